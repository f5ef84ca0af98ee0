"""Content-free calibration (Zhao et al., ICML 2021, "Calibrate Before Use").

Why: a model read through a template and a few label words often prefers one label whatever the text (the
bundled sentence encoder with a tied head answers one AG News class for almost every input). Zhao et al. measure
that bias by scoring *content-free* inputs ("N/A", "", ...) through the same template and prompt, and divide it
out: with p_cf the mean label distribution of the content-free inputs, the calibrated distribution is
softmax(log p - log p_cf) (their W = diag(p_cf)^-1, b = 0). Only label-word scores are needed, which every
endpoint returns, so this works on any black box, text APIs included.

In this project each candidate prompt is scored on the N texts *and* the M content-free inputs in the same call
(the extra sequences' tokens count in the token budget; the call count does not change), and the loss and
accuracy see the calibrated logits. Pure: the job appends the inputs and splits the answer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bbt_client.tasks.losses import log_softmax

#: The content-free inputs scored with every candidate ("[MASK]" of the paper is left out: on a masked LM served
#: through a text API it would be a second mask token).
CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "")


def with_content_free(texts: Sequence[str], inputs: Sequence[str] = CONTENT_FREE_INPUTS) -> list[str]:
    """The texts to send: ``texts`` followed by the content-free ``inputs``."""
    if not inputs:
        raise ValueError("calibration needs at least one content-free input")
    return [*texts, *inputs]


def calibrate(logits: np.ndarray, num_content_free: int) -> np.ndarray:
    """(C, N + M, K) label logits whose last M texts are content-free -> (C, N, K) calibrated log-probabilities.

    Each candidate's label log-softmax on the N real texts minus the log of its mean label distribution on the
    M content-free inputs.
    """
    z = np.asarray(logits, dtype=np.float64)
    m = int(num_content_free)
    if z.ndim != 3 or m < 1 or z.shape[1] <= m:
        raise ValueError(f"expected (C, N + {m}, K) logits with N >= 1, got shape {z.shape}")
    logp = log_softmax(z)
    text, cf = logp[:, :-m], logp[:, -m:]
    cf_mean = np.log(np.exp(cf).mean(axis=1, keepdims=True))  # (C, 1, K): log of the mean distribution
    return text - cf_mean


def split_content_free(logits: np.ndarray, num_content_free: int) -> np.ndarray:
    """The (C, N, K) logits of the real texts alone (what an uncalibrated reading of the same call sees)."""
    return np.asarray(logits)[:, : np.asarray(logits).shape[1] - int(num_content_free)]
