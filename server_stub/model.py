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
checkpoint (layout, head, special tokens) is :mod:`server_stub.loading`.
"""


from __future__ import annotations

import logging
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bbt_client.protocol import PromptBatch
from server_stub.errors import InvalidInput
from server_stub.loading import REFERENCE_TEXT, LoadedLM, _hidden_arg, default_model_dir, resolve_device

__all__ = ["PromptedLM", "ScoreOutput", "LoadedLM", "REFERENCE_TEXT", "default_model_dir", "resolve_device"]

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{(text|text_a|text_b|mask)\}")


@dataclass
class ScoreOutput:
    """``logits`` (C, N, K) float32 plus metering."""

    logits: np.ndarray
    sequences: int
    forward_passes: int
    tokens_processed: int


@dataclass
class _Encoded:
    """N texts laid out as padded id rows: ``ids`` (N, S) int64, ``lengths`` (N,), ``answer`` (N,)."""

    ids: np.ndarray
    lengths: np.ndarray
    answer: np.ndarray
    slot_start: int
    n: int
    mode: str = "replace"


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class PromptedLM(LoadedLM):
    """Loads a local HF checkpoint once (:class:`LoadedLM`) and scores (candidate prompt × text) pairs in
    micro-batches."""

    def __init__(self, path: str | Path, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self._text_cache: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()

    # ------------------------------------------------------------------ tokenization

    def word_ids(self, word: str) -> list[int]:
        """Ids of ``word`` as it appears at the answer slot: after a space for BPE; WordPiece ignores it."""
        spaced = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(spaced) == 1:
            return spaced
        plain = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        return plain if len(plain) == 1 else spaced

    def label_word_ids(self, words: Sequence[str]) -> list[int]:
        out = []
        for w in words:
            ids = self.word_ids(w)
            if len(ids) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(ids)
                raise InvalidInput(
                    f"label word {w!r} is {len(ids)} tokens {pieces} for this model; "
                    "choose words that are a single token (check with /v1/tokenize)"
                )
            out.append(ids[0])
        return out

    def text_ids(self, texts: Sequence[str], leading_space: bool = False) -> list[list[int]]:
        """Token ids of each text without special tokens; memoised (BBT re-sends the same texts every step)."""
        out: list[list[int] | None] = []
        todo: list[int] = []
        for i, t in enumerate(texts):
            hit = self._text_cache.get((t, leading_space))
            if hit is None:
                todo.append(i)
            else:
                self._text_cache.move_to_end((t, leading_space))
            out.append(hit)
        if todo:
            enc = self.tokenizer(
                [(" " + texts[i]) if leading_space else texts[i] for i in todo], add_special_tokens=False
            )["input_ids"]
            for i, ids in zip(todo, enc):
                out[i] = ids
                self._text_cache[(texts[i], leading_space)] = ids
            while len(self._text_cache) > 50_000:
                self._text_cache.popitem(last=False)
        return out  # type: ignore[return-value]

    def encode(
        self, template: str, texts: Sequence[str], text_pairs: Sequence[str] | None, n_prompt: int,
        slot_ids: Sequence[int] | None = None, mode: str = "replace",
    ) -> _Encoded:
        """Lay out N sequences (right-padded); texts are truncated (longest first) to fit ``max_seq_len``.

        The n prompt slots hold ``slot_ids`` (``add`` mode) or padding ids whose embeddings a ``replace`` prompt
        overwrites."""
        pieces = _split_template(template)
        if self.kind == "causal":
            mask_at = next(i for i, (k, _) in enumerate(pieces) if k == "mask")
            if any(k != "lit" or v.strip() for k, v in pieces[mask_at + 1 :]):
                raise InvalidInput("for a causal LM {mask} must end the template (the answer is the next token)")
            pieces = pieces[: mask_at + 1]
        # Build segments: literal ids, or a text slot; a literal's trailing space moves onto the next text
        # (a lone trailing space is its own token in byte-level BPE).
        segments: list[tuple[str, list[int] | str, bool]] = []
        carry_space = False
        for kind, value in pieces:
            if kind == "lit":
                text = (" " if carry_space else "") + value
                carry_space = text.endswith((" ", "\t", "\n"))
                text = text.rstrip()
                if text:
                    segments.append(("ids", self.tokenizer(text, add_special_tokens=False)["input_ids"], False))
            elif kind == "mask":
                carry_space = False
                segments.append(("mask", [], False))
            else:
                segments.append(("text", "b" if kind == "text_b" else "a", carry_space))
                carry_space = False
        groups: dict[tuple[str, bool], list[list[int]]] = {}
        for kind, which, space in segments:
            if kind == "text":
                src = texts if which == "a" else text_pairs
                groups[(which, space)] = self.text_ids(src, leading_space=space)
        fixed = len(self._special_prefix) + n_prompt + len(self._special_suffix)
        fixed += sum(len(v) for k, v, _ in segments if k == "ids") + (1 if self.kind == "masked" else 0)
        room = self.max_seq_len - fixed
        n_text_slots = sum(1 for k, _, _ in segments if k == "text")
        if room < n_text_slots:
            raise InvalidInput(
                f"template plus {n_prompt} prompt tokens take {fixed} of the model's {self.max_seq_len} "
                "tokens and leave no room for the text; shorten the template or use fewer prompt tokens"
            )
        rows: list[list[int]] = []
        answers: list[int] = []
        mask_id = self.tokenizer.mask_token_id
        uses = {key: sum(1 for k, v, sp in segments if k == "text" and (v, sp) == key) for key in groups}
        for i in range(len(texts)):
            slots = {key: ids[i] for key, ids in groups.items()}
            slots = _truncate_longest_first(slots, room, uses)
            row = list(self._special_prefix) + (list(slot_ids) if slot_ids is not None else [self.pad_id] * n_prompt)
            answer = -1
            for kind, value, space in segments:
                if kind == "ids":
                    row.extend(value)
                elif kind == "text":
                    row.extend(slots[(value, space)])
                else:
                    if self.kind == "masked":
                        answer = len(row)
                        row.append(mask_id)
                    else:
                        answer = len(row) - 1
            row.extend(self._special_suffix)
            if answer < 0:
                raise InvalidInput("template and text produce an empty sequence before {mask}")
            rows.append(row)
            answers.append(answer)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.full((len(rows), int(lengths.max())), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        return _Encoded(ids, lengths, np.array(answers, dtype=np.int64), len(self._special_prefix), n_prompt, mode)

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
                    max_batch_tokens: int = 8192) -> tuple[list[float], int]:
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
        max_batch_tokens: int = 8192,
        max_candidates: int = 256,
    ) -> ScoreOutput:
        """(C, N, K) label-word logits at the answer slot; see the module docstring for the layout."""
        self.check_prompts(prompts, max_candidates)
        label_ids = torch.tensor(self.label_word_ids(label_words), device=self.device)
        enc = self.encode(template, texts, text_pairs, prompts.num_prompt_tokens,
                          slot_ids=self.slot_ids(prompts), mode=prompts.mode)
        N, C = len(texts), prompts.num_candidates
        meter = ScoreOutput(np.empty(0), sequences=C * N, forward_passes=0, tokens_processed=0)
        with torch.inference_mode():
            if prompts.kind == "deep" and prompts.base is not None and prompts.layer:
                out = self._score_split(enc, prompts, label_ids, max_batch_tokens, meter)
            else:
                full = self._full_prompts(prompts)
                out = self._score_rows(enc, C, full, label_ids, max_batch_tokens, meter)
        meter.logits = out.float().cpu().numpy().reshape(N, C, -1).transpose(1, 0, 2).copy()
        return meter

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
        """Row indices (text-major: row = text * copies + copy) grouped so rows × longest ≤ max_batch_tokens.

        Rows go in order of text length so each micro-batch pads little.
        """
        order = np.argsort(lengths, kind="stable")
        rows = (order[:, None] * copies + np.arange(copies)[None, :]).reshape(-1)
        row_len = lengths[rows // copies]
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and (end - start + 1) * row_len[end] <= max_batch_tokens:
                end += 1
            yield rows[start:end]
            start = end

    def _batch_inputs(self, enc: _Encoded, text_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        lens = enc.lengths[text_idx]
        S = int(lens.max())
        ids = torch.from_numpy(enc.ids[text_idx, :S]).to(self.device)
        mask = (torch.arange(S)[None, :] < torch.from_numpy(lens)[:, None]).to(self.device, torch.long)
        return ids, mask, int(lens.sum())

    def _score_rows(
        self, enc: _Encoded, C: int, full: torch.Tensor | None, label_ids: torch.Tensor, mbt: int, meter: ScoreOutput
    ) -> torch.Tensor:
        """Logits (N*C, K), text-major, for prompts given in full form."""
        N = len(enc.lengths)
        out = torch.empty(N * C, len(label_ids), dtype=torch.float32, device=self.device)
        for rows in self._micro_batches(enc.lengths, C, mbt):
            rows_t = torch.from_numpy(rows).to(self.device)
            t_idx, c_idx = rows // C, torch.from_numpy(rows % C).to(self.device)
            ids, mask, ntok = self._batch_inputs(enc, t_idx)
            per_layer: dict[int, torch.Tensor] = {}
            if full is not None:
                chosen = full.index_select(0, c_idx)  # (B, n, D) or (B, L, n, D)
                per_layer = {0: chosen} if chosen.dim() == 3 else {j: chosen[:, j] for j in range(chosen.shape[1])}
            hidden = self._forward(ids, mask, enc, per_layer)
            out[rows_t] = self._answer_logits(hidden, torch.from_numpy(enc.answer[t_idx]), label_ids)
            meter.forward_passes += 1
            meter.tokens_processed += ntok
        return out

    def _score_split(
        self, enc: _Encoded, p: PromptBatch, label_ids: torch.Tensor, mbt: int, meter: ScoreOutput
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
            hidden = self._forward(ids, mask, enc, per_layer, start_layer=l, start_hidden=start)
            out[rows_t] = self._answer_logits(hidden, torch.from_numpy(enc.answer[t_idx]), label_ids)
            meter.forward_passes += 1
            meter.tokens_processed += ntok
        return out

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        enc: _Encoded,
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
            p0 = per_layer[0]
            embeds = embeds.clone()
            embeds[:, slot_start : slot_start + p0.shape[1]] = p0.to(embeds.dtype)
        acts_at = (lambda j: j in per_layer) if mode == "add" else (lambda j: j > 0 and j in per_layer)

        def make_hook(j: int):
            def hook(_m, args, kwargs):
                h = _hidden_arg(args, kwargs)
                if j == start_layer and start_hidden is not None:
                    h = start_hidden.to(h.dtype)
                if j == capture_at:
                    raise _StopForward(h)
                if acts_at(j):
                    p = per_layer[j].to(h.dtype)
                    h = h.clone()
                    if mode == "add":
                        h[:, slot_start : slot_start + p.shape[1]] += p
                    else:
                        h[:, slot_start : slot_start + p.shape[1]] = p
                if observe is not None:
                    observe(j, h)
                return _replace_hidden_arg(args, kwargs, h)

            return hook

        handles = [
            self.layers[j].register_forward_pre_hook(make_hook(j), with_kwargs=True)
            for j in range(start_layer, self.num_layers)
        ]
        try:
            with self._layers_from(start_layer):
                out = self.base_model(inputs_embeds=embeds, attention_mask=mask, **self._extra_kwargs())
        except _StopForward as stop:
            return stop.hidden
        finally:
            for h in handles:
                h.remove()
        return out[0]

    @contextmanager
    def _layers_from(self, start: int) -> Iterator[None]:
        """Temporarily run only layers[start:] (the model is used by one worker thread only)."""
        if start == 0:
            yield
            return
        setattr(self._layers_parent, self._layers_attr, nn.ModuleList(list(self.layers)[start:]))
        try:
            yield
        finally:
            setattr(self._layers_parent, self._layers_attr, self.layers)

    def _answer_logits(self, hidden: torch.Tensor, answer: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """(B, K) float32: the head at each row's answer slot, at the label ids. A tied head is a dot product with
        the label words' embeddings only (the other 30k columns would be computed and thrown away)."""
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), answer.to(hidden.device)]  # (B, D)
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



