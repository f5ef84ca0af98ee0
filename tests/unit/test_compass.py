"""Compass search (the second stage of the two-stage search): probes, moves, step halving, exact resume."""

import numpy as np
import pytest

from bbt_client.search.compass import CompassSearch, load_optimiser
from bbt_client.search.cmaes import CMAES


def sphere(x, c):
    return ((x - c) ** 2).sum(axis=1)


def test_probes_are_signed_axis_steps_from_the_centre_and_a_fruitless_cycle_halves_the_step():
    centre = np.arange(5.0)
    cs = CompassSearch(centre, popsize=5, step=0.5, seed=3, centre_loss=-1.0)  # nothing can beat -1: no move
    seen = []
    for _ in range(2):  # 2 generations x 5 probes = one cycle of the 2 x 5 signed axes
        x = cs.ask()
        d = x - centre
        assert np.all((d != 0).sum(axis=1) == 1) and np.all(np.abs(d[d != 0]) == 0.5)
        seen += [(int(np.flatnonzero(r)[0]), float(r[r != 0][0])) for r in d]
        cs.tell(np.zeros(5))
    assert sorted(seen) == sorted((a, s) for a in range(5) for s in (-0.5, 0.5))
    assert cs.sigma == 0.25 and np.array_equal(cs.mean, centre)
    assert np.all(np.abs(cs.ask() - centre).sum(axis=1) == 0.25)


def test_moves_to_the_best_probe_that_beats_the_centre_and_finds_a_minimum():
    c = np.array([1.0, -2.0, 0.5, 3.0])
    cs = CompassSearch(np.zeros(4), popsize=6, step=1.0, seed=0, centre_loss=float(sphere(np.zeros((1, 4)), c)[0]))
    for _ in range(60):
        x = cs.ask()
        f = sphere(x, c)
        before = cs.mean
        cs.tell(f)
        if f.min() < float(sphere(before[None], c)[0]):
            assert np.array_equal(cs.mean, x[np.argmin(f)])
        else:
            assert np.array_equal(cs.mean, before)
    assert np.abs(cs.mean - c).max() < 0.05 and cs.moves >= 5


def test_a_remeasured_centre_is_row_zero_and_its_new_loss_is_what_probes_must_beat():
    cs = CompassSearch(np.zeros(3), popsize=4, step=1.0, seed=1, centre_loss=-5.0, remeasure_centre=True)
    x = cs.ask()
    assert np.array_equal(x[0], np.zeros(3)) and np.all((x[1:] != 0).sum(axis=1) == 1)
    cs.tell([2.0, 3.0, 1.5, 4.0])  # the stale -5 is replaced by 2.0, and the probe at 1.5 beats it
    assert np.array_equal(cs.mean, x[2])


def test_state_round_trip_continues_identically_and_bad_input_is_refused():
    c = np.random.default_rng(0).normal(size=10)
    a = CompassSearch(np.zeros(10), popsize=5, seed=9, remeasure_centre=True)
    for _ in range(3):
        a.tell(sphere(a.ask(), c))
    b = load_optimiser(a.state_bytes())
    for _ in range(4):
        xa, xb = a.ask(), b.ask()
        assert np.array_equal(xa, xb)
        a.tell(sphere(xa, c))
        b.tell(sphere(xb, c))
    assert isinstance(load_optimiser(CMAES(4, seed=2).state_bytes()), CMAES)
    with pytest.raises(ValueError, match="finite"):
        a.ask()
        a.tell([1.0, np.nan, 1.0, 1.0, 1.0])
    with pytest.raises(RuntimeError, match="twice"):
        a.ask()
    with pytest.raises(ValueError, match="popsize"):
        CompassSearch(np.zeros(3), popsize=1)
