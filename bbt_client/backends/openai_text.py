"""Backend for any OpenAI-compatible text endpoint (OpenAI, Azure-style proxies, vLLM/TGI without embeddings).

Such an endpoint takes only text, so no continuous prompt can be sent: ``supported_prompts = {"none", "text"}``
and BBT/BBTv2/GDFO are refused with :class:`~bbt_client.errors.UnsupportedError`. What works is zero-shot
scoring of a template and discrete *text* prompts (``bdpl``, ``cmaes-tokens``): each text is rendered up to
``{mask}``, a text prompt is joined before it (:func:`~bbt_client.protocol.join_text_prompt`: prompt, one space,
rendered text), and the label words are scored after it in one of the ways of :mod:`bbt_client.backends.scoring`
(``scoring`` option; ``auto``: the one ``bbt tune`` finds by :meth:`OpenAITextBackend.probe`, else ``bias`` when
the label token ids are known and ``top-k`` when not). ``bias`` sends ``max_tokens=1``, ``logprobs`` and
``logit_bias`` (+``label_bias`` on the label tokens, so all of them appear in the top logprobs where the endpoint
applies the bias before it reports them; an equal shift keeps their differences, which is what accuracy and
cross-entropy use). A label missing from what the endpoint returned gets the floor ``lowest returned logprob -
missing_margin``, counted in ``ScoreResult.floored_scores``. An endpoint returns at
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
import re
from typing import Any, Sequence

import numpy as np
from bbt_client.backends import tokens as tok
from bbt_client.backends.base import Counted, ScoreJob, ScoreResult, uncounted
from bbt_client.backends.causal_template import check_causal_template, label_text, prefix_before_mask
from bbt_client.backends.http import HttpBackend, HttpEndpoint, RetryPolicy
from bbt_client.backends.openai_wire import (  # noqa: F401 - Chat* models stay importable from here
    ChatChoice,
    ChatLogprobs,
    ChatResponse,
    ChatTokenLogprob,
    ChatTopLogprob,
    ChatUsage,
    CompletionChoice,
    CompletionResponse,
    TokenizeAnswer,
    first_top_logprobs,
    label_logprobs,
    ordered_choices,
    parse_completions,
    split_v1,
    usable_logprob,
    usage_tokens,
)
from bbt_client.backends.scoring import Scoring, describe
from bbt_client.errors import ConfigError, ProtocolError, RequestRejected, UnsupportedError
from bbt_client.protocol import ModelInfo, TokenizeResponse, WordTokens, join_text_prompt

log = logging.getLogger("bbt_client.backends.openai")

APIS = ("completions", "chat")
TOKENIZERS = ("auto", "tiktoken", "endpoint", "bytes")
SCORINGS = ("auto", "logprob_token_ids", "echo", "prompt_logprobs", "bias", "top-k")
#: Answers that mean "this endpoint has no /tokenize route" (as opposed to auth or server failures).
_NO_TOKENIZE_ROUTE = {400, 404, 405, 422, 501}
#: Answers that mean "no such route" for /v1/completions (a chat-only API).
_NO_ROUTE = {404, 405, 501}
#: What the probe scores, and words whose single token it biases or asks for by id.
PROBE_TEXT = "The capital of France is"
PROBE_BATCH = (PROBE_TEXT, "Paris is a city", "hello")
PROBE_WORDS = ("great", "zebra", "banana", "purple", "river")
_CAP_IN_MESSAGE = re.compile(r"(?:max(?:imum)? allowed:?|less than or equal to|at most|maximum(?: value)? is)\s*(\d+)",
                             re.I)


def _match_labels(top: dict[str, float], words: Sequence[str], margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(K,) log-probs of the label words from {token text: logprob} and the (K,) mask of floored ones; tokens match
    with or without the leading space, case-sensitive first, else case-insensitively (an uncased tokenizer returns
    "world" for the label "World"); the higher of several matches counts. vLLM's -9999.0 (its -inf) is no score."""
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
    missing = np.zeros(len(words), bool)
    for k, w in enumerate(words):
        v = norm.get(w.strip(), folded.get(w.strip().lower()))
        if v is None:
            v, missing[k] = floor, True
        out[k] = v
    return out, missing


