"""Weight digests: a cheap, exact test of whether two models hold the same weight tensors.

Why: GDFO distils the endpoint into a local student; a student that holds the endpoint's own weights gets
white-box gradients no user of a hosted model has, and its results would not mean what they claim. The
server lists a digest per parameter tensor (``ModelInfo.weight_digests``), the client computes the same for
its student, and any overlap is refused (or loudly marked). One definition serves both sides.

A digest is the first 16 hex characters of sha256 over the tensor's float32 little-endian bytes in C order
(its shape is not hashed: a reshaped copy is still the same weights). Constant tensors (a LayerNorm at its
initial ones, a zero bias) are skipped: every model of that width holds them, so they prove nothing.
A digest match proves a shared tensor; no match does not prove independence from a quantised or
fine-tuned copy of the same model.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

DIGEST_CHARS = 16


def weight_digest(array: np.ndarray) -> str | None:
    """Digest of one weight tensor, or None for an empty or constant one (see the module docstring)."""
    arr = np.ascontiguousarray(np.asarray(array), dtype="<f4")
    flat = arr.reshape(-1)
    if flat.size == 0 or bool(np.all(flat == flat[0])):
        return None
    return hashlib.sha256(arr.tobytes()).hexdigest()[:DIGEST_CHARS]


def weight_digests(arrays: Iterable[np.ndarray]) -> list[str]:
    """Digests of several tensors, constant ones skipped, first occurrence order, no duplicates."""
    out: dict[str, None] = {}
    for a in arrays:
        d = weight_digest(a)
        if d is not None:
            out.setdefault(d)
    return list(out)


def shared_digests(ours: Iterable[str], theirs: Iterable[str] | None) -> list[str]:
    """The digests both sides hold (sorted); empty when the other side reports none."""
    return sorted(set(ours) & set(theirs or ()))


__all__ = ["DIGEST_CHARS", "weight_digest", "weight_digests", "shared_digests"]
