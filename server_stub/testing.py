"""Start a real server for tests and benchmarks; both bind 127.0.0.1 on a free port and yield its URL.

- :func:`run_server`: in-process, its own event loop on a background thread (cheap, shares torch threads).
- :func:`spawn_server`: ``python -m server_stub`` as a subprocess (own process, own cores: for timing).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator

from server_stub.app import ServerOptions, serve
from server_stub.engine.model import PromptedLM


@contextmanager
def run_server(model_path: str | Path = "default", *, lm: PromptedLM | None = None, startup_timeout: float = 120.0,
               **opts) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``); stop gracefully on exit.

    ``opts`` are :class:`ServerOptions` fields (``api_key``, ``max_body_bytes``, ``threads`` ...).
    Pass ``lm`` to reuse an already loaded model (it is then used by this server's worker only).
    """
    known = {f.name for f in fields(ServerOptions)}
    unknown = set(opts) - known
    if unknown:
        raise TypeError(f"unknown server options {sorted(unknown)}; known: {sorted(known)}")
    options = ServerOptions(model=str(model_path), host="127.0.0.1", port=0, **opts)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    port: list[int] = []
    failure: list[BaseException] = []

    def on_ready(p: int) -> None:
        port.append(p)
        ready.set()

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(options, stop, on_ready=on_ready, lm=lm))
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="bbt-test-server", daemon=True)
    thread.start()
    if not ready.wait(startup_timeout) or failure:
        if failure:
            raise RuntimeError(f"test server failed to start: {failure[0]!r}") from failure[0]
        raise TimeoutError(f"test server did not start within {startup_timeout} s")
    try:
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)


@contextmanager
def spawn_server(model: str | Path = "default", *cli_args: str, startup_timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``python -m server_stub --model MODEL --port 0 *cli_args``; yield its URL; SIGTERM it on exit.

    ``cli_args`` are extra CLI flags, e.g. ``"--threads", "2"``. The server's log goes to stderr. The server
    also stops when its stdin, a pipe only this process holds, closes: if this process is killed (SIGKILL, the
    OOM killer) the server does not outlive it.
    """
    repo = str(Path(__file__).resolve().parents[1])
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, child_env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "server_stub", "--model", str(model), "--port", "0", "--exit-with-stdin", *cli_args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env)
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(startup_timeout)
        line = ready[0] if ready else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"server did not start (exit code {proc.poll()}); see its log above: {cmd}")
        yield line.split()[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdin.close()
        proc.stdout.close()

