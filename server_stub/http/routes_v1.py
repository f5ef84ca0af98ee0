"""Protocol v1's routes on top of a :class:`PromptedLM`: decode, resolve cached tensors, score, meter.

All model work (including base64 decoding and the tensor cache) runs on the single model worker
thread, so the cache needs no lock and the event loop only parses JSON and moves bytes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bbt_client.protocol import (
    DeepPrompt,
    Health,
    LayerStatsRequest,
    LayerStatsResponse,
    ModelInfo,
    NoPrompt,
    PromptBatch,
    ScoreRequest,
    ScoreResponse,
    ServerUsage,
    ShallowPrompt,
    Tensor,
    TensorRef,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    WordTokens,
    tensor_digest,
)
from server_stub.engine.micro_batches import MAX_BATCH_TOKENS
from server_stub.engine.model import PromptedLM
from server_stub.engine.shared_batches import PreparedScoreRequest, ScoreOutput
from server_stub.engine.worker import ModelWorker
from server_stub.errors import InvalidInput, UnknownTensor
from server_stub.http.framing import Handler, HttpLimits, Request
from server_stub.http.usage import UsageMeter

log = logging.getLogger(__name__)

#: Routes served without the API key: liveness probes need no secret.
PUBLIC_PATHS = frozenset({"/v1/health"})


@dataclass
class ServiceLimits:
    """Per-request limits advertised in ModelInfo; ``cache_bytes`` bounds the TensorRef cache."""

    max_prompt_tokens: int = 64
    max_candidates: int = 256
    max_texts: int = 4096
    max_batch_tokens: int = MAX_BATCH_TOKENS
    cache_bytes: int = 256 * 1024 * 1024


class TensorCache:
    """LRU of float32 arrays by sha256 (:func:`tensor_digest`), bounded by total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, digest: str) -> np.ndarray | None:
        arr = self._items.get(digest)
        if arr is not None:
            self._items.move_to_end(digest)
        return arr

    def put(self, digest: str, arr: np.ndarray) -> None:
        if digest in self._items or arr.nbytes > self.max_bytes:
            return
        self._items[digest] = arr
        self._bytes += arr.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)


