"""The run directory fails: read-only, full from the start, full mid-run, or the writer dies mid-write.

Promise: a clear error (exit code 4) *before* any API call is spent when the directory is unusable from the
start; a clear error and a still-loadable previous checkpoint when it breaks mid-run; never a torn file.
"""

from __future__ import annotations

import contextlib
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bbt_client.run import checkpoint as ckpt
from bbt_client.errors import CheckpointError
from bbt_client.run.job import TuningJob
from tests.reliability.helpers import REPO, child_env, tiny_config, tune_args


@contextlib.contextmanager
def _tmpfs(where: Path, *options: str):
    """Mount a small tmpfs (needs root, as in CI's container); skip the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=1m", *options)), "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the RLIMIT_FSIZE tests cover full disks")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _cli(args: list[str], preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbt_client.cli", *args], capture_output=True, text=True,
                          env=child_env(), cwd=REPO, timeout=120, preexec_fn=preexec)


def test_read_only_output_directory_fails_before_any_call(proxy, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro") as ro:
        r = _cli(tune_args(proxy.url, ro / "run"))
    assert r.returncode == 4, r.stderr
    assert "Read-only file system" in r.stderr and "run directory error" in r.stderr
    assert sum(proxy.received.values()) == 0  # not even /v1/model: nothing was spent


def test_full_disk_at_start_fails_before_any_call(proxy, tmp_path):
    """RLIMIT_FSIZE=1 makes every regular-file write of 2+ bytes fail like a full disk (EFBIG), no root needed."""
    def no_space() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))

    r = _cli(tune_args(proxy.url, tmp_path / "run"), preexec=no_space)
    assert r.returncode == 4, r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr
    assert sum(proxy.received.values()) == 0
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*.tmp"))


async def test_disk_fills_mid_run_clear_error_then_resume_finishes_identically(tiny_server, tmp_path):
    with _tmpfs(tmp_path / "small") as disk:
        run = disk / "run"
        filler = disk / "filler"

        def fill_disk(p) -> None:
            if p.event == "generation" and p.generation == 3 and not filler.exists():
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()

        with pytest.raises(CheckpointError, match="No space left"):
            await TuningJob(tiny_config(tiny_server, run), progress=fill_disk).run()
        saved = ckpt.load_checkpoint(run)  # the last good checkpoint survived the failed write
        assert saved["loop"].generation in (1, 2, 3) and not list(run.glob(".*.tmp"))
        filler.unlink()
        resumed = await TuningJob(tiny_config(tiny_server, run)).run(resume=True)
    # The generation whose checkpoint could not be written was paid for: it stays counted, as lost work.
    lost = int(resumed.lost_to_crashes["calls"])
    assert lost >= 4 * (3 - saved["loop"].generation)  # at least popsize 4 per generation the checkpoint missed
    # An uninterrupted run with the budget that was left ends exactly where the resumed run ends.
    reference = await TuningJob(tiny_config(tiny_server, tmp_path / "ref", calls=40 - lost)).run()
    keys = ("generations", "test_accuracy", "best_dev_accuracy", "prompt_sha256")
    assert {k: getattr(resumed, k) for k in keys} == {k: getattr(reference, k) for k in keys}
    assert resumed.api_calls_used == reference.api_calls_used + lost <= 40


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    from bbt_client.run import checkpoint as ckpt
    run = Path(sys.argv[1])
    i = 0
    while True:
        i += 1
        arr = np.random.default_rng(i).standard_normal(2_000_000).astype(np.float32)  # 8 MB per write
        ckpt.save_checkpoint(run, {"gen": i, "arr": arr})
        print(i, flush=True)
""")


def test_sigkill_during_checkpoint_writes_never_leaves_an_unreadable_checkpoint(tmp_path):
    rng = random.Random(0)
    for attempt in range(5):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(run)], stdout=subprocess.PIPE, text=True,
                                env=child_env(), cwd=REPO)
        try:
            assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
            time.sleep(rng.uniform(0.0, 0.3))  # then die at an arbitrary point, likely mid-write
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        state = ckpt.load_checkpoint(run)
        expected = np.random.default_rng(state["gen"]).standard_normal(2_000_000).astype(np.float32)
        np.testing.assert_array_equal(state["arr"], expected)
