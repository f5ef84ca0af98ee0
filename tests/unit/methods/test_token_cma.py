"""cmaes-tokens: CMA-ES over z, a seeded projection to per-slot vocabulary scores, argmax per slot."""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.errors import ConfigError
from bbt_client.methods.text.token_cma import TokenCMATuner

VOCAB = [f"w{i}" for i in range(20)]
TARGET = np.array([3, 17, 9])


def tuner(seed: int = 0, **cfg) -> TokenCMATuner:
    cfg.setdefault("prompt_tokens", 3)
    cfg.setdefault("intrinsic_dim", 10)
    return TokenCMATuner(None, cfg, seed, vocabulary=VOCAB)


def toy_losses(t: TokenCMATuner) -> np.ndarray:
    return (t._pending != TARGET).mean(axis=1)


def test_candidates_are_the_argmax_of_the_projected_scores():
    t = tuner(popsize=6)
    batch = t.ask()
    assert batch.kind == "text" and batch.num_candidates == 6
    z = t._pending_z
    scores = (z @ t.projection).reshape(6, 3, 20)
    np.testing.assert_array_equal(t._pending, scores.argmax(axis=2))
    assert list(batch.texts) == [" ".join(VOCAB[i] for i in row) for row in scores.argmax(axis=2)]
    assert t.projection.shape == (10, 60)
    np.testing.assert_array_equal(t.projection, tuner().projection)  # seeded, never stored
    assert not np.array_equal(t.projection, tuner(seed=1).projection)


def test_search_lowers_the_toy_loss():
    t = tuner(popsize=10)
    first = None
    for _ in range(30):
        t.ask()
        f = toy_losses(t)
        first = f.mean() if first is None else first
        t.tell(f)
    assert first > 0.8 and t.best_loss <= 1 / 3
    assert t.prompt_text(t.best_prompt()).count(" ") == 2 and "cma_sigma" in t.extra_metrics()


def test_resume_bit_identical(straight_and_resumed):
    def step(t):
        batch = t.ask()
        t.tell(toy_losses(t))
        return batch.texts

    full, resumed = straight_and_resumed(lambda: tuner(popsize=5), step, generations=6, split=3)
    assert full == resumed


def test_resume_with_a_pending_ask_resends_it():
    t = tuner()
    asked = t.ask().texts
    blob = t.state_dict()
    again = tuner()
    again.load_state_dict(blob)
    assert again.pending_batch().texts == asked
    again.tell(toy_losses(again))
    with pytest.raises(ConfigError, match="different"):
        tuner(intrinsic_dim=12).load_state_dict(blob)
