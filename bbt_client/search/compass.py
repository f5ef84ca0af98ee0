"""Compass search: the local second stage of BBT-RGB's two-stage search, batched and resumable.

BBT-RGB (Sun et al., LREC-COLING 2024) runs CMA-ES first, then scipy's COBYLA from each layer's CMA-ES best
point. In d = 500 COBYLA's first d + 1 evaluations only build its simplex: axis probes at step ``rhobeg``
(1.0) from its best vertex, one per call, moving to any probe that improves. Within the few hundred calls a
budget here leaves for the second stage that *is* the whole of COBYLA, so this module runs that search
directly and batched: each generation probes ``centre ± step·e_j`` along ``popsize`` (or ``popsize - 1``)
signed axes, the axes in a seeded random order, cycling; the centre moves to the best probe that beats it.
After a whole cycle (2·dim probes) without a move the step halves (Torczon's compass search).

``remeasure_centre``: BBTv2 holds the other layers' prompts fixed only while one layer is searched; by the
next visit they have moved, so the centre's loss is stale. Row 0 of every generation then re-measures the
centre, and probes are compared with that. BBT's objective does not change, so it keeps the loss it knows.

Pure numpy, explicit state: :meth:`state_bytes` / :func:`load_optimiser` continue bit-identically.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np


class CompassSearch:
    """Batched compass search over R^dim from ``centre`` (whose loss is ``centre_loss``, or unknown: inf)."""

    def __init__(self, centre: np.ndarray, *, popsize: int, step: float = 1.0, seed: int = 1,
                 centre_loss: float = float("inf"), remeasure_centre: bool = False):
        centre = np.array(centre, dtype=np.float64).reshape(-1)
        if popsize < 2 or not step > 0:
            raise ValueError(f"compass search needs popsize >= 2 and step > 0, got {popsize} and {step}")
        self._s: dict[str, Any] = {
            "centre": centre, "centre_loss": float(centre_loss), "step": float(step), "popsize": int(popsize),
            "remeasure": bool(remeasure_centre), "axes": np.random.default_rng(seed).permutation(centre.size),
            "cursor": 0, "since_move": 0, "moves": 0, "pending": None,
        }

    # ------------------------------------------------------------------ the optimiser API the tuners use

    @property
    def popsize(self) -> int:
        return self._s["popsize"]

    @property
    def dim(self) -> int:
        return int(self._s["centre"].size)

    @property
    def sigma(self) -> float:
        """The current step (reported where CMA-ES reports σ)."""
        return self._s["step"]

    @property
    def mean(self) -> np.ndarray:
        """The centre: the incumbent every probe is compared with."""
        return self._s["centre"].copy()

    @property
    def best_x(self) -> np.ndarray:
        """The centre (what a layer holds: the best point of the latest comparison, in the current context)."""
        return self.mean

    @property
    def moves(self) -> int:
        return self._s["moves"]

    def ask(self) -> np.ndarray:
        """(popsize, dim): the centre first when it is re-measured, then the next signed axis probes."""
        s = self._s
        if s["pending"] is not None:
            raise RuntimeError("ask() called twice without tell(): report the losses of the pending generation first")
        first = 1 if s["remeasure"] else 0
        x = np.repeat(s["centre"][None], s["popsize"], axis=0)
        cycle = 2 * self.dim
        for row in range(first, s["popsize"]):
            k = (s["cursor"] + row - first) % cycle
            x[row, s["axes"][k // 2]] += s["step"] if k % 2 == 0 else -s["step"]
        s["pending"] = x
        return x.copy()

    def tell(self, losses: Sequence[float] | np.ndarray) -> None:
        s = self._s
        x = s["pending"]
        if x is None:
            raise ValueError("tell() without a pending ask(): call ask() first")
        f = np.asarray(losses, dtype=np.float64).reshape(-1)
        if f.shape != (len(x),) or not np.all(np.isfinite(f)):
            raise ValueError(f"expected {len(x)} finite losses, got {f.tolist()}")
        first = 1 if s["remeasure"] else 0
        if first:
            s["centre_loss"] = float(f[0])
        probes = len(x) - first
        j = first + int(np.argmin(f[first:]))
        if f[j] < s["centre_loss"]:
            s["centre"], s["centre_loss"] = x[j].copy(), float(f[j])
            s["since_move"] = 0
            s["moves"] += 1
        else:
            s["since_move"] += probes
            if s["since_move"] >= 2 * self.dim:  # a whole cycle of axes without a better point: look closer
                s["step"] /= 2
                s["since_move"] = 0
        s["cursor"] = (s["cursor"] + probes) % (2 * self.dim)
        s["pending"] = None

    # ------------------------------------------------------------------ persistence

    def state_bytes(self) -> bytes:
        return pickle.dumps({"compass": self._s}, protocol=pickle.HIGHEST_PROTOCOL)


def load_optimiser(data: bytes) -> Any:
    """A CMA-ES or compass search back from its ``state_bytes`` (trusted input: a pickle)."""
    from bbt_client.search.cmaes import CMAES, import_cma

    import_cma()  # a CMA-ES pickle would otherwise import it the usual way
    state = pickle.loads(data)
    if isinstance(state, dict) and "compass" in state:
        obj = CompassSearch.__new__(CompassSearch)
        obj._s = state["compass"]
        return obj
    return CMAES.from_bytes(data)


__all__ = ["CompassSearch", "load_optimiser"]
