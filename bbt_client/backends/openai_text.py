"""Backend for any OpenAI-compatible text endpoint (OpenAI, Azure-style proxies, vLLM/TGI without embeddings).

Such an endpoint takes only text, so no continuous prompt can be sent: ``supported_prompts = {"none", "text"}``
and BBT/BBTv2/GDFO are refused with :class:`~bbt_client.errors.UnsupportedError`. What works is zero-shot
scoring of a template and discrete *text* prompts (``bdpl``, ``cmaes-tokens``): each text is rendered up to
``{mask}``, a text prompt is joined before it (:func:`~bbt_client.protocol.join_text_prompt`: prompt, one space,
rendered text), and the label words are scored as the next token with ``max_tokens=1``, ``logprobs`` and
``logit_bias`` (+``label_bias`` on the label tokens, so all of them appear in the top logprobs; an equal shift
keeps their differences, which is what accuracy and cross-entropy use). A label still missing from the top-k gets
the floor ``lowest returned logprob - missing_margin`` (counted in ``ScoreResult.extra``). An endpoint returns at
most ``max_logprobs`` per token (vLLM's ``--max-logprobs``, 20 by default; OpenAI Chat 20, OpenAI's legacy
Completions 5): more label words than that (a label-word search scores hundreds) go out in rounds of requests,
each biasing its own words plus an anchor word, and are aligned on the anchor; every round's tokens are counted.

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
from bbt_client.backends import tokens as tok
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
        max_logprobs: int = 20,
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
        if prompts_per_request < 1 or top_logprobs < 1 or max_logprobs < 2:
            raise ConfigError("prompts_per_request and top_logprobs must be at least 1, max_logprobs at least 2")
        if top_logprobs > max_logprobs:
            raise ConfigError(f"top_logprobs={top_logprobs} exceeds max_logprobs={max_logprobs}, the most the "
                              "endpoint returns")
        if tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
        self.model, self.api = model, api
        self.top_logprobs = int(top_logprobs)
        self.max_logprobs = int(max_logprobs)
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
        pieces = await self._word_pieces(words) if words else None
        pieces = pieces or [[] for _ in words]
        return TokenizeResponse(words=[WordTokens(word=w, ids=ids) for w, ids in zip(words, pieces)],
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

    async def _word_pieces(self, words: Sequence[str]) -> list[list[int]] | None:
        """Token ids of each word as a label (after a space), or None when they cannot be known."""
        if all(w in self._label_token_ids for w in words):
            return [[int(self._label_token_ids[w])] for w in words]
        if self._encoding is not None:
            return [self._encoding.encode_ordinary(label_text(w)) for w in words]
        if self.token_counter == "endpoint":
            return await self._endpoint_tokenize([label_text(w) for w in words])
        return None

    async def _label_ids(self, words: Sequence[str]) -> dict[str, int] | None:
        """Token id per label word for logit_bias, or None when they cannot be known."""
        pieces = await self._word_pieces(words)
        if pieces is None:
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
        return (sum(counts) + per_seq * len(counts)) * len(self.label_rounds(len(job.label_words)))

    def _refuse(self, kind: str) -> None:
        raise UnsupportedError(
            f"an OpenAI-compatible text endpoint accepts only text, so {kind} (continuous) prompts cannot be sent "
            "and bbt/bbtv2/gdfo cannot tune through it. What works here: zero-shot scoring of a template and the "
            "text-prompt methods bdpl and cmaes-tokens. For continuous prompts use a vLLM server with "
            "--enable-prompt-embeds (backend 'vllm', method bbt) or the bbt server (backend 'server').")

    def label_rounds(self, k: int) -> list[list[int]]:
        """Which of ``k`` label words each request round scores: all at once when the endpoint returns that many
        log-probs, else word 0 (the anchor) plus up to ``max_logprobs - 1`` others per round."""
        cap = min(self.max_logprobs, 20) if self.api == "chat" else self.max_logprobs
        if k <= cap:
            return [list(range(k))]
        return [[0, *range(a, min(k, a + cap - 1))] for a in range(1, k, cap - 1)]

    async def score(self, job: ScoreJob) -> ScoreResult:
        """More label words than the endpoint returns log-probs (a label-word search, a large verbalizer) are
        scored in rounds, each biasing its own words; a log-prob is only comparable within its round (each round's
        normaliser differs), so every round carries the anchor word and is shifted to agree with round 0 on it."""
        if job.prompts.kind not in self.supported_prompts:
            self._refuse(job.prompts.kind)
        check_causal_template(job.template)
        words = list(job.label_words)
        label_ids = await self._label_ids(words)
        seqs = self._sequences(job)
        rounds = self.label_rounds(len(words)) if label_ids else [list(range(len(words)))]
        parts = await asyncio.gather(*(self._score_round(seqs, [words[i] for i in r], label_ids) for r in rounds))
        logits = parts[0][0]
        if len(rounds) > 1:
            logits = np.empty((len(seqs), len(words)), np.float32)
            for r, (part, _, _, _) in zip(rounds, parts):
                logits[:, r] = part - part[:, :1] + parts[0][0][:, :1]
        return ScoreResult(logits=logits.reshape(job.num_calls, len(job.texts), len(words)),
                           tokens=sum(p[1] for p in parts),
                           extra={"requests": sum(p[3] for p in parts), "label_rounds": len(rounds),
                                  "missing_label_logprobs": sum(p[2] for p in parts),
                                  "logit_bias": label_ids is not None})

    async def _score_round(self, seqs: list[str], words: list[str],
                           label_ids: dict[str, int] | None) -> tuple[np.ndarray, int, int, int]:
        """(len(seqs), len(words)) log-probs of ``words`` with only their tokens biased, tokens, missing, requests."""
        bias = {str(label_ids[w]): self.label_bias for w in words} if label_ids else None
        if self.api == "completions":
            groups = [seqs[i:i + self.prompts_per_request] for i in range(0, len(seqs), self.prompts_per_request)]
            parts = await asyncio.gather(*(self._completions(g, words, bias) for g in groups))
        else:
            parts = await asyncio.gather(*(self._chat(p, words, bias) for p in seqs))
        return (np.concatenate([p[0] for p in parts], axis=0), sum(p[1] for p in parts), sum(p[2] for p in parts),
                len(parts))

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
