"""Wire models of the server's OpenAI/vLLM face: the requests it reads and the responses it writes.

Requests are lenient about keys (``extra="allow"``): OpenAI clients send many knobs (``temperature``,
``top_p``, ``seed``, ``user`` ...) that a greedy one-token scorer has no use for; like vLLM, unknown keys are
ignored. Keys whose meaning the face cannot honour (``stream``, ``n`` > 1, ``max_tokens`` > 1) are
refused by :mod:`server_stub.http.routes_openai` with a 400 instead. Responses follow OpenAI's shapes, which the
official ``openai`` SDK validates.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class CompletionRequest(_Request):
    model: str | None = None
    #: Text, texts, token ids, or lists of token ids (OpenAI's four prompt forms).
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    #: vLLM extra: base64 of ``torch.save`` of a (seq_len, D) tensor, or a list of them.
    prompt_embeds: str | list[str] | None = None
    max_tokens: int | None = None
    logprobs: int | None = None
    #: vLLM extras: top-N log-probs at every prompt token; exact tokens' log-probs at the generated one.
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    echo: bool | None = False
    n: int | None = 1
    best_of: int | None = None
    stream: bool | None = False
    suffix: str | None = None
    #: vLLM extras.
    allowed_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool | None = False


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    #: vLLM extras: a per-request template (refused, as vLLM does without --trust-request-chat-template).
    chat_template: str | None = None
    add_generation_prompt: bool | None = True
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = 1
    stream: bool | None = False
    allowed_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool | None = False


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: a completion prompt, or chat messages (rendered as the chat route does)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


# ---------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Echoed prompt tokens first (the first one's entries null, as vLLM), then the generated token.
    ``text_offset``: cumulative lengths of the token strings, as vLLM counts them."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class PromptLogprob(BaseModel):
    """vLLM's ``prompt_logprobs`` entry for one token id."""

    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] = "length"
    stop_reason: None = None
    #: vLLM extra: per prompt token ``{"<id>": PromptLogprob}`` (the actual token and the top-N), first null.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["length", "stop"] = "length"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bbt-server"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
