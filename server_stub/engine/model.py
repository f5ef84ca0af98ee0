"""A pretrained LM that scores label words at an answer slot, with shallow or deep continuous prompts.

Sequence layout (one row per candidate × text)::

    [CLS/BOS if the tokenizer adds one] [n prompt slots] template-with-text [SEP if masked]

- shallow prompt (C, n, D): replaces the input *word embeddings* of the n slots; position/type
  embeddings and the embedding LayerNorm still apply (what BBT does through ``inputs_embeds``).
- deep prompt (C, L, n, D): entry 0 as shallow; entry l >= 1 replaces the hidden states at the n slots
  at the *input* of layer l (BBTv2 / P-tuning v2). Implemented with forward pre-hooks on the layer
  modules, so any HF architecture whose layers live in one ``ModuleList`` works.
- deep "base + layer l + candidates": layers below l do not depend on the candidate, so they run once
  for the N texts; their output is then expanded to C × N and only layers >= l run per candidate.

Everything here is pure compute: no HTTP, no JSON. Invalid input raises :class:`InvalidInput`. Loading the
checkpoint (layout, head, special tokens, ``--quantize``) is :mod:`.loading`; laying out the rows,
:mod:`.layout`; packing the rows of several requests into shared micro-batches, :mod:`.shared_batches`; the
last layer at the answer slot only, :mod:`.answer_layer`.
"""


from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from bbt_client.protocol import PromptBatch
from server_stub.engine.answer_layer import answer_layer_for
from server_stub.engine.layout import EncodedRows, TextLayout
from server_stub.engine.loading import REFERENCE_TEXT, LoadedLM, _hidden_arg
from server_stub.engine.micro_batches import MAX_BATCH_TOKENS, micro_batch_spans
from server_stub.engine.shared_batches import PreparedScoreRequest, ScoreOutput, score_shared
from server_stub.errors import InvalidInput

