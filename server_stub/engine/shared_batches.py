"""Rows of several scoring requests in shared micro-batches: one forward pass serves many requests.

Why: concurrent tuning jobs each send (candidate × text) grids; served one request at a time, every request
ends in a part-filled micro-batch and pays its own Python overhead. Here the rows of all compatible requests
(:attr:`PreparedScoreRequest.key`: same prompt mode, slot layout and prompt shape) are sorted by length
together, packed into micro-batches of at most ``max_batch_tokens`` tokens (padding included), run once, and
split back: each request gets its own label words at its own answer slots. A request alone goes through the
same code, so "alone" and "shared" differ only in which rows share a GEMM (float-noise differences, never
different maths).

Pure compute on an already validated :class:`PreparedScoreRequest`;
:meth:`server_stub.engine.model.PromptedLM.prepare_score` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from bbt_client.protocol import PromptBatch
from server_stub.engine.layout import EncodedRows
from server_stub.engine.micro_batches import micro_batch_spans


@dataclass
class ScoreOutput:
    """``logits`` (C, N, K) float32 plus metering."""

    logits: np.ndarray
    sequences: int
    forward_passes: int
    tokens_processed: int


@dataclass
class PreparedScoreRequest:
    """One /v1/score request ready for the model: validated, its texts laid out, its prompts on the device, its
    label ids; ``out`` receives the logits."""

    enc: EncodedRows
    prompts: PromptBatch
    #: (C, n, D) shallow, (C, L, n, D) deep, None zero-shot; unused by the split (base + layer) path.
    full: torch.Tensor | None
    label_ids: torch.Tensor
    out: ScoreOutput

    @property
    def num_candidates(self) -> int:
        return self.prompts.num_candidates

    @property
    def split(self) -> bool:
        """Deep base + layer l + candidates: layers below l run once per text (its own two-phase path)."""
        p = self.prompts
        return p.kind == "deep" and p.base is not None and bool(p.layer)

    @property
    def key(self) -> tuple | None:
        """Jobs with equal keys can share forward passes; None: this job runs on its own."""
        if self.split:
            return None
        shape = None if self.full is None else tuple(self.full.shape[1:])
        return (self.enc.mode, self.enc.slot_start, shape)


class RowScorer(Protocol):
    """What :func:`score_shared` needs of the model: :class:`server_stub.engine.model.PromptedLM`, described here
    rather than imported, since that module imports this one."""

    device: torch.device
    pad_id: int
    #: (B, D) last hidden states at each row's answer slot.
    forward_answer: Callable[..., torch.Tensor]
    #: (B, K) float32 label-word logits of those states.
    head_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_shared(lm: RowScorer, jobs: Sequence[PreparedScoreRequest],
                 max_batch_tokens: int) -> list[torch.Tensor]:
    """Each job's logits (N*C, K) float32, text-major (row = text * C + candidate); all jobs share one key."""
    sizes = [(len(j.enc.lengths), j.num_candidates) for j in jobs]
    text_job = np.concatenate([np.full(n, k) for k, (n, _) in enumerate(sizes)])
    text_local = np.concatenate([np.arange(n) for n, _ in sizes])
    lengths = np.concatenate([j.enc.lengths for j in jobs])
    copies = np.array([c for _, c in sizes])[text_job]
    # Rows in order of text length (stable: a request's texts keep their order), each text's copies adjacent.
    order = np.argsort(lengths, kind="stable")
    row_text = np.repeat(order, copies[order])  # global text index per row
    row_cand = np.concatenate([np.arange(copies[t]) for t in order]) if len(order) else np.zeros(0, np.int64)
    row_len = lengths[row_text]
    row_job, row_tloc = text_job[row_text], text_local[row_text]

    cand_offset = np.cumsum([0] + [c for _, c in sizes])[:-1]
    full = None if jobs[0].full is None else torch.cat([j.full for j in jobs]) if len(jobs) > 1 else jobs[0].full
    outs = [torch.empty(n * c, len(j.label_ids), dtype=torch.float32, device=lm.device)
            for j, (n, c) in zip(jobs, sizes)]
    for j in jobs:
        j.out.forward_passes = j.out.tokens_processed = 0
    enc0 = jobs[0].enc
    for start, end in micro_batch_spans(row_len, max_batch_tokens):
        b_job, b_t, b_c, b_len = row_job[start:end], row_tloc[start:end], row_cand[start:end], row_len[start:end]
        S = int(b_len.max())
        ids = np.full((end - start, S), lm.pad_id, dtype=np.int64)
        answer = np.empty(end - start, dtype=np.int64)
        present = np.unique(b_job)
        for k in present:
            at = np.nonzero(b_job == k)[0]
            src = jobs[k].enc
            w = min(S, src.ids.shape[1])
            ids[at, :w] = src.ids[b_t[at], :w]
            answer[at] = src.answer[b_t[at]]
        ids_t = torch.from_numpy(ids).to(lm.device)
        mask = (torch.arange(S)[None, :] < torch.from_numpy(b_len)[:, None]).to(lm.device, torch.long)
        per_layer: dict[int, torch.Tensor] = {}
        if full is not None:
            c_idx = torch.from_numpy(cand_offset[b_job] + b_c).to(lm.device)
            chosen = full.index_select(0, c_idx)  # (B, n, D) or (B, L, n, D)
            per_layer = {0: chosen} if chosen.dim() == 3 else {j: chosen[:, j] for j in range(chosen.shape[1])}
        h = lm.forward_answer(ids_t, mask, per_layer, torch.from_numpy(answer), slot_start=enc0.slot_start,
                              mode=enc0.mode)  # (B, D)
        for k in present:
            at = np.nonzero(b_job == k)[0]
            job = jobs[k]
            rows = torch.from_numpy(b_t[at] * sizes[k][1] + b_c[at]).to(lm.device)
            outs[k][rows] = lm.head_logits(h[torch.from_numpy(at).to(h.device)], job.label_ids)
            job.out.forward_passes += 1
            job.out.tokens_processed += int(b_len[at].sum())
    return outs

