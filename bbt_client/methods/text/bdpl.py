"""BDPL: Black-box Discrete Prompt Learning (Diao et al., "Black-box Prompt Learning for Pre-trained Language
Models", TMLR 2023), as a pure ask/tell tuner.

Each of the n prompt slots holds a categorical distribution p_i over the V entries of the candidate vocabulary
(:mod:`bbt_client.methods.text.vocabulary`), starting uniform. A generation samples C prompts s_1..s_C (one entry per slot,
independently), the caller scores them (C API calls in one batch) and tells their losses L_k; the
variance-reduced policy-gradient estimator of the paper's code, with the generation's mean loss as the baseline,

    g_i = 1/(C-1) · Σ_k (L_k - mean(L)) · d_i(s_k,i),      d_i(s)_j = +1/p_i(j) for j = s, -1/p_i(j) otherwise

is clipped to norm ``clip_norm`` and applied with Adam (``lr``), after which each p_i is projected back onto the
probability simplex (Euclidean projection). The best prompt is the lowest-training-loss sample seen; the
distribution's argmax is reported as a metric (``mode_prompt``).

Deviations from the paper and its code (also in docs/deviations.md):
- one generation scores every candidate on the whole few-shot training set (the code samples mini-batches of 4
  texts per step); an API call is one candidate on that batch, as for BBT;
- none in the gradient: the code's d_i(s) is 2·e_s/p_i(s) - 1/p_i, and the -1/p_i part is multiplied by
  Σ_k (L_k - mean(L)) = 0, so the estimate is exactly twice the score-function one (2·e_s/p_i(s)); that factor is
  kept so that the norm clip acts where the code's does;
- Adam's state and the sampler's RNG are checkpointed, so a resumed run continues bit-identically;
- defaults are sized for a 400-call budget (n = 5 slots, V = 50 entries, C = 10 samples, lr = 0.005, measured) instead of
  the paper's 8,000 calls; the vocabulary excludes the label words, and calibration (Zhao et al. 2021) is chosen
  on dev by default (the paper scores raw label probabilities).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from bbt_client.methods.text.discrete import DiscretePromptConfig, DiscretePromptTuner
from bbt_client.search.projection import derive_seed

_STREAM_SAMPLER = 91


class BDPLConfig(DiscretePromptConfig):
    """BDPL settings (see the module docstring)."""

    #: Adam step size on the probabilities (a fraction per step: each entry starts at 1/V = 0.02). Measured by
    #: ``benchmarks/bdpl_lr.py`` (pure noise, n = 5, V = 50, C = 10): 0.03 put 13.8 of 50 entries per slot at
    #: zero, never to be sampled again, within 5 generations; 0.005 is the largest rate tried that zeroes under
    #: one entry in 5 generations (0.08), and it still lifts a planted good entry to 0.046 in 40 (0.003: 0.033).
    lr: float = Field(0.005, gt=0, le=1)
    #: Gradient norm clipping before the Adam step (3 in the reference code).
    clip_norm: float = Field(3.0, gt=0)
    #: Adam's first-moment decay.
    beta1: float = Field(0.9, ge=0, lt=1)
    #: Adam's second-moment decay.
    beta2: float = Field(0.999, ge=0, lt=1)


def project_simplex(p: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``p`` (n, V) onto the probability simplex (Duchi et al. 2008)."""
    u = -np.sort(-p, axis=1)
    css = np.cumsum(u, axis=1) - 1.0
    k = np.arange(1, p.shape[1] + 1)
    rho = (u - css / k > 0).sum(axis=1)  # >= 1 always
    theta = css[np.arange(p.shape[0]), rho - 1] / rho
    return np.maximum(p - theta[:, None], 0.0)


def policy_gradient(probs: np.ndarray, samples: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """BDPL's variance-reduced estimate (n, V) from C samples (C, n) and their losses (C,), as its code computes it:
    twice the score-function estimate of ∇_p E[L] (see the module docstring)."""
    c = samples.shape[0]
    adv = (losses - losses.mean()) / max(1, c - 1)
    grad = np.zeros_like(probs)
    rows = np.arange(probs.shape[0])
    for k in range(c):
        s = samples[k]
        grad[rows, s] += 2.0 * adv[k] / probs[rows, s]  # the code's +1/p at s and -1/p elsewhere, summed over k
    return grad


class BDPLTuner(DiscretePromptTuner):
    """Categorical distributions over the candidate vocabulary, one per slot, learnt by policy gradient."""

    method = "bdpl"
    config_class = BDPLConfig

    def __init__(self, model_info: Any, config: BDPLConfig | dict | None = None, seed: int = 42, **kw: Any):
        super().__init__(model_info, config, seed, **kw)
        n, v = self.num_slots, len(self.vocabulary)
        self.probs = np.full((n, v), 1.0 / v)
        self._m = np.zeros((n, v))
        self._v = np.zeros((n, v))
        self._steps = 0
        self._rng = np.random.default_rng(derive_seed(self.seed, _STREAM_SAMPLER))

    def _propose(self) -> np.ndarray:
        cdf = np.cumsum(self.probs, axis=1)
        cdf /= cdf[:, -1:]
        u = self._rng.random((self.popsize, self.num_slots))
        idx = (cdf[None, :, :] <= u[:, :, None]).sum(axis=2)  # first entry whose cdf exceeds u
        return np.minimum(idx, len(self.vocabulary) - 1)

    def _update(self, indices: np.ndarray, losses: np.ndarray) -> None:
        cfg = self.config
        g = policy_gradient(self.probs, indices, losses)
        norm = float(np.linalg.norm(g))
        if norm > cfg.clip_norm:
            g *= cfg.clip_norm / norm
        self._steps += 1
        self._m = cfg.beta1 * self._m + (1 - cfg.beta1) * g
        self._v = cfg.beta2 * self._v + (1 - cfg.beta2) * g * g
        m_hat = self._m / (1 - cfg.beta1 ** self._steps)
        v_hat = self._v / (1 - cfg.beta2 ** self._steps)
        self.probs = project_simplex(self.probs - cfg.lr * m_hat / (np.sqrt(v_hat) + 1e-8))

    def mode_prompt(self) -> np.ndarray:
        return self.probs.argmax(axis=1).astype(np.int64)

    def extra_metrics(self) -> dict[str, float]:
        p = np.clip(self.probs, 1e-12, 1.0)
        return {**super().extra_metrics(), "max_prob": float(self.probs.max(axis=1).mean()),
                "entropy": float(-(p * np.log(p)).sum(axis=1).mean())}

    def _search_state(self) -> dict[str, Any]:
        return {"probs": self.probs, "m": self._m, "v": self._v, "steps": self._steps,
                "rng": self._rng.bit_generator.state}

    def _load_search_state(self, state: dict[str, Any]) -> None:
        self.probs, self._m, self._v = state["probs"].copy(), state["m"].copy(), state["v"].copy()
        self._steps = int(state["steps"])
        self._rng = np.random.default_rng(0)
        self._rng.bit_generator.state = state["rng"]
