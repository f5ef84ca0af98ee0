"""What every endpoint backend offers the tuning loop: model facts, tokenization, batched scoring.

The tuning loop speaks only this interface, so a backend (our server, vLLM prompt embeddings,
an OpenAI-compatible text API) can be swapped without touching methods, budgets or checkpoints.
Backends own transport concerns: HTTP, auth, retries, timeouts, concurrency limits. They do not
own budgets: the caller reserves budget before a call and commits what the backend reports.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from bbt_client.backends.scoring import Scoring, describe
from bbt_client.protocol import ModelInfo, PromptBatch, PromptKind, TokenizeResponse  # noqa: F401 - re-exported

#: Sends one counted probe request: takes a factory of the request (returning its value and the tokens the
#: endpoint metered) and returns the value. Inside ``bbt tune`` it reserves and settles budget like a score.
Counted = Callable[[Callable[[], Awaitable[tuple[Any, int]]]], Awaitable[Any]]


async def uncounted(factory: Callable[[], Awaitable[tuple[Any, int]]]) -> Any:
    """The :data:`Counted` of a probe outside a run: just send."""
    return (await factory())[0]


@dataclass(frozen=True)
class ScoreJob:
    """Score ``label_words`` at the answer slot of ``template`` for every candidate × text."""

    template: str
    texts: Sequence[str]
    label_words: Sequence[str]
    prompts: PromptBatch
    text_pairs: Sequence[str] | None = None

    @property
    def num_calls(self) -> int:
        """API calls this job costs: one per candidate prompt evaluated on the text batch (as in BBT)."""
        return self.prompts.num_candidates


@dataclass(frozen=True)
class ScoreResult:
    """``logits`` (C, N, K) float32, finite; ``tokens`` processed as the endpoint metered them (0: not reported);
    ``endpoint_calls``: the calls the endpoint says it served (protocol v1 ``usage.candidates``), None when it
    does not say; ``floored_scores``: how many of the C·N·K label scores are a floor put below what the endpoint
    returned rather than its own value (see :mod:`bbt_client.backends.scoring`)."""

    logits: np.ndarray
    tokens: int
    extra: dict = field(default_factory=dict)
    endpoint_calls: int | None = None
    floored_scores: int = 0

    @property
    def label_scores(self) -> int:
        return int(self.logits.size)


class Backend(abc.ABC):
    """An endpoint the client can query. Use as ``async with backend: ...`` to close connections."""

    #: Prompt kinds this backend can send; the job refuses methods that need others.
    supported_prompts: frozenset[str] = frozenset({"none"})

    @abc.abstractmethod
    async def model_info(self) -> ModelInfo: ...

    @abc.abstractmethod
    async def tokenize(self, words: Sequence[str] = (), texts: Sequence[str] = ()) -> TokenizeResponse: ...

    @abc.abstractmethod
    async def score(self, job: ScoreJob) -> ScoreResult:
        """Run one batched request (or a few, if the endpoint's limits demand), retrying transient faults.

        Must raise :class:`~bbt_client.errors.ProtocolError` rather than return NaN or wrongly shaped logits.
        """

    #: ``"auto"``: the strategy is chosen by :meth:`probe` (``bbt tune`` probes before it starts).
    scoring_option: str = "full-vocab"

    def scoring(self, k: int) -> Scoring:
        """How this backend reads ``k`` label words' scores now, and what it costs."""
        return describe("full-vocab", k)

    async def probe(self, counted: Counted = uncounted, label_words: Sequence[str] = ()) -> dict:
        """What the endpoint can do, found by a few requests (each through ``counted``), and the strategy chosen
        from it, applied to this backend. Backends with one way of scoring have nothing to probe."""
        return {"backend": type(self).__name__, "scoring": self.scoring(len(label_words) or 2).as_dict()}

    def apply_scoring(self, facts: dict) -> None:
        """Reapply a strategy a probe chose (``Scoring.facts``), e.g. on resume, without probing again."""
        return None

    async def layer_stats(self, *, template: str, texts: Sequence[str], text_pairs: Sequence[str] | None,
                          prompt_tokens: int, slot_token_ids: Sequence[int] | None) -> list[float]:
        """Per-layer σ̂ measured on ``texts`` (see :class:`~bbt_client.protocol.LayerStatsRequest`)."""
        from bbt_client.errors import UnsupportedError

        raise UnsupportedError(f"the {type(self).__name__} endpoint cannot measure hidden-state statistics; "
                               "use hidden_std_source='model'")

    def estimate_tokens(self, job: ScoreJob, text_token_counts: Sequence[int],
                        prompt_token_counts: Sequence[int] = ()) -> int:
        """Upper-bound estimate of tokens ``job`` will be billed, for reserving budget before the call.

        ``prompt_token_counts``: for ``text`` prompts, each candidate's prompt string in tokens (+1 for the join).
        Default: (prompt tokens + template overhead + text tokens) per candidate per text.
        """
        overhead = len(job.template) // 2 + 4  # generous: template words + special tokens
        per_text = sum(text_token_counts) + len(text_token_counts) * (overhead + job.prompts.num_prompt_tokens)
        texts = sum(int(c) + 1 for c in prompt_token_counts) * len(text_token_counts)
        return per_text * job.num_calls + texts

    async def aclose(self) -> None:  # pragma: no cover - trivial default
        return None

    async def __aenter__(self) -> "Backend":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
