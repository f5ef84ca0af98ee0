"""Seeded random projections from the intrinsic space (d,) to prompts (n, D): the "A" of p = A z + p0.

BBT/BBTv2 search a low-dimensional z with CMA-ES and map it through a fixed random matrix A (d, n·D).
A is never stored: it is regenerated from ``(seed, distribution, std, shape)`` with
``np.random.default_rng`` (never numpy's global RNG), so a checkpoint only keeps the seed, and the
same seed gives the same A on every machine (PCG64 + float32 draws are platform independent).

Distributions (see the BBT papers / reference code):

- ``"uniform"``: U(-1/√d, 1/√d), i.e. torch ``nn.Linear``'s default init that BBT's first code used
  ("he" there). Model-independent scale: std = 1/√(3d).
- ``"normal"``: N(0, σ_A²) with σ_A = α·σ̂ / (√d · σ0), BBTv2's designed projection, where σ̂ is the
  std of what the prompt replaces (word embeddings for layer 0, a layer's hidden states for l ≥ 1),
  σ0 the CMA-ES initial step size and α a scale (1 in the code). With z ~ N(0, σ0² I) the prompt
  entries then have std α·σ̂, i.e. they start at the scale of real activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Distribution = Literal["uniform", "normal"]

# Rows of A drawn per chunk: bounds the float64 temporaries of the generator (~ rows × n·D × 8 bytes).
_CHUNK_ROWS = 32


def designed_std(target_std: float, intrinsic_dim: int, sigma0: float, alpha: float = 1.0) -> float:
    """BBTv2's projection std σ_A = α·σ̂ / (√d · σ0), so that A z has std ≈ α·σ̂ when z ~ N(0, σ0² I)."""
    if target_std <= 0 or not math.isfinite(target_std):
        raise ValueError(f"target std must be a positive finite number, got {target_std}")
    if sigma0 <= 0:
        raise ValueError(f"sigma0 must be positive, got {sigma0}")
    return alpha * target_std / (math.sqrt(intrinsic_dim) * sigma0)


@dataclass
class Projection:
    """A fixed random linear map z (d,) or (C, d) -> prompts (n, D) or (C, n, D), float32.

    ``std`` is the entry std for ``"normal"``; ignored for ``"uniform"`` (its bound is 1/√d).
    The matrix (d, n·D) float32 is generated on first use and kept until :meth:`release`.
    """

    seed: int
    intrinsic_dim: int
    prompt_tokens: int
    hidden_size: int
    distribution: Distribution = "normal"
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.intrinsic_dim <= 0 or self.prompt_tokens <= 0 or self.hidden_size <= 0:
            raise ValueError("intrinsic_dim, prompt_tokens and hidden_size must be positive")
        if self.distribution not in ("uniform", "normal"):
            raise ValueError(f"unknown projection distribution {self.distribution!r}; use 'uniform' or 'normal'")
        if self.distribution == "normal" and not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"projection std must be positive and finite, got {self.std}")
        self._matrix: np.ndarray | None = None

    @property
    def out_dim(self) -> int:
        return self.prompt_tokens * self.hidden_size

    @property
    def nbytes(self) -> int:
        """Memory the generated matrix occupies (float32)."""
        return self.intrinsic_dim * self.out_dim * 4

    @property
    def entry_std(self) -> float:
        """Theoretical std of A's entries."""
        if self.distribution == "uniform":
            return 1.0 / math.sqrt(3 * self.intrinsic_dim)
        return self.std

    @property
    def matrix(self) -> np.ndarray:
        """A, (d, n·D) float32, generated deterministically from the seed on first access."""
        if self._matrix is None:
            self._matrix = self._generate()
        return self._matrix

    def _generate(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        a = np.empty((self.intrinsic_dim, self.out_dim), dtype=np.float32)
        for start in range(0, self.intrinsic_dim, _CHUNK_ROWS):
            rows = a[start : start + _CHUNK_ROWS]
            if self.distribution == "normal":
                rng.standard_normal(out=rows, dtype=np.float32)
                rows *= np.float32(self.std)
            else:
                bound = 1.0 / math.sqrt(self.intrinsic_dim)
                rng.random(out=rows, dtype=np.float32)
                rows *= np.float32(2 * bound)
                rows -= np.float32(bound)
        return a

    def release(self) -> None:
        """Drop the cached matrix (it is regenerated, identically, on next use)."""
        self._matrix = None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """Map z (d,) -> (n, D) or (C, d) -> (C, n, D), float32."""
        z = np.asarray(z)
        single = z.ndim == 1
        z2 = z[None] if single else z
        if z2.ndim != 2 or z2.shape[1] != self.intrinsic_dim:
            raise ValueError(f"z must be (d,) or (C, d) with d = {self.intrinsic_dim}, got shape {z.shape}")
        out = (z2.astype(np.float32) @ self.matrix).reshape(-1, self.prompt_tokens, self.hidden_size)
        return out[0] if single else out

    def params(self) -> dict:
        """What rebuilds this projection exactly (stored in checkpoints instead of the matrix)."""
        return {
            "seed": self.seed,
            "intrinsic_dim": self.intrinsic_dim,
            "prompt_tokens": self.prompt_tokens,
            "hidden_size": self.hidden_size,
            "distribution": self.distribution,
            "std": self.std,
        }


def derive_seed(seed: int, *path: int) -> int:
    """An independent 63-bit seed for a sub-stream (e.g. ``derive_seed(seed, PROJECTION, layer)``).

    Uses numpy's SeedSequence so sub-streams of nearby seeds do not overlap.
    """
    if seed < 0 or any(p < 0 for p in path):
        raise ValueError("seeds and sub-stream indices must be non-negative")
    state = np.random.SeedSequence([int(seed), *[int(p) for p in path]]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) >> 1
