import math

import numpy as np
import pytest

from bbt_client.tasks.losses import accuracy, cross_entropy, hinge, log_softmax, loss_fn


def test_cross_entropy_matches_hand_computation():
    logits = np.array([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # (1, 3, 2)
    labels = np.array([0, 0, 1])
    expected = (
        -math.log(math.exp(2) / (math.exp(2) + 1))
        - math.log(1 / (1 + math.e))
        - math.log(0.5)
    ) / 3
    assert cross_entropy(logits, labels) == pytest.approx([expected], rel=1e-12)


def test_cross_entropy_is_per_candidate_and_accepts_2d():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 3))
    labels = rng.integers(0, 3, size=5)
    per_c = cross_entropy(logits, labels)
    assert per_c.shape == (4,)
    for c in range(4):
        assert cross_entropy(logits[c], labels)[0] == pytest.approx(per_c[c])


def test_cross_entropy_stable_for_huge_logits():
    logits = np.array([[[1e6, -1e6], [-1e6, 1e6]]])
    out = cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(out).all()
    assert out[0] == pytest.approx(1e6, rel=1e-9)  # first text costs 0, second 2e6; mean 1e6
    assert np.allclose(np.exp(log_softmax(np.array([1000.0, 1000.0]))), 0.5)


def test_hinge_hand_computed():
    # text 0: label 0, scores (3, 2.5, 0) -> class1: max(0, 2 - 0.5) = 1.5, class2: max(0, 2 - 3) = 0
    # text 1: label 2, scores (0, 1, 0.5) -> class0: max(0, 2 - 0.5) = 1.5, class1: max(0, 2 + 0.5) = 2.5
    logits = np.array([[[3.0, 2.5, 0.0], [0.0, 1.0, 0.5]]])
    labels = np.array([0, 2])
    assert hinge(logits, labels, margin=2.0) == pytest.approx([(1.5 + 4.0) / 2])
    assert hinge(logits, labels, margin=0.1) == pytest.approx([(0.0 + (0.1 + 0.5)) / 2])


def test_accuracy_and_loss_fn():
    logits = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    labels = np.array([0, 1])
    assert accuracy(logits, labels).tolist() == [1.0, 0.5]
    assert np.allclose(loss_fn("ce")(logits, labels), cross_entropy(logits, labels))
    assert np.allclose(loss_fn("hinge", margin=1.0)(logits, labels), hinge(logits, labels, margin=1.0))
    with pytest.raises(ValueError, match="unknown loss"):
        loss_fn("mse")


@pytest.mark.parametrize(
    "logits,labels",
    [
        (np.zeros((2, 3, 2)), np.array([0, 1])),  # wrong N
        (np.zeros((2, 2, 2)), np.array([0, 2])),  # label out of range
        (np.zeros((2, 2, 2)), np.array([0.0, 1.0])),  # float labels
        (np.zeros((2,)), np.array([0])),  # bad rank
    ],
)
def test_shape_and_label_validation(logits, labels):
    with pytest.raises(ValueError):
        cross_entropy(logits, labels)
