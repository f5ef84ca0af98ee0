"""benchmarks/surrogate_rank.py: its surrogates rank well where a surrogate can, so a low τ on real runs is theirs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REPO, load_script


@pytest.fixture(scope="module")
def study():
    return load_script(REPO / "benchmarks" / "surrogate_rank.py")


def test_both_models_rank_a_low_dimensional_ellipsoid(study):
    scores = study.rank_scores(study.ellipsoid_trace(calls=200, dim=5, layers=1, popsize=10))
    stats = {m: study._stats(rows) for m, rows in scores.items()}
    assert stats["lq"]["generations"] == 19 and stats["lq"]["archive_max"] == 190
    assert stats["lq"]["mean_tau_larger_archives"] > 0.9 and stats["lq"]["share_trusted"] > 0.5
    assert stats["gp"]["mean_tau_larger_archives"] > 0.5


def test_each_generation_is_predicted_from_its_own_optimisers_earlier_points_only(study):
    rng = np.random.default_rng(0)
    z, loss = rng.standard_normal((4, 6, 3)), rng.standard_normal((4, 6))
    loss[3] = loss[1] = (z[1] ** 2).sum(1)  # optimiser 1's second generation repeats its first
    z[3] = z[1]
    scores = study.rank_scores({"optimiser": np.array([0, 1, 0, 1]), "z": z, "loss": loss})
    assert [n for n, _ in scores["gp"]] == [6, 6]  # generations 2 and 3, each from 6 earlier points of its own
    assert scores["gp"][1][1] == pytest.approx(1.0)  # seen points are predicted in order
