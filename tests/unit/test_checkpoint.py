import os

import numpy as np
import pytest

from bbt_client import checkpoint as ckpt
from bbt_client.errors import CheckpointError


def test_round_trip(tmp_path):
    state = {"a": np.arange(3), "b": b"bytes"}
    ckpt.save_checkpoint(tmp_path, state)
    back = ckpt.load_checkpoint(tmp_path)
    assert back["b"] == b"bytes" and np.array_equal(back["a"], np.arange(3))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, {"gen": 1})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, {"gen": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path) == {"gen": 1}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_garbage_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / ckpt.CHECKPOINT_FILE).write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        ckpt.load_checkpoint(tmp_path)


def test_unwritable_output_fails_before_work(tmp_path):
    """Even as root: an output path under a regular file cannot be created."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create output directory"):
        ckpt.ensure_writable_dir(blocker / "run")