log = logging.getLogger(__name__)


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class PromptedLM(LoadedLM):
    """A checkpoint loaded once (:class:`LoadedLM`) that scores (candidate prompt × text) pairs in micro-batches;
    :attr:`layout` lays out its rows."""

    #: The last layer at the answer slot only (:mod:`server_stub.engine.answer_layer`), or None: every position.
    answer_layer = None

    def __init__(self, path: str | Path, **kwargs) -> None:
        """``kwargs``: :class:`LoadedLM`'s (device, dtype, quantize ...)."""
        super().__init__(path, **kwargs)
        self.layout = TextLayout(self)

    def encode(self, template: str, texts: Sequence[str], text_pairs: Sequence[str] | None, n_prompt: int,
               slot_ids: Sequence[int] | None = None, mode: str = "replace") -> EncodedRows:
        """This model's rows for ``texts`` in ``template`` (:meth:`TextLayout.encode`)."""
        return self.layout.encode(template, texts, text_pairs, n_prompt, slot_ids=slot_ids, mode=mode)

    def label_word_ids(self, words: Sequence[str]) -> list[int]:
        """One token id per label word, or InvalidInput (:meth:`TextLayout.label_word_ids`)."""
        return self.layout.label_word_ids(words)

    def _before_quantize(self) -> None:
        probe = self.special_prefix + self.tokenizer(REFERENCE_TEXT, add_special_tokens=False)["input_ids"][:40]
        self.answer_layer = answer_layer_for(self, probe)  # checked before int8 swaps in its own noise

    # ------------------------------------------------------------------ prompt slots


    def slot_ids(self, p: PromptBatch) -> list[int] | None:
        """The token ids the slots of ``p`` hold (``add`` mode), or None (``replace``: padding, overwritten)."""
        if p.kind == "none" or p.mode != "add":
            return None
        n = p.num_prompt_tokens
        ids = list(p.slot_token_ids) if p.slot_token_ids is not None else self.default_slot_token_ids[:n]
        if len(ids) != n:
            raise InvalidInput(f"slot_token_ids has {len(ids)} ids for a prompt of {n} tokens")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidInput(f"slot_token_ids {bad} are outside this model's vocabulary (0..{self.vocab_size - 1})")
        return ids

    def layer_stats(self, template: str, texts: Sequence[str], text_pairs: Sequence[str] | None, n_prompt: int,
                    slot_ids: Sequence[int] | None, clip_rounds: int = 5, clip_sigmas: float = 3.0,
                    max_batch_tokens: int = MAX_BATCH_TOKENS) -> tuple[list[float], int]:
        """σ̂ per layer on these texts with ``add``-mode slots and nothing added (the plain model): entry 0 is the
        word-embedding std, entry l >= 1 the std of layer l's input over all positions after ``clip_rounds``
        rounds of clipping at μ ± ``clip_sigmas``·σ (BBTv2's reference statistics). Returns (stds, tokens)."""
        ids = list(slot_ids) if slot_ids is not None else self.default_slot_token_ids[:n_prompt]
        enc = self.encode(template, texts, text_pairs, n_prompt, slot_ids=ids, mode="add")
        values: dict[int, list[np.ndarray]] = {j: [] for j in range(1, self.num_layers)}
        tokens = 0
        with torch.inference_mode():
            for rows in self._micro_batches(enc.lengths, 1, max_batch_tokens):
                b_ids, mask, ntok = self._batch_inputs(enc, rows)
                keep = mask.bool().cpu().numpy()
                tokens += ntok

                def observe(j: int, h: torch.Tensor) -> None:
                    if j >= 1:
                        values[j].append(h.float().cpu().numpy()[keep].reshape(-1))

                self.forward_layers(b_ids, mask, {}, slot_start=enc.slot_start, observe=observe, mode="add")
        stds = [self.embedding_std] + [_clipped_std(np.concatenate(values[j]), clip_rounds, clip_sigmas)
                                       for j in range(1, self.num_layers)]
        return stds, tokens

    # ------------------------------------------------------------------ validation

    def check_prompts(self, p: PromptBatch, max_candidates: int) -> None:
        """Shape and finiteness checks; raises InvalidInput naming what is wrong and what is expected."""
        D, L, nmax = self.hidden_size, self.num_layers, self.max_prompt_tokens
        arrays = {"candidates": p.candidates, "base": p.base}
        for label, arr in arrays.items():
            if arr is not None and not np.isfinite(arr).all():
                raise InvalidInput(f"prompt {label} contain NaN or infinite values")
        if p.kind == "none":
            return
        if p.kind == "shallow":
            _expect(p.candidates, 3, "shallow candidates", "(C, n, D)")
            C, n, d = p.candidates.shape
        elif p.base is None:
            _expect(p.candidates, 4, "deep candidates", "(C, L, n, D)")
            C, l_, n, d = p.candidates.shape
            if l_ != L:
                raise InvalidInput(f"deep candidates have {l_} layers; this model has L = {L}")
        else:
            _expect(p.base, 3, "deep base", "(L, n, D)")
            l_, n, d = p.base.shape
            if l_ != L:
                raise InvalidInput(f"deep base has {l_} layers; this model has L = {L}")
            C = 1
            if p.candidates is not None:
                _expect(p.candidates, 3, "deep candidates with a base", "(C, n, D)")
                C = p.candidates.shape[0]
                if p.candidates.shape[1:] != (n, d):
                    raise InvalidInput(
                        f"deep candidates {tuple(p.candidates.shape)} do not match base (L, n, D) = {(l_, n, d)}"
                    )
                if p.layer is None or p.layer >= L:
                    raise InvalidInput(f"layer must be in 0..{L - 1}; got {p.layer}")
        if d != D:
            raise InvalidInput(f"prompt hidden size is {d}; this model has D = {D}")
        if not 1 <= n <= nmax:
            raise InvalidInput(f"prompts must have 1..{nmax} tokens (n); got {n}")
        if not 1 <= C <= max_candidates:
            raise InvalidInput(f"prompts must have 1..{max_candidates} candidates (C); got {C}")

    # ------------------------------------------------------------------ scoring

    def score(
        self,
        template: str,
        texts: Sequence[str],
        label_words: Sequence[str],
        prompts: PromptBatch,
        *,
        text_pairs: Sequence[str] | None = None,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        max_candidates: int = 256,
    ) -> ScoreOutput:
        """(C, N, K) label-word logits at the answer slot; see the module docstring for the layout."""
        job = self.prepare_score(template, texts, label_words, prompts, text_pairs=text_pairs,
                                 max_candidates=max_candidates)
        self.run_score_jobs([job], max_batch_tokens)
        return job.out

    def prepare_score(
        self,
        template: str,
        texts: Sequence[str],
        label_words: Sequence[str],
        prompts: PromptBatch,
        *,
        text_pairs: Sequence[str] | None = None,
        max_candidates: int = 256,
    ) -> PreparedScoreRequest:
        """Validate and tokenize one request (raises :class:`InvalidInput`); :meth:`run_score_jobs` computes it."""
        self.check_prompts(prompts, max_candidates)
        label_ids = torch.tensor(self.label_word_ids(label_words), device=self.device)
        enc = self.encode(template, texts, text_pairs, prompts.num_prompt_tokens,
                          slot_ids=self.slot_ids(prompts), mode=prompts.mode)
        out = ScoreOutput(np.empty(0), sequences=prompts.num_candidates * len(texts), forward_passes=0,
                          tokens_processed=0)
        job = PreparedScoreRequest(enc, prompts, None, label_ids, out)
        if not job.split:
            with torch.inference_mode():
                job.full = self._full_prompts(prompts)
        return job

    def run_score_jobs(self, jobs: Sequence[PreparedScoreRequest],
                       max_batch_tokens: int = MAX_BATCH_TOKENS) -> None:
        """Fill each job's ``out``: jobs with equal :attr:`PreparedScoreRequest.key` share micro-batches
        (:mod:`server_stub.engine.shared_batches`); a split deep job runs its own two phases."""
        groups: dict[tuple, list[PreparedScoreRequest]] = {}
        with torch.inference_mode():
            for job in jobs:
                if job.key is None:
                    job.out.forward_passes = job.out.tokens_processed = 0
                    self._finish(job, self._score_split(job.enc, job.prompts, job.label_ids, max_batch_tokens,
                                                        job.out))
                else:
                    groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                for job, logits in zip(group, score_shared(self, group, max_batch_tokens)):
                    self._finish(job, logits)

    @staticmethod
    def _finish(job: PreparedScoreRequest, logits: torch.Tensor) -> None:
        N, C = len(job.enc.lengths), job.num_candidates
        job.out.logits = logits.float().cpu().numpy().reshape(N, C, -1).transpose(1, 0, 2).copy()

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(self.device, self.dtype)

    def _full_prompts(self, p: PromptBatch) -> torch.Tensor | None:
        """(C, n, D) shallow, (C, L, n, D) deep, or None."""
        if p.kind == "none":
            return None
        if p.kind == "shallow" or p.base is None:
            return self._to_device(p.candidates)
        base = self._to_device(p.base)[None]
        if p.candidates is None:
            return base
        full = base.repeat(p.num_candidates, 1, 1, 1)
        full[:, p.layer] = self._to_device(p.candidates)
        return full

    def _micro_batches(self, lengths: np.ndarray, copies: int, max_batch_tokens: int) -> Iterator[np.ndarray]:
        """Row indices (text-major: row = text * copies + copy) in micro-batches (:func:`micro_batch_spans`)."""
        order = np.argsort(lengths, kind="stable")
        rows = (order[:, None] * copies + np.arange(copies)[None, :]).reshape(-1)
        for start, end in micro_batch_spans(lengths[rows // copies], max_batch_tokens):
            yield rows[start:end]

    def _batch_inputs(self, enc: EncodedRows, text_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        lens = enc.lengths[text_idx]
        S = int(lens.max())
        ids = torch.from_numpy(enc.ids[text_idx, :S]).to(self.device)
        mask = (torch.arange(S)[None, :] < torch.from_numpy(lens)[:, None]).to(self.device, torch.long)
        return ids, mask, int(lens.sum())

    def _score_split(
        self, enc: EncodedRows, p: PromptBatch, label_ids: torch.Tensor, mbt: int, meter: ScoreOutput
    ) -> torch.Tensor:
        """Base + layer l + candidates: layers < l once per text, then layers >= l per candidate."""
        N, C, l = len(enc.lengths), p.num_candidates, int(p.layer)
        base = self._to_device(p.base)  # (L, n, D)
        cands = self._to_device(p.candidates)  # (C, n, D)
        prefix = torch.zeros(N, enc.ids.shape[1], self.hidden_size, dtype=self.dtype, device=self.device)
        for rows in self._micro_batches(enc.lengths, 1, mbt):
            ids, mask, ntok = self._batch_inputs(enc, rows)
            B = len(rows)
            per_layer = {j: base[j].expand(B, -1, -1) for j in range(l)}
            h = self._forward(ids, mask, enc, per_layer, capture_at=l)
            prefix[torch.from_numpy(rows).to(self.device), : h.shape[1]] = h
            meter.forward_passes += 1
            meter.tokens_processed += ntok
        out = torch.empty(N * C, len(label_ids), dtype=torch.float32, device=self.device)
        for rows in self._micro_batches(enc.lengths, C, mbt):
            rows_t = torch.from_numpy(rows).to(self.device)
            t_idx, c_idx = rows // C, torch.from_numpy(rows % C).to(self.device)
            ids, mask, ntok = self._batch_inputs(enc, t_idx)
            B = len(rows)
            per_layer = {j: base[j].expand(B, -1, -1) for j in range(l + 1, self.num_layers)}
            per_layer[l] = cands.index_select(0, c_idx)
            start = prefix[torch.from_numpy(t_idx).to(self.device), : ids.shape[1]]
            h = self.forward_answer(ids, mask, per_layer, torch.from_numpy(enc.answer[t_idx]),
                                    slot_start=enc.slot_start, mode=enc.mode, start_layer=l, start_hidden=start)
            out[rows_t] = self.head_logits(h, label_ids)
            meter.forward_passes += 1
            meter.tokens_processed += ntok
        return out

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        enc: EncodedRows,
        per_layer: dict[int, torch.Tensor],
        *,
        start_layer: int = 0,
        start_hidden: torch.Tensor | None = None,
        capture_at: int | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, S, D); or the input of layer ``capture_at`` (before its prompt is applied).

        ``per_layer[0]`` (B, n, D) replaces word embeddings of the slots; ``per_layer[j]`` the input of layer j.
        With ``start_layer`` > 0, layers below it are skipped and ``start_hidden`` (B, S, D) is its input.
        """
        return self.forward_layers(
            ids, mask, per_layer, slot_start=enc.slot_start, start_layer=start_layer,
            start_hidden=start_hidden, capture_at=capture_at, mode=enc.mode,
        )

    def forward_layers(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        per_layer: dict[int, torch.Tensor],
        *,
        slot_start: int,
        start_layer: int = 0,
        start_hidden: torch.Tensor | None = None,
        capture_at: int | None = None,
        observe: Callable[[int, torch.Tensor], None] | None = None,
        mode: str = "replace",
    ) -> torch.Tensor:
        """The prompted forward pass itself (public so tests can observe each layer's input via ``observe``).

        ``mode="replace"``: ``per_layer[0]`` replaces the slots' word embeddings, ``per_layer[j]`` layer j's input
        at the slots. ``mode="add"``: every ``per_layer[j]``, j = 0 included, is added to layer j's input at the
        slots — for j = 0 that is the embedding output, after its LayerNorm (the reference code's semantics).
        """
        embeds = self.word_embeddings(ids)
        if mode == "replace" and 0 in per_layer and start_layer == 0:
            embeds = _prompt_at_slots(embeds, per_layer[0], slot_start, mode)
        acts_at = (lambda j: j in per_layer) if mode == "add" else (lambda j: j > 0 and j in per_layer)

        def make_hook(j: int):
            def hook(_m, args, kwargs):
                h = _hidden_arg(args, kwargs)
                if j == start_layer and start_hidden is not None:
                    h = start_hidden.to(h.dtype)
                if j == capture_at:
                    raise _StopForward(h)
                if acts_at(j):
                    h = _prompt_at_slots(h, per_layer[j], slot_start, mode)
                if observe is not None:
                    observe(j, h)
                return _replace_hidden_arg(args, kwargs, h)

            return hook

        handles = [
            self.layers[j].register_forward_pre_hook(make_hook(j), with_kwargs=True)
            for j in range(start_layer, self.num_layers)
        ]
        try:
            with self.layer_list.only(start_layer):
                out = self.base_model(inputs_embeds=embeds, attention_mask=mask, **self._extra_kwargs())
        except _StopForward as stop:
            return stop.hidden
        finally:
            for h in handles:
                h.remove()
        return out[0]

    def forward_answer(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        per_layer: dict[int, torch.Tensor],
        answer: torch.Tensor,
        *,
        slot_start: int,
        mode: str = "replace",
        start_layer: int = 0,
        start_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) last hidden states at each row's ``answer`` slot: :meth:`forward_layers` up to the last layer's
        input, then that layer at the answer only (:attr:`answer_layer`) when the model has one."""
        last = self.num_layers - 1
        if self.answer_layer is None:
            hidden = self.forward_layers(ids, mask, per_layer, slot_start=slot_start, start_layer=start_layer,
                                         start_hidden=start_hidden, mode=mode)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), answer.to(hidden.device)]
        h = self.forward_layers(ids, mask, per_layer, slot_start=slot_start, start_layer=start_layer,
                                start_hidden=start_hidden, capture_at=last, mode=mode)
        if last in per_layer and (mode == "add" or last > 0):  # what forward_layers' hook does at that layer
            h = _prompt_at_slots(h, per_layer[last], slot_start, mode)
        return self.answer_layer(h, mask, answer)

    def head_logits(self, h: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 label-word logits from answer-slot hidden states ``h`` (B, D)."""
        if self.tied_head:
            return (h @ self.word_embeddings.weight.index_select(0, label_ids).T).float()
        return self.head(h).index_select(-1, label_ids).float()


# ---------------------------------------------------------------------- helpers


def _clipped_std(x: np.ndarray, rounds: int, sigmas: float) -> float:
    """std of ``x`` after ``rounds`` rounds of clipping to mean ± sigmas·std (outliers pulled in, not dropped)."""
    x = x.astype(np.float64)
    for _ in range(rounds):
        mu, sd = x.mean(), x.std()
        x = np.clip(x, mu - sigmas * sd, mu + sigmas * sd)
    return float(x.std())


def _prompt_at_slots(h: torch.Tensor, p: torch.Tensor, slot_start: int, mode: str) -> torch.Tensor:
    """A copy of ``h`` (B, S, D) with ``p`` (B, n, D) added to (``add``) or written over (``replace``) its n
    prompt slots."""
    p = p.to(h.dtype)
    h = h.clone()
    if mode == "add":
        h[:, slot_start : slot_start + p.shape[1]] += p
    else:
        h[:, slot_start : slot_start + p.shape[1]] = p
    return h


def _replace_hidden_arg(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _expect(arr: np.ndarray | None, ndim: int, label: str, shape: str) -> None:
    if arr is None or arr.ndim != ndim:
        got = None if arr is None else tuple(arr.shape)
        raise InvalidInput(f"{label} must have shape {shape}; got {got}")
