"""``cmaes-tokens``: BBT's recipe — CMA-ES in a small random subspace — applied to discrete prompts.

CMA-ES searches z ∈ R^d; a fixed, seeded random projection A (d → n·V) turns z into scores for every entry of the
candidate vocabulary (:mod:`bbt_client.methods.text.vocabulary`) in each of the n slots, and each slot takes its
highest-scoring entry:

    scores = (z @ A).reshape(n, V),    prompt_i = vocabulary[argmax_j scores[i, j]]

So the project's core (derivative-free search over a low-dimensional z, a random projection, one batched call
per generation) carries over to endpoints that accept only text. Different z may give the same prompt string
(identical candidates in one generation are scored as they are); the best prompt is the lowest-training-loss
candidate seen. A is regenerated from the seed, never stored; CMA-ES state (with its private RNG) is
checkpointed through :class:`~bbt_client.search.cmaes.CMAES`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from bbt_client.methods.text.discrete import DiscretePromptConfig, DiscretePromptTuner
from bbt_client.search.cmaes import CMAES
from bbt_client.search.projection import derive_seed

_STREAM_PROJECTION, _STREAM_CMA = 81, 82


class TokenCMAConfig(DiscretePromptConfig):
    """``cmaes-tokens`` settings: the discrete prompt's, plus the subspace CMA-ES searches."""

    #: d: dimension CMA-ES searches.
    intrinsic_dim: int = Field(50, ge=2, le=10_000)
    #: CMA-ES initial step size σ0.
    sigma0: float = Field(1.0, gt=0)


class TokenCMATuner(DiscretePromptTuner):
    """CMA-ES over z (d,), projected to per-slot vocabulary scores; argmax per slot gives the prompt."""

    method = "cmaes-tokens"
    config_class = TokenCMAConfig

    def __init__(self, model_info: Any, config: TokenCMAConfig | dict | None = None, seed: int = 42, **kw: Any):
        super().__init__(model_info, config, seed, **kw)
        cfg = self.config
        rng = np.random.default_rng(derive_seed(self.seed, _STREAM_PROJECTION))
        # entries N(0, 1/d): scores have unit scale for z ~ N(0, I); the scale does not change argmax anyway
        self.projection = rng.standard_normal((cfg.intrinsic_dim, self.num_slots * len(self.vocabulary)))
        self.projection /= np.sqrt(cfg.intrinsic_dim)
        self._es = CMAES(cfg.intrinsic_dim, popsize=cfg.popsize, sigma0=cfg.sigma0,
                         seed=derive_seed(self.seed, _STREAM_CMA) % (2**31 - 2) + 1)
        self._pending_z: np.ndarray | None = None

    def indices(self, z: np.ndarray) -> np.ndarray:
        """(C, d) or (d,) points -> (C, n) vocabulary indices (argmax per slot; ties to the lower index)."""
        z2 = np.atleast_2d(np.asarray(z, dtype=np.float64))
        scores = (z2 @ self.projection).reshape(z2.shape[0], self.num_slots, len(self.vocabulary))
        return scores.argmax(axis=2).astype(np.int64)

    def _propose(self) -> np.ndarray:
        self._pending_z = self._es.ask()
        return self.indices(self._pending_z)

    def _update(self, indices: np.ndarray, losses: np.ndarray) -> None:
        self._es.tell(losses)
        self._pending_z = None

    def mode_prompt(self) -> np.ndarray:
        return self.indices(self._es.mean)[0]

    def extra_metrics(self) -> dict[str, float]:
        return {**super().extra_metrics(), "cma_sigma": self._es.sigma}

    def _search_state(self) -> dict[str, Any]:
        return {"es": self._es.state_bytes(), "pending_z": self._pending_z}

    def _load_search_state(self, state: dict[str, Any]) -> None:
        self._es = CMAES.from_bytes(state["es"])
        self._pending_z = state["pending_z"]
