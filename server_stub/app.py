"""Assemble model, worker, both faces' routes and the HTTP server from one options object; run until told to stop.

Shared by the CLI (``python -m server_stub``) and :func:`server_stub.testing.run_server`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from server_stub.engine.int8 import OUTLIER_CHANNELS
from server_stub.engine.loading import default_model_dir
from server_stub.engine.micro_batches import default_max_batch_tokens
from server_stub.engine.model import PromptedLM
from server_stub.engine.worker import ModelWorker
from server_stub.http.framing import HttpLimits, HttpServer
from server_stub.http.routes_openai import FaceOptions, OpenAIFace
from server_stub.http.routes_v1 import PUBLIC_PATHS, ScoringService, ServiceLimits
from server_stub.http.usage import UsageMeter

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass
class ServerOptions:
    """Everything the CLI can set. Sizes in bytes/tokens, times in seconds."""

    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"
    dtype: str = "float32"
    #: None (default) or "int8": int8 linear layers, CPU only (:mod:`server_stub.engine.int8`).
    quantize: str | None = None
    #: With ``quantize="int8"``: input channels per linear kept float32
    #: (:data:`server_stub.engine.int8.OUTLIER_CHANNELS`).
    int8_outliers: int = OUTLIER_CHANNELS
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    #: Tokens per forward micro-batch; None: :func:`server_stub.engine.micro_batches.default_max_batch_tokens`
    #: for the device.
    max_batch_tokens: int | None = None
    max_prompt_tokens: int = 64
    max_candidates: int = 256
    max_texts: int = 4096
    max_queue: int = 64
    #: Most queued /v1/score requests one model pass may serve together. Off (1) by default: a row's logits
    #: then depend on which other requests shared its micro-batch (padding, GEMM shapes) at float-rounding
    #: level, so a run is no longer reproducible bit for bit. Worth it for throughput on a shared GPU server.
    coalesce_requests: int = 1
    cache_bytes: int = 256 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 75.0
    threads: int | None = None
    shutdown_grace: float = 30.0
    #: OpenAI/vLLM face (docs/openai_face.md): the model name it answers to (default: the model's name).
    served_model_name: str | None = None
    enable_prompt_embeds: bool = False
    max_logprobs: int = 20
    #: vLLM's default; "processed_logprobs" reports log-probs after logit_bias/allowed_token_ids, as OpenAI does.
    logprobs_mode: str = "raw_logprobs"
    #: Jinja chat template (text, or a file holding it) used instead of the tokenizer's (vLLM's --chat-template).
    chat_template: str | None = None
    #: Test hook run on the model thread before each job (see :class:`server_stub.engine.worker.ModelWorker`).
    before_job: Callable[[], None] | None = None


def load_model(opts: ServerOptions) -> PromptedLM:
    if opts.model == "default":
        path, name = default_model_dir(), DEFAULT_MODEL_NAME
    else:
        path, name = Path(opts.model).expanduser(), None
    return PromptedLM(path, device=opts.device, dtype=opts.dtype, max_prompt_tokens=opts.max_prompt_tokens, name=name,
                      quantize=opts.quantize, int8_outliers=opts.int8_outliers)


def read_chat_template(value: str | None) -> str | None:
    """vLLM's rule: a path to a file holding the template, or the template itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text() if len(value) < 4096 and "{" not in value and path.is_file() else value


async def serve(
    opts: ServerOptions,
    stop: asyncio.Event,
    on_ready: Callable[[int], None] | None = None,
    lm: PromptedLM | None = None,
) -> None:
    """Load (unless ``lm`` is given), listen, call ``on_ready(port)``, serve until ``stop`` is set, drain."""
    if lm is None:
        lm = await asyncio.get_running_loop().run_in_executor(None, load_model, opts)
    max_batch_tokens = opts.max_batch_tokens or default_max_batch_tokens(lm.device.type)
    worker = ModelWorker(max_queue=opts.max_queue, num_threads=opts.threads,  # torch threads are process-wide
                         before_job=opts.before_job, max_group=opts.coalesce_requests)
    limits = ServiceLimits(
        max_prompt_tokens=min(opts.max_prompt_tokens, lm.max_prompt_tokens),
        max_candidates=opts.max_candidates,
        max_texts=opts.max_texts,
        max_batch_tokens=max_batch_tokens,
        cache_bytes=opts.cache_bytes,
    )
    meter = UsageMeter()  # both faces count into it: GET /v1/usage reports all work done
    v1 = ScoringService(lm, worker, meter, limits, max_body_bytes=opts.max_body_bytes)
    http_limits = HttpLimits(
        max_header_bytes=opts.max_header_bytes,
        max_body_bytes=opts.max_body_bytes,
        header_timeout=opts.header_timeout,
        body_timeout=opts.body_timeout,
        idle_timeout=opts.idle_timeout,
    )
    face = OpenAIFace(lm, worker, meter, FaceOptions(
        served_model_name=opts.served_model_name or lm.name, enable_prompt_embeds=opts.enable_prompt_embeds,
        max_logprobs=opts.max_logprobs, logprobs_mode=opts.logprobs_mode, max_prompts=opts.max_texts,
        max_batch_tokens=max_batch_tokens, chat_template=read_chat_template(opts.chat_template)))
    # One port, one API key: protocol v1's routes and the OpenAI face's, errors on the face's in OpenAI's shape.
    server = HttpServer({**v1.routes(), **face.routes()}, api_key=opts.api_key, public_paths=PUBLIC_PATHS,
                        limits=http_limits, error_format=face.error_format)
    port = await server.start(opts.host, opts.port)
    log.info("serving %s (%s, %d layers, D=%d, %s) on http://%s:%d on %s%s", lm.name, lm.kind, lm.num_layers,
             lm.hidden_size, lm.quantization or str(lm.dtype).removeprefix("torch."), opts.host, port, lm.device,
             " with API key" if opts.api_key else "")
    if on_ready is not None:
        on_ready(port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: finishing in-flight requests")
        await server.shutdown(opts.shutdown_grace)
        await asyncio.get_running_loop().run_in_executor(None, worker.close)
        log.info("stopped")