def _plain(token: str) -> str:
    """A token's text without its word-boundary marks (space, BPE's Ġ, SentencePiece's ▁, WordPiece's ##)."""
    return re.sub(r"\s|Ġ|▁|##", "", token).lower()


def logprobs_cap(message: str) -> int | None:
    """The most logprobs an endpoint allows, read from its refusal ("... greater than max allowed: 20")."""
    m = _CAP_IN_MESSAGE.search(message)
    return int(m.group(1)) if m else None


class OpenAITextBackend(HttpBackend):
    """Template scoring (zero-shot or with discrete text prompts) on an OpenAI-compatible endpoint via label
    log-probs, read in one of :mod:`bbt_client.backends.scoring`'s ways."""

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
        scoring: str = "auto",
        bias_in_logprobs: bool | None = None,
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
        if scoring not in SCORINGS:
            raise ConfigError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        if api == "chat" and scoring not in ("auto", "bias", "top-k"):
            raise ConfigError(f"scoring={scoring!r} needs the Completions API; Chat returns only the next "
                              "token's top logprobs: use scoring=top-k or bias with api=chat")
        self.model, self.api = model, api
        self.top_logprobs = int(top_logprobs)
        self.max_logprobs = int(max_logprobs)
        self.label_bias = float(label_bias)
        self.missing_margin = float(missing_margin)
        self.prompts_per_request = int(prompts_per_request)
        self.scoring_option = scoring
        #: The strategy in use; None: ``auto`` not yet probed (then ``bias`` if label ids are known, else ``top-k``).
        self.strategy: str | None = None if scoring == "auto" else scoring
        #: Whether the endpoint shows logit_bias in its logprobs (None: unknown).
        self.bias_in_logprobs = bias_in_logprobs
        #: The field ``POST /tokenize`` reads the text from: vLLM/SGLang ``prompt``, llama.cpp ``content``.
        self.tokenize_field = "prompt"
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

    async def _tokenize_one(self, text: str) -> list[int]:
        """One text's ids from ``POST /tokenize``. An answer of no tokens for a non-empty text means the server
        read another field (llama.cpp reads ``content``, vLLM ``prompt``): asked once more with the other one."""
        answer = await self._ask_tokenize(text, self.tokenize_field)
        if not answer and text.strip() and self.tokenize_field == "prompt":
            answer = await self._ask_tokenize(text, "content")
            if answer:
                log.info("%s/tokenize reads 'content' (llama.cpp's shape)", self.http.base_url)
                self.tokenize_field = "content"
        if not answer and text.strip():
            raise UnsupportedError(f"{self.http.base_url}/tokenize answers no tokens for {text[:40]!r} with either "
                                   "'prompt' or 'content'; set the backend option tokenizer=bytes")
        return answer

    async def _ask_tokenize(self, text: str, field: str) -> list[int]:
        body = {"model": self.model, field: text, "add_special_tokens": False}
        answer: TokenizeAnswer = await self.http.request("POST", "/tokenize", model=TokenizeAnswer, json_body=body)
        return list(answer.tokens)

    async def _endpoint_tokenize(self, texts: Sequence[str]) -> list[list[int]] | None:
        """Token ids of each text from the endpoint's ``POST /tokenize`` (cached), or None when it has none."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._endpoint_ids]
        try:
            answers = [await self._tokenize_one(todo[0])] if todo else []  # one probe first: a missing route fails once
            answers += await asyncio.gather(*(self._tokenize_one(t) for t in todo[1:]))
        except RequestRejected as exc:
            if exc.status not in _NO_TOKENIZE_ROUTE:
                raise
            if self._endpoint_required:
                raise UnsupportedError(f"tokenizer='endpoint' but the endpoint has no usable /tokenize ({exc})") from None
            log.warning("%s has no /tokenize (HTTP %s); counting tokens as UTF-8 bytes (an upper bound) and "
                        "skipping logit_bias unless label_token_ids is set", self.http.base_url, exc.status)
            self.token_counter = "bytes"
            return None
        self._endpoint_ids.update(zip(todo, answers))
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
                                  "needs single-token label words (echo scoring takes words of any length: "
                                  "--backend-opt scoring=echo, where the endpoint supports it)")
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

    def _current_strategy(self) -> str:
        """The strategy a score uses now: the chosen one, else ``bias`` where label ids can be known."""
        if self.strategy is not None:
            return self.strategy
        known = self._encoding is not None or self.token_counter == "endpoint" or bool(self._label_token_ids)
        return "bias" if known else "top-k"

    def scoring(self, k: int) -> Scoring:
        strategy = self._current_strategy()
        rounds = len(self.label_rounds(k)) if strategy == "bias" else 1
        return describe(strategy, k, rounds=rounds, processed=self.bias_in_logprobs, facts=self._facts())

    def _facts(self) -> dict:
        return {"strategy": self._current_strategy(), "api": self.api, "max_logprobs": self.max_logprobs,
                "top_logprobs": self.top_logprobs, "bias_in_logprobs": self.bias_in_logprobs,
                "tokenize_field": self.tokenize_field, "prompts_per_request": self.prompts_per_request}

    def apply_scoring(self, facts: dict) -> None:
        self.strategy = facts.get("strategy", self.strategy)
        self.api = facts.get("api", self.api)
        self.max_logprobs = int(facts.get("max_logprobs", self.max_logprobs))
        self.top_logprobs = int(facts.get("top_logprobs", self.top_logprobs))
        self.bias_in_logprobs = facts.get("bias_in_logprobs", self.bias_in_logprobs)
        self.tokenize_field = facts.get("tokenize_field", self.tokenize_field)
        self.prompts_per_request = int(facts.get("prompts_per_request", self.prompts_per_request))

    def estimate_tokens(self, job: ScoreJob, text_token_counts: Sequence[int] = (),
                        prompt_token_counts: Sequence[int] = ()) -> int:
        """Upper bound of the tokens ``job`` is billed: its C·N sequences' tokens + chat framing + one generated
        token per sequence (``echo``: each sequence once per label word, with the word's tokens). tiktoken counts
        the sequences exactly; otherwise the texts' own counts (from :meth:`tokenize`, the endpoint's tokenizer)
        and the text prompts' counts (``prompt_token_counts``, one per candidate, else their UTF-8 bytes) plus the
        template's other words as UTF-8 bytes and three tokens for BOS and merges across the joins; with no counts
        at all, the sequences' bytes."""
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
        strategy = self._current_strategy()
        if strategy in ("echo", "prompt_logprobs"):
            words = [label_text(w) for w in job.label_words]
            label_tokens = ([len(x) for x in self._encoding.encode_ordinary_batch(words)] if self._encoding
                            else tok.byte_upper_bound(words))
            k = len(words)
            return k * sum(counts) + len(counts) * (sum(label_tokens) + k * per_seq)
        rounds = len(self.label_rounds(len(job.label_words))) if strategy == "bias" else 1
        return (sum(counts) + per_seq * len(counts)) * rounds

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

    # ------------------------------------------------------------------ scoring

    async def score(self, job: ScoreJob) -> ScoreResult:
        if job.prompts.kind not in self.supported_prompts:
            self._refuse(job.prompts.kind)
        check_causal_template(job.template)
        words = list(job.label_words)
        seqs = self._sequences(job)
        strategy = self._current_strategy()
        if strategy in ("echo", "prompt_logprobs"):
            pieces = await self._word_pieces(words)
            if pieces is None:
                raise ConfigError(f"{strategy} scoring sums the label words' own tokens, so it needs their token "
                                  "counts: this endpoint offers no tokenizer (set label_token_ids, or tokenizer)")
            logits, tokens, requests = await self._score_echo(seqs, words, pieces, strategy)
            return ScoreResult(logits=logits.reshape(job.num_calls, len(job.texts), len(words)), tokens=tokens,
                               extra={"requests": requests, "scoring": strategy, "missing_label_logprobs": 0},
                               floored_scores=0)
        if strategy == "logprob_token_ids":
            label_ids = await self._label_ids(words)
            if label_ids is None:
                raise ConfigError("logprob_token_ids scoring needs the label words' token ids: this endpoint "
                                  "offers no tokenizer (set label_token_ids)")
            logits, tokens, floored, requests = await self._score_by_ids(seqs, [label_ids[w] for w in words])
            return ScoreResult(logits=logits.reshape(job.num_calls, len(job.texts), len(words)), tokens=tokens,
                               extra={"requests": requests, "scoring": strategy, "missing_label_logprobs": floored},
                               floored_scores=floored)
        return await self._score_next_token(job, seqs, words, strategy)

    async def _score_next_token(self, job: ScoreJob, seqs: list[str], words: list[str],
                                strategy: str) -> ScoreResult:
        """``bias`` or ``top-k``. More label words than the endpoint returns log-probs (a label-word search, a
        large verbalizer) are scored in bias rounds, each biasing its own words; a log-prob is only comparable
        within its round (each round's normaliser differs), so every round carries the anchor word and is shifted
        to agree with round 0 on it; a label whose round's anchor was floored counts as floored too."""
        label_ids = await self._label_ids(words) if strategy == "bias" else None
        rounds = self.label_rounds(len(words)) if label_ids else [list(range(len(words)))]
        parts = await asyncio.gather(*(self._score_round(seqs, [words[i] for i in r], label_ids) for r in rounds))
        logits, floored = parts[0][0], parts[0][2]
        if len(rounds) > 1:
            logits = np.empty((len(seqs), len(words)), np.float32)
            floored = np.zeros((len(seqs), len(words)), bool)
            for r, (part, _, miss, _) in zip(rounds, parts):
                logits[:, r] = part - part[:, :1] + parts[0][0][:, :1]
                floored[:, r] = miss | miss[:, :1] | parts[0][2][:, :1]
        n_floored = int(floored.sum())
        return ScoreResult(logits=logits.reshape(job.num_calls, len(job.texts), len(words)),
                           tokens=sum(p[1] for p in parts),
                           extra={"requests": sum(p[3] for p in parts), "label_rounds": len(rounds),
                                  "missing_label_logprobs": n_floored, "logit_bias": label_ids is not None,
                                  "scoring": strategy},
                           floored_scores=n_floored)

    async def _score_round(self, seqs: list[str], words: list[str],
                           label_ids: dict[str, int] | None) -> tuple[np.ndarray, int, np.ndarray, int]:
        """(len(seqs), len(words)) log-probs of ``words`` with only their tokens biased, tokens, floored mask,
        requests."""
        bias = {str(label_ids[w]): self.label_bias for w in words} if label_ids else None
        if self.api == "completions":
            groups = [seqs[i:i + self.prompts_per_request] for i in range(0, len(seqs), self.prompts_per_request)]
            parts = await asyncio.gather(*(self._completions(g, words, bias) for g in groups))
        else:
            parts = await asyncio.gather(*(self._chat(p, words, bias) for p in seqs))
        return (np.concatenate([p[0] for p in parts], axis=0), sum(p[1] for p in parts),
                np.concatenate([p[2] for p in parts], axis=0), len(parts))

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

    async def _post_completions(self, body: dict[str, Any], retries: int | None = None) -> CompletionResponse:
        """``POST /v1/completions`` read as one response (llama.cpp's array answer included)."""
        data = await self.http.request("POST", "/v1/completions", json_body=body, retries=retries)
        return parse_completions(data, f"{self.http.base_url}/v1/completions")

    async def _completions(self, prompts, words, bias) -> tuple[np.ndarray, int, np.ndarray]:
        resp = await self._post_completions(self.completions_body(prompts, len(words), bias))
        out = np.empty((len(prompts), len(words)), np.float32)
        missing = np.zeros((len(prompts), len(words)), bool)
        for i, top in enumerate(first_top_logprobs(resp, len(prompts), "prompts")):
            out[i], missing[i] = _match_labels(top or {}, words, self.missing_margin)
        return out, usage_tokens(resp.usage), missing

    async def _chat(self, prompt, words, bias) -> tuple[np.ndarray, int, np.ndarray]:
        resp: ChatResponse = await self.http.request("POST", "/v1/chat/completions",
                                                     json_body=self.chat_body(prompt, len(words), bias),
                                                     model=ChatResponse)
        if not resp.choices or not resp.choices[0].logprobs or not resp.choices[0].logprobs.content:
            raise ProtocolError("/v1/chat/completions returned no logprobs content; the model or endpoint may "
                                "not support logprobs")
        first = resp.choices[0].logprobs.content[0]
        top = {t.token: t.logprob for t in first.top_logprobs} or {first.token: first.logprob}
        out, missing = _match_labels(top, words, self.missing_margin)
        return out[None], usage_tokens(resp.usage), missing[None]

    # -------------------------------------------------------------- exact: logprob_token_ids, echo

    def by_ids_body(self, prompts: Sequence[str], ids: Sequence[int]) -> dict[str, Any]:
        """vLLM's ``logprob_token_ids``: exactly these ids' log-probs at the next position, keyed ``token_id:N``."""
        return {"model": self.model, "prompt": list(prompts), "max_tokens": 1, "temperature": 0, "logprobs": 1,
                "logprob_token_ids": list(ids), "return_tokens_as_token_ids": True}

    async def _score_by_ids(self, seqs: list[str], ids: list[int]) -> tuple[np.ndarray, int, int, int]:
        groups = [seqs[i:i + self.prompts_per_request] for i in range(0, len(seqs), self.prompts_per_request)]

        async def one(group: list[str]) -> tuple[np.ndarray, int, int]:
            resp = await self._post_completions(self.by_ids_body(group, ids))
            out = np.empty((len(group), len(ids)), np.float32)
            missing = 0
            for i, top in enumerate(first_top_logprobs(resp, len(group), "prompts")):
                out[i], m = label_logprobs(top, ids, self.missing_margin)
                missing += m
            return out, usage_tokens(resp.usage), missing

        parts = await asyncio.gather(*(one(g) for g in groups))
        return (np.concatenate([p[0] for p in parts], axis=0), sum(p[1] for p in parts), sum(p[2] for p in parts),
                len(parts))

    def echo_body(self, prompts: Sequence[str], how: str) -> dict[str, Any]:
        """Score the prompts themselves: Completions ``echo`` with no generated token, or vLLM's
        ``prompt_logprobs`` with the actual tokens only (keyed by id, which checks the label's tail)."""
        body: dict[str, Any] = {"model": self.model, "prompt": list(prompts), "temperature": 0}
        if how == "echo":
            body.update(echo=True, logprobs=1, max_tokens=0)
        else:
            body.update(max_tokens=1, prompt_logprobs=0)
        return body

    async def _score_echo(self, seqs: list[str], words: list[str], pieces: list[list[int]],
                          how: str) -> tuple[np.ndarray, int, int]:
        """(len(seqs), K) log P(label word | sequence): each sequence sent once per label word, the word's tokens'
        log-probs summed."""
        tails = [label_text(w) for w in words]
        prompts = [s + t for s in seqs for t in tails]
        expect = [(w, p) for _ in seqs for w, p in zip(words, pieces)]
        step = self.prompts_per_request
        groups = [(prompts[i:i + step], expect[i:i + step]) for i in range(0, len(prompts), step)]

        async def one(group: list[str], exp: list[tuple[str, list[int]]]) -> tuple[np.ndarray, int]:
            resp = await self._post_completions(self.echo_body(group, how))
            choices = ordered_choices(resp, len(group), "prompts")
            return (np.array([self._tail_logprob(c, p, w, ids, how) for c, p, (w, ids) in zip(choices, group, exp)],
                             np.float32), usage_tokens(resp.usage))

        parts = await asyncio.gather(*(one(g, e) for g, e in groups))
        flat = np.concatenate([p[0] for p in parts])
        return flat.reshape(len(seqs), len(words)), sum(p[1] for p in parts), len(parts)

    @staticmethod
    def _tail_logprob(c: CompletionChoice, prompt: str, word: str, ids: list[int], how: str) -> float:
        """The summed log-probs of the label word's ``len(ids)`` tokens that end ``prompt``; a tail that is not the
        label (the endpoint tokenized it otherwise, or generated past the prompt) is an error, never a guess."""
        n = len(ids)
        if how == "prompt_logprobs":
            entries = c.prompt_logprobs
            if entries is None:
                raise ProtocolError("the endpoint returned no prompt_logprobs; it does not support them here "
                                    "(use --backend-opt scoring=echo or top-k; bbt probe tells which work)")
            tail = entries[-n:] if len(entries) > n else []
            if len(tail) != n or not all(e and len(e) == 1 for e in tail):
                raise ProtocolError(f"prompt_logprobs do not hold one actual token for each of {word!r}'s {n} "
                                    "tokens after the text (asked with prompt_logprobs=0)")
            got = [int(next(iter(e))) for e in tail]
            if got != list(ids):
                raise ProtocolError(f"the prompt ends in token ids {got}, not {word!r}'s {list(ids)}: the endpoint "
                                    "tokenizes the label word differently in context")
            values = [next(iter(e.values())).logprob for e in tail]
        else:
            if c.text is not None and len(c.text) > len(prompt) and c.text.startswith(prompt):
                raise ProtocolError("the endpoint generated tokens after an echoed prompt despite max_tokens=0, so "
                                    "its echo cannot be read as the prompt's scores; use another scoring")
            lp = c.logprobs
            if lp is not None and lp.token_logprobs is not None:
                seq, toks = list(lp.token_logprobs), list(lp.tokens or [])
            elif lp is not None and lp.content:
                seq, toks = [t.logprob for t in lp.content], [t.token for t in lp.content]
            else:
                raise ProtocolError("the endpoint echoed no token logprobs; it does not support echo with logprobs "
                                    "(bbt probe tells which scoring works)")
            if len(seq) <= n:
                raise ProtocolError(f"the echoed prompt has {len(seq)} tokens, too few to hold the text and {word!r}")
            tail = toks[-n:] if len(toks) == len(seq) else []
            if tail and not any(t.startswith("bytes:") for t in tail) and _plain("".join(tail)) != _plain(word):
                raise ProtocolError(f"the echoed prompt ends in tokens {tail}, not the label word {word!r}: the "
                                    "endpoint tokenizes it differently in context")
            values = seq[-n:]
        if not all(usable_logprob(v) for v in values):
            raise ProtocolError(f"the endpoint returned no usable log-prob for a token of {word!r}")
        return float(sum(values))

    # ------------------------------------------------------------------ probe

    async def probe(self, counted: Counted = uncounted, label_words: Sequence[str] = ()) -> dict:
        """What the endpoint can do, found with a few requests (those that run the model go through ``counted``),
        and the strategy chosen from it for ``label_words`` (exact ones first), applied to this backend.

        Told answers are kept: a ``scoring`` other than ``auto`` and a ``bias_in_logprobs`` given as an option
        are not overridden."""
        from bbt_client.backends import probe as pr

        return await pr.probe_openai(self, counted, list(label_words))
