"""Backend for any OpenAI-compatible text endpoint (OpenAI, Azure-style proxies, vLLM/TGI without embeddings).

Such an endpoint takes only text, so no continuous prompt can be sent: ``supported_prompts = {"none", "text"}``
and BBT/BBTv2/GDFO are refused with :class:`~bbt_client.errors.UnsupportedError`. What works is zero-shot
scoring of a template and discrete *text* prompts (``bdpl``, ``cmaes-tokens``): each text is rendered up to
``{mask}``, a text prompt is joined before it (:func:`~bbt_client.protocol.join_text_prompt`: prompt, one space,
rendered text), and the label words are scored as the next token with ``max_tokens=1``, ``logprobs`` and
``logit_bias`` (+``label_bias`` on the label tokens, so all of them appear in the top logprobs; an equal shift
keeps their differences, which is what accuracy and cross-entropy use). A label still missing from the top-k gets
the floor ``lowest returned logprob - missing_margin`` (counted in ``ScoreResult.extra``).

C candidate prompts × N texts are C·N sequences: ``api="completions"`` (default) batches
``prompts_per_request`` of them per request (``prompt`` is a list); ``api="chat"`` sends one request per
sequence (Chat takes one conversation), concurrently.
Token counts (for budgets) and label token ids (for ``logit_bias``) come from ``tokenizer``:

- ``"auto"`` (default): tiktoken for OpenAI model names; for any other model the endpoint's own
  ``POST /tokenize`` (vLLM and SGLang serve it), and if the endpoint has none, UTF-8 bytes (an upper bound;
  the bias is then skipped unless ``label_token_ids`` gives the ids).
- ``"tiktoken"``, ``"endpoint"``, ``"bytes"``: force one; a forced source that is unavailable is an error.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Sequence

import numpy as np
from bbt_client import tokens as tok
from bbt_client.backends.base import ScoreJob, ScoreResult
from bbt_client.backends.causal_template import check_causal_template, label_text, prefix_before_mask
from bbt_client.backends.http import HttpBackend, HttpEndpoint, RetryPolicy
from bbt_client.backends.openai_wire import (  # noqa: F401 - Chat* models stay importable from here
    ChatChoice,
    ChatLogprobs,
    ChatResponse,
    ChatTokenLogprob,
    ChatTopLogprob,
    ChatUsage,
    CompletionResponse,
    TokenizeAnswer,
    first_top_logprobs,
    split_v1,
    usable_logprob,
    usage_tokens,
)
from bbt_client.errors import ConfigError, ProtocolError, RequestRejected, UnsupportedError
from bbt_client.protocol import ModelInfo, TokenizeResponse, WordTokens, join_text_prompt

log = logging.getLogger("bbt_client.backends.openai")

APIS = ("completions", "chat")
TOKENIZERS = ("auto", "tiktoken", "endpoint", "bytes")
#: Answers that mean "this endpoint has no /tokenize route" (as opposed to auth or server failures).
_NO_TOKENIZE_ROUTE = {400, 404, 405, 422, 501}


def _match_labels(top: dict[str, float], words: Sequence[str], margin: float) -> tuple[np.ndarray, int]:
    """(K,) log-probs of the label words from {token text: logprob}; tokens match with or without the
    leading space, case-sensitive first, else case-insensitively (an uncased tokenizer returns "world" for the
    label "World"); the higher of several matches counts. vLLM's -9999.0 (its -inf) is no score."""
    if not top:
        raise ProtocolError("the endpoint returned no top logprobs; does it support logprobs for this model?")
    norm: dict[str, float] = {}
    folded: dict[str, float] = {}
    for token, lp in top.items():
        if not usable_logprob(lp):
            continue
        key = token.strip()
        if key not in norm or lp > norm[key]:
            norm[key] = lp
        if key.lower() not in folded or lp > folded[key.lower()]:
            folded[key.lower()] = lp
    floor = (min(norm.values()) if norm else -100.0) - margin
    out = np.empty(len(words), np.float32)
    missing = 0
    for k, w in enumerate(words):
        v = norm.get(w.strip(), folded.get(w.strip().lower()))
        if v is None:
            v, missing = floor, missing + 1
        out[k] = v
    return out, missing


