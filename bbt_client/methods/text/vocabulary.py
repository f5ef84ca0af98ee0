"""The candidate vocabulary of discrete prompt methods: task-specific words and phrases from the training texts.

Why: a categorical over a model's whole vocabulary (30k-200k tokens) cannot be searched with a few hundred API
calls, and a text API does not even say what its vocabulary is. BDPL (Diao et al., TMLR 2023) searches a small
vocabulary of n-grams mined from the task's own texts with pointwise mutual information; we follow its recipe:

1. words: lower-cased runs of letters/digits (punctuation splits phrases);
2. adjacent words whose PMI ``log(total · c(a, b) / (c(a) · c(b)))`` reaches ``min_pmi`` (and whose pair is seen
   ``min_count`` times) are glued into one segment, up to ``max_ngram`` words;
3. segments are ranked by frequency in the texts (the paper's ranking), ties by longer first, then alphabetically;
   segments made only of function words, digits or markup leftovers (``quot``, ``lt``) are dropped.

Only training texts go in (never dev or test). Pure and deterministic: same texts, same vocabulary.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from bbt_client.tasks.verbalizer import _STOPWORDS

_WORD = re.compile(r"[^\W_]+")
_PUNCT = re.compile(r"[^\w\s]+|_")
_POSSESSIVE = re.compile(r"['’]s\b")
#: HTML entity and markup leftovers common in news/web datasets (AG News has "&lt;", "#39;", "quot;").
_MARKUP = frozenset({"quot", "lt", "gt", "amp", "nbsp", "href", "fullquote", "http", "www", "com", "39"})


def _runs(text: str) -> list[list[str]]:
    """Word runs of ``text`` that punctuation does not cut, lower-cased, possessive 's removed."""
    return [_WORD.findall(run) for run in _PUNCT.split(_POSSESSIVE.sub("", text.lower()))]


def _useful(gram: tuple[str, ...], exclude: frozenset[str]) -> bool:
    if all(w in _STOPWORDS or w.isdigit() for w in gram) or any(w in _MARKUP for w in gram):
        return False
    return not any(w in exclude for w in gram) and len("".join(gram)) > 1


def build_vocabulary(texts: Sequence[str], size: int = 200, *, max_ngram: int = 3, min_count: int = 2,
                     min_pmi: float = 1.0, exclude: Sequence[str] = ()) -> list[str]:
    """Up to ``size`` candidate prompt entries (words or short phrases, lower case) mined from ``texts``, most
    frequent first (``min_count``: how often a word pair must occur to be glued into a phrase).

    ``exclude``: words an entry must not contain (e.g. the label words, so a prompt cannot simply say the answer).
    Raises ValueError when the texts yield no candidate at all.
    """
    if size < 1 or max_ngram < 1 or min_count < 1:
        raise ValueError("size, max_ngram and min_count must be at least 1")
    runs = [r for t in texts for r in _runs(t) if r]
    words = Counter(w for r in runs for w in r)
    pairs = Counter((a, b) for r in runs for a, b in zip(r, r[1:]))
    total = max(1, sum(pairs.values()))
    strong = {p for p, c in pairs.items()
              if c >= min_count and math.log(total * c / (words[p[0]] * words[p[1]])) >= min_pmi}
    grams: Counter[tuple[str, ...]] = Counter()
    for r in runs:
        seg = [r[0]]
        for a, b in zip(r, r[1:]):
            if (a, b) in strong and len(seg) < max_ngram:
                seg.append(b)
            else:
                grams[tuple(seg)] += 1
                seg = [b]
        grams[tuple(seg)] += 1
    skip = frozenset(w.lower().strip() for w in exclude)
    ranked = sorted((g for g in grams if _useful(g, skip)), key=lambda g: (-grams[g], -len(g), g))
    if not ranked:
        raise ValueError("the training texts contain no usable prompt candidates (no words besides function words)")
    return [" ".join(g) for g in ranked[:size]]


#: A slot index meaning "no entry": a prompt of only these is the empty prompt (the bare template).
EMPTY_SLOT = -1


def render_prompt(vocabulary: Sequence[str], indices: Sequence[int]) -> str:
    """The prompt string of one choice per slot: the chosen entries joined by single spaces (empty slots skipped)."""
    return " ".join(vocabulary[int(i)] for i in indices if int(i) != EMPTY_SLOT)
