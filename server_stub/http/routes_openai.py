"""The server's OpenAI/vLLM-compatible face: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` and
vLLM's ``/tokenize``, on the same port as protocol v1.

Why: the ``vllm`` and ``openai`` backends (and any third-party OpenAI client) can then run against a server that
really scores, instead of fakes. The face computes one next token per prompt (``max_tokens`` 1; docs in
docs/openai_face.md): with a masked LM the "next token" is the distribution at a [MASK] appended after the prompt
(see :mod:`server_stub.engine.next_token`). Behaviour copied from vLLM where the backends depend on it:
``prompt_embeds`` only with ``--enable-prompt-embeds``, ``logprobs`` capped at ``--max-logprobs`` (400 above it),
-inf log-probs reported as -9999.0, ``return_tokens_as_token_ids`` keys ``token_id:<id>``, a 404 for any model
name but the served one. Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, and
invalid requests are 400 (as OpenAI and vLLM answer), never 422. All model work runs on the single model worker.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from server_stub.engine.loading import LoadedLM
from server_stub.engine.next_token import (
    LOGPROBS_MODES,
    NextTokenOutput,
    check_embeds,
    logits_for_embeds,
    logits_for_texts,
    pick,
    prompt_ids,
)
from server_stub.engine.micro_batches import MAX_BATCH_TOKENS
from server_stub.engine.worker import ModelWorker
from server_stub.errors import BadRequest, ServerError
from server_stub.http.framing import Handler, Request
from server_stub.http.openai_models import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIErrorDetail,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server_stub.http.usage import UsageMeter

#: The face's routes; errors on them are rendered in OpenAI's shape.
FACE_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize"})
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "server_error"}


@dataclass
class FaceOptions:
    """``served_model_name``: the only ``model`` accepted (vLLM's ``--served-model-name``)."""

    served_model_name: str
    enable_prompt_embeds: bool = False
    max_logprobs: int = 20
    logprobs_mode: str = "processed_logprobs"
    max_prompts: int = 4096
    max_batch_tokens: int = MAX_BATCH_TOKENS

    def __post_init__(self) -> None:
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs mode must be one of {', '.join(LOGPROBS_MODES)}")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")


def invalid(message: str, code: str = "bad_request") -> ServerError:
    return ServerError(message, status=400, code=code)


