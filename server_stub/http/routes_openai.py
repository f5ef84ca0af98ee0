"""The server's OpenAI/vLLM-compatible face: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` and
vLLM's ``/tokenize``, on the same port as protocol v1.

Why: the ``vllm`` and ``openai`` backends (and any third-party OpenAI client) can then run against a server that
really scores, instead of fakes. The face computes one next token per prompt (``max_tokens`` 0 or 1; docs in
docs/openai_face.md) and, with ``echo`` or ``prompt_logprobs``, every prompt token's log-probability: with a
masked LM the "next token" is the distribution at a [MASK] appended after the prompt and a prompt token's is its
pseudo-log-likelihood (see :mod:`server_stub.engine.next_token`). It behaves as vLLM does unless told otherwise:
raw log-probs (``--logprobs-mode``), ``prompt_embeds`` only with ``--enable-prompt-embeds``, ``logprobs`` capped at
``--max-logprobs`` with vLLM's 400, -inf log-probs reported as -9999.0, ``return_tokens_as_token_ids`` keys
``token_id:<id>``, chat only through a chat template, a 404 for any model name but the served one. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, and invalid requests are 400 (as OpenAI and
vLLM answer), never 422. All model work runs on the single model worker.
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
from server_stub.engine.micro_batches import MAX_BATCH_TOKENS
from server_stub.engine.next_token import (
    LOGPROBS_MODES,
    Pick,
    Prompt,
    PromptToken,
    check_embeds,
    embeds_prompt,
    pick,
    prompt_ids,
    prompt_tokens,
    score_prompts,
    text_prompt,
    token_prompt,
)
from server_stub.engine.worker import ModelWorker
from server_stub.errors import BadRequest, InvalidInput, ServerError
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
    PromptLogprob,
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
#: vLLM's answers where a tokenizer has no chat template, or a request brings its own.
NO_CHAT_TEMPLATE = ("As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
                    "template if the tokenizer does not define one.")
REQUEST_CHAT_TEMPLATE = ("Chat template is passed with request, but --trust-request-chat-template is not set. "
                         "Refused request with untrusted chat template.")


@dataclass
class FaceOptions:
    """``served_model_name``: the only ``model`` accepted (vLLM's ``--served-model-name``); ``chat_template``: a
    Jinja template (vLLM's ``--chat-template``) used instead of the tokenizer's own."""

    served_model_name: str
    enable_prompt_embeds: bool = False
    max_logprobs: int = 20
    logprobs_mode: str = LOGPROBS_MODES[0]
    max_prompts: int = 4096
    max_batch_tokens: int = MAX_BATCH_TOKENS
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs mode must be one of {', '.join(LOGPROBS_MODES)}")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")


def invalid(message: str, code: str = "bad_request", param: str | None = None) -> ServerError:
    return ServerError(message, status=400, code=code, param=param)


@dataclass
class _Want:
    """What one completion request asks to see, checked on the event loop, used on the model thread."""

    k: int
    logprobs: bool
    prompt_k: int | None
    echo: bool
    generate: bool
    bias: dict[int, float] | None
    allowed: list[int] | None
    exact_ids: list[int] | None
    as_ids: bool


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
        body = OpenAIError(error=OpenAIErrorDetail(message=str(exc), type=kind, param=exc.param, code=code))
        return status, body.model_dump_json().encode()

    # ------------------------------------------------------------------ routes

    async def models(self, _req: Request) -> tuple[int, ModelList]:
        name = self.options.served_model_name
        card = ModelCard(id=name, root=name, created=int(time.time()), max_model_len=self.lm.max_seq_len)
        return 200, ModelList(data=[card])

    async def completions(self, req: Request) -> tuple[int, Completion]:
        body = req.json(CompletionRequest)
        self._check_model(body.model)
        generate = _check_tokens(body.max_tokens, body.n, body.stream)
        if (body.best_of or 1) > 1 or body.suffix:
            raise invalid("best_of and suffix are not supported: the next token is always the greedy one")
        want = _Want(k=self._check_logprobs(body.logprobs, "logprobs", "sample"), logprobs=body.logprobs is not None,
                     prompt_k=None, echo=bool(body.echo), generate=generate, bias=self._bias(body.logit_bias),
                     allowed=self._allowed(body.allowed_token_ids), exact_ids=self._exact_ids(body),
                     as_ids=bool(body.return_tokens_as_token_ids))
        if body.prompt_logprobs is not None:
            want.prompt_k = self._check_logprobs(body.prompt_logprobs, "prompt_logprobs", "prompt")
        elif want.echo and want.logprobs:
            want.prompt_k = want.k  # vLLM fills prompt_logprobs from an echo's logprobs
        if body.prompt_embeds is not None:
            if not self.options.enable_prompt_embeds:
                raise invalid("prompt_embeds are disabled: start the server with --enable-prompt-embeds",
                              param="prompt_embeds")
            if want.echo:
                raise invalid("Echo is unsupported with prompt embeds.", param="echo")
            if body.prompt_logprobs is not None:
                raise invalid("prompt_logprobs is not compatible with prompt embeds.", param="prompt_logprobs")
            if body.prompt not in (None, "", [""]):
                raise invalid("send either prompt or prompt_embeds, not both (an empty prompt \"\" is ignored)")
            blobs = [body.prompt_embeds] if isinstance(body.prompt_embeds, str) else body.prompt_embeds
            self._check_count(len(blobs), "prompt_embeds")
            items: list = blobs
        else:
            items = self._prompt_list(body.prompt)
        return 200, await self.worker.submit(self._complete, items, body.prompt_embeds is not None, want)

    async def chat(self, req: Request) -> tuple[int, ChatCompletion]:
        body = req.json(ChatRequest)
        self._check_model(body.model)
        generate = _check_tokens(body.max_completion_tokens or body.max_tokens, body.n, body.stream)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs needs logprobs=true", param="top_logprobs")
        k = self._check_logprobs(body.top_logprobs, "top_logprobs", "sample") if body.logprobs else 0
        bias = self._bias(body.logit_bias)
        allowed = self._allowed(body.allowed_token_ids)
        template = self._chat_template(body.chat_template)
        gen_prompt = True if body.add_generation_prompt is None else body.add_generation_prompt
        return 200, await self.worker.submit(self._chat, body.messages, template, gen_prompt, k,
                                             bool(body.logprobs), generate, bias, allowed,
                                             bool(body.return_tokens_as_token_ids))

    async def tokenize(self, req: Request) -> tuple[int, TokenizeResponse]:
        body = req.json(TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("send exactly one of prompt or messages")
        if body.prompt is not None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await self.worker.submit(prompt_ids, self.lm, body.prompt, special)
        else:
            template = self._chat_template(None)
            gen_prompt = True if body.add_generation_prompt is None else body.add_generation_prompt
            ids = await self.worker.submit(self._chat_ids, body.messages or [], template, gen_prompt)
        strs = self.lm.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return 200, TokenizeResponse(count=len(ids), max_model_len=self.lm.max_seq_len, tokens=ids, token_strs=strs)

    # ------------------------------------------------------------------ checks (event loop)

    def _check_model(self, name: str | None) -> None:
        served = self.options.served_model_name
        if name is not None and name != served:
            raise ServerError(f"The model `{name}` does not exist. This server serves `{served}` "
                              "(GET /v1/models lists it).", status=404, code="model_not_found", param="model")

    def _check_logprobs(self, k: int | None, field: str, what: str) -> int:
        """vLLM's rules: -1 means the whole vocabulary; more than ``--max-logprobs`` is a 400 with its message."""
        if k is None:
            return 0
        if k == -1:
            k = self.lm.vocab_size
        if k < 0:
            raise invalid(f"`{field}` must be a positive value or -1. (parameter={field}, value={k})", param=field)
        if k > self.options.max_logprobs:
            raise invalid(f"Requested {what} logprobs of {k}, which is greater than max allowed: "
                          f"{self.options.max_logprobs} (parameter={field}, value={k})", param=field)
        return k

    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise invalid(f"{what} is an empty list", param=what)
        if n > self.options.max_prompts:
            raise invalid(f"{n} {what} in one request; this server accepts at most {self.options.max_prompts}",
                          param=what)

    def _prompt_list(self, prompt: str | list | None) -> list[str | list[int]]:
        """OpenAI's four prompt forms as a list of texts and token-id lists."""
        if prompt is None or prompt == "":
            raise invalid("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        if isinstance(prompt, str):
            return [prompt]
        items: list = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
        self._check_count(len(items), "prompt")
        for i, p in enumerate(items):
            if isinstance(p, list):
                if not p:
                    raise invalid(f"prompt[{i}] is an empty list of token ids", param="prompt")
                self._vocab_ids(p, "prompt")
        return items

    def _vocab_ids(self, ids: Sequence[int], field: str) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.lm.vocab_size]
        if bad:
            raise invalid(f"token_id(s) {bad[:5]} in {field} contain out-of-vocab token ids. Vocabulary size: "
                          f"{self.lm.vocab_size}", param=field)
        return list(ids)

    def _bias(self, raw: Mapping[str, float] | None) -> dict[int, float] | None:
        if not raw:
            return None
        out: dict[int, float] = {}
        for key, value in raw.items():
            tid = _token_id(key)
            if tid is None or not 0 <= tid < self.lm.vocab_size:
                raise invalid(f"logit_bias key {key[:40]!r} is not a token id of this model "
                              f"(0..{self.lm.vocab_size - 1})", param="logit_bias")
            if not math.isfinite(value) or not -100 <= value <= 100:
                raise invalid(f"logit_bias value for token {tid} is {value}; it must be between -100 and 100",
                              param="logit_bias")
            out[tid] = float(value)
        return out

    def _allowed(self, ids: Sequence[int] | None) -> list[int] | None:
        if ids is None:
            return None
        if not ids:
            raise invalid("allowed_token_ids is an empty list", param="allowed_token_ids")
        return self._vocab_ids(ids, "allowed_token_ids")

    def _exact_ids(self, body: CompletionRequest) -> list[int] | None:
        if body.logprob_token_ids is None:
            return None
        if body.logprobs is None:
            raise invalid("when using `logprob_token_ids`, `logprobs` must be set.", param="logprob_token_ids")
        return self._vocab_ids(body.logprob_token_ids, "logprob_token_ids")

    def _chat_template(self, from_request: str | None) -> str:
        if from_request is not None:
            raise invalid(REQUEST_CHAT_TEMPLATE)
        template = self.options.chat_template or getattr(self.lm.tokenizer, "chat_template", None)
        if not template:
            raise invalid(NO_CHAT_TEMPLATE)
        return template

    # ------------------------------------------------------------------ worker-thread work

    def _prompt(self, item, from_embeds: bool, i: int) -> Prompt:
        if from_embeds:
            where = f"prompt_embeds[{i}]"
            return embeds_prompt(self.lm, check_embeds(self.lm, load_embeds(item, where), where))
        return text_prompt(self.lm, item) if isinstance(item, str) else token_prompt(self.lm, item)

    def _score(self, prompts: list[Prompt], want: _Want):
        def next_reduce(row: torch.Tensor) -> Pick:
            return pick(row, want.k, logit_bias=want.bias, allowed_token_ids=want.allowed,
                        mode=self.options.logprobs_mode, logprob_token_ids=want.exact_ids)

        def prompt_reduce(rows: torch.Tensor, targets: torch.Tensor) -> list[PromptToken]:
            return prompt_tokens(rows, targets, max(want.k if want.logprobs else 0, want.prompt_k or 0))

        wants_prompt = want.prompt_k is not None or (want.echo and want.logprobs)
        out = score_prompts(self.lm, prompts, self.options.max_batch_tokens, next_reduce,
                            prompt_reduce if wants_prompt else None)
        self.meter.add(requests=1, sequences=out.sequences, tokens=out.tokens_processed)
        return out

    def _complete(self, items: list, from_embeds: bool, want: _Want) -> Completion:
        prompts = [self._prompt(item, from_embeds, i) for i, item in enumerate(items)]
        out = self._score(prompts, want)
        choices = []
        for i, (item, p, nxt) in enumerate(zip(items, prompts, out.next)):
            echoed = p.ids[p.echo[0]:p.echo[1]] if p.ids is not None else []
            by_pos = dict(zip(p.scored, out.prompt[i] or []))
            per_token = [by_pos.get(j) for j in range(*p.echo)] if p.ids is not None else []
            gen_text = self._gen_text(echoed, nxt.token_id) if want.generate else ""
            text = gen_text
            if want.echo:
                text = (item if isinstance(item, str) else self.lm.tokenizer.decode(echoed)) + gen_text
            lp = self._completion_logprobs(echoed, per_token, nxt, want) if want.logprobs else None
            plp = None
            if want.prompt_k is not None:
                plp = [None if t is None else self._prompt_entry(t, want.prompt_k) for t in per_token]
            choices.append(CompletionChoice(index=i, text=text, logprobs=lp, prompt_logprobs=plp))
        return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                          model=self.options.served_model_name, choices=choices, usage=_usage(out.prompt_tokens))

    def _completion_logprobs(self, echoed: list[int], per_token: list[PromptToken | None], nxt: Pick,
                             want: _Want) -> CompletionLogprobs:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if want.echo:
            for tid, t in zip(echoed, per_token):
                tokens.append(self._name(tid, want.as_ids))
                values.append(None if t is None else t.logprob)
                tops.append(None if t is None else self._top_dict(tid, t.logprob, t.top[: want.k], want.as_ids))
        if want.generate:
            tokens.append(self._name(nxt.token_id, want.as_ids))
            values.append(nxt.logprob)
            tops.append(self._top_dict(nxt.token_id, nxt.logprob, nxt.top, want.as_ids))
        offsets, at = [], 0
        for name in tokens:
            offsets.append(at)
            at += len(name)
        return CompletionLogprobs(text_offset=offsets, token_logprobs=values, tokens=tokens, top_logprobs=tops)

    def _top_dict(self, tid: int, logprob: float, top: list[tuple[int, float]], as_ids: bool) -> dict[str, float]:
        """The actual (or sampled) token first, then the top-k, as vLLM lists them."""
        out = {self._name(tid, as_ids): logprob}
        for t, v in top:
            out.setdefault(self._name(t, as_ids), v)
        return out

    def _prompt_entry(self, t: PromptToken, n: int) -> dict[str, PromptLogprob]:
        out = {str(t.token_id): PromptLogprob(logprob=t.logprob, rank=t.rank, decoded_token=self._text(t.token_id))}
        for rank, (tid, v) in enumerate(t.top[:n], start=1):
            out.setdefault(str(tid), PromptLogprob(logprob=v, rank=rank, decoded_token=self._text(tid)))
        return out

    def _chat_ids(self, messages: Sequence[ChatMessage], template: str, gen_prompt: bool) -> list[int]:
        """The chat template's text, tokenized as it stands: the template writes any BOS itself (as in vLLM)."""
        convo = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(messages)]
        try:
            text = self.lm.tokenizer.apply_chat_template(convo, chat_template=template, tokenize=False,
                                                         add_generation_prompt=gen_prompt)
        except Exception as exc:  # noqa: BLE001 - a template that cannot render these messages is the client's
            raise InvalidInput(f"the chat template cannot render these messages: {exc}") from None
        ids = prompt_ids(self.lm, text, add_special_tokens=False)
        if not ids:
            raise InvalidInput("the chat template rendered these messages as no tokens")
        return ids

    def _chat(self, messages, template: str, gen_prompt: bool, k: int, logprobs: bool, generate: bool, bias,
              allowed, as_ids: bool) -> ChatCompletion:
        ids = self._chat_ids(messages, template, gen_prompt)
        want = _Want(k=k, logprobs=logprobs, prompt_k=None, echo=False, generate=generate, bias=bias,
                     allowed=allowed, exact_ids=None, as_ids=as_ids)
        out = self._score([token_prompt(self.lm, ids)], want)
        p = out.next[0]
        lp = None
        if logprobs and generate:
            top = [self._top(t, v, as_ids) for t, v in p.top]
            first = self._top(p.token_id, p.logprob, as_ids)
            lp = ChatLogprobs(content=[TokenLogprob(**first.model_dump(), top_logprobs=top)])
        content = self._gen_text(ids, p.token_id) if generate else ""
        choice = ChatChoice(message=AssistantMessage(content=content), logprobs=lp)
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                              model=self.options.served_model_name, choices=[choice], usage=_usage(out.prompt_tokens))

    def _gen_text(self, context: list[int], tid: int) -> str:
        """The generated token's text as it reads after its context (a leading space where the tokenizer puts
        one), special tokens left out, as vLLM's detokenizer writes it."""
        if not context:
            return self.lm.tokenizer.decode([tid], skip_special_tokens=True)
        tail = context[-8:]  # enough context for spacing; decoding the whole prompt per choice is wasted work
        before = self.lm.tokenizer.decode(tail, skip_special_tokens=True)
        return self.lm.tokenizer.decode(tail + [tid], skip_special_tokens=True)[len(before):]

    def _text(self, tid: int) -> str:
        if tid not in self._token_text:
            self._token_text[tid] = self.lm.tokenizer.decode([tid])
        return self._token_text[tid]

    def _name(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self._text(tid)

    def _top(self, tid: int, logprob: float, as_ids: bool) -> TopLogprob:
        return TopLogprob(token=self._name(tid, as_ids), logprob=logprob, bytes=list(self._text(tid).encode()))


# ---------------------------------------------------------------------- helpers


def _message_text(m: ChatMessage, i: int) -> str:
    """A message's text: its string content, or its text parts joined by newlines (as vLLM joins them)."""
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"messages[{i}]: only text content parts are supported", param="messages")
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


def _check_tokens(max_tokens: int | None, n: int | None, stream: bool | None) -> bool:
    """Whether a token is generated: ``max_tokens`` 1 (or omitted) yes, 0 no (echo or prompt log-probs only)."""
    if max_tokens is not None and max_tokens not in (0, 1):
        raise invalid(f"max_tokens={max_tokens}: this server computes only the first token's distribution; "
                      "send max_tokens=1 (or 0 with echo, or omit it)", param="max_tokens")
    if (n or 1) != 1:
        raise invalid("n must be 1: the next token is always the greedy one", param="n")
    if stream:
        raise invalid("stream=true is not supported", param="stream")
    return max_tokens != 0


def _token_id(key: str) -> int | None:
    try:
        return int(key)
    except ValueError:
        return None


def _usage(billed: list[int]) -> Usage:
    """As vLLM bills: every prompt token, and one generated token per prompt even with ``max_tokens`` 0 (vLLM
    still runs that decode step)."""
    prompt = sum(billed)
    return Usage(prompt_tokens=prompt, completion_tokens=len(billed), total_tokens=prompt + len(billed))
