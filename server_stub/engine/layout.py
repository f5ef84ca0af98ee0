"""Sequence layout: template + texts + prompt slots as padded token-id rows, and label words as ids.

Why a module of its own: where the prompt slots, the text and the answer slot sit in each row (and how texts
are truncated to fit) is the contract of protocol v1's "Sequence layout" section; the prompted forward pass
(:mod:`server_stub.engine.model`) only consumes the rows.

Layout of one row::

    [CLS/BOS if the tokenizer adds one] [n prompt slots] template-with-text [SEP if masked]
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bbt_client.tasks.template import split_template, truncate_longest_first
from server_stub.engine.loading import LoadedLM
from server_stub.errors import InvalidInput



@dataclass
class EncodedRows:
    """N texts laid out as padded id rows: ``ids`` (N, S) int64, ``lengths`` (N,), ``answer`` (N,)."""

    ids: np.ndarray
    lengths: np.ndarray
    answer: np.ndarray
    slot_start: int
    n: int
    mode: str = "replace"


class TextLayout:
    """Tokenizes label words and lays out (template, text) rows with prompt slots for one loaded checkpoint."""

    def __init__(self, lm: LoadedLM) -> None:
        self.lm = lm
        self._text_cache: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()

    def word_ids(self, word: str) -> list[int]:
        """Ids of ``word`` as it appears at the answer slot: after a space for BPE; WordPiece ignores it."""
        spaced = self.lm.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(spaced) == 1:
            return spaced
        plain = self.lm.tokenizer(word, add_special_tokens=False)["input_ids"]
        return plain if len(plain) == 1 else spaced

    def label_word_ids(self, words: Sequence[str]) -> list[int]:
        out = []
        for w in words:
            ids = self.word_ids(w)
            if len(ids) != 1:
                pieces = self.lm.tokenizer.convert_ids_to_tokens(ids)
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
            enc = self.lm.tokenizer(
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
    ) -> EncodedRows:
        """Lay out N sequences (right-padded); texts are truncated (longest first) to fit ``max_seq_len``.

        The n prompt slots hold ``slot_ids`` (``add`` mode) or padding ids whose embeddings a ``replace`` prompt
        overwrites."""
        lm = self.lm
        pieces = split_template(template)
        if lm.kind == "causal":
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
                    segments.append(("ids", lm.tokenizer(text, add_special_tokens=False)["input_ids"], False))
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
        fixed = len(lm.special_prefix) + n_prompt + len(lm.special_suffix)
        fixed += sum(len(v) for k, v, _ in segments if k == "ids") + (1 if lm.kind == "masked" else 0)
        room = lm.max_seq_len - fixed
        n_text_slots = sum(1 for k, _, _ in segments if k == "text")
        if room < n_text_slots:
            raise InvalidInput(
                f"template plus {n_prompt} prompt tokens take {fixed} of the model's {lm.max_seq_len} "
                "tokens and leave no room for the text; shorten the template or use fewer prompt tokens"
            )
        rows: list[list[int]] = []
        answers: list[int] = []
        mask_id = lm.tokenizer.mask_token_id
        uses = {key: sum(1 for k, v, sp in segments if k == "text" and (v, sp) == key) for key in groups}
        for i in range(len(texts)):
            keys = list(groups)
            slots = dict(zip(keys, truncate_longest_first([groups[k][i] for k in keys], room, [uses[k] for k in keys])))
            row = list(lm.special_prefix) + (list(slot_ids) if slot_ids is not None else [lm.pad_id] * n_prompt)
            answer = -1
            for kind, value, space in segments:
                if kind == "ids":
                    row.extend(value)
                elif kind == "text":
                    row.extend(slots[(value, space)])
                else:
                    if lm.kind == "masked":
                        answer = len(row)
                        row.append(mask_id)
                    else:
                        answer = len(row) - 1
            row.extend(lm.special_suffix)
            if answer < 0:
                raise InvalidInput("template and text produce an empty sequence before {mask}")
            rows.append(row)
            answers.append(answer)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.full((len(rows), int(lengths.max())), lm.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        return EncodedRows(ids, lengths, np.array(answers, dtype=np.int64), len(lm.special_prefix), n_prompt, mode)
