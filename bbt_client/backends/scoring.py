"""How a backend reads label scores from an endpoint, and what each way costs.

A label score is exact when it is the endpoint's own log-probability of the label (or a fixed shift of it shared
by every label of that text); it is floored when the label was not among what the endpoint returned and the
backend had to put a bound below the lowest value shown. Floors are counted (``ScoreResult.floored_scores``) so
a run can say how much of what it optimised was made up (``label_score_coverage``).

Strategies (``scoring`` backend option; ``auto`` lets ``bbt tune`` probe the endpoint and pick the best exact one):

- ``full-vocab``: our server's protocol returns every label's score. Exact.
- ``logprob_token_ids``: vLLM's ``logprob_token_ids`` returns exactly the listed label ids' log-probs at the next
  position (raw, full vocabulary, not capped by ``--max-logprobs``). Exact; single-token label words.
- ``echo`` / ``prompt_logprobs``: each text is sent once per label word as ``prefix + label word`` and the label's
  own tokens' log-probs are summed (Completions ``echo`` with ``max_tokens`` 0, or vLLM's ``prompt_logprobs``):
  log P(label | prefix), exact for any number of label words and for multi-token words; K times the sequences.
- ``bias``: ``logit_bias`` on the label tokens, in rounds when there are more labels than the endpoint returns
  log-probs; exact only where the endpoint applies the bias before it reports log-probs (vLLM's
  ``--logprobs-mode processed_logprobs``); elsewhere (vLLM's default, OpenAI) the bias is not in the values.
- ``allowed_token_ids``: vLLM's label restriction; exact only in processed mode, like ``bias``.
- ``top-k``: the next token's top log-probs; exact only for labels inside the returned top k (the one way on a
  chat-only API), floored otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Strategies whose label scores are exact by construction (no floor is ever needed).
EXACT_BY_CONSTRUCTION = frozenset({"full-vocab", "logprob_token_ids", "echo", "prompt_logprobs"})

#: Strategies that read any number of named words from one sequence per text: more words cost nothing more.
WORD_COUNT_FREE = frozenset({"full-vocab", "logprob_token_ids"})


@dataclass(frozen=True)
class Scoring:
    """The strategy a backend uses, whether it yields exact label scores, and its cost per candidate."""

    strategy: str
    exact: bool
    #: Sequences sent per text and candidate (K label words: ``echo`` sends K, the others 1 per round).
    sequences_per_text: int
    cost: str
    #: Facts the choice rests on (probed or told), reapplied unchanged on resume.
    facts: dict

    def as_dict(self) -> dict:
        return asdict(self)


def describe(strategy: str, k: int, *, rounds: int = 1, processed: bool | None = None,
             facts: dict | None = None) -> Scoring:
    """The :class:`Scoring` of ``strategy`` for ``k`` label words (``rounds`` bias rounds; ``processed``: whether
    the endpoint shows bias/allowed ids in its log-probs)."""
    if strategy == "full-vocab":
        return Scoring(strategy, True, 1, "1 sequence per text; every label read from the full distribution",
                       dict(facts or {}))
    if strategy == "logprob_token_ids":
        return Scoring(strategy, True, 1, f"1 sequence per text + 1 generated token; the {k} label ids' "
                       "log-probs returned as asked", dict(facts or {}))
    if strategy in ("echo", "prompt_logprobs"):
        return Scoring(strategy, True, k, f"{k} sequences per text (prefix + each label word); tokens per "
                       f"candidate = {k} x (text tokens + label tokens + 1)", dict(facts or {}))
    if strategy in ("bias", "allowed_token_ids"):
        exact = bool(processed)
        how = "biased in logprobs" if strategy == "bias" else "restricted in logprobs"
        return Scoring(strategy, exact, rounds,
                       f"{rounds} request round(s) x 1 sequence per text + 1 generated token; exact only where "
                       f"the endpoint shows label ids {how} ({'shown' if processed else 'not shown or unknown'})",
                       dict(facts or {}))
    if strategy == "top-k":
        return Scoring(strategy, False, 1, "1 sequence per text + 1 generated token; labels outside the "
                       "returned top k get a floor", dict(facts or {}))
    raise ValueError(f"unknown scoring strategy {strategy!r}")


def coverage(total: int, floored: int) -> float | None:
    """Exact label scores / all label scores; None before any score."""
    return None if total <= 0 else (total - floored) / total