class ScoringService:
    """Route handlers; :meth:`routes` plugs them into :class:`server_stub.http.framing.HttpServer`."""

    def __init__(self, lm: PromptedLM, worker: ModelWorker, meter: UsageMeter, limits: ServiceLimits | None = None,
                 max_body_bytes: int = HttpLimits.max_body_bytes):
        self.lm = lm
        self.worker = worker
        self.limits = limits or ServiceLimits(max_prompt_tokens=lm.max_prompt_tokens)
        self.max_body_bytes = max_body_bytes
        self.cache = TensorCache(self.limits.cache_bytes)
        self._stats_cache: dict[str, LayerStatsResponse] = {}
        self.meter = meter
        self.info = ModelInfo(
            name=lm.name,
            kind=lm.kind,
            architecture=lm.architecture,
            hidden_size=lm.hidden_size,
            num_layers=lm.num_layers,
            max_seq_len=lm.max_seq_len,
            vocab_size=lm.vocab_size,
            embedding_std=lm.embedding_std,
            hidden_std=lm.hidden_std,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            max_candidates=self.limits.max_candidates,
            max_texts=self.limits.max_texts,
            max_body_bytes=max_body_bytes,
            device=str(lm.device),
            prompt_modes=["replace", "add"],
            default_slot_token_ids=lm.default_slot_token_ids,
            weight_digests=lm.weight_digests,
            quantization=lm.quantization,
            dtype=str(lm.dtype).removeprefix("torch."),
        )

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/v1/health": {"GET": self.health},
            "/v1/model": {"GET": self.model_info},
            "/v1/tokenize": {"POST": self.tokenize},
            "/v1/score": {"POST": self.score},
            "/v1/layer_stats": {"POST": self.layer_stats},
            "/v1/usage": {"GET": self.usage},
        }

    # ------------------------------------------------------------------ routes

    async def health(self, _req: Request) -> tuple[int, Health]:
        return 200, Health(model=self.lm.name, quantization=self.lm.quantization)

    async def model_info(self, _req: Request) -> tuple[int, ModelInfo]:
        return 200, self.info

    async def usage(self, _req: Request) -> tuple[int, ServerUsage]:
        return 200, self.meter.snapshot(queue_depth=self.worker.pending)

    async def tokenize(self, req: Request) -> tuple[int, TokenizeResponse]:
        body = req.json(TokenizeRequest)
        return 200, await self.worker.submit(self._tokenize, body)

    async def score(self, req: Request) -> tuple[int, ScoreResponse]:
        body = req.json(ScoreRequest)
        if len(body.texts) > self.limits.max_texts:
            raise InvalidInput(f"{len(body.texts)} texts in one request; this server accepts at most "
                               f"{self.limits.max_texts}: split the batch")
        return 200, await self.worker.submit_group(self._score_group, body)

    async def layer_stats(self, req: Request) -> tuple[int, LayerStatsResponse]:
        body = req.json(LayerStatsRequest)
        if len(body.texts) > self.limits.max_texts or body.prompt_tokens > self.limits.max_prompt_tokens:
            raise InvalidInput(f"at most {self.limits.max_texts} texts and {self.limits.max_prompt_tokens} prompt "
                               "tokens per request")
        return 200, await self.worker.submit(self._layer_stats, body)

    # ------------------------------------------------------------------ worker-thread work

    def _layer_stats(self, body: LayerStatsRequest) -> LayerStatsResponse:
        key = body.model_dump_json()
        if key not in self._stats_cache:  # BBTv2 asks once per job; resumes and sweeps ask again
            slots = self.lm.slot_ids(PromptBatch("shallow", candidates=np.zeros((1, body.prompt_tokens, 1)),
                                                 mode="add", slot_token_ids=body.slot_token_ids))
            stds, tokens = self.lm.layer_stats(body.template, body.texts, body.text_pairs, body.prompt_tokens, slots,
                                               body.clip_rounds, body.clip_sigmas, self.limits.max_batch_tokens)
            self._stats_cache[key] = LayerStatsResponse(hidden_std=stds, texts=len(body.texts), tokens=tokens)
        return self._stats_cache[key]

    def _tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        words = [WordTokens(word=w, ids=self.lm.layout.word_ids(w)) for w in body.words]
        counts = [len(ids) for ids in self.lm.layout.text_ids(body.texts)] if body.texts else []
        return TokenizeResponse(words=words, text_token_counts=counts)

    def _score_group(self, bodies: Sequence[ScoreRequest]) -> list[ScoreResponse | Exception]:
        """Score queued requests together (:mod:`server_stub.engine.shared_batches`); one response or error each.

        Each request is validated on its own first, so a bad one fails alone; if a shared pass itself fails,
        its requests are retried one by one so that only the one that breaks the model fails."""
        results: list[ScoreResponse | Exception | None] = [None] * len(bodies)
        jobs: dict[int, PreparedScoreRequest] = {}
        for i, body in enumerate(bodies):
            try:
                jobs[i] = self.lm.prepare_score(body.template, body.texts, body.label_words,
                                                self._decode_prompt(body.prompt), text_pairs=body.text_pairs,
                                                max_candidates=self.limits.max_candidates)
            except Exception as exc:
                results[i] = exc
        try:
            self.lm.run_score_jobs(list(jobs.values()), self.limits.max_batch_tokens)
        except Exception as exc:
            if len(jobs) == 1:
                results[next(iter(jobs))] = exc
                jobs.clear()
            else:
                log.warning("a shared pass of %d requests failed (%s); scoring them one by one", len(jobs), exc)
                for i, job in list(jobs.items()):
                    try:
                        self.lm.run_score_jobs([job], self.limits.max_batch_tokens)
                    except Exception as one:
                        results[i] = one
                        del jobs[i]
        for i, job in jobs.items():
            results[i] = self._respond(bodies[i], job.out)
        return results  # type: ignore[return-value]

    def _respond(self, body: ScoreRequest, out: ScoreOutput) -> ScoreResponse:
        usage = Usage(candidates=out.logits.shape[0], sequences=out.sequences,
                      forward_passes=out.forward_passes, tokens_processed=out.tokens_processed)
        self.meter.add(requests=1, candidates=usage.candidates, sequences=usage.sequences,
                       tokens=usage.tokens_processed)
        return ScoreResponse(logits=Tensor.from_array(out.logits), usage=usage, model=self.lm.name,
                             request_id=body.request_id)

    def _decode_prompt(self, spec: NoPrompt | ShallowPrompt | DeepPrompt) -> PromptBatch:
        if isinstance(spec, NoPrompt):
            return PromptBatch.zero_shot()
        slots = {"mode": spec.mode, "slot_token_ids": tuple(spec.slot_token_ids) if spec.slot_token_ids else None}
        if isinstance(spec, ShallowPrompt):
            return PromptBatch("shallow", candidates=_decode(spec.candidates, "candidates"), **slots)
        base = self._resolve(spec.base) if spec.base is not None else None
        cands = _decode(spec.candidates, "candidates") if spec.candidates is not None else None
        return PromptBatch("deep", candidates=cands, base=base, layer=spec.layer, **slots)

    def _resolve(self, ref: TensorRef) -> np.ndarray:
        if ref.tensor is None:
            arr = self.cache.get(ref.sha256)
            if arr is None:
                raise UnknownTensor(f"tensor {ref.sha256[:12]}… is not cached on this server; resend it with 'tensor'")
            return arr
        arr = _decode(ref.tensor, "base")
        digest = tensor_digest(arr)
        if digest != ref.sha256:
            raise InvalidInput(f"base tensor digest is {digest[:12]}…, not the {ref.sha256[:12]}… the request names; "
                               "compute it with bbt_client.protocol.tensor_digest on the float32 array")
        if not np.isfinite(arr).all():
            raise InvalidInput("prompt base contains NaN or infinite values")
        self.cache.put(digest, arr)
        return arr


def _decode(t: Tensor, label: str) -> np.ndarray:
    try:
        return t.to_array()
    except ValueError as exc:
        raise InvalidInput(f"{label}: {exc}") from None
