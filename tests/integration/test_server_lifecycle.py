"""Queueing, overload and process lifecycle: the CLI starts, serves, and drains on SIGTERM with exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from bbt_client.protocol import ScoreRequest, ShallowPrompt, Tensor
from server_stub.__main__ import parse_args
from server_stub.batching import ModelWorker
from server_stub.errors import Overloaded

REPO = Path(__file__).resolve().parents[2]


async def test_worker_runs_jobs_in_order_and_refuses_when_queue_full():
    worker = ModelWorker(max_queue=1)
    gate = threading.Event()
    order: list[int] = []

    def job(i: int) -> int:
        if i == 0:
            gate.wait(10)
        order.append(i)
        return i * 10

    try:
        first = asyncio.ensure_future(worker.submit(job, 0))
        await asyncio.sleep(0.2)  # the worker is now blocked inside job 0; the queue is empty
        second = asyncio.ensure_future(worker.submit(job, 1))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await worker.submit(job, 2)
        gate.set()
        assert await first == 0 and await second == 10
        assert order == [0, 1]
    finally:
        gate.set()
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


def test_sigterm_finishes_in_flight_requests_then_exits_zero(tiny_bert_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server_stub", "--model", str(tiny_bert_dir), "--port", "0", "--threads", "1",
         "--api-key-env", "TEST_KEY"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**env, "TEST_KEY": "abc"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[1]
        # Enough work that the request is still running when SIGTERM arrives.
        arr = np.random.default_rng(0).normal(0, 0.5, (40, 4, 32)).astype(np.float32)
        req = ScoreRequest(template="{text} It was {mask} .", texts=["a long enough sentence to score " * 8] * 40,
                           label_words=["great", "bad"], prompt=ShallowPrompt(candidates=Tensor.from_array(arr)))
        headers = {"Authorization": "Bearer abc", "content-type": "application/json"}
        with ThreadPoolExecutor(1) as pool:
            def post():
                r = httpx.post(url + "/v1/score", content=req.model_dump_json(), headers=headers, timeout=120)
                return r, time.monotonic()

            pending = pool.submit(post)
            time.sleep(0.5)
            signalled_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            resp, answered_at = pending.result()
        assert resp.status_code == 200, resp.text
        assert answered_at > signalled_at, "request finished before SIGTERM: make it bigger"
        assert resp.json()["usage"]["sequences"] == 40 * 40
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        assert "shutting down" in err and "abc" not in err  # the API key is never logged
        assert "sentence to score" not in err  # nor request bodies
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _heavy_request(C: int = 48, N: int = 48) -> str:
    arr = np.random.default_rng(1).normal(0, 0.5, (C, 4, 32)).astype(np.float32)
    return ScoreRequest(template="{text} It was {mask} .", texts=["a long enough sentence to score " * 8] * N,
                        label_words=["great", "bad"],
                        prompt=ShallowPrompt(candidates=Tensor.from_array(arr))).model_dump_json()


def test_event_loop_stays_responsive_while_the_model_works(tiny_bert_dir):
    from server_stub.testing import run_server

    with run_server(tiny_bert_dir, threads=1) as url:
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            heavy = pool.submit(httpx.post, url + "/v1/score", content=_heavy_request(),
                                headers={"content-type": "application/json"}, timeout=120)
            time.sleep(0.3)
            t0 = time.monotonic()
            assert httpx.get(url + "/v1/health", timeout=10).status_code == 200
            health_latency = time.monotonic() - t0
            assert heavy.result().status_code == 200
            heavy_time = time.monotonic() - started
        assert health_latency < 0.5 < heavy_time, (health_latency, heavy_time)


def test_full_queue_answers_503_overloaded_and_later_requests_succeed(tiny_bert_dir):
    from server_stub.testing import run_server

    with run_server(tiny_bert_dir, threads=1, max_queue=1) as url:
        body = _heavy_request(C=24, N=24)
        post = lambda: httpx.post(url + "/v1/score", content=body,  # noqa: E731
                                  headers={"content-type": "application/json"}, timeout=120)
        with ThreadPoolExecutor(5) as pool:
            statuses = [f.result() for f in [pool.submit(post) for _ in range(5)]]
        codes = sorted(r.status_code for r in statuses)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        assert all(r.json()["error"]["code"] == "overloaded" for r in statuses if r.status_code == 503)
        assert post().status_code == 200


def test_spawn_server_serves_then_stops(tiny_bert_dir):
    from server_stub.testing import spawn_server

    with spawn_server(tiny_bert_dir, "--threads", "1", env={"OMP_NUM_THREADS": "1"}) as url:
        assert httpx.get(url + "/v1/health").json()["status"] == "ok"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/health", timeout=5)
