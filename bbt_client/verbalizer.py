"""Several label words per class, found from the few-shot training data with one API call.

Why: a verbalizer of one hand-picked word per class reads the model's answer slot through K directions only;
on a model whose answer slot barely prefers those words (the bundled sentence encoder with a tied head predicts
one AG News class whatever the text) the prompt must first fight the words. BBT-RGB's "M2 verbalizers"
(Sun et al. 2023) use several words per class instead. Our reading, fitted to a black box that only scores the
words it is asked about:

1. candidates: the task's own label words plus the words that are frequent in one class's training texts and
   rare in the others' (never the dev or test texts);
2. one call scores every candidate at the answer slot for the training texts with no prompt (N × V logits);
3. each text's row is centred (a per-text shift, the only difference between raw logits and the log-probs a text
   API returns, then cannot change the choice), each candidate's scores are standardised across the texts, and
   its score for class k is the mean over class k's texts minus the mean over the rest; each class takes its
   ``m`` best words, no word serving two classes.

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


def candidate_words(texts: Sequence[str], labels: np.ndarray, num_classes: int, label_words: Sequence[str],
                    per_class: int = 40) -> list[str]:
    """The task's label words as given, then for each class the ``per_class`` lower-cased words most
    over-represented in its texts (document frequency in the class minus in the others), words in two or more
    of the class's texts before words seen once, and ties to the word in more of them. Deterministic; order:
    label words, then class by class. (Words seen once tie with each other and break ties alphabetically, so
    they come after every word seen twice; before, "afar", "ancestor", "abandoning" led the list.)"""
    docs = [set(w.lower() for w in _WORD.findall(t)) - _STOPWORDS for t in texts]
    labels = np.asarray(labels)
    out = list(dict.fromkeys(label_words))
    seen = set(out)
    for k in range(num_classes):
        inside = Counter(w for d, y in zip(docs, labels) if y == k for w in d)
        outside = Counter(w for d, y in zip(docs, labels) if y != k for w in d)
        n_in, n_out = max(1, int((labels == k).sum())), max(1, int((labels != k).sum()))
        ranked = sorted(inside, key=lambda w: (inside[w] < 2, -(inside[w] / n_in - outside[w] / n_out), -inside[w], w))
        for w in ranked[:per_class]:
            if w not in seen and len(w) > 2:
                out.append(w)
                seen.add(w)
    return out


def select_words(logits: np.ndarray, labels: np.ndarray, words: Sequence[str], num_classes: int,
                 per_class: int) -> tuple[tuple[str, ...], ...]:
    """``per_class`` words per class from zero-shot ``logits`` (N, V) of ``words`` on labelled texts (see the
    module docstring); classes pick in turn, best remaining word first, so no word serves two classes."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(words):
        raise ValueError(f"logits must be (N, {len(words)}), got {z.shape}")
    labels = np.asarray(labels)
    z = z - z.mean(1, keepdims=True)
    z = (z - z.mean(0)) / (z.std(0) + 1e-9)
    scores = np.stack([z[labels == k].mean(0) - z[labels != k].mean(0) for k in range(num_classes)])  # (K, V)
    chosen: list[list[int]] = [[] for _ in range(num_classes)]
    taken: set[int] = set()
    for _ in range(per_class):
        for k in range(num_classes):
            for v in np.argsort(-scores[k], kind="stable"):
                if int(v) not in taken:
                    chosen[k].append(int(v))
                    taken.add(int(v))
                    break
    return tuple(tuple(words[v] for v in c) for c in chosen)


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
