"""The paired sign test that keeps a prompt better on dev only by luck from replacing the bare template."""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.run.significance import BARE_TEMPLATE_ALPHA, sign_test_p


def _pair(wins: int, losses: int, both: int = 3) -> tuple[np.ndarray, np.ndarray]:
    hits = np.array([True] * wins + [False] * losses + [True] * both + [False] * both)
    base = np.array([False] * wins + [True] * losses + [True] * both + [False] * both)
    return hits, base


@pytest.mark.parametrize("wins, losses, p", [(5, 0, 1 / 32), (4, 0, 1 / 16), (3, 3, 42 / 64), (0, 0, 1.0),
                                             (0, 2, 1.0), (8, 2, 56 / 1024)])
def test_p_is_the_binomial_tail_over_the_examples_they_disagree_on(wins, losses, p):
    assert sign_test_p(*_pair(wins, losses)) == pytest.approx(p)


def test_five_clean_wins_are_the_fewest_that_pass():
    assert sign_test_p(*_pair(5, 0)) <= BARE_TEMPLATE_ALPHA < sign_test_p(*_pair(4, 0))
    assert sign_test_p(*_pair(9, 2)) <= BARE_TEMPLATE_ALPHA < sign_test_p(*_pair(8, 2))


def test_examples_of_different_splits_are_refused():
    with pytest.raises(ValueError, match="shape"):
        sign_test_p(np.ones(4, bool), np.ones(5, bool))
