"""Response models of the OpenAI-compatible HTTP API (Completions and Chat Completions), as read by the
``vllm`` and ``openai`` backends.

Lenient on purpose (``extra="allow"``, optional fields): servers that claim OpenAI compatibility (OpenAI,
vLLM, TGI, proxies) add and omit fields; only what the backends read is declared.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from bbt_client.errors import ProtocolError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class CompletionUsage(_Lenient):
    """Token usage of one request; ``total_tokens`` may be missing on some servers."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None


#: Chat Completions reports usage in the same shape.
ChatUsage = CompletionUsage


def usage_tokens(usage: CompletionUsage | None) -> int:
    """Tokens a request was billed for: ``total_tokens``, else prompt + completion; 0 without usage."""
    if usage is None:
        return 0
    return int(usage.total_tokens or usage.prompt_tokens + usage.completion_tokens)


# ---------------------------------------------------------------------- logprob entries in Chat's shape


class ChatTopLogprob(_Lenient):
    token: str
    logprob: float


class ChatTokenLogprob(_Lenient):
    token: str
    logprob: float
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(_Lenient):
    content: list[ChatTokenLogprob] | None = None


# ---------------------------------------------------------------------- /v1/completions


class CompletionLogprobs(_Lenient):
    """OpenAI's legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs``), or llama.cpp's server, which
    answers ``/v1/completions`` with Chat's ``content`` list."""

    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None
    content: list[ChatTokenLogprob] | None = None


class PromptLogprob(_Lenient):
    """One entry of vLLM's ``prompt_logprobs`` (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(_Lenient):
    index: int = 0
    text: str | None = None
    logprobs: CompletionLogprobs | None = None
    #: vLLM's ``prompt_logprobs``: None for the first prompt token, then {token id: entry} per token.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    #: vLLM's ``return_token_ids``: the prompt as the server tokenized it.
    prompt_token_ids: list[int] | None = None


class CompletionResponse(_Lenient):
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    model: str | None = None


def parse_completions(data: object, url: str) -> CompletionResponse:
    """A ``/v1/completions`` answer as one response. llama.cpp's server answers a list of prompts with a JSON
    array of single-prompt responses: their choices are renumbered in array order and their usage summed."""
    from pydantic import ValidationError

    try:
        if isinstance(data, list):
            parts = [CompletionResponse.model_validate(d) for d in data]
            choices = []
            for i, part in enumerate(parts):
                if len(part.choices) != 1:
                    raise ProtocolError(f"{url} answered a prompt list with an array whose item {i} has "
                                        f"{len(part.choices)} choices (expected one per prompt)")
                choices.append(part.choices[0].model_copy(update={"index": i}))
            usage = [p.usage for p in parts if p.usage is not None]
            total = CompletionUsage(prompt_tokens=sum(u.prompt_tokens for u in usage),
                                    completion_tokens=sum(u.completion_tokens for u in usage)) if usage else None
            return CompletionResponse(choices=choices, usage=total)
        return CompletionResponse.model_validate(data)
    except ValidationError as exc:
        first = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise ProtocolError(f"{url} answered JSON that is not a completions response ({first})") from None


def _top_of(lp: CompletionLogprobs | None) -> dict[str, float] | None:
    if lp is None:
        return None
    if lp.top_logprobs:
        return lp.top_logprobs[0]
    if lp.content:  # llama.cpp: Chat's shape
        first = lp.content[0]
        return {t.token: t.logprob for t in first.top_logprobs} or {first.token: first.logprob}
    return None


def first_top_logprobs(resp: CompletionResponse, expected: int, what: str) -> list[dict[str, float] | None]:
    """The first generated token's ``top_logprobs`` for each of ``expected`` prompts, in prompt order
    (choices matched by ``index``; None where a choice has none). ``what`` names the prompts in errors."""
    indices = [c.index for c in resp.choices]
    if sorted(indices) != list(range(expected)):
        raise ProtocolError(f"/v1/completions returned choices {indices} for {expected} {what}")
    out: list[dict[str, float] | None] = [None] * expected
    for c in resp.choices:
        out[c.index] = _top_of(c.logprobs)
    return out


def ordered_choices(resp: CompletionResponse, expected: int, what: str) -> list[CompletionChoice]:
    """The choices in prompt order; an answer with other indices is a protocol error."""
    indices = [c.index for c in resp.choices]
    if sorted(indices) != list(range(expected)):
        raise ProtocolError(f"/v1/completions returned choices {indices} for {expected} {what}")
    return sorted(resp.choices, key=lambda c: c.index)


# ---------------------------------------------------------------------- /v1/chat/completions


class ChatChoice(_Lenient):
    index: int = 0
    logprobs: ChatLogprobs | None = None


class ChatResponse(_Lenient):
    choices: list[ChatChoice]
    usage: ChatUsage | None = None


class ModelCard(_Lenient):
    id: str


class ModelList(_Lenient):
    """``GET /v1/models``: the names the endpoint serves (vLLM: ``--served-model-name``, else ``--model``)."""

    data: list[ModelCard] = []


#: vLLM reports a -inf log-probability (a token masked out by ``allowed_token_ids`` or a -100 bias) as this value.
VLLM_MISSING_LOGPROB = -9999.0


def usable_logprob(value: float | None) -> bool:
    """Whether a returned log-probability is a score: not missing, finite, and not vLLM's -9999.0 for -inf."""
    return value is not None and math.isfinite(value) and value > VLLM_MISSING_LOGPROB


class TokenizeAnswer(_Lenient):
    """vLLM's (and SGLang's) ``POST /tokenize`` answer: the endpoint's own token ids for one prompt."""

    tokens: list[int]
    count: int | None = None


def label_logprobs(top: dict[str, float] | None, label_ids: Sequence[int], margin: float) -> tuple[np.ndarray, int]:
    """(K,) label log-probs from one ``top_logprobs`` dict keyed ``token_id:<id>``; missing ones get the floor."""
    if not top:
        raise ProtocolError("the endpoint returned no top_logprobs; is logprobs supported on this server?")
    by_id: dict[int, float] = {}
    for key, value in top.items():
        if not key.startswith("token_id:"):
            raise ProtocolError(f"top_logprobs key {key!r} is not 'token_id:<id>'; the server ignored "
                                "return_tokens_as_token_ids (vLLM >= 0.9 supports it)")
        by_id[int(key.split(":", 1)[1])] = float(value)
    usable = [v for v in by_id.values() if usable_logprob(v)]  # vLLM's -9999.0 stands for -inf: not a score
    floor = (min(usable) if usable else -100.0) - margin
    out = np.empty(len(label_ids), dtype=np.float32)
    missing = 0
    for k, tid in enumerate(label_ids):
        v = by_id.get(tid)
        if not usable_logprob(v):
            v, missing = floor, missing + 1
        out[k] = v
    return out, missing


def split_v1(url: str) -> str:
    """Accept ``http://host:8000`` or ``http://host:8000/v1``; return the part before ``/v1``."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


__all__ = [
    "ChatChoice", "ChatLogprobs", "ChatResponse", "ChatTokenLogprob", "ChatTopLogprob", "ChatUsage",
    "CompletionChoice", "CompletionLogprobs", "CompletionResponse", "CompletionUsage", "ModelCard", "ModelList",
    "PromptLogprob", "TokenizeAnswer", "label_logprobs", "VLLM_MISSING_LOGPROB", "first_top_logprobs", "ordered_choices",
    "parse_completions", "split_v1", "usable_logprob", "usage_tokens",
]
