"""The fitted verbalizer's read-out: what it learns, what it ignores, and how it travels in result.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt_client.tasks.fitted_verbalizer import L2_GRID, FittedVerbalizer, cross_fit, fit, fit_on_dev


def _scores(rng, n, labels, words=12, signal=1.0):
    """Word scores where words 3k, 3k+1, 3k+2 lean to class k (k < 3), the rest are noise, plus per-text shifts."""
    z = rng.normal(size=(n, words))
    for j in range(3):
        z[np.arange(n), 3 * labels + j] += signal
    return z + rng.normal(scale=5.0, size=(n, 1))  # a per-text shift: log-probs vs raw logits


def test_the_fit_learns_which_words_carry_each_class_and_transfers_to_new_texts():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, 90), rng.integers(0, 3, 600)
    words = [f"w{i}" for i in range(12)]
    fv = fit(_scores(rng, 90, y_train), y_train, 3, words, l2=0.1)
    test = _scores(rng, 600, y_test)
    acc = (fv.class_logits(test).argmax(-1) == y_test).mean()
    own = (test[:, [0, 3, 6]].argmax(-1) == y_test).mean()  # one word per class, as a hand-picked verbalizer reads
    assert acc > 0.75 and acc > own + 0.1
    assert np.argmax(fv.weights[:9], axis=1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_per_text_shift_does_not_change_the_class_logits():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 30)
    z = _scores(rng, 30, y)
    fv = fit(z, y, 3, [f"w{i}" for i in range(12)], l2=0.3)
    shifted = z + rng.normal(scale=10, size=(30, 1))
    np.testing.assert_allclose(fv.class_logits(shifted), fv.class_logits(z), atol=1e-9)


def test_the_same_data_give_the_same_read_out_and_it_survives_json():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 30)
    z = _scores(rng, 30, y)
    words = [f"w{i}" for i in range(12)]
    a, b = fit(z, y, 3, words, l2=0.1), fit(z.copy(), y.copy(), 3, words, l2=0.1)
    np.testing.assert_array_equal(a.weights, b.weights)
    back = FittedVerbalizer.from_dict(json.loads(json.dumps(a.as_dict())))
    np.testing.assert_array_equal(back.class_logits(z), a.class_logits(z))
    assert back.words == a.words and back.l2 == a.l2


def test_dev_picks_the_penalty_and_a_tie_keeps_the_stronger_one():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    z = _scores(rng, 60, y)
    words = [f"w{i}" for i in range(12)]
    y_dev = rng.integers(0, 3, 50)
    fv, acc = fit_on_dev(z, y, _scores(rng, 50, y_dev, signal=50.0), y_dev, 3, words)  # every penalty reads it all
    assert fv.l2 == L2_GRID[0] and acc == 1.0
    y_dev = rng.integers(0, 3, 200)
    fv, acc = fit_on_dev(z, y, _scores(rng, 200, y_dev), y_dev, 3, words)
    assert fv.l2 in L2_GRID and acc > 0.6


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="word logits"):
        fit(np.zeros((4, 3)), np.array([0, 1, 0, 1]), 2, ["a", "b"], l2=0.1)
    fv = fit(np.eye(4)[:, :2] + 0.0, np.array([0, 1, 0, 1]), 2, ["a", "b"], l2=0.1)
    with pytest.raises(ValueError, match="word logits"):
        fv.class_logits(np.zeros((3, 5)))


def test_the_search_reads_each_training_text_through_a_fold_fitted_without_it():
    """On pure noise the fit reads its own training texts almost perfectly; the cross-fit reads them at chance,
    as it reads new texts: a search scored through it cannot gain by fitting the read-out's noise."""
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 8)
    z = rng.normal(size=(24, 40))
    words = [f"w{i}" for i in range(40)]
    fv = cross_fit(fit(z, y, 3, words, l2=0.03), z, y)
    assert len(fv.folds) == 4 and sorted(np.bincount(fv.fold_of)) == [6, 6, 6, 6]
    assert (fv.class_logits(z).argmax(-1) == y).mean() > 0.95
    assert (fv.training_class_logits(z).argmax(-1) == y).mean() < 0.6
    held = np.array(fv.fold_of) == 0
    np.testing.assert_allclose(fv.training_class_logits(z)[held], fv.folds[0].class_logits(z[held]))
    moved = z.copy()
    moved[held] += rng.normal(scale=3.0, size=moved[held].shape)  # fold 0's own texts do not shape its read-out
    again = cross_fit(fit(moved, y, 3, words, l2=0.03), moved, y)
    np.testing.assert_allclose(again.folds[0].weights, fv.folds[0].weights)
    assert not np.allclose(again.folds[1].weights, fv.folds[1].weights)
    extra = np.vstack([z, rng.normal(size=(2, 40))])  # calibration's content-free inputs follow the texts
    np.testing.assert_allclose(fv.training_class_logits(extra)[24:], fv.class_logits(extra[24:]))
    back = FittedVerbalizer.from_dict(json.loads(json.dumps(fv.as_dict())))
    np.testing.assert_array_equal(back.training_class_logits(z), fv.training_class_logits(z))


def test_a_class_with_one_training_text_leaves_nothing_to_cross_fit():
    rng = np.random.default_rng(5)
    y = np.array([0, 0, 0, 1])
    z = rng.normal(size=(4, 6))
    fv = fit(z, y, 2, [f"w{i}" for i in range(6)], l2=0.1)
    assert cross_fit(fv, z, y) is fv and fv.folds == ()
    np.testing.assert_array_equal(fv.training_class_logits(z), fv.class_logits(z))
