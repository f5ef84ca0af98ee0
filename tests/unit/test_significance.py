"""The paired sign test that keeps a prompt better on dev only by luck from replacing the bare template."""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.run.significance import BARE_TEMPLATE_ALPHA, sign_test_p
from bbt_client.tasks.losses import cross_entropy, label_log_probs


def _pair(wins: int, losses: int, ties: int = 3) -> tuple[np.ndarray, np.ndarray]:
    base = np.linspace(-2.0, -0.1, wins + losses + ties)
    moved = base + np.array([0.5] * wins + [-0.5] * losses + [0.0] * ties)
    return moved, base


@pytest.mark.parametrize("wins, losses, p", [(5, 0, 1 / 32), (4, 0, 1 / 16), (3, 3, 42 / 64), (0, 0, 1.0),
                                             (0, 2, 1.0), (8, 2, 56 / 1024)])
def test_p_is_the_binomial_tail_over_the_examples_that_moved(wins, losses, p):
    assert sign_test_p(*_pair(wins, losses)) == pytest.approx(p)


def test_five_clean_wins_are_the_fewest_that_pass():
    assert sign_test_p(*_pair(5, 0)) <= BARE_TEMPLATE_ALPHA < sign_test_p(*_pair(4, 0))
    assert sign_test_p(*_pair(9, 2)) <= BARE_TEMPLATE_ALPHA < sign_test_p(*_pair(8, 2))


def test_examples_of_different_splits_are_refused():
    with pytest.raises(ValueError, match="shape"):
        sign_test_p(np.zeros(4), np.zeros(5))


def test_label_log_probs_are_what_cross_entropy_averages():
    z = np.random.default_rng(0).normal(size=(3, 7, 4)) * 50
    y = np.array([0, 1, 2, 3, 0, 1, 2])
    lp = label_log_probs(z, y)
    assert lp.shape == (3, 7) and np.all(lp <= 0) and np.all(np.isfinite(lp))
    assert np.allclose(-lp.mean(axis=1), cross_entropy(z, y))
