"""Processes die mid-job: the server (SIGKILL, then restarted) and the client (SIGKILL, then ``--resume``).

The yardstick is an uninterrupted run of the same seed: same calls spent, same prompt, same accuracies.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import numpy as np

from bbt_client.backends.http import RetryPolicy
from bbt_client.backends.server import ServerBackend
from bbt_client.run.job import TuningJob
from tests.reliability.helpers import REPO, child_env, cli, tiny_config, tune_args

#: Patient enough to outlast a server restart on a busy CPU (waits are capped at 0.5 s; the count is a hang guard).
PATIENT = RetryPolicy(max_retries=400, backoff_initial_s=0.05, backoff_max_s=0.5, jitter_s=0.05)

_SAME = ("api_calls_used", "generations", "best_dev_accuracy", "test_accuracy", "zero_shot_test_accuracy",
         "best_generation", "stop_reason", "prompt_sha256")


def _same_outcome(a: dict, b: dict) -> None:
    assert {k: a[k] for k in _SAME} == {k: b[k] for k in _SAME}


async def _run(cfg, backend: ServerBackend, progress=None):
    try:
        return await TuningJob(cfg, backend=backend, progress=progress).run()
    finally:
        await backend.aclose()


async def test_server_killed_mid_job_then_restarted_job_finishes_without_double_counting(server_process, tmp_path):
    sp = server_process()
    reference = await _run(tiny_config(sp.url, tmp_path / "ref"), ServerBackend(sp.url, retry=PATIENT, timeout=30))
    backend = ServerBackend(sp.url, retry=PATIENT, timeout=30)
    killed = threading.Event()
    restarted = threading.Event()

    def progress(p) -> None:
        if p.event == "generation" and p.generation == 3:
            sp.kill()  # synchronous: the server is dead before the job sends its next request
            killed.set()

    def restarter() -> None:
        killed.wait(120)
        while backend.http.attempts <= backend.http.requests:  # until the client has met the dead server
            threading.Event().wait(0.01)
        sp.start()
        restarted.set()

    t = threading.Thread(target=restarter, daemon=True)
    t.start()
    result = await _run(tiny_config(sp.url, tmp_path / "killed"), backend, progress)
    t.join(120)
    assert restarted.is_set() and sp.starts == 2
    # Retries happened (attempts > logical requests), yet the budget counts each logical call once.
    assert backend.http.attempts > backend.http.requests
    _same_outcome(result.model_dump(), reference.model_dump())
    assert result.api_calls_used <= 40
    assert (tmp_path / "killed" / "prompt.npy").read_bytes() == (tmp_path / "ref" / "prompt.npy").read_bytes()


def test_client_sigkilled_mid_run_resumes_to_the_uninterrupted_result(tiny_server, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bbt_client.cli", *tune_args(tiny_server, run, calls=60)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env(), cwd=REPO)
    try:
        killed_at = None
        for line in proc.stdout:
            event = json.loads(line)
            if event.get("event") == "generation" and event["generation"] >= 4:
                proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: like an OOM kill or a power cut
                killed_at = event["generation"]
                break
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    assert not (run / "result.json").exists()

    resumed = cli("tune", "--resume", str(run), "--json")
    assert resumed.returncode == 0, resumed.stderr
    lines = [json.loads(x) for x in resumed.stdout.strip().splitlines()]
    start = lines[0]
    assert start["event"] == "start" and start["generation"] >= killed_at - 1  # lost at most the one in flight
    final = lines[-1]
    # Work the kill cut short (a request in flight, a generation not yet checkpointed) stays counted.
    lost = int(final["lost_to_crashes"]["calls"])
    ref = cli(*tune_args(tiny_server, tmp_path / "ref", calls=60 - lost))
    assert ref.returncode == 0, ref.stderr
    reference = json.loads(ref.stdout.strip().splitlines()[-1])
    _same_outcome({**final, "api_calls_used": final["api_calls_used"] - lost}, reference)
    np.testing.assert_array_equal(np.load(run / "prompt.npy"), np.load(tmp_path / "ref" / "prompt.npy"))
