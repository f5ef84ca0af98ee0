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



#: Where ``make test-vllm`` installs vLLM (CPU); ``BBT_VLLM_VENV`` points elsewhere.
VLLM_VENV = Path(os.environ.get("BBT_VLLM_VENV", Path(__file__).resolve().parents[1] / ".venv-vllm"))


def vllm_python() -> Path | None:
    """The vLLM venv's interpreter, or None when vLLM is not installed there."""
    py = VLLM_VENV / "bin" / "python"
    return py if py.exists() and (VLLM_VENV / ".bbt-vllm-installed").exists() else None


@contextmanager
def spawn_vllm(model: str | Path, *cli_args: str, served_name: str = "tiny-llama", startup_timeout: float = 300.0,
               log_path: Path | None = None) -> Iterator[str]:
    """Run a real vLLM (CPU) OpenAI server on ``model`` with ``--enable-prompt-embeds``; yield its URL.

    Its own process group (API server, engine core and worker): SIGTERM to the group on exit. A 1 GiB KV cache
    (``VLLM_CPU_KVCACHE_SPACE``): vLLM's CPU default sizes it to most of the machine's memory.
    """
    import socket
    import time
    import urllib.request

    py = vllm_python()
    if py is None:
        raise FileNotFoundError(f"no vLLM in {VLLM_VENV}: run `make test-vllm` (or tests/vllm/install.sh)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)  # vLLM's venv, not this one's packages
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
           served_name, "--enable-prompt-embeds", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           *cli_args]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {proc.returncode} while starting; log: {log_path}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not answer within {startup_timeout} s; log: {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_path:
            log.close()


def vllm_counters(url: str) -> dict[str, float]:
    """vLLM's own counts from its ``/metrics``: prompt and generated tokens, successful ``/v1/completions`` calls
    (what a client's call and token counts are checked against)."""
    import re
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for name, pattern in [("prompt_tokens", r"^vllm:prompt_tokens_total\{[^}]*\} (\S+)"),
                          ("generation_tokens", r"^vllm:generation_tokens_total\{[^}]*\} (\S+)"),
                          ("calls", r'^http_requests_total\{handler="/v1/completions",method="POST",status="2xx"\} (\S+)')]:
        m = re.search(pattern, text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out
