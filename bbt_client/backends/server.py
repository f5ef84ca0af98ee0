"""Backend for our own inference server (``server_stub``, protocol v1 in :mod:`bbt_client.protocol`).

It can send every prompt kind. Jobs larger than the server's advertised limits (``max_candidates``,
``max_texts``, ``max_body_bytes``) are split into a grid of candidate × text chunks whose logits are
stitched back into one (C, N, K) array; chunks run concurrently up to the endpoint's concurrency limit.

BBTv2 asks for "base prompt with layer l replaced by each candidate"; the base (L, n, D) is the bulk of
the bytes and changes only when the best prompt improves. So the base travels as a :class:`TensorRef`:
with the tensor the first time this backend sends that digest, by digest alone afterwards; if the
server forgot it (restart, eviction) it answers 409 ``unknown_tensor`` and the chunk is resent once
with the tensor.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Sequence

import numpy as np

from bbt_client.backends.base import ScoreJob, ScoreResult
from bbt_client.backends.http import HttpBackend, HttpEndpoint, RetryPolicy
from bbt_client.errors import ProtocolError, RequestRejected, UnsupportedError
from bbt_client.protocol import (
    ERROR_UNKNOWN_TENSOR,
    MASK_SLOT,
    TEXT_A_SLOT,
    TEXT_B_SLOT,
    TEXT_SLOT,
    DeepPrompt,
    LayerStatsRequest,
    LayerStatsResponse,
    ModelInfo,
    NoPrompt,
    ScoreRequest,
    ScoreResponse,
    ServerUsage,
    ShallowPrompt,
    Tensor,
    TensorRef,
    TokenizeRequest,
    TokenizeResponse,
    tensor_digest,
)

#: Tokenize requests are chunked to stay inside TokenizeRequest's own list limits.
_TOKENIZE_TEXTS_PER_REQUEST = 5000
_TOKENIZE_WORDS_PER_REQUEST = 1000
#: Fraction of max_body_bytes a request may fill: JSON framing and our estimate's slack need the rest.
_BODY_FILL = 0.8
#: Specials a sequence may carry ([CLS] ... [SEP], or BOS/EOS; pairs add one more [SEP]).
_SPECIAL_TOKENS = 4


def _b64_len(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


def template_token_bound(template: str) -> int:
    """Upper bound on the tokens a template adds around its text(s): at most one token per character
    outside the slots, one for the mask, plus special tokens."""
    rest = template
    for slot in (TEXT_SLOT, TEXT_A_SLOT, TEXT_B_SLOT, MASK_SLOT):
        rest = rest.replace(slot, "")
    return len(rest) + 1 + _SPECIAL_TOKENS


class ServerBackend(HttpBackend):
    """Speaks protocol v1 to a bbt inference server. ``attempts``/``requests`` count HTTP traffic."""

    supported_prompts = frozenset({"none", "shallow", "deep"})

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_concurrency: int = 4,
        max_retries: int = 5,
        retry: RetryPolicy | None = None,
        prompt_dtype: str = "float32",
        http: HttpEndpoint | None = None,
    ):
        self._connect(base_url, http=http, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                      max_concurrency=max_concurrency, max_retries=max_retries, retry=retry)
        if prompt_dtype not in ("float32", "float16"):
            raise ValueError("prompt_dtype must be float32 or float16")
        self.prompt_dtype = prompt_dtype
        self._info: ModelInfo | None = None
        self._sent_digests: set[str] = set()
        self._tokenize_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], TokenizeResponse] = {}
        #: Extra requests caused by 409 unknown_tensor (for reports and tests).
        self.tensor_resends = 0

    # ------------------------------------------------------------------ model facts and tokens

    async def model_info(self) -> ModelInfo:
        # No lock on purpose: a duplicate GET on a concurrent first call is harmless, and an asyncio.Lock
        # would tie this backend to one event loop.
        if self._info is None:
            self._info = await self.http.request("GET", "/v1/model", model=ModelInfo)
        return self._info

    async def usage(self) -> ServerUsage:
        """What the server says it has computed since it started (``GET /v1/usage``)."""
        return await self.http.request("GET", "/v1/usage", model=ServerUsage)

    async def tokenize(self, words: Sequence[str] = (), texts: Sequence[str] = ()) -> TokenizeResponse:
        key = (tuple(words), tuple(texts))
        if key in self._tokenize_cache:
            return self._tokenize_cache[key]
        words, texts = list(words), list(texts)
        out_words, out_counts = [], []
        n_chunks = max(1, math.ceil(len(words) / _TOKENIZE_WORDS_PER_REQUEST),
                       math.ceil(len(texts) / _TOKENIZE_TEXTS_PER_REQUEST))
        for i in range(n_chunks):
            w = words[i * _TOKENIZE_WORDS_PER_REQUEST:(i + 1) * _TOKENIZE_WORDS_PER_REQUEST]
            t = texts[i * _TOKENIZE_TEXTS_PER_REQUEST:(i + 1) * _TOKENIZE_TEXTS_PER_REQUEST]
            resp = await self.http.request("POST", "/v1/tokenize", model=TokenizeResponse,
                                           json_body=TokenizeRequest(words=w, texts=t).model_dump(mode="json"))
            if len(resp.words) != len(w) or len(resp.text_token_counts) != len(t):
                raise ProtocolError(
                    f"/v1/tokenize answered {len(resp.words)} words and {len(resp.text_token_counts)} counts "
                    f"for {len(w)} words and {len(t)} texts")
            out_words.extend(resp.words)
            out_counts.extend(resp.text_token_counts)
        result = TokenizeResponse(words=out_words, text_token_counts=out_counts)
        self._tokenize_cache[key] = result
        return result

    async def layer_stats(self, *, template: str, texts: Sequence[str], text_pairs: Sequence[str] | None,
                          prompt_tokens: int, slot_token_ids: Sequence[int] | None) -> list[float]:
        info = await self.model_info()
        if "add" not in info.prompt_modes:
            raise UnsupportedError("this server predates /v1/layer_stats (it has no 'add' prompt mode); "
                                   "use hidden_std_source='model'")
        req = LayerStatsRequest(template=template, texts=list(texts),
                                text_pairs=list(text_pairs) if text_pairs is not None else None,
                                prompt_tokens=prompt_tokens,
                                slot_token_ids=list(slot_token_ids) if slot_token_ids else None)
        resp = await self.http.request("POST", "/v1/layer_stats", json_body=req.model_dump(mode="json", exclude_none=True),
                                       model=LayerStatsResponse)
        if len(resp.hidden_std) != info.num_layers or not all(math.isfinite(v) and v > 0 for v in resp.hidden_std):
            raise ProtocolError(f"/v1/layer_stats answered {resp.hidden_std!r} for a {info.num_layers}-layer model")
        return list(resp.hidden_std)

    def estimate_tokens(self, job: ScoreJob, text_token_counts: Sequence[int]) -> int:
        """Upper bound of ``tokens_processed`` the server will meter: per candidate and text,
        prompt tokens + text tokens (+ pair tokens are included in counts if the caller passes them) +
        one token per template character + mask + specials."""
        per_seq = template_token_bound(job.template) + job.prompts.num_prompt_tokens
        per_candidate = sum(int(c) for c in text_token_counts) + len(text_token_counts) * per_seq
        if job.text_pairs is not None:
            per_candidate += sum(len(p) + 1 for p in job.text_pairs)  # pairs: <= one token per char
        return per_candidate * job.num_calls

    # ------------------------------------------------------------------ scoring

    async def score(self, job: ScoreJob) -> ScoreResult:
        prompts = job.prompts
        if prompts.kind not in self.supported_prompts:
            raise UnsupportedError(f"prompt kind {prompts.kind!r} is not known to the server protocol")
        if len(job.texts) == 0:
            raise ValueError("a score job needs at least one text")
        info = await self.model_info()
        C, N, K = prompts.num_candidates, len(job.texts), len(job.label_words)
        c_step, n_step = self._chunk_sizes(job, info)
        tiles = [(c0, min(C, c0 + c_step), n0, min(N, n0 + n_step))
                 for c0 in range(0, C, c_step) for n0 in range(0, N, n_step)]
        base_digest = None
        if prompts.kind == "deep" and prompts.base is not None:
            base_digest = tensor_digest(prompts.base)
        batch_id = uuid.uuid4().hex[:16]
        logits = np.empty((C, N, K), dtype=np.float32)
        tokens = served = 0

        async def run(i: int, tile: tuple[int, int, int, int]) -> None:
            nonlocal tokens, served
            c0, c1, n0, n1 = tile
            resp = await self._send_tile(job, tile, base_digest, f"{batch_id}-{i}")
            logits[c0:c1, n0:n1] = self._checked_logits(resp, (c1 - c0, n1 - n0, K), f"{batch_id}-{i}")
            tokens += int(resp.usage.tokens_processed)
            served += int(resp.usage.candidates)

        start = 0
        if base_digest is not None and base_digest not in self._sent_digests and tiles:
            await run(0, tiles[0])  # teach the server the base once, then let the rest refer to it
            start = 1
        await asyncio.gather(*(run(i, t) for i, t in enumerate(tiles) if i >= start))
        return ScoreResult(logits=logits, tokens=tokens, extra={"requests": len(tiles)}, endpoint_calls=served)

    def _chunk_sizes(self, job: ScoreJob, info: ModelInfo) -> tuple[int, int]:
        """Largest (candidates, texts) per request inside the server's limits and body-size estimate."""
        p = job.prompts
        C, N = p.num_candidates, len(job.texts)
        itemsize = 4 if self.prompt_dtype == "float32" else 2
        c_step = max(1, min(C, info.max_candidates))
        n_step = max(1, min(N, info.max_texts))
        per_candidate = 0
        fixed = 0
        if p.candidates is not None:
            per_candidate = _b64_len(int(np.prod(p.candidates.shape[1:])) * itemsize)
        if p.base is not None:
            fixed = _b64_len(int(p.base.size) * itemsize)
        pairs = job.text_pairs or ()
        text_bytes = [len(t.encode()) * 2 + 8 for t in job.texts]  # JSON escaping worst-ish case
        pair_bytes = [len(t.encode()) * 2 + 8 for t in pairs]
        budget = info.max_body_bytes * _BODY_FILL - len(job.template) * 2 - sum(len(w) * 2 + 8 for w in job.label_words)
        budget -= 2048  # field names, request id, shape lists
        text_total = sum(text_bytes) + sum(pair_bytes)
        # Prefer keeping all texts in one request and splitting candidates; shrink texts only if needed.
        while True:
            avg_text = text_total * n_step / max(N, 1)
            room = budget - fixed - avg_text
            if per_candidate == 0:
                if room >= 0 or n_step == 1:
                    break
            elif room >= per_candidate or n_step == 1:
                c_step = max(1, min(c_step, int(room // per_candidate) if room > 0 else 1))
                break
            n_step = max(1, n_step // 2)
        return c_step, n_step

    def _prompt_spec(self, job: ScoreJob, c0: int, c1: int, base_digest: str | None, with_base: bool):
        p = job.prompts
        dt = self.prompt_dtype
        if p.kind == "none":
            return NoPrompt()
        slots = {"mode": p.mode, "slot_token_ids": list(p.slot_token_ids) if p.slot_token_ids else None}
        if p.kind == "shallow":
            return ShallowPrompt(candidates=Tensor.from_array(p.candidates[c0:c1], dt), **slots)
        if p.base is None:
            return DeepPrompt(candidates=Tensor.from_array(p.candidates[c0:c1], dt), **slots)
        ref = TensorRef(sha256=base_digest, tensor=Tensor.from_array(p.base, dt) if with_base else None)
        if p.layer is None:
            return DeepPrompt(base=ref, **slots)
        return DeepPrompt(base=ref, layer=p.layer, candidates=Tensor.from_array(p.candidates[c0:c1], dt), **slots)

    async def _send_tile(self, job: ScoreJob, tile, base_digest: str | None, request_id: str) -> ScoreResponse:
        c0, c1, n0, n1 = tile
        with_base = base_digest is not None and base_digest not in self._sent_digests

        def body(send_base: bool) -> dict:
            req = ScoreRequest(
                template=job.template,
                texts=list(job.texts[n0:n1]),
                text_pairs=list(job.text_pairs[n0:n1]) if job.text_pairs is not None else None,
                label_words=list(job.label_words),
                prompt=self._prompt_spec(job, c0, c1, base_digest, send_base),
                request_id=request_id,
            )
            out = req.model_dump(mode="json", exclude_none=True)
            if out["prompt"].get("mode") == "replace":
                del out["prompt"]["mode"]  # the v1 default: servers older than prompt modes accept the request
            return out

        try:
            resp = await self.http.request("POST", "/v1/score", json_body=body(with_base), model=ScoreResponse)
        except RequestRejected as exc:
            if exc.code != ERROR_UNKNOWN_TENSOR or base_digest is None or with_base:
                raise
            self._sent_digests.discard(base_digest)
            self.tensor_resends += 1
            resp = await self.http.request("POST", "/v1/score", json_body=body(True), model=ScoreResponse)
        if base_digest is not None:
            self._sent_digests.add(base_digest)
        return resp

    @staticmethod
    def _checked_logits(resp: ScoreResponse, shape: tuple[int, int, int], request_id: str) -> np.ndarray:
        if resp.request_id != request_id:
            raise ProtocolError(f"/v1/score echoed request_id {resp.request_id!r}, expected {request_id!r}; "
                                "a proxy may be mixing up responses")
        try:
            arr = resp.logits.to_array()
        except ValueError as exc:
            raise ProtocolError(f"/v1/score returned undecodable logits: {exc}") from None
        if tuple(arr.shape) != shape:
            raise ProtocolError(f"/v1/score returned logits of shape {tuple(arr.shape)}, expected {shape} "
                                "(candidates, texts, label words)")
        if not np.all(np.isfinite(arr)):
            raise ProtocolError("/v1/score returned non-finite logits (NaN or inf); the prompt may be far out of "
                                "the embedding scale, or the server's model is broken")
        return arr


__all__ = ["ServerBackend", "template_token_bound"]
