"""The ask–tell contract every tuning method implements. Pure: no I/O, no clocks, no global state.

A tuner proposes a whole generation (one :class:`PromptBatch`), the caller evaluates it however it likes
(one batched request), and tells back one finite loss per candidate, in order. Because the tuner never
calls the objective, budgets, retries, checkpoints and progress stay in the job loop, and a user can
drive the loop themselves.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from bbt_client.backends.base import PromptBatch, PromptKind
from bbt_client.errors import ConfigError


def check_losses(losses: np.ndarray, expected: int) -> np.ndarray:
    """``tell``'s argument as (C,) float64, or ValueError for a wrong length or NaN/inf (the contract above)."""
    f = np.asarray(losses, dtype=np.float64).reshape(-1)
    if f.shape[0] != expected:
        raise ValueError(f"expected {expected} losses (one per candidate), got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"losses must be finite; NaN/inf at positions {np.flatnonzero(~np.isfinite(f)).tolist()}")
    return f


_MISSING = object()


def check_state(state: dict[str, Any], version: int, identity: dict[str, Any]) -> None:
    """Refuse a tuner state of another version, or one whose identity (method, seed, config, model, data) differs;
    the refusal names the config options that differ, so the user knows which ``--opt`` to set back."""
    if state.get("version") != version:
        raise ConfigError(f"tuner state version {state.get('version')} is not supported (expected {version})")
    saved = state.get("identity")
    if saved != identity:
        was, now = (saved or {}).get("config") or {}, identity.get("config") or {}
        # a field missing from an identity is one left out while off (PromptSearchConfig.identity)
        fields = [f"{k} (checkpoint: {was.get(k, 'off')}, now: {now.get(k, 'off')})"
                  for k in sorted(set(was) | set(now)) if was.get(k, _MISSING) != now.get(k, _MISSING)]
        detail = f"; options that differ: {', '.join(fields)}" if fields else ""
        raise ConfigError("checkpoint was made with a different method, seed, config, model or training data"
                          f"{detail}; resume with the same job config (set a changed option back with --opt)")


class Tuner(abc.ABC):
    """Base class of BBT, BBTv2 and GDFO tuners."""

    #: Registered method name (``bbt``, ``bbtv2``, ``gdfo``).
    method: str = ""
    #: The prompt kind this tuner's proposals use; backends that cannot send it are refused up front.
    prompt_kind: PromptKind = "shallow"

    @property
    @abc.abstractmethod
    def popsize(self) -> int:
        """Candidates per generation: the API calls one ``ask`` costs."""

    @abc.abstractmethod
    def ask(self) -> PromptBatch:
        """Propose the next generation. Calling ``ask`` twice without ``tell`` is an error."""

    def pending_batch(self) -> PromptBatch | None:
        """The batch of an ``ask`` not yet told, or None.

        A job stopped by its budget after asking (or resumed from a checkpoint taken then) re-sends exactly
        this batch instead of asking again, so extending the budget continues as one longer run would have.
        """
        return None

    @abc.abstractmethod
    def tell(self, losses: np.ndarray, logits: np.ndarray | None = None) -> None:
        """Report (C,) finite losses for the last ``ask``; ``logits`` (C, N, K) for methods that learn from them.

        Raises ValueError for a wrong length, NaN/inf, or a ``tell`` without a pending ``ask``.
        """

    @abc.abstractmethod
    def best_prompt(self) -> np.ndarray:
        """The lowest-training-loss prompt seen so far: (n, D) shallow or (L, n, D) deep."""

    def empty_prompt(self) -> np.ndarray | None:
        """A prompt that means "no prompt" (text methods: every slot empty; continuous ones: a prompt of no tokens,
        sent as the bare template); the job keeps it unless a tuned prompt beats it on dev. None: no baseline,
        as the config's ``empty_prompt_baseline`` says."""
        if not getattr(getattr(self, "config", None), "empty_prompt_baseline", False):
            return None
        return np.zeros(0, np.float32)

    def last_candidate_prompts(self) -> np.ndarray:
        """Full prompts of the generation last told, (C, n, D) or (C, L, n, D), for dev evaluation."""
        raise NotImplementedError

    @property
    def phase(self) -> str:
        """Human-readable position in the method's schedule (e.g. ``layer 3/6``) for progress and plots."""
        return ""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, picklable (numpy arrays, bytes, ints).

        Must include the optimiser state and any RNG state the tuner uses; projections are rebuilt
        from their seeds, not stored.
        """

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, on a tuner built with the same config and model info."""

    def extra_metrics(self) -> dict[str, float]:
        """Method-specific figures for progress lines and result.json (GDFO's distillation loss, ...)."""
        return {}