class OpenAITextBackend(HttpBackend):
    """Template scoring (zero-shot or with discrete text prompts) on an OpenAI-compatible endpoint via next-token
    logprobs."""

    supported_prompts = frozenset({"none", "text"})

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api: str = "completions",
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_concurrency: int = 4,
        max_retries: int = 5,
        retry: RetryPolicy | None = None,
        top_logprobs: int = 5,
        label_bias: float = 100.0,
        label_token_ids: dict[str, int] | None = None,
        missing_margin: float = 1.0,
        prompts_per_request: int = 20,
        tokenizer: str = "auto",
        http: HttpEndpoint | None = None,
    ):
        if not model:
            raise ConfigError("the openai backend needs the model name: options.model (e.g. gpt-4o-mini)")
        if api not in APIS:
            raise ConfigError(f"api must be one of {', '.join(APIS)}, got {api!r}")
        if prompts_per_request < 1 or top_logprobs < 1:
            raise ConfigError("prompts_per_request and top_logprobs must be at least 1")
        if tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
        self.model, self.api = model, api
        self.top_logprobs = int(top_logprobs)
        self.label_bias = float(label_bias)
        self.missing_margin = float(missing_margin)
        self.prompts_per_request = int(prompts_per_request)
        self._label_token_ids = dict(label_token_ids or {})
        self._encoding = None
        enc_name = tok.encoding_name_for_model(model) if tokenizer in ("auto", "tiktoken") else None
        if enc_name is not None:
            try:
                self._encoding = tok.get_encoding(enc_name)
            except RuntimeError as exc:
                log.warning("%s", exc)
        if tokenizer == "tiktoken" and self._encoding is None:
            raise ConfigError(f"tokenizer='tiktoken' but tiktoken has no usable encoding for model {model!r}")
        #: Where token counts come from now: "tiktoken", "endpoint" (until its /tokenize proves absent) or "bytes"
        #: (also for an OpenAI model whose encoding cannot be loaded offline: OpenAI serves no /tokenize).
        self.token_counter = ("tiktoken" if self._encoding else
                              "bytes" if tokenizer == "bytes" or enc_name is not None else "endpoint")
        self._endpoint_required = tokenizer == "endpoint"
        self._endpoint_ids: dict[str, list[int]] = {}
        self._connect(split_v1(base_url), http=http, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                      max_concurrency=max_concurrency, max_retries=max_retries, retry=retry)

    def _repr_fields(self) -> str:
        return f"model={self.model!r}, api={self.api!r}"

    async def model_info(self) -> ModelInfo:
        """Text APIs reveal no internals; the sizes here are placeholders that no method may rely on."""
        return ModelInfo(name=self.model, kind="causal", architecture="unknown (text-only API)", hidden_size=1,
                         num_layers=1, max_seq_len=8192, vocab_size=self._encoding.n_vocab if self._encoding else 1,
                         embedding_std=0.0, hidden_std=[0.0], max_prompt_tokens=0, max_candidates=1,
                         max_texts=100_000, max_body_bytes=2**31 - 1, device="remote openai-compatible")

    async def tokenize(self, words: Sequence[str] = (), texts: Sequence[str] = ()) -> TokenizeResponse:
        ids = await self._label_ids(words) if words else None
        return TokenizeResponse(words=[WordTokens(word=w, ids=[ids[w]] if ids and w in ids else []) for w in words],
                                text_token_counts=await self._count(texts))

    async def _count(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, from the best source this endpoint offers (see the module docstring)."""
        if self.token_counter == "endpoint" and texts:
            ids = await self._endpoint_tokenize(texts)
            if ids is not None:
                return [len(i) for i in ids]
        if self._encoding is not None:
            return [len(x) for x in self._encoding.encode_ordinary_batch(list(texts))]
        return tok.byte_upper_bound(texts)

    async def _endpoint_tokenize(self, texts: Sequence[str]) -> list[list[int]] | None:
        """Token ids of each text from the endpoint's ``POST /tokenize`` (cached), or None when it has none."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._endpoint_ids]

        def ask(text: str):
            return self.http.request("POST", "/tokenize", model=TokenizeAnswer,
                                     json_body={"model": self.model, "prompt": text, "add_special_tokens": False})

        try:
            answers = [await ask(todo[0])] if todo else []  # one probe first: a missing route fails once
            answers += await asyncio.gather(*(ask(t) for t in todo[1:]))
        except RequestRejected as exc:
            if exc.status not in _NO_TOKENIZE_ROUTE:
                raise
            if self._endpoint_required:
                raise UnsupportedError(f"tokenizer='endpoint' but the endpoint has no usable /tokenize ({exc})") from None
            log.warning("%s has no /tokenize (HTTP %s); counting tokens as UTF-8 bytes (an upper bound) and "
                        "skipping logit_bias unless label_token_ids is set", self.http.base_url, exc.status)
            self.token_counter = "bytes"
            return None
        self._endpoint_ids.update(zip(todo, (a.tokens for a in answers)))
        return [self._endpoint_ids[t] for t in texts]

    async def _label_ids(self, words: Sequence[str]) -> dict[str, int] | None:
        """Token id per label word for logit_bias, or None when they cannot be known."""
        if all(w in self._label_token_ids for w in words):
            return {w: int(self._label_token_ids[w]) for w in words}
        if self._encoding is not None:
            pieces = [self._encoding.encode_ordinary(label_text(w)) for w in words]
        elif self.token_counter == "endpoint":
            pieces = await self._endpoint_tokenize([label_text(w) for w in words])
            if pieces is None:
                return None
        else:
            return None
        out = {}
        for w, ids in zip(words, pieces):
            if len(ids) != 1:
                raise ConfigError(f"label word {w!r} is {len(ids)} tokens for {self.model}; next-token scoring "
                                  "needs single-token label words")
            out[w] = ids[0]
        return out

    def _prefixes(self, job: ScoreJob) -> list[str]:
        """The N texts rendered up to ``{mask}``, without any prompt."""
        pairs = job.text_pairs or [None] * len(job.texts)
        return [prefix_before_mask(job.template, t, b) for t, b in zip(job.texts, pairs)]

    @staticmethod
    def _prompt_texts(job: ScoreJob) -> tuple[str, ...]:
        """One prompt string per candidate ("" for zero-shot)."""
        return job.prompts.texts if job.prompts.kind == "text" else ("",)

    def _sequences(self, job: ScoreJob) -> list[str]:
        """The C·N sequences sent, candidate-major: candidate c's prompt joined before each rendered text."""
        prefixes = self._prefixes(job)
        return [join_text_prompt(p, x) for p in self._prompt_texts(job) for x in prefixes]

    def estimate_tokens(self, job: ScoreJob, text_token_counts: Sequence[int] = (),
                        prompt_token_counts: Sequence[int] = ()) -> int:
        """Upper bound of the tokens ``job`` is billed: its C·N sequences' tokens + chat framing + one generated
        token per sequence. tiktoken counts the sequences exactly; otherwise the texts' own counts (from
        :meth:`tokenize`, the endpoint's tokenizer) and the text prompts' counts (``prompt_token_counts``, one per
        candidate, else their UTF-8 bytes) plus the template's other words as UTF-8 bytes and three tokens for
        BOS and merges across the joins; with no counts at all, the sequences' bytes."""
        per_seq = 1 + (tok.CHAT_TOKENS_PER_MESSAGE + tok.CHAT_TOKENS_PER_REPLY if self.api == "chat" else 0)
        prompts = self._prompt_texts(job)
        if self._encoding is not None:
            counts = [len(x) for x in self._encoding.encode_ordinary_batch(self._sequences(job))]
        elif len(text_token_counts) == len(job.texts) and self.token_counter == "endpoint":
            # the rendered prefix holds the text; everything else in it (template words, a pair) is counted
            # as bytes, which no byte-level BPE exceeds, + 2 for BOS and a merge across the text's edges
            prefixes = self._prefixes(job)
            per_text = [int(c) + 2 + max(0, len(p.encode("utf-8")) - len(t.encode("utf-8")))
                        for c, p, t in zip(text_token_counts, prefixes, job.texts)]
            if len(prompt_token_counts) != len(prompts):
                prompt_token_counts = tok.byte_upper_bound(prompts)
            counts = [c + (int(pc) + 1 if p else 0)
                      for p, pc in zip(prompts, prompt_token_counts) for c in per_text]
        else:
            counts = tok.byte_upper_bound(self._sequences(job))
        return sum(counts) + per_seq * len(counts)

    def _refuse(self, kind: str) -> None:
        raise UnsupportedError(
            f"an OpenAI-compatible text endpoint accepts only text, so {kind} (continuous) prompts cannot be sent "
            "and bbt/bbtv2/gdfo cannot tune through it. What works here: zero-shot scoring of a template and the "
            "text-prompt methods bdpl and cmaes-tokens. For continuous prompts use a vLLM server with "
            "--enable-prompt-embeds (backend 'vllm', method bbt) or the bbt server (backend 'server').")

    async def score(self, job: ScoreJob) -> ScoreResult:
        if job.prompts.kind not in self.supported_prompts:
            self._refuse(job.prompts.kind)
        check_causal_template(job.template)
        label_ids = await self._label_ids(job.label_words)
        seqs = self._sequences(job)
        bias = {str(i): self.label_bias for i in label_ids.values()} if label_ids else None
        if self.api == "completions":
            groups = [seqs[i:i + self.prompts_per_request] for i in range(0, len(seqs), self.prompts_per_request)]
            parts = await asyncio.gather(*(self._completions(g, job.label_words, bias) for g in groups))
        else:
            parts = await asyncio.gather(*(self._chat(p, job.label_words, bias) for p in seqs))
        logits = np.concatenate([p[0] for p in parts], axis=0)
        logits = logits.reshape(job.num_calls, len(job.texts), len(job.label_words))
        return ScoreResult(logits=logits, tokens=sum(p[1] for p in parts),
                           extra={"requests": len(parts), "missing_label_logprobs": sum(p[2] for p in parts),
                                  "logit_bias": bias is not None})

    def completions_body(self, prompts: Sequence[str], k: int, bias: dict[str, float] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": list(prompts), "max_tokens": 1, "temperature": 0,
                                "logprobs": max(self.top_logprobs, k if bias else 1)}
        if bias:
            body["logit_bias"] = bias
        return body

    def chat_body(self, prompt: str, k: int, bias: dict[str, float] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": 1, "temperature": 0, "logprobs": True,
                                "top_logprobs": min(20, max(self.top_logprobs, k if bias else 1))}
        if bias:
            body["logit_bias"] = bias
        return body

    async def _completions(self, prompts, words, bias) -> tuple[np.ndarray, int, int]:
        body = self.completions_body(prompts, len(words), bias)
        resp: CompletionResponse = await self.http.request("POST", "/v1/completions", json_body=body,
                                                           model=CompletionResponse)
        out = np.empty((len(prompts), len(words)), np.float32)
        missing = 0
        for i, top in enumerate(first_top_logprobs(resp, len(prompts), "prompts")):
            out[i], m = _match_labels(top or {}, words, self.missing_margin)
            missing += m
        return out, usage_tokens(resp.usage), missing

    async def _chat(self, prompt, words, bias) -> tuple[np.ndarray, int, int]:
        resp: ChatResponse = await self.http.request("POST", "/v1/chat/completions",
                                                     json_body=self.chat_body(prompt, len(words), bias),
                                                     model=ChatResponse)
        if not resp.choices or not resp.choices[0].logprobs or not resp.choices[0].logprobs.content:
            raise ProtocolError("/v1/chat/completions returned no logprobs content; the model or endpoint may "
                                "not support logprobs")
        first = resp.choices[0].logprobs.content[0]
        top = {t.token: t.logprob for t in first.top_logprobs} or {first.token: first.logprob}
        out, missing = _match_labels(top, words, self.missing_margin)
        return out[None], usage_tokens(resp.usage), missing
