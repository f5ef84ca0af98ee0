"""Atomic, versioned files for a run directory: a crash mid-write never leaves a torn file.

Every write goes to a temporary file in the same directory, is fsynced, then renamed over the target
(``os.replace`` is atomic on POSIX), and the directory is fsynced so the rename survives power loss.

Checkpoints are pickles (they hold the CMA-ES state, which pycma pickles). Only load checkpoints from
run directories you trust: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from bbt_client.errors import CheckpointError
from bbt_client.run.ledger import LEDGER_FILE

CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pkl"

#: Where modules whose classes a checkpoint pickles lived in bbt-client 0.1's flat layout, so runs
#: checkpointed then still resume.
_MOVED_MODULES = {
    "bbt_client.job": "bbt_client.run.job",
    "bbt_client.budget": "bbt_client.run.budget",
    "bbt_client.results": "bbt_client.run.results",
    "bbt_client.ledger": "bbt_client.run.ledger",
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(_MOVED_MODULES.get(module, module), name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` and prove we can write and rename in it, before any budget is spent."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create output directory {path}: {exc.strerror or exc}") from exc
    atomic_write_bytes(path / ".write-test", b"ok")
    (path / ".write-test").unlink(missing_ok=True)
    return path


def refuse_existing_run(run_dir: Path) -> None:
    """A new run must never overwrite another run's checkpoint, results or budget ledger. A directory holding
    only a config.json (a run refused before it spent anything) is free for the corrected command."""
    if any((Path(run_dir) / f).exists() for f in (CHECKPOINT_FILE, "result.json", LEDGER_FILE)):
        raise CheckpointError(f"{run_dir} already holds a run: pick another --out, or continue that run with "
                              f"`bbt tune --resume {run_dir}` (Python: resume=True; budgets may change on a resume)")


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    payload = {"version": CHECKPOINT_VERSION, "state": state}
    atomic_write_bytes(Path(run_dir) / CHECKPOINT_FILE, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for missing or foreign files."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume (start without --resume)")
    try:
        with path.open("rb") as f:
            payload = _Unpickler(f).load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not ours or is damaged
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {payload.get('version') if isinstance(payload, dict) else '?'}, "
            f"this bbt-client reads version {CHECKPOINT_VERSION}"
        )
    return payload["state"]
