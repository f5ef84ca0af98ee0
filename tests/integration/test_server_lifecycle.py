"""Queueing, overload and process lifecycle: the CLI starts, serves, and drains on SIGTERM with exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from bbt_client.protocol import ScoreRequest, ShallowPrompt, Tensor
from server_stub.__main__ import parse_args
from server_stub.engine.worker import ModelWorker
from server_stub.errors import Overloaded
from server_stub.gate import RequestGate

REPO = Path(__file__).resolve().parents[2]


async def test_worker_runs_jobs_in_order_and_refuses_when_queue_full():
    gate = RequestGate()
    worker = ModelWorker(max_queue=1, before_job=gate)
    order: list[int] = []

    def job(i: int) -> int:
        order.append(i)
        return i * 10

    try:
        first = asyncio.ensure_future(worker.submit(job, 0))
        await asyncio.get_running_loop().run_in_executor(None, gate.wait_entered, 1)  # job 0 holds the worker
        second = asyncio.ensure_future(worker.submit(job, 1))
        await asyncio.sleep(0)  # one loop turn: the task runs up to its await, job 1 is now queued
        assert worker.pending == 1
        with pytest.raises(Overloaded):
            await worker.submit(job, 2)
        gate.release(2)
        assert await first == 0 and await second == 10
        assert order == [0, 1]
    finally:
        gate.open()
        worker.close()


async def test_worker_delivers_exceptions_to_the_caller():
    worker = ModelWorker()
    try:
        with pytest.raises(ZeroDivisionError):
            await worker.submit(lambda: 1 / 0)
        assert await worker.submit(lambda: "still alive") == "still alive"
    finally:
        worker.close()


def test_cli_defaults_and_api_key_from_env(monkeypatch):
    opts = parse_args(["--model", "default"])
    assert (opts.host, opts.port, opts.device, opts.api_key) == ("127.0.0.1", 8080, "auto", None)
    monkeypatch.setenv("MY_KEY", "k-123")
    assert parse_args(["--api-key-env", "MY_KEY"]).api_key == "k-123"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(SystemExit):
        parse_args(["--api-key-env", "MY_KEY"])


def _read_until(stream, marker: str) -> list[str]:
    """Lines of ``stream`` up to and including the first that contains ``marker`` (EOF: assertion error)."""
    lines = []
    for line in stream:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never appeared; output was:\n{''.join(lines)}")


def _score_body(C: int = 3, N: int = 4) -> str:
    arr = np.random.default_rng(0).normal(0, 0.5, (C, 4, 32)).astype(np.float32)
    return ScoreRequest(template="{text} It was {mask} .", texts=["a sentence to score"] * N,
                        label_words=["great", "bad"],
                        prompt=ShallowPrompt(candidates=Tensor.from_array(arr))).model_dump_json()


def test_sigterm_finishes_in_flight_requests_then_exits_zero(tiny_bert_dir, tmp_path):
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TEST_KEY": "abc"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server_stub", "--model", str(tiny_bert_dir), "--port", "0", "--threads", "1",
         "--api-key-env", "TEST_KEY", "--test-gate", str(fifo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[1]
        headers = {"Authorization": "Bearer abc", "content-type": "application/json"}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/score", content=_score_body(), headers=headers, timeout=120)
            log = _read_until(proc.stderr, "test-gate: holding job 1")  # the request is inside the model now
            proc.send_signal(signal.SIGTERM)
            log += _read_until(proc.stderr, "shutting down")  # the server has begun its shutdown...
            assert not pending.done()  # ...and the request is still held, so it is in flight by construction
            with open(fifo, "wb") as gate:
                gate.write(b"x")  # let the held request finish
            resp = pending.result()
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["sequences"] == 3 * 4
        assert proc.wait(timeout=60) == 0
        err = "".join(log) + proc.stderr.read()
        assert "abc" not in err  # the API key is never logged
        assert "a sentence to score" not in err  # nor request bodies
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_event_loop_stays_responsive_while_the_model_works(tiny_bert_dir):
    from server_stub.testing import run_server

    gate = RequestGate()
    with run_server(tiny_bert_dir, threads=1, before_job=gate) as url:
        try:
            with ThreadPoolExecutor(1) as pool:
                heavy = pool.submit(httpx.post, url + "/v1/score", content=_score_body(),
                                    headers={"content-type": "application/json"}, timeout=120)
                gate.wait_entered(1)  # the model thread is busy with the score request, and stays so
                assert httpx.get(url + "/v1/health", timeout=30).status_code == 200
                assert httpx.get(url + "/v1/model", timeout=30).status_code == 200
                assert not heavy.done()
                gate.release()
                assert heavy.result().status_code == 200
        finally:
            gate.open()


def test_full_queue_answers_503_overloaded_and_later_requests_succeed(tiny_bert_dir):
    from server_stub.testing import run_server

    gate = RequestGate()
    body = _score_body()
    post = lambda: httpx.post(url + "/v1/score", content=body,  # noqa: E731
                              headers={"content-type": "application/json"}, timeout=120)
    with run_server(tiny_bert_dir, threads=1, max_queue=1, before_job=gate) as url:
        try:
            with ThreadPoolExecutor(3) as pool:
                held = pool.submit(post)
                gate.wait_entered(1)  # request 1 holds the model; the queue (size 1) is empty
                others = [pool.submit(post), pool.submit(post)]
                # Nothing can finish while the gate is shut, so the first answer is the refusal: one of the two
                # found the queue already full; the other is queued.
                done, _ = wait(others, return_when=FIRST_COMPLETED)
                refused = done.pop().result()
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
                gate.release(2)
                queued = next(f for f in others if f.result() is not refused).result()
                assert held.result().status_code == 200 and queued.status_code == 200
            gate.release()
            assert post().status_code == 200
        finally:
            gate.open()


def _usage(url: str) -> dict:
    return httpx.get(url + "/v1/usage", timeout=30).json()


def _until(check, what: str, tries: int = 500) -> None:
    """Poll a server-side fact until it holds (each poll is a round trip; no sleeps, no elapsed-time limit)."""
    for _ in range(tries):
        if check():
            return
    raise AssertionError(f"never observed: {what}")


def test_a_queued_request_whose_client_hangs_up_is_dropped_not_computed(tiny_bert_dir):
    from server_stub.testing import run_server

    gate = RequestGate()
    body = _score_body()
    with run_server(tiny_bert_dir, threads=1, before_job=gate) as url:
        port = int(url.rsplit(":", 1)[1])
        try:
            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(httpx.post, url + "/v1/score", content=body,
                                   headers={"content-type": "application/json"}, timeout=120)
                gate.wait_entered(1)  # request 1 holds the model thread
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # request 2, then hang up
                    s.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
                    _until(lambda: _usage(url)["queue_depth"] == 1, "request 2 queued behind request 1")
                _until(lambda: _usage(url)["queue_depth"] == 0, "request 2 leaving the queue after the hang-up")
                gate.release()
                assert held.result().status_code == 200
            gate.release()
            assert httpx.post(url + "/v1/score", content=body, headers={"content-type": "application/json"},
                              timeout=120).status_code == 200
            assert gate.entered == 2  # requests 1 and 3 reached the model; request 2 never did
            assert _usage(url)["requests"] == 2
        finally:
            gate.open()


def test_spawn_server_serves_then_stops(tiny_bert_dir):
    from server_stub.testing import spawn_server

    with spawn_server(tiny_bert_dir, "--threads", "1", env={"OMP_NUM_THREADS": "1"}) as url:
        assert httpx.get(url + "/v1/health").json()["status"] == "ok"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/health", timeout=5)


@contextmanager
def _server_on_a_stdin_pipe(model_dir) -> Iterator[subprocess.Popen]:
    """A server started with ``--exit-with-stdin`` and a pipe on its stdin, as spawn_server starts it; ready.
    On the way out the pipe is closed and a server still running is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server_stub", "--model", str(model_dir), "--port", "0", "--threads", "1",
         "--exit-with-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready http://127.0.0.1:"), line + proc.stderr.read()
        yield proc
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exit_with_stdin_stops_the_server_when_its_stdin_closes(tiny_bert_dir):
    with _server_on_a_stdin_pipe(tiny_bert_dir) as proc:
        proc.stdin.close()  # what the OS does to the pipe when the parent holding it dies
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in proc.stderr.read()


def test_sigterm_with_stdin_still_open_exits_zero_without_a_fatal_error(tiny_bert_dir):
    """spawn_server's normal stop: SIGTERM while the parent still holds the pipe. The stdin watcher was then
    blocked in a buffered read, and interpreter shutdown died on that buffer's lock ("Fatal Python error:
    _enter_buffered_busy", exit by abort), printed in the middle of `make tune`."""
    with _server_on_a_stdin_pipe(tiny_bert_dir) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "Fatal Python error" not in proc.stderr.read()


def test_spawned_server_does_not_outlive_a_killed_parent(tiny_bert_dir):
    """A sweep killed by the OOM killer used to leave its servers running (~0.8 GB and a port each)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom server_stub.testing import spawn_server\n"
         f"with spawn_server({str(tiny_bert_dir)!r}, '--threads', '1') as url:\n"
         "    print(url, flush=True)\n    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        url = parent.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        assert httpx.get(url + "/v1/health").json()["status"] == "ok"
        parent.kill()  # SIGKILL: no finally, no atexit in the parent
        parent.wait()
        for _ in range(600):  # the server drains and exits; poll until it refuses connections
            try:
                httpx.get(url + "/v1/health", timeout=5)
            except httpx.ConnectError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server outlived its killed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
