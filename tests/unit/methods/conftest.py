import pickle

import numpy as np
import pytest

from bbt_client.protocol import ModelInfo


@pytest.fixture
def model_info() -> ModelInfo:
    """A tiny fake model: D=16, L=3; enough to exercise projections and schedules quickly."""
    return ModelInfo(
        name="toy",
        kind="masked",
        architecture="Toy",
        hidden_size=16,
        num_layers=3,
        max_seq_len=128,
        vocab_size=100,
        embedding_std=0.05,
        hidden_std=[0.4, 0.6, 0.8],
        max_prompt_tokens=64,
        max_candidates=64,
        max_texts=64,
        max_body_bytes=1 << 24,
        device="cpu",
    )


class LinearToyModel:
    """A fake black box: logits (C, N, K) = fixed text logits (N, K) + mean prompt token (C, D) @ V.

    The true labels favour class 1 more than the text logits do, so a prompt whose bias pushes toward
    class 1 lowers the loss well below where a random prompt starts: proof of ask/tell wiring, no model.
    """

    def __init__(self, hidden_size: int, num_classes: int = 2, seed: int = 0, texts: int = 16):
        rng = np.random.default_rng(seed)
        self.V = rng.normal(size=(hidden_size, num_classes)) * 20.0
        self.base = rng.normal(size=(texts, num_classes))
        shift = np.zeros(num_classes)
        shift[1] = 3.0
        self.labels = np.argmax(self.base + shift, axis=1)

    def logits(self, full_prompts: np.ndarray) -> np.ndarray:
        # full_prompts: (C, n, D) or (C, L, n, D); use the mean token over every layer.
        flat = full_prompts.reshape(full_prompts.shape[0], -1, full_prompts.shape[-1]).mean(axis=1)
        bias = flat.astype(np.float64) @ self.V  # (C, K)
        return self.base[None] + bias[:, None, :]


@pytest.fixture
def toy_model():
    return LinearToyModel


def run_straight_and_resumed(make, step, generations: int = 6, split: int = 3):
    """Run a tuner ``generations`` generations straight, and a second one ``split`` generations, then
    through a pickled ``state_dict`` into a third (fresh, global NumPy RNG reseeded) for the rest.

    ``make()`` builds a tuner, ``step(tuner)`` runs one generation and returns what was asked. Checks
    that both end with the same best and last prompts; returns (straight asks, head + resumed asks)
    for the caller to compare.
    """
    straight = make()
    full = [step(straight) for _ in range(generations)]
    first = make()
    head = [step(first) for _ in range(split)]
    blob = pickle.dumps(first.state_dict())
    np.random.seed(1)  # resuming must not depend on the global RNG
    resumed = make()
    resumed.load_state_dict(pickle.loads(blob))
    tail = [step(resumed) for _ in range(generations - split)]
    assert np.array_equal(straight.best_prompt(), resumed.best_prompt())
    assert np.array_equal(straight.last_candidate_prompts(), resumed.last_candidate_prompts())
    return full, head + tail


@pytest.fixture
def straight_and_resumed():
    """:func:`run_straight_and_resumed`, for resume tests of any tuner."""
    return run_straight_and_resumed