class OpenAIFace:
    """Route handlers; :meth:`routes` and :meth:`error_format` plug into
    :class:`server_stub.http.framing.HttpServer`."""

    def __init__(self, lm: LoadedLM, worker: ModelWorker, meter: UsageMeter, options: FaceOptions):
        self.lm, self.worker, self.meter, self.options = lm, worker, meter, options
        self._token_text: dict[int, str] = {}

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {"/v1/models": {"GET": self.models}, "/v1/completions": {"POST": self.completions},
                "/v1/chat/completions": {"POST": self.chat}, "/tokenize": {"POST": self.tokenize}}

    @staticmethod
    def error_format(path: str, exc: ServerError) -> tuple[int, bytes] | None:
        """OpenAI's error JSON on the face's paths; 422 (schema) becomes 400 as OpenAI and vLLM answer."""
        if path not in FACE_PATHS:
            return None
        status = 400 if exc.status == 422 else exc.status
        code = "invalid_api_key" if status == 401 else exc.code
        kind = _ERROR_TYPES.get(status, "invalid_request_error")
        body = OpenAIError(error=OpenAIErrorDetail(message=str(exc), type=kind, code=code))
        return status, body.model_dump_json().encode()

    # ------------------------------------------------------------------ routes

    async def models(self, _req: Request) -> tuple[int, ModelList]:
        name = self.options.served_model_name
        card = ModelCard(id=name, root=name, created=int(time.time()), max_model_len=self.lm.max_seq_len)
        return 200, ModelList(data=[card])

    async def completions(self, req: Request) -> tuple[int, Completion]:
        body = req.json(CompletionRequest)
        self._check_model(body.model)
        _check_one_token(body.max_tokens, body.n, body.stream)
        if body.echo:
            raise invalid("echo=true is not supported: this server computes only the next token's distribution")
        if (body.best_of or 1) > 1 or body.suffix:
            raise invalid("best_of and suffix are not supported: the next token is always the greedy one")
        k = self._check_logprobs(body.logprobs, "logprobs")
        bias = self._bias(body.logit_bias)
        allowed = self._allowed(body.allowed_token_ids)
        as_ids = bool(body.return_tokens_as_token_ids)
        if body.prompt_embeds is not None:
            if not self.options.enable_prompt_embeds:
                raise invalid("prompt_embeds are disabled: start the server with --enable-prompt-embeds")
            if body.prompt not in (None, "", [""]):
                raise invalid("send either prompt or prompt_embeds, not both (an empty prompt \"\" is ignored)")
            blobs = [body.prompt_embeds] if isinstance(body.prompt_embeds, str) else body.prompt_embeds
            self._check_count(len(blobs), "prompt_embeds")
            job = (self._embeds_job, blobs)
        else:
            if body.prompt is None:
                raise invalid("prompt is required (a string or a list of strings)")
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            self._check_count(len(prompts), "prompts")
            job = (self._texts_job, prompts)
        fn, arg = job
        return 200, await self.worker.submit(self._complete, fn, arg, k, bias, allowed, as_ids, body.logprobs)

    async def chat(self, req: Request) -> tuple[int, ChatCompletion]:
        body = req.json(ChatRequest)
        self._check_model(body.model)
        _check_one_token(body.max_completion_tokens or body.max_tokens, body.n, body.stream)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs needs logprobs=true")
        k = self._check_logprobs(body.top_logprobs, "top_logprobs") if body.logprobs else 0
        bias = self._bias(body.logit_bias)
        allowed = self._allowed(body.allowed_token_ids)
        text = render_chat(body.messages)
        return 200, await self.worker.submit(self._chat, text, k, bool(body.logprobs), bias, allowed,
                                             bool(body.return_tokens_as_token_ids))

    async def tokenize(self, req: Request) -> tuple[int, TokenizeResponse]:
        body = req.json(TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("send exactly one of prompt or messages")
        text = body.prompt if body.prompt is not None else render_chat(body.messages or [])
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await self.worker.submit(prompt_ids, self.lm, text, special)
        strs = self.lm.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return 200, TokenizeResponse(count=len(ids), max_model_len=self.lm.max_seq_len, tokens=ids, token_strs=strs)

    # ------------------------------------------------------------------ checks (event loop)

    def _check_model(self, name: str | None) -> None:
        served = self.options.served_model_name
        if name is not None and name != served:
            raise ServerError(f"The model `{name}` does not exist. This server serves `{served}` "
                              "(GET /v1/models lists it).", status=404, code="model_not_found")

    def _check_logprobs(self, k: int | None, field: str) -> int:
        if k is None:
            return 0
        if k < 0:
            raise invalid(f"{field} must be >= 0, got {k}")
        if k > self.options.max_logprobs:
            raise invalid(f"Requested sample logprobs of {k}, which is greater than max allowed: "
                          f"{self.options.max_logprobs} ({field}; the server's --max-logprobs)")
        return k

    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise invalid(f"{what} is an empty list")
        if n > self.options.max_prompts:
            raise invalid(f"{n} {what} in one request; this server accepts at most {self.options.max_prompts}")

    def _bias(self, raw: Mapping[str, float] | None) -> dict[int, float] | None:
        if not raw:
            return None
        out: dict[int, float] = {}
        for key, value in raw.items():
            tid = _token_id(key)
            if tid is None or not 0 <= tid < self.lm.vocab_size:
                raise invalid(f"logit_bias key {key[:40]!r} is not a token id of this model "
                              f"(0..{self.lm.vocab_size - 1})")
            if not math.isfinite(value) or not -100 <= value <= 100:
                raise invalid(f"logit_bias value for token {tid} is {value}; it must be between -100 and 100")
            out[tid] = float(value)
        return out

    def _allowed(self, ids: Sequence[int] | None) -> list[int] | None:
        if ids is None:
            return None
        if not ids:
            raise invalid("allowed_token_ids is an empty list")
        bad = [i for i in ids if not 0 <= i < self.lm.vocab_size]
        if bad:
            raise invalid(f"allowed_token_ids {bad[:5]} are outside this model's vocabulary "
                          f"(0..{self.lm.vocab_size - 1})")
        return list(ids)

    # ------------------------------------------------------------------ worker-thread work

    def _texts_job(self, prompts: Sequence[str], reduce) -> NextTokenOutput:
        return logits_for_texts(self.lm, prompts, self.options.max_batch_tokens, reduce)

    def _embeds_job(self, blobs: Sequence[str], reduce) -> NextTokenOutput:
        rows = [check_embeds(self.lm, load_embeds(b, f"prompt_embeds[{i}]"), f"prompt_embeds[{i}]")
                for i, b in enumerate(blobs)]
        return logits_for_embeds(self.lm, rows, self.options.max_batch_tokens, reduce)

    def _picks(self, fn, arg, k: int, bias, allowed) -> NextTokenOutput:
        """Run ``fn`` with each sequence's logits reduced to a :class:`Pick` as its micro-batch finishes."""
        out = fn(arg, lambda row: pick(row, k, logit_bias=bias, allowed_token_ids=allowed,
                                       mode=self.options.logprobs_mode))
        self.meter.add(requests=1, sequences=len(out.prompt_tokens), tokens=out.tokens_processed)
        return out

    def _complete(self, fn, arg, k: int, bias, allowed, as_ids: bool, logprobs: int | None) -> Completion:
        out = self._picks(fn, arg, k, bias, allowed)
        choices = []
        for i, p in enumerate(out.rows):
            lp = None
            if logprobs is not None:
                top = {self._name(t, as_ids): v for t, v in p.top} or {self._name(p.token_id, as_ids): p.logprob}
                lp = CompletionLogprobs(tokens=[self._name(p.token_id, as_ids)], token_logprobs=[p.logprob],
                                        top_logprobs=[top], text_offset=[0])
            choices.append(CompletionChoice(index=i, text=self._text(p.token_id), logprobs=lp))
        return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                          model=self.options.served_model_name, choices=choices, usage=_usage(out))

    def _chat(self, text: str, k: int, logprobs: bool, bias, allowed, as_ids: bool) -> ChatCompletion:
        out = self._picks(self._texts_job, [text], k, bias, allowed)
        p = out.rows[0]
        lp = None
        if logprobs:
            top = [self._top(t, v, as_ids) for t, v in p.top]
            first = self._top(p.token_id, p.logprob, as_ids)
            lp = ChatLogprobs(content=[TokenLogprob(**first.model_dump(), top_logprobs=top)])
        choice = ChatChoice(message=AssistantMessage(content=self._text(p.token_id)), logprobs=lp)
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                              model=self.options.served_model_name, choices=[choice], usage=_usage(out))

    def _text(self, tid: int) -> str:
        if tid not in self._token_text:
            self._token_text[tid] = self.lm.tokenizer.decode([tid])
        return self._token_text[tid]

    def _name(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self._text(tid)

    def _top(self, tid: int, logprob: float, as_ids: bool) -> TopLogprob:
        return TopLogprob(token=self._name(tid, as_ids), logprob=logprob, bytes=list(self._text(tid).encode()))


# ---------------------------------------------------------------------- helpers


def render_chat(messages: Sequence[ChatMessage]) -> str:
    """Chat is rendered simply: the messages' text contents joined by newlines (no roles, no chat template);
    the next token is then computed as for a completion of that text."""
    parts = []
    for i, m in enumerate(messages):
        if m.content is None or isinstance(m.content, str):
            parts.append(m.content or "")
            continue
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}]: only text content parts are supported")
            parts.append(part["text"])
    return "\n".join(parts)


def load_embeds(blob: str, where: str) -> object:
    """``torch.load(base64decode(blob), weights_only=True)``: refuses anything but plain tensors' pickles."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None
    try:
        return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the client's bad input
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BadRequest(f"{where} is not a torch.save file of a tensor (loaded with weights_only=True): "
                         f"{reason}") from None


def _check_one_token(max_tokens: int | None, n: int | None, stream: bool | None) -> None:
    if max_tokens is not None and max_tokens != 1:
        raise invalid(f"max_tokens={max_tokens}: this server computes only the first token's distribution; "
                      "send max_tokens=1 (or omit it)")
    if (n or 1) != 1:
        raise invalid("n must be 1: the next token is always the greedy one")
    if stream:
        raise invalid("stream=true is not supported")


def _token_id(key: str) -> int | None:
    try:
        return int(key)
    except ValueError:
        return None


def _usage(out: NextTokenOutput) -> Usage:
    prompt = sum(out.prompt_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=len(out.prompt_tokens),
                 total_tokens=prompt + len(out.prompt_tokens))
