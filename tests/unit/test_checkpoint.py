import json
import os
from pathlib import Path

import numpy as np
import pytest

from bbt_client.run import checkpoint as ckpt
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


def _without_clock(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("wall_seconds", "config", "prompt_sha256")}


def _same(got, want) -> bool:
    """Equal, floats to 1e-9 relative: OpenBLAS picks its kernels by CPU, and the fixture's differ from an AMD
    CPU's in the last bit (so the prompt's hash is left out; its shape and every score are compared)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, float) and isinstance(got, (int, float)):
        return abs(got - want) <= 1e-9 * max(1.0, abs(want))
    return got == want


async def test_a_run_checkpointed_by_the_flat_layout_resumes_on_the_same_trajectory(tmp_path):
    """Module paths moved (``bbt_client.job`` -> ``bbt_client.run.job``, ...); a checkpoint pickled before the
    move still loads and continues as the old code continued it."""
    import shutil

    from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
    from bbt_client.run.job import tune
    from bbt_client.tasks.datasets import load_task_data
    from tests.unit.toy_backend import ToyBackend

    fixture = Path(__file__).parents[1] / "fixtures" / "run-0.1-layout"
    run = shutil.copytree(fixture / "run-30-calls", tmp_path / "run")
    task = TaskConfig(name="sst2", shots=4, test_limit=40)
    data = load_task_data(task, 7)
    labels = {t: int(y) for s in (data.train, data.dev, data.test) for t, y in zip(s.texts, s.labels)}
    cfg = TuneConfig(endpoint=EndpointConfig(url="http://toy.invalid"), task=task, method="bbtv2", seed=7,
                     budget={"calls": 60}, eval_every=2, out=run,
                     method_options={"prompt_tokens": 2, "intrinsic_dim": 10, "popsize": 6,
                                     "calibrate": True})  # the default it was made with, pinned
    result = await tune(cfg, backend=ToyBackend(labels), resume=True)

    expected = json.loads((fixture / "resumed-result.json").read_text())
    got = {k: v for k, v in result.model_dump(mode="json").items() if k in expected}  # fields added since: not in it
    assert _same(_without_clock(got), _without_clock(expected)), (got, expected)
    assert result.scoring["strategy"] == "full-vocab" and result.label_score_coverage == 1.0
    assert result.bare_template is False
    got_rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    want_rows = [json.loads(line) for line in (fixture / "resumed-history.jsonl").read_text().splitlines()]
    assert _same([_without_clock(r) for r in got_rows], [_without_clock(r) for r in want_rows])
    assert result.generations > 4  # it went on past the fixture's generations
