"""Losses and accuracy over label-word logits, for a whole population at once.

Every function takes ``logits`` (C, N, K): C candidate prompts, N texts, K classes (one label word per
class, in class order: the backend scores exactly the task's label words) and ``labels`` (N,) int class
indices, and returns one float64 value per candidate, (C,). A (N, K) array is accepted as C = 1.

As in the BBT/BBTv2 reference code, losses are averaged over the N texts and computed on the K
label-word logits only (the softmax runs over the label words, not the vocabulary).
"""

from __future__ import annotations

import numpy as np


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3:
        raise ValueError(f"logits must be (C, N, K) or (N, K), got shape {np.shape(logits)}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != z.shape[1]:
        raise ValueError(f"labels must be (N,) with N = {z.shape[1]}, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[2]):
        raise ValueError(f"labels must lie in [0, {z.shape[2]}), got range [{y.min()}, {y.max()}]")
    if z.shape[1] == 0:
        raise ValueError("need at least one text (N >= 1)")
    return z, y.astype(np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log-softmax over the last axis (max-shifted), float64."""
    z = np.asarray(logits, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean cross-entropy over texts, (C,). Stable for logits of any magnitude (log-sum-exp)."""
    z, y = _check(logits, labels)
    logp = log_softmax(z)  # (C, N, K)
    picked = np.take_along_axis(logp, y[None, :, None], axis=2)[..., 0]  # (C, N)
    return -picked.mean(axis=1)


def hinge(logits: np.ndarray, labels: np.ndarray, margin: float = 2.0) -> np.ndarray:
    """Multi-class hinge, (C,): mean over texts of sum over wrong classes j of max(0, margin - (s_y - s_j)).

    This is the reference code's hinge (summed over classes, averaged over texts); its default margin
    there comes from the task's metric; 2.0 is our default.
    """
    z, y = _check(logits, labels)
    target = np.take_along_axis(z, y[None, :, None], axis=2)  # (C, N, 1)
    viol = np.maximum(0.0, margin - (target - z))  # (C, N, K)
    np.put_along_axis(viol, np.broadcast_to(y[None, :, None], target.shape), 0.0, axis=2)
    return viol.sum(axis=2).mean(axis=1)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fraction of texts whose highest label-word logit is the true class, (C,). Ties go to the lower index."""
    z, y = _check(logits, labels)
    return (z.argmax(axis=2) == y[None, :]).mean(axis=1)


#: Names accepted by :func:`loss_fn` (and by the method configs' ``loss`` field).
LOSSES = ("ce", "hinge")


def loss_fn(name: str, *, margin: float = 2.0):
    """The loss named ``name`` ("ce" or "hinge") as ``f(logits (C,N,K), labels (N,)) -> (C,)``."""
    if name == "ce":
        return cross_entropy
    if name == "hinge":
        return lambda logits, labels: hinge(logits, labels, margin=margin)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
