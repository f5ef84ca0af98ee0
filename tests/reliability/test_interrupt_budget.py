"""Ctrl-C is an interrupt, not a crash: ``bbt tune`` exits 130 naming the resume command, and the request it cut
off is charged what the server reports having served of it, never more than was reserved.

The generation is split into two requests (the server takes 2 candidates per request): the test holds the first in
the server's gate, interrupts the client while the second waits in the queue (the server then drops it, unserved),
and only then lets the first finish. The server served 2 of the 4 calls reserved, whatever the machine's speed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

from tests.reliability.helpers import REPO, GatedServer, child_env, cli, tune_args


def _until(condition, what: str, guard_s: float = 60.0) -> None:
    """Wait for an event the server reports (the guard only stops a hung test)."""
    deadline = time.monotonic() + guard_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def _ctrl_c_delivered() -> None:
    """In the client before it starts: SIGINT back to its default. A shell without job control starts background
    commands with SIGINT ignored and children inherit that, while a user's Ctrl-C reaches a foreground process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_request_is_settled_by_what_the_server_served(tiny_bert_dir, tmp_path):
    server = GatedServer(tiny_bert_dir, tmp_path / "gate", "--max-candidates", "2")
    out = tmp_path / "run"
    client: list[subprocess.Popen] = []
    interrupted = threading.Event()  # set once the abandoned half has left the queue, before the held half is freed

    errors: list[BaseException] = []

    def on_job(k: int) -> None:
        try:  # an error here must not stop the gate releasing later jobs: it is reported below instead
            # the verbalizer fit (2), zero-shot and bare-template calls (1 candidate each) are done: this job is
            # generation 1's first half
            if interrupted.is_set() or server.usage()["candidates"] != 4:
                return
            _until(lambda: server.usage()["queue_depth"] >= 1, "the second half never queued")
            client[0].send_signal(signal.SIGINT)
            client[0].wait(60)
            _until(lambda: server.usage()["queue_depth"] == 0, "the server kept the abandoned request")
            interrupted.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        server.on_job = on_job
        args = tune_args(server.url, out, calls=30, extra=["--method", "bbt"])
        client.append(subprocess.Popen([sys.executable, "-m", "bbt_client.cli", *args], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO,
                                       preexec_fn=_ctrl_c_delivered))
        _, stderr = client[0].communicate(timeout=300)
        assert interrupted.wait(120) and client[0].returncode == 130, (errors, stderr)
        assert f"continue with bbt tune --resume {out}" in stderr
        _until(lambda: server.usage()["candidates"] == 6, "the held half was not served")  # 2 + 1 + 1 + 2
        ops = [json.loads(line)["op"] for line in (out / "budget.wal").read_text().splitlines()]
        assert "interrupt" in ops

        r = cli("tune", "--resume", str(out), "--json")
        assert r.returncode == 0, r.stderr
        final = json.loads(r.stdout.strip().splitlines()[-1])
        assert final["lost_to_interrupts"]["calls"] == 2 and final["lost_to_crashes"]["calls"] == 0
        assert final["api_calls_used"] == server.usage()["candidates"] <= 30  # the client's count is the server's
        report = cli("report", "--run", str(out))
        assert report.returncode == 0
        assert "2 calls and" in report.stdout and "interrupt (Ctrl-C)" in report.stdout
        assert "crash" not in report.stdout and not errors
    finally:
        server.stop()
