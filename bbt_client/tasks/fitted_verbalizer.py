"""A fitted verbalizer: each class's logit a weighted sum of many candidate words' scores at the answer slot.

Why: a black box scores only the words it is asked about, so one hand-picked word per class reads the answer
slot through K directions, and a mean over several words (:mod:`bbt_client.tasks.verbalizer`) through a few
more with equal weights. Fitting the weights on the labelled training texts reads every candidate the endpoint
scored, as prototypical verbalizers (Cui et al., ACL 2022) and kNN prompting (Xu et al., ICLR 2023) read an LM's
output distribution. It costs what one word per class costs on endpoints that score named tokens (our server,
vLLM's ``logprob_token_ids``, top-k when the words are there); with echo scoring each word is one more sequence.

The fit: each text's row of word scores is centred (raw logits and an API's log-probs differ by a per-text shift
only), each word standardised with the training texts' statistics, then a multinomial logistic regression with an
L2 penalty, whose strength the dev texts choose from :data:`L2_GRID`. Pure numpy, deterministic.

The prompt search reads its training texts through *cross-fitted* read-outs (:func:`cross_fit`): each text
through weights fitted on the other folds. Read through weights fitted on the very texts the search scores, the
bare template already sits at that fit's optimum, and the search learns to move the answer slot of those texts
only (train accuracy climbs to 1 while dev stays where it was).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bbt_client.tasks.losses import log_softmax

#: Candidates per class when the endpoint scores any number of words at no extra cost and the user did not say:
#: enough words to read a topic or a sentiment by (a class's training texts rarely offer more that are over-
#: represented in them), few enough that a 14-class request names under 500 token ids.
DEFAULT_PER_CLASS = 30
#: Penalties tried, strongest first: on a dev tie the stronger penalty (the smoother read-out) wins.
L2_GRID: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03)
#: Folds of the training texts' cross-fit (fewer when a class has fewer texts).
FOLDS = 4


@dataclass(frozen=True, eq=False)
class FittedVerbalizer:
    """Class logits = standardised, row-centred word scores (N, V) @ ``weights`` (V, K) + ``bias`` (K,).

    ``folds``/``fold_of``: the cross-fit of the training texts (:func:`cross_fit`); training text ``i`` is read
    by :meth:`training_class_logits` through ``folds[fold_of[i]]``, fitted without it."""

    words: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    l2: float
    folds: tuple["FittedVerbalizer", ...] = ()
    fold_of: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        v, k = np.shape(self.weights)
        if len(self.words) != v or np.shape(self.center) != (v,) or np.shape(self.scale) != (v,) \
                or np.shape(self.bias) != (k,) or len(set(self.words)) != v:
            raise ValueError(f"a fitted verbalizer needs {v} distinct words and matching arrays")
        if any(f.words != self.words for f in self.folds) or not all(0 <= i < len(self.folds) for i in self.fold_of):
            raise ValueError("a cross-fit needs folds over the same words and a fold for every training text")

    @property
    def num_classes(self) -> int:
        return int(np.shape(self.weights)[1])

    def class_logits(self, word_logits: np.ndarray) -> np.ndarray:
        """(..., V) scores of :attr:`words` -> (..., K) class logits."""
        z = np.asarray(word_logits, dtype=np.float64)
        if z.shape[-1] != len(self.words):
            raise ValueError(f"expected {len(self.words)} word logits, got {z.shape[-1]}")
        return _features(z, self.center, self.scale) @ self.weights + self.bias

    def training_class_logits(self, word_logits: np.ndarray) -> np.ndarray:
        """(..., N', V) scores with the N training texts first -> (..., N', K): each training text read through
        the fold fitted without it, any further row (calibration's content-free inputs) through the full fit."""
        out = self.class_logits(word_logits)
        fold_of = np.asarray(self.fold_of[:out.shape[-2]], dtype=int)
        z = np.asarray(word_logits, dtype=np.float64)
        for f, fold in enumerate(self.folds):
            rows = np.flatnonzero(fold_of == f)
            out[..., rows, :] = fold.class_logits(z[..., rows, :])
        return out

    def as_dict(self) -> dict:
        """JSON-ready (result.json), read back by :meth:`from_dict`."""
        d = {"words": list(self.words), "center": self.center.tolist(), "scale": self.scale.tolist(),
             "weights": self.weights.tolist(), "bias": self.bias.tolist(), "l2": self.l2}
        if self.folds:
            d["folds"] = [{k: v for k, v in f.as_dict().items() if k != "words"} for f in self.folds]
            d["fold_of"] = list(self.fold_of)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FittedVerbalizer":
        folds = tuple(cls.from_dict({**f, "words": d["words"]}) for f in d.get("folds", ()))
        return cls(words=tuple(d["words"]), center=np.asarray(d["center"], dtype=np.float64),
                   scale=np.asarray(d["scale"], dtype=np.float64), weights=np.asarray(d["weights"], dtype=np.float64),
                   bias=np.asarray(d["bias"], dtype=np.float64), l2=float(d["l2"]), folds=folds,
                   fold_of=tuple(int(i) for i in d.get("fold_of", ())))


def _features(z: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (z - z.mean(-1, keepdims=True) - center) / scale


def fit(word_logits: np.ndarray, labels: np.ndarray, num_classes: int, words: Sequence[str], l2: float,
        steps: int = 500) -> FittedVerbalizer:
    """Fit on (N, V) scores of ``words`` for N labelled texts: full-batch gradient descent with step 1/L on the
    (strongly convex) penalised cross-entropy, so the same data give the same read-out."""
    z = np.asarray(word_logits, dtype=np.float64)
    labels = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] != len(labels) or z.shape[1] != len(words):
        raise ValueError(f"expected ({len(labels)}, {len(words)}) word logits, got {z.shape}")
    centred = z - z.mean(1, keepdims=True)
    center, scale = centred.mean(0), centred.std(0) + 1e-6
    x = (centred - center) / scale
    n = len(labels)
    onehot = np.eye(num_classes)[labels]
    w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
    lipschitz = 0.5 * (np.linalg.norm(x, 2) ** 2 + n) / n + l2  # softmax CE: Hessian <= 1/2 of the design's
    for _ in range(steps):
        g = (np.exp(log_softmax(x @ w + b)) - onehot) / n
        w -= (x.T @ g + l2 * w) / lipschitz
        b -= g.sum(0) / lipschitz
    return FittedVerbalizer(tuple(words), center, scale, w, b, float(l2))


def cross_fit(fitted: FittedVerbalizer, word_logits: np.ndarray, labels: np.ndarray,
              folds: int = FOLDS) -> FittedVerbalizer:
    """``fitted`` (fit on all N training texts' (N, V) scores) with its cross-fit: the texts split into
    ``folds`` folds, each class dealt round-robin in its order, each fold's read-out fitted on the others with
    ``fitted``'s penalty. Unchanged when a class has a single text (no fold could be held out of it)."""
    labels = np.asarray(labels)
    folds = min(folds, int(np.bincount(labels, minlength=fitted.num_classes).min()))
    if folds < 2:
        return fitted
    rank = np.zeros(len(labels), dtype=int)
    for k in range(fitted.num_classes):
        rank[labels == k] = np.arange(int((labels == k).sum()))
    fold_of = rank % folds
    z = np.asarray(word_logits, dtype=np.float64)
    fits = tuple(fit(z[fold_of != f], labels[fold_of != f], fitted.num_classes, fitted.words, fitted.l2)
                 for f in range(folds))
    return dataclasses.replace(fitted, folds=fits, fold_of=tuple(int(f) for f in fold_of))


def fit_on_dev(train_logits: np.ndarray, train_labels: np.ndarray, dev_logits: np.ndarray, dev_labels: np.ndarray,
               num_classes: int, words: Sequence[str]) -> tuple[FittedVerbalizer, float]:
    """The fit whose penalty in :data:`L2_GRID` reads dev best (with its cross-fit of the training texts), and its
    dev accuracy."""
    best: tuple[FittedVerbalizer, float] | None = None
    for l2 in L2_GRID:
        fv = fit(train_logits, train_labels, num_classes, words, l2)
        acc = float((fv.class_logits(dev_logits).argmax(-1) == np.asarray(dev_labels)).mean())
        if best is None or acc > best[1]:
            best = (fv, acc)
    return cross_fit(best[0], train_logits, train_labels), best[1]
