"""Is a tuned prompt really better than no prompt? A paired sign test on the dev examples.

A few-shot dev set is small (16 examples per class), and a run checks many prompts on it: the best of a
dozen dev readings beats the bare template by a few examples through luck alone, and on a task the model
cannot do that prompt then scores below doing nothing on test. So a tuned prompt replaces the bare template
only when the examples they disagree on favour it beyond chance: McNemar's exact one-sided test (a sign test
on the discordant pairs) at :data:`BARE_TEMPLATE_ALPHA`.
"""

from __future__ import annotations

import math

import numpy as np

#: The conventional 5 % level: a tuned prompt that wins fewer discordant dev examples than this allows stays out.
BARE_TEMPLATE_ALPHA = 0.05


def sign_test_p(hits: np.ndarray, baseline_hits: np.ndarray) -> float:
    """One-sided exact p-value that ``hits`` (per-example correctness, bool) beats ``baseline_hits`` on the
    same examples: P(Binomial(n, 1/2) >= wins) over the n examples exactly one of them gets right."""
    hits, baseline_hits = np.asarray(hits, bool), np.asarray(baseline_hits, bool)
    if hits.shape != baseline_hits.shape:
        raise ValueError(f"paired hits differ in shape: {hits.shape} vs {baseline_hits.shape}")
    wins = int(np.sum(hits & ~baseline_hits))
    n = wins + int(np.sum(baseline_hits & ~hits))
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n
