"""Is a tuned prompt really better than no prompt? A paired sign test on the dev examples.

A few-shot dev set is small (16 examples per class), and a run checks many prompts on it: the best of a dozen
dev readings beats the bare template by a few examples through luck alone, and on a task the model cannot do,
that prompt then scores below doing nothing on test. Accuracy alone is too coarse to tell luck from learning on
so few examples (a prompt that lifts AG News from 0.32 to 0.45 on test reads only 6 dev examples better), so
the test reads every example: how often the tuned prompt raises the probability of the true class over the bare
template, against a fair coin (an exact one-sided sign test at :data:`BARE_TEMPLATE_ALPHA`). A prompt that
learned raises it on most examples; one that fits noise raises it on about half.
"""

from __future__ import annotations

import math

import numpy as np

#: The conventional 5 % level.
BARE_TEMPLATE_ALPHA = 0.05


def sign_test_p(log_probs: np.ndarray, baseline_log_probs: np.ndarray) -> float:
    """One-sided exact p-value that ``log_probs`` (per example, of the true class) exceed ``baseline_log_probs``
    more often than chance: P(Binomial(n, 1/2) >= wins) over the n examples where they differ."""
    a, b = np.asarray(log_probs, np.float64), np.asarray(baseline_log_probs, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired log-probabilities differ in shape: {a.shape} vs {b.shape}")
    wins, losses = int(np.sum(a > b)), int(np.sum(a < b))
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n
