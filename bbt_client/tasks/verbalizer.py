"""Several label words per class, found from the few-shot training data with one API call.

Why: a verbalizer of one hand-picked word per class reads the model's answer slot through K directions only;
on a model whose answer slot barely prefers those words (the bundled sentence encoder with a tied head predicts
one AG News class whatever the text) the prompt must first fight the words. BBT-RGB's "M2 verbalizers"
(Sun et al. 2023) use several words per class instead. Our reading, fitted to a black box that only scores the
words it is asked about:

1. candidates, per class: the task's label word for it plus the words in two or more of its training texts
   that are more frequent there than in the other classes' texts (never the dev or test texts); each word is
   a candidate of one class only, so the text statistics and the model's scores must agree on it;
2. one call scores every candidate at the answer slot for the training texts with no prompt (N × V logits);
3. each text's row is centred (a per-text shift, the only difference between raw logits and the log-probs a text
   API returns, then cannot change the choice), each candidate's scores are standardised across the texts, and
   its score for class k is the mean over class k's texts minus the mean over the rest; each class takes its
   ``m`` best candidates.

A class's logit is then the mean of its words' logits (the loss, accuracy and every method see K numbers as
before). Pure: the job does the scoring call and its budget.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

#: Function words never useful as a topic or sentiment label (the texts' most frequent words otherwise win).
_STOPWORDS = frozenset(
    "a an the of to in and or for on at by from with as is was are were be been it its this that these those "
    "he she they we you i his her their our your them him us not no but if then than so such said says say "
    "will would can could has have had do does did after before about over into out up down new more most "
    "one two also who which what when where while there here all any some just only very".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
#: Candidates per class at most (beyond ``at_least``): bounds the one scoring call when there are many shots.
MAX_PER_CLASS = 100


def candidate_words(texts: Sequence[str], labels: np.ndarray, num_classes: int, label_words: Sequence[str],
                    at_least: int = 10) -> list[list[str]]:
    """Each class's candidates: its own label word, then the lower-cased words over-represented in its texts
    (document frequency in the class minus in the others, > 0) that appear in two or more of them, best first;
    words seen once (ordered alphabetically: nothing else tells them apart) only fill a class to ``at_least``.
    A word is a candidate of one class only, the one it is most over-represented in, so the selection cannot
    hand a sports word, or the label word "Business", to another class. Deterministic."""
    docs = [set(w.lower() for w in _WORD.findall(t)) - _STOPWORDS for t in texts]
    labels = np.asarray(labels)
    counts = [Counter(w for d, y in zip(docs, labels) if y == k for w in d) for k in range(num_classes)]
    sizes = [int((labels == k).sum()) for k in range(num_classes)]

    def over(w: str, k: int) -> float:
        rest = sum(counts[j][w] for j in range(num_classes) if j != k)
        return counts[k][w] / max(1, sizes[k]) - rest / max(1, len(labels) - sizes[k])

    taken = {w.lower() for w in label_words}
    owned: list[dict[str, float]] = [{} for _ in range(num_classes)]  # class -> {word: its over-representation}
    for w in set().union(*counts) - taken:
        o = [over(w, k) for k in range(num_classes)]
        k = int(np.argmax(o))
        if o[k] > 0 and len(w) > 2:
            owned[k][w] = o[k]
    out = [[w] for w in label_words]
    for k, mine in enumerate(owned):
        ranked = sorted(mine, key=lambda w: (counts[k][w] < 2, -mine[w], -counts[k][w], w))
        seen_twice = sum(counts[k][w] >= 2 for w in ranked)
        out[k] += ranked[:max(min(seen_twice, MAX_PER_CLASS), at_least - 1)]
    return out


def select_words(logits: np.ndarray, labels: np.ndarray, owners: Sequence[int], num_classes: int,
                 per_class: int) -> list[list[int]]:
    """For each class, the columns of ``logits`` (N, V: zero-shot scores of the candidates on labelled texts)
    that it owns (``owners[v]`` = the class candidate ``v`` may serve) and that best separate its texts from the
    rest (see the module docstring), best first; at most ``per_class`` each."""
    z = np.asarray(logits, dtype=np.float64)
    owners = np.asarray(owners)
    if z.ndim != 2 or z.shape[1] != len(owners):
        raise ValueError(f"logits must be (N, {len(owners)}), got {z.shape}")
    labels = np.asarray(labels)
    z = z - z.mean(1, keepdims=True)
    z = (z - z.mean(0)) / (z.std(0) + 1e-9)
    chosen = []
    for k in range(num_classes):
        score = z[labels == k].mean(0) - z[labels != k].mean(0)
        cols = np.flatnonzero(owners == k)
        chosen.append([int(v) for v in cols[np.argsort(-score[cols], kind="stable")][:per_class]])
    return chosen


def flat_words(verbalizer: Sequence[Sequence[str]]) -> list[str]:
    """Every word of every class, class-major: the label words a scoring request asks about."""
    return [w for ws in verbalizer for w in ws]


def class_logits(logits: np.ndarray, verbalizer: Sequence[Sequence[str]]) -> np.ndarray:
    """(..., V) logits over :func:`flat_words` -> (..., K): each class the mean of its words' logits."""
    sizes = [len(ws) for ws in verbalizer]
    if logits.shape[-1] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} word logits, got {logits.shape[-1]}")
    if all(s == 1 for s in sizes):
        return logits
    bounds = np.cumsum([0, *sizes])
    return np.stack([logits[..., a:b].mean(-1) for a, b in zip(bounds[:-1], bounds[1:])], axis=-1)
