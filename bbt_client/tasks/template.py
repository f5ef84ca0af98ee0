"""How a template and its texts become one token sequence: the template's parts, and truncation to fit.

Shared by the server (:mod:`server_stub.engine.layout`) and GDFO's local student, so both read a template
the same way and cut an over-long text the same way.
"""

from __future__ import annotations

import re
from typing import Sequence

_PLACEHOLDER = re.compile(r"\{(text|text_a|text_b|mask)\}")


def split_template(template: str) -> list[tuple[str, str]]:
    """``"{text} It was {mask} ."`` -> ``[("text", ""), ("lit", " It was "), ("mask", ""), ("lit", " .")]``.

    Kinds: ``"lit"`` (with its literal text), ``"text"`` (``{text}`` or ``{text_a}``), ``"text_b"``, ``"mask"``.
    """
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            out.append(("lit", template[pos: m.start()]))
        kind = m.group(1)
        out.append(("text" if kind == "text_a" else kind, ""))
        pos = m.end()
    if pos < len(template):
        out.append(("lit", template[pos:]))
    return out


def truncate_longest_first(seqs: Sequence[Sequence[int]], room: int,
                           uses: Sequence[int] | None = None) -> list[list[int]]:
    """Cut the longest sequence (the first of equals) one token at a time until ``sum(len × uses) <= room``.

    ``uses``: how many times each sequence appears in the row (a text slot may stand twice in a template).
    Only texts are ever cut, never the template, so the query keeps its shape.
    """
    uses = list(uses) if uses is not None else [1] * len(seqs)
    lens = [len(s) for s in seqs]
    if len(seqs) == 1 and lens[0] * uses[0] > room:
        lens[0] = room // uses[0]
    while sum(n * u for n, u in zip(lens, uses)) > room:
        i = max(range(len(lens)), key=lens.__getitem__)
        lens[i] -= 1
    return [list(s[:n]) for s, n in zip(seqs, lens)]
