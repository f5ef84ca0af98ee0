"""Backend for a vLLM OpenAI-compatible server started with ``--enable-prompt-embeds`` (vLLM >= 0.9.0).

BBT (shallow prompt) on a causal LM: for each candidate c and text t the client builds the input
embeddings ``[BOS] prompt_c (n, D) ++ E[tokens(template prefix with t)]`` itself (it holds the model's
tokenizer and input-embedding matrix E, see :mod:`bbt_client.backends.local_embeddings`) and sends them as
``prompt_embeds``: a list with one base64 string per sequence, each the bytes of ``torch.save`` of a
(seq_len, D) tensor (float32, float16 or bfloat16), on ``POST /v1/completions`` with ``max_tokens=1``.

Label scores are the log-probabilities of each label word's (single) token as the next token, read from
``logprobs`` with ``return_tokens_as_token_ids`` so tokens are matched by id, not by decoded text, in one of
three ways (``scoring`` option; ``auto``: the one ``bbt tune`` finds by :meth:`VLLMBackend.probe`, else
``allowed_token_ids`` when ``restrict_labels`` and ``top-k`` when not):

- ``logprob_token_ids``: vLLM's ``logprob_token_ids`` = the label tokens returns exactly their raw full-vocabulary
  log-probs, however many (not capped by ``--max-logprobs``). Exact.
- ``allowed_token_ids``: vLLM's label restriction. When the server runs with ``--logprobs-mode
  processed_logprobs`` the returned logprobs are exactly the label tokens' log-softmax over the label set
  (differences of their logits, which is all the loss needs); with vLLM's default ``raw_logprobs`` the returned
  top-k come from the unrestricted distribution and every label but the sampled one may be floored.
- ``top-k``: no restriction; labels outside the returned top k are floored.
- A label token missing from the returned top-k gets ``lowest returned logprob - missing_margin``: its true
  value is below the lowest one shown, so this is an approximation (counted in ``ScoreResult.extra``).
  vLLM reports a -inf log-probability as -9999.0; such a value is treated as missing too, never as a score.
- vLLM refuses ``logprobs`` above its ``--max-logprobs`` (default 20) with a 400; ``max_logprobs`` (default 20)
  tells the backend the server's cap. A task with more label words than the cap cannot be scored exactly
  (labels past the cap would all get the floor): that is a :class:`ConfigError` naming both fixes.
- ``model``: vLLM answers 404 for any name but the one it serves (``--served-model-name``, else ``--model``,
  e.g. ``meta-llama/...``, not the local folder's name). Unless ``model`` is given, the backend asks
  ``GET /v1/models`` once and uses the one name served there (and omits ``model`` if the route is missing).

Batching: vLLM's Completions API accepts a list of prompt embeddings in one request (one choice per
sequence, matched by ``index``); C × N sequences are sent ``prompts_per_request`` at a time, with requests
running concurrently up to the endpoint's concurrency limit.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any, Sequence

import numpy as np
from bbt_client.backends.base import Counted, ScoreJob, ScoreResult, uncounted
from bbt_client.backends.causal_template import check_causal_template, label_text, prefix_before_mask
from bbt_client.backends.http import HttpBackend, HttpEndpoint, RetryPolicy
from bbt_client.backends.local_embeddings import LocalEmbeddings
from bbt_client.backends.scoring import Scoring, describe
from bbt_client.backends.openai_wire import (
    CompletionResponse,
    ModelList,
    first_top_logprobs,
    label_logprobs,  # noqa: F401 - importable from here
    split_v1,
    usage_tokens,
)
from bbt_client.errors import ConfigError, RequestRejected, UnsupportedError
from bbt_client.protocol import ModelInfo, TokenizeResponse, WordTokens

EMBEDS_DTYPES = ("float32", "float16", "bfloat16")
SCORINGS = ("auto", "logprob_token_ids", "allowed_token_ids", "top-k")


def encode_prompt_embeds(seq: np.ndarray, dtype: str = "float32") -> str:
    """base64 of ``torch.save`` of a fresh (seq_len, D) tensor: vLLM's ``prompt_embeds`` element format.

    A fresh tensor matters: ``torch.save`` of a view would write the whole underlying storage.
    """
    import torch

    t = torch.from_numpy(np.array(seq, dtype=np.float32, copy=True)).to(getattr(torch, dtype)).contiguous()
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class VLLMBackend(HttpBackend):
    """BBT against vLLM prompt embeddings. ``embeddings_from``: HF model folder or .safetensors with E."""

    supported_prompts = frozenset({"none", "shallow"})

    def __init__(
        self,
        base_url: str,
        *,
        embeddings_from: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_concurrency: int = 4,
        max_retries: int = 5,
        retry: RetryPolicy | None = None,
        restrict_labels: bool = True,
        scoring: str = "auto",
        processed_logprobs: bool | None = None,
        top_logprobs: int = 20,
        max_logprobs: int = 20,
        missing_margin: float = 1.0,
        prompts_per_request: int = 64,
        embeds_dtype: str = "bfloat16",
        add_bos: bool | None = None,
        embedding_key: str | None = None,
        tokenizer_from: str | None = None,
        max_seq_len: int | None = None,
        embeddings: LocalEmbeddings | None = None,
        http: HttpEndpoint | None = None,
    ):
        if embeddings is None:
            if not embeddings_from:
                raise ConfigError("the vllm backend needs --embeddings-from DIR: the served model's Hugging Face "
                                  "folder (tokenizer + safetensors) so the client can embed text itself")
            embeddings = LocalEmbeddings(embeddings_from, embedding_key=embedding_key, tokenizer_from=tokenizer_from)
        if scoring not in SCORINGS:
            raise ConfigError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        if embeds_dtype not in EMBEDS_DTYPES:
            raise ConfigError(f"embeds_dtype must be one of {', '.join(EMBEDS_DTYPES)}")
        if prompts_per_request < 1 or top_logprobs < 1 or max_logprobs < 1:
            raise ConfigError("prompts_per_request, top_logprobs and max_logprobs must be at least 1")
        if top_logprobs > max_logprobs:
            raise ConfigError(f"top_logprobs={top_logprobs} exceeds max_logprobs={max_logprobs}: vLLM refuses more "
                              "logprobs than its --max-logprobs; lower top_logprobs or raise both")
        self.emb = embeddings
        #: The served model name; None until asked (``GET /v1/models``) unless given.
        self.model: str | None = model
        self._model_known = model is not None
        self.restrict_labels = restrict_labels
        self.scoring_option = scoring
        #: The strategy in use; None: ``auto`` not yet probed (then ``restrict_labels`` decides).
        self.strategy: str | None = None if scoring == "auto" else scoring
        #: Whether the server's logprobs are taken after the label restriction (None: unknown).
        self.processed_logprobs = processed_logprobs
        self.top_logprobs = int(top_logprobs)
        self.max_logprobs = int(max_logprobs)
        self.missing_margin = float(missing_margin)
        self.prompts_per_request = int(prompts_per_request)
        self.embeds_dtype = embeds_dtype
        self.add_bos = embeddings.tokenizer.adds_bos if add_bos is None else bool(add_bos)
        if self.add_bos and embeddings.tokenizer.bos_id is None:
            raise ConfigError("add_bos is set but the tokenizer defines no bos_token")
        self._max_seq_len = max_seq_len
        self._connect(split_v1(base_url), http=http, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                      max_concurrency=max_concurrency, max_retries=max_retries, retry=retry)
        self._info: ModelInfo | None = None

    def _repr_fields(self) -> str:
        return f"model={self.model!r}" if self._model_known else "model=<from /v1/models>"

    async def served_model(self) -> str | None:
        """The ``model`` to send: the given one, else the single name ``GET /v1/models`` lists (None: omit it)."""
        if not self._model_known:
            try:
                listing: ModelList = await self.http.request("GET", "/v1/models", model=ModelList)
            except RequestRejected as exc:
                if exc.status not in (404, 405):
                    raise
                listing = ModelList(data=[])  # no listing route: send no model, the server uses its own
            names = [m.id for m in listing.data]
            if len(names) > 1:
                raise ConfigError(f"{self.http.base_url} serves several models {names}; choose one with "
                                  "options.model")
            self.model = names[0] if names else None
            self._model_known = True
        return self.model

    # ------------------------------------------------------------------ facts from the local copy

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            cfg = self.emb.config
            std = float(self.emb.matrix.std())
            layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1)
            self._info = ModelInfo(
                name=self.model or self.emb.folder.name, kind="causal",
                architecture=(cfg.get("architectures") or ["unknown"])[0],
                hidden_size=self.emb.hidden_size, num_layers=layers,
                max_seq_len=int(self._max_seq_len or cfg.get("max_position_embeddings") or cfg.get("n_positions")
                                or 4096),
                vocab_size=self.emb.vocab_size, embedding_std=std,
                hidden_std=[std] * layers,  # unknown remotely; only entry 0 matters for shallow prompts
                max_prompt_tokens=512, max_candidates=10_000, max_texts=100_000,
                max_body_bytes=2**31 - 1, device="remote vllm",
            )
        return self._info

    def _label_ids(self, words: Sequence[str]) -> list[int]:
        ids = []
        for w in words:
            toks = self.emb.tokenizer.encode(label_text(w))
            if len(toks) != 1:
                raise ConfigError(f"label word {w!r} is {len(toks)} tokens for this model's tokenizer; a causal "
                                  "endpoint scores one next token, so pick single-token label words")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ConfigError(f"label words {list(words)} map to repeated tokens {ids}")
        if len(ids) > self.max_logprobs and self._current_strategy() != "logprob_token_ids":
            raise ConfigError(
                f"{len(ids)} label words but the endpoint returns at most max_logprobs={self.max_logprobs} "
                "log-probs per token, so some labels could never be scored; start vLLM with a larger "
                "--max-logprobs and set the backend option max_logprobs to match, use fewer label words, or "
                "scoring=logprob_token_ids where the server supports it (bbt probe tells)")
        return ids

    # ------------------------------------------------------------------ strategy

    def _current_strategy(self) -> str:
        if self.strategy is not None:
            return self.strategy
        return "allowed_token_ids" if self.restrict_labels else "top-k"

    def scoring(self, k: int) -> Scoring:
        return describe(self._current_strategy(), k, processed=self.processed_logprobs, facts=self._facts())

    def _facts(self) -> dict:
        return {"strategy": self._current_strategy(), "max_logprobs": self.max_logprobs,
                "top_logprobs": self.top_logprobs, "processed_logprobs": self.processed_logprobs}

    def apply_scoring(self, facts: dict) -> None:
        self.strategy = facts.get("strategy", self.strategy)
        self.max_logprobs = int(facts.get("max_logprobs", self.max_logprobs))
        self.top_logprobs = int(facts.get("top_logprobs", self.top_logprobs))
        self.processed_logprobs = facts.get("processed_logprobs", self.processed_logprobs)

    async def probe(self, counted: Counted = uncounted, label_words: Sequence[str] = ()) -> dict:
        """What the server can do for prompt embeddings (accepted at all, logprobs cap, ``logprob_token_ids``,
        whether ``allowed_token_ids`` shows in logprobs), and the strategy chosen from it, applied here."""
        from bbt_client.backends.probe import probe_vllm

        return await probe_vllm(self, counted, list(label_words))

    async def tokenize(self, words: Sequence[str] = (), texts: Sequence[str] = ()) -> TokenizeResponse:
        tok = self.emb.tokenizer
        return TokenizeResponse(
            words=[WordTokens(word=w, ids=tok.encode(label_text(w))) for w in words],
            text_token_counts=[len(tok.encode(t)) for t in texts],
        )

    def _prefix_ids(self, job: ScoreJob) -> list[list[int]]:
        pairs = job.text_pairs or [None] * len(job.texts)
        bos = [self.emb.tokenizer.bos_id] if self.add_bos else []
        return [bos + self.emb.tokenizer.encode(prefix_before_mask(job.template, t, b))
                for t, b in zip(job.texts, pairs)]

    def estimate_tokens(self, job: ScoreJob, text_token_counts: Sequence[int] = ()) -> int:
        """Exact for this client's own tokenization: prompt rows + prefix tokens per sequence, + 1 generated."""
        n = job.prompts.num_prompt_tokens
        per_candidate = sum(len(ids) + n + 1 for ids in self._prefix_ids(job))
        return per_candidate * job.num_calls

    # ------------------------------------------------------------------ scoring

    def _sequences(self, job: ScoreJob) -> list[np.ndarray]:
        """C*N input-embedding sequences (seq_len, D), candidate-major."""
        p = job.prompts
        if p.kind == "deep":
            raise UnsupportedError(
                "vLLM prompt embeddings replace only the input layer, so deep prompts (BBTv2) cannot be sent; "
                "use method bbt (shallow prompt) with this backend, or the 'server' backend for bbtv2")
        texts_emb = [self.emb.embed(ids) for ids in self._prefix_ids(job)]
        if p.kind == "none":
            return texts_emb
        cands = np.asarray(p.candidates, dtype=np.float32)
        if cands.ndim != 3 or cands.shape[-1] != self.emb.hidden_size:
            raise ConfigError(f"shallow candidates must be (C, n, {self.emb.hidden_size}), got {cands.shape}")
        out = []
        bos = 1 if self.add_bos else 0
        for c in cands:
            for e in texts_emb:
                out.append(np.concatenate([e[:bos], c, e[bos:]], axis=0))  # BOS stays first
        return out

    async def score(self, job: ScoreJob) -> ScoreResult:
        check_causal_template(job.template)
        if job.prompts.kind not in self.supported_prompts:
            self._sequences(job)  # raises the explanatory UnsupportedError
        label_ids = self._label_ids(job.label_words)
        await self.served_model()
        seqs = self._sequences(job)
        C, N, K = job.prompts.num_candidates, len(job.texts), len(label_ids)
        chunks = [(i, min(len(seqs), i + self.prompts_per_request)) for i in range(0, len(seqs), self.prompts_per_request)]
        results = await asyncio.gather(*(self._complete(seqs[a:b], label_ids) for a, b in chunks))
        flat = np.concatenate([r[0] for r in results], axis=0)
        tokens = sum(r[1] for r in results)
        missing = sum(r[2] for r in results)
        return ScoreResult(logits=flat.reshape(C, N, K), tokens=tokens, floored_scores=missing,
                           extra={"requests": len(chunks), "missing_label_logprobs": missing,
                                  "scoring": self._current_strategy()})

    def request_body(self, seqs: Sequence[np.ndarray], label_ids: Sequence[int]) -> dict[str, Any]:
        strategy = self._current_strategy()
        body: dict[str, Any] = {
            "prompt_embeds": [encode_prompt_embeds(s, self.embeds_dtype) for s in seqs],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": (1 if strategy == "logprob_token_ids" else len(label_ids) if strategy == "allowed_token_ids"
                         else max(self.top_logprobs, 1)),
            "return_tokens_as_token_ids": True,
        }
        if self.model is not None:
            body = {"model": self.model, **body}
        if strategy == "allowed_token_ids":
            body["allowed_token_ids"] = list(label_ids)
        elif strategy == "logprob_token_ids":
            body["logprob_token_ids"] = list(label_ids)
        return body

    async def _complete(self, seqs: Sequence[np.ndarray], label_ids: Sequence[int]) -> tuple[np.ndarray, int, int]:
        body = self.request_body(seqs, label_ids)
        resp: CompletionResponse = await self.http.request("POST", "/v1/completions", json_body=body,
                                                           model=CompletionResponse)
        out = np.empty((len(seqs), len(label_ids)), dtype=np.float32)
        missing = 0
        for i, top in enumerate(first_top_logprobs(resp, len(seqs), "prompt embeddings")):
            out[i], m = label_logprobs(top, label_ids, self.missing_margin)
            missing += m
        return out, usage_tokens(resp.usage), missing