def _replace_hidden_arg(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _expect(arr: np.ndarray | None, ndim: int, label: str, shape: str) -> None:
    if arr is None or arr.ndim != ndim:
        got = None if arr is None else tuple(arr.shape)
        raise InvalidInput(f"{label} must have shape {shape}; got {got}")


def _split_template(template: str) -> list[tuple[str, str]]:
    """[("lit", "..."), ("text", ""), ("mask", ""), ...] in order."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            out.append(("lit", template[pos : m.start()]))
        kind = m.group(1)
        out.append(("text" if kind == "text_a" else kind, ""))
        pos = m.end()
    if pos < len(template):
        out.append(("lit", template[pos:]))
    return out


def _truncate_longest_first(slots: dict, room: int, uses: dict) -> dict:
    """Cut the longest text one token at a time until all slots fit ``room`` (``uses``: times each appears)."""
    lens = {k: len(v) for k, v in slots.items()}
    if sum(lens[k] * uses[k] for k in lens) <= room:
        return slots
    if len(slots) == 1:
        ((k, v),) = slots.items()
        return {k: v[: room // uses[k]]}
    while sum(lens[k] * uses[k] for k in lens) > room:
        k = max(lens, key=lens.get)
        lens[k] -= 1
    return {k: v[: lens[k]] for k, v in slots.items()}
