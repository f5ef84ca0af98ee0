"""Response models of the OpenAI-compatible HTTP API (Completions and Chat Completions), as read by the
``vllm`` and ``openai`` backends.

Lenient on purpose (``extra="allow"``, optional fields): servers that claim OpenAI compatibility (OpenAI,
vLLM, TGI, proxies) add and omit fields; only what the backends read is declared.
"""

from __future__ import annotations

import math

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


# ---------------------------------------------------------------------- /v1/completions


class CompletionLogprobs(_Lenient):
    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class CompletionChoice(_Lenient):
    index: int
    text: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Lenient):
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    model: str | None = None


def first_top_logprobs(resp: CompletionResponse, expected: int, what: str) -> list[dict[str, float] | None]:
    """The first generated token's ``top_logprobs`` for each of ``expected`` prompts, in prompt order
    (choices matched by ``index``; None where a choice has none). ``what`` names the prompts in errors."""
    indices = [c.index for c in resp.choices]
    if sorted(indices) != list(range(expected)):
        raise ProtocolError(f"/v1/completions returned choices {indices} for {expected} {what}")
    out: list[dict[str, float] | None] = [None] * expected
    for c in resp.choices:
        lp = c.logprobs
        out[c.index] = lp.top_logprobs[0] if lp and lp.top_logprobs else None
    return out


# ---------------------------------------------------------------------- /v1/chat/completions


class ChatTopLogprob(_Lenient):
    token: str
    logprob: float


class ChatTokenLogprob(_Lenient):
    token: str
    logprob: float
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(_Lenient):
    content: list[ChatTokenLogprob] | None = None


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


def split_v1(url: str) -> str:
    """Accept ``http://host:8000`` or ``http://host:8000/v1``; return the part before ``/v1``."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


__all__ = [
    "ChatChoice", "ChatLogprobs", "ChatResponse", "ChatTokenLogprob", "ChatTopLogprob", "ChatUsage",
    "CompletionChoice", "CompletionLogprobs", "CompletionResponse", "CompletionUsage", "ModelCard", "ModelList",
    "TokenizeAnswer", "VLLM_MISSING_LOGPROB", "first_top_logprobs", "split_v1", "usable_logprob", "usage_tokens",
]
