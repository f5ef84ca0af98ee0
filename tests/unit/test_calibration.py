"""Content-free calibration (Zhao et al. 2021): the bias a template shows on empty inputs is divided out."""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.tasks.calibration import CONTENT_FREE_INPUTS, calibrate, split_content_free, with_content_free
from bbt_client.tasks.losses import accuracy, log_softmax


def test_removes_a_constant_label_bias():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(2, 30, 4))  # (C, N, K) what the texts say
    labels = signal[0].argmax(1)
    bias = np.array([6.0, 0.0, -1.0, 0.5])  # the template's preference, the same for every input
    cf = np.zeros((2, 2, 4))  # content-free inputs carry no signal: only the bias
    logits = np.concatenate([signal, cf], axis=1) + bias
    assert accuracy(split_content_free(logits, 2), labels)[0] < 0.5  # biased: class 0 wins nearly everywhere
    cal = calibrate(logits, 2)
    assert cal.shape == (2, 30, 4)
    assert accuracy(cal, labels)[0] == 1.0
    # exactly log p - log p_cf: the signal's own log-softmax (up to a per-text constant)
    d = cal - log_softmax(signal)
    np.testing.assert_allclose(d - d[..., :1], 0, atol=1e-9)


def test_mean_of_distributions_per_candidate():
    cf = np.log(np.array([[[0.5, 0.5], [0.9, 0.1]]]))  # two content-free inputs of one candidate
    text = np.log(np.array([[[0.7, 0.3]]]))
    out = calibrate(np.concatenate([text, cf], axis=1), 2)
    expected = np.log([0.7, 0.3]) - np.log([0.7, 0.3])  # mean of the two distributions is (0.7, 0.3)
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-12)


def test_inputs_and_shape_checks():
    assert with_content_free(["a", "b"]) == ["a", "b", *CONTENT_FREE_INPUTS]
    with pytest.raises(ValueError, match="at least one"):
        with_content_free(["a"], ())
    with pytest.raises(ValueError, match="N >= 1"):
        calibrate(np.zeros((1, 2, 3)), 2)
    with pytest.raises(ValueError, match="expected"):
        calibrate(np.zeros((2, 3)), 1)
