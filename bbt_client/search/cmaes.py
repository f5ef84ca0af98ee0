"""A thin, resumable, silent ask/tell wrapper over ``cma.CMAEvolutionStrategy``.

Two pycma behaviours make a naive wrapper non-reproducible, and this module fixes both:

- pycma samples from numpy's *global* RNG by default (its ``seed`` option calls ``np.random.seed``).
  Several optimisers (BBTv2 keeps one per layer) or any other user of ``np.random`` would interleave
  and change each other's samples, and a pickled strategy would not carry its stream. Each
  :class:`CMAES` therefore gives pycma a private ``RandomState`` (option ``randn``) that is pickled
  with it; as a second guard, any remaining global-RNG use inside pycma runs on a private global
  state that is swapped in around every call, leaving the caller's ``np.random`` state untouched.
- pycma silently replaces NaN/inf fitness values by the median; we refuse them instead, since they
  mean a broken endpoint, not a bad prompt.

``state_bytes()`` pickles the strategy together with its private RNG state, so
``CMAES.from_bytes(es.state_bytes())`` continues bit-identically.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import warnings
from types import ModuleType
from typing import Iterator, Sequence

import numpy as np

_SILENT = {"verbose": -9, "verb_log": 0, "verb_disp": 0, "verb_filenameprefix": "", "verb_plot": 0}

#: What ``import cma`` loads eagerly when installed, for plotting and a surrogate model's rank test this module
#: never calls (pycma falls back when they are missing): 1.4 s of a 35 s tuning run's wall time here.
_CMA_EXTRAS = ("matplotlib", "scipy")


def import_cma() -> ModuleType:
    """``import cma`` without its eager optional imports (:data:`_CMA_EXTRAS`) unless they are loaded already.

    They are hidden for the duration of that one import only; importing them later works as usual (cma's own
    ``cma.s`` pyplot shortcuts stay unset in this process).
    """
    if "cma" in sys.modules:
        return sys.modules["cma"]
    hidden = [name for name in _CMA_EXTRAS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cma warns that it could not import matplotlib
            import cma
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return cma


class CMAES:
    """CMA-ES over R^dim starting at ``x0`` (default 0) with step size ``sigma0``.

    ``bounds`` (lo, hi) clips the search box (BBT's early code used ±5; 0/None means unbounded, as in
    the later code). ``seed`` must be a positive int: it is what makes a run reproducible.
    """

    def __init__(
        self,
        dim: int,
        *,
        popsize: int = 20,
        sigma0: float = 1.0,
        seed: int = 1,
        x0: np.ndarray | None = None,
        bounds: tuple[float, float] | None = None,
        extra_options: dict | None = None,
    ):
        cma = import_cma()  # here: keep its import cost off modules that only need the types

        if dim < 2:
            raise ValueError(f"CMA-ES needs dim >= 2, got {dim}")
        if popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {popsize}")
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {sigma0}")
        # pycma treats seed 0/None as "seed from time": map to a deterministic positive 31-bit seed.
        cma_seed = int(seed) if 0 < int(seed) < 2**31 - 1 else int(seed) % (2**31 - 2) + 1
        # A private RandomState as pycma's sampler: it is pickled with the strategy, so a restored
        # strategy continues its own stream (pickling np.random.randn would freeze a copy of the
        # *global* state at save time instead). seed=nan: pycma must not reseed the global RNG.
        opts = {"popsize": int(popsize), "seed": float("nan"), "randn": np.random.RandomState(cma_seed).randn, **_SILENT}
        if bounds is not None:
            opts["bounds"] = [float(bounds[0]), float(bounds[1])]
        if extra_options:
            opts.update(extra_options)
        start = np.zeros(dim) if x0 is None else np.asarray(x0, dtype=np.float64)
        if start.shape != (dim,):
            raise ValueError(f"x0 must have shape ({dim},), got {start.shape}")
        self._rng_state = np.random.RandomState(cma_seed).get_state()
        with self._private_rng():
            self._es = cma.CMAEvolutionStrategy(start, float(sigma0), inopts=opts)
        self._pending: np.ndarray | None = None

    # ------------------------------------------------------------------ RNG isolation

    @contextlib.contextmanager
    def _private_rng(self) -> Iterator[None]:
        outer = np.random.get_state()
        np.random.set_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(outer)

    # ------------------------------------------------------------------ ask / tell

    @property
    def dim(self) -> int:
        return int(self._es.N)

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    @property
    def pending(self) -> bool:
        """True between an :meth:`ask` and its :meth:`tell`."""
        return self._pending is not None

    def ask(self) -> np.ndarray:
        """The next generation, (popsize, dim) float64. Refused while a previous ask is untold."""
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell(): report the losses of the pending generation first")
        with self._private_rng():
            xs = self._es.ask()
        self._pending = np.array(xs, dtype=np.float64)
        return self._pending.copy()

    def tell(self, losses: Sequence[float] | np.ndarray) -> None:
        """Report one finite loss per candidate of the pending generation, in order (lower is better)."""
        if self._pending is None:
            raise ValueError("tell() without a pending ask(): call ask() first")
        f = np.asarray(losses, dtype=np.float64).reshape(-1)
        if f.shape[0] != self._pending.shape[0]:
            raise ValueError(f"expected {self._pending.shape[0]} losses, got {f.shape[0]}")
        if not np.all(np.isfinite(f)):
            raise ValueError(f"losses must be finite; got NaN/inf at positions {np.flatnonzero(~np.isfinite(f)).tolist()}")
        with self._private_rng():
            self._es.tell(list(self._pending), f.tolist())
        self._pending = None

    # ------------------------------------------------------------------ results

    @property
    def mean(self) -> np.ndarray:
        """Current distribution mean (dim,) (pycma's ``mean``; the solution CMA-ES itself recommends)."""
        return np.array(self._es.mean, dtype=np.float64)

    def inject(self, x: np.ndarray) -> None:
        """Make the point ``x`` itself one of the next ask's candidates (pycma ``inject(force=True)``).

        pycma places it among the first rows and, in ``tell``, weights it by its rank like any sample
        (never with a negative, active-update weight).
        """
        if self._pending is not None:
            raise RuntimeError("inject() between ask() and tell()")
        self._es.inject([np.asarray(x, dtype=np.float64)], force=True)

    def inject_direction(self, direction: np.ndarray) -> None:
        """Make ``mean + direction`` a next candidate, rescaled by pycma to a sample-like Mahalanobis length
        when it is longer than ``sqrt(dim)`` (pycma ``inject(force=False)``): the candidate then looks like a
        draw from the distribution pycma's paths and covariance describe."""
        if self._pending is not None:
            raise RuntimeError("inject_direction() between ask() and tell()")
        d = np.asarray(direction, dtype=np.float64)
        if d.shape != (self.dim,) or not np.all(np.isfinite(d)) or not np.any(d):
            raise ValueError("direction must be a finite, non-zero vector of length dim")
        self._es.inject([self._es.mean + d], force=False)

    def mahalanobis_norm(self, dx: np.ndarray) -> float:
        """Length of a step ``dx`` in the current distribution's metric (a sample's is ~sqrt(dim))."""
        return float(self._es.mahalanobis_norm(np.asarray(dx, dtype=np.float64)))

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    @property
    def best_x(self) -> np.ndarray | None:
        """Best candidate ever told (dim,), or None before the first tell."""
        x = self._es.result.xbest
        return None if x is None else np.array(x, dtype=np.float64)

    @property
    def best_f(self) -> float:
        """Loss of :attr:`best_x` (inf before the first tell)."""
        f = self._es.result.fbest
        return float("inf") if f is None else float(f)

    @property
    def generations(self) -> int:
        return int(self._es.countiter)

    # ------------------------------------------------------------------ persistence

    def state_bytes(self) -> bytes:
        """Everything needed to continue bit-identically (strategy, private RNG, pending ask)."""
        return pickle.dumps(
            {"es": self._es, "rng": self._rng_state, "pending": self._pending}, protocol=pickle.HIGHEST_PROTOCOL
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "CMAES":
        """Rebuild an optimiser from :meth:`state_bytes` output (trusted input: it is a pickle)."""
        import_cma()  # before unpickling imports it the usual way
        state = pickle.loads(data)
        obj = cls.__new__(cls)
        obj._es = state["es"]
        obj._rng_state = state["rng"]
        obj._pending = state["pending"]
        return obj
