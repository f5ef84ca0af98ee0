"""``python -m server_stub --model PATH|default --port 8080``: serve a local LM as a bbt black box.

Ctrl-C / SIGTERM: stop accepting, finish in-flight requests, exit 0. With ``--exit-with-stdin`` the end of
stdin does the same: a parent that starts the server with a pipe on its stdin (``server_stub.testing.spawn_server``)
takes it down when it dies, SIGKILL and the OOM killer included, instead of leaving it holding memory and a port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

from server_stub.app import ServerOptions, serve
from server_stub.engine.int8 import OUTLIER_CHANNELS
from server_stub.engine.loading import QUANTIZATIONS
from server_stub.gate import FifoGate


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[ServerOptions, argparse.Namespace]:
    d = ServerOptions()
    p = argparse.ArgumentParser(prog="python -m server_stub", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d.model, help="local HF checkpoint directory, or 'default' (bundled MiniLM)")
    p.add_argument("--host", default=d.host, help="bind address (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"],
                   help="weights and activations: float32 (default); float16/bfloat16 on CUDA (bfloat16 also runs on "
                        "a CPU, but slower than float32 there unless the CPU has AMX)")
    p.add_argument("--quantize", default=d.quantize, choices=list(QUANTIZATIONS),
                   help="int8: int8 linear layers, a scale per weight row and a range per token, 16 outlier input "
                        "channels per layer kept float32 (CPU only; how much faster than float32 depends on the "
                        "CPU's int8 GEMM -- docs/server.md; BBTv2 tuned against it on AG News within a point "
                        "of float32)")
    p.add_argument("--int8-outliers", type=int, metavar="K",
                   help=f"with --quantize int8: input channels per layer kept float32 (default {OUTLIER_CHANNELS}; 0 "
                        "rounds them too: faster on a CPU without VNNI, but BBTv2 lost ~5 points of AG News to it)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (visible in ps; prefer --api-key-env)")
    key.add_argument("--api-key-env", metavar="VAR", help="read the API key from environment variable VAR")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="tokens (incl. padding) per model micro-batch (default: 2048 on a CPU, 8192 on a GPU)")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-candidates", type=int, default=d.max_candidates)
    p.add_argument("--max-texts", type=int, default=d.max_texts)
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="queued requests before 503 overloaded")
    p.add_argument("--coalesce-requests", type=int, default=d.coalesce_requests,
                   help="most queued /v1/score requests (e.g. from concurrent jobs) one model pass serves together;"
                        " default 1 (off: answers reproducible bit for bit); e.g. 16 on a server shared by many jobs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    face = p.add_argument_group("OpenAI/vLLM face", "/v1/models, /v1/completions, /v1/chat/completions, /tokenize")
    face.add_argument("--served-model-name", default=None,
                      help="the model name the face answers to (default: the model folder's name)")
    face.add_argument("--enable-prompt-embeds", action="store_true",
                      help="accept vLLM's prompt_embeds on /v1/completions (as vLLM's flag of that name)")
    face.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                      help="most logprobs/top_logprobs a request may ask for (vLLM's default 20)")
    face.add_argument("--logprobs-mode", default=d.logprobs_mode, choices=["raw_logprobs", "processed_logprobs"],
                      help="raw (default, as vLLM): the model's own log-probs whatever logit_bias says; processed (as "
                           "OpenAI): after logit_bias/allowed_token_ids")
    face.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                      help="Jinja chat template for /v1/chat/completions, a file or the text itself (default: the "
                           "tokenizer's; without one, chat requests are refused as vLLM refuses them)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--exit-with-stdin", action="store_true",
                   help="stop as on SIGTERM when stdin reaches its end (for a parent process that holds the pipe)")
    p.add_argument("--test-gate", metavar="FIFO", help=argparse.SUPPRESS)  # tests only: hold each job (FifoGate)
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = a.api_key
    if a.api_key_env:
        api_key = os.environ.get(a.api_key_env)
        if not api_key:
            p.error(f"--api-key-env {a.api_key_env}: that environment variable is empty or unset")
    if a.max_logprobs < 0:
        p.error("--max-logprobs must be >= 0")
    if a.int8_outliers is not None and (a.quantize != "int8" or a.int8_outliers < 0):
        p.error("--int8-outliers K needs --quantize int8 and K >= 0")
    for name in ("max_body_bytes", "max_batch_tokens", "max_prompt_tokens", "max_candidates", "max_texts", "max_queue",
                 "coalesce_requests"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return ServerOptions(
        model=a.model, host=a.host, port=a.port, device=a.device, dtype=a.dtype, quantize=a.quantize, api_key=api_key,
        int8_outliers=d.int8_outliers if a.int8_outliers is None else a.int8_outliers,
        max_body_bytes=a.max_body_bytes, max_batch_tokens=a.max_batch_tokens,
        max_prompt_tokens=a.max_prompt_tokens, max_candidates=a.max_candidates, max_texts=a.max_texts,
        max_queue=a.max_queue, coalesce_requests=a.coalesce_requests, threads=a.threads, served_model_name=a.served_model_name,
        enable_prompt_embeds=a.enable_prompt_embeds, max_logprobs=a.max_logprobs, logprobs_mode=a.logprobs_mode,
        chat_template=a.chat_template,
        before_job=FifoGate(a.test_gate) if a.test_gate else None,
    ), a


async def _main(opts: ServerOptions, exit_with_stdin: bool = False) -> None:
    if opts.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("server_stub").warning(
            "listening on %s: reachable from other machines%s", opts.host,
            "" if opts.api_key else " WITHOUT an API key (set --api-key-env)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if exit_with_stdin:
        threading.Thread(target=_stop_at_stdin_eof, args=(loop, stop), name="stdin-watch", daemon=True).start()
    await serve(opts, stop, on_ready=lambda port: print(f"ready http://{opts.host}:{port}", flush=True))


def _stop_at_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    # os.read on the raw descriptor, not sys.stdin: a daemon thread blocked inside the buffered reader holds its
    # lock, and interpreter shutdown after SIGTERM then aborts on it ("Fatal Python error: _enter_buffered_busy")
    while os.read(sys.stdin.fileno(), 65536):  # whatever the parent writes is ignored; only the end matters
        pass
    try:
        loop.call_soon_threadsafe(stop.set)
    except RuntimeError:  # the loop has already closed: the server stopped for another reason
        pass


def main(argv: list[str] | None = None) -> int:
    opts, args = _parse(argv)
    try:
        asyncio.run(_main(opts, exit_with_stdin=args.exit_with_stdin))
    except (OSError, ValueError) as exc:  # missing model dir, port in use, bad device
        logging.getLogger("server_stub").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
