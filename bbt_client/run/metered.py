"""Scoring under a budget: estimate, reserve, record durably, send, settle.

Its own module because the order of these steps is what keeps the budget honest across errors, timeouts and
crashes: the reservation is in the ledger before the request leaves; an endpoint that answered with an error
(or was never reached) bills nothing, so the reservation is released; a request that may have done its work
(timed out by the wall-time cap, cancelled, interrupted) is charged in full — an interrupted one until the
endpoint's own usage counters show what it served (:func:`settle_interrupted`).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Awaitable, Callable

from bbt_client.backends.base import Backend, ScoreJob, ScoreResult
from bbt_client.run.budget import Budget, Reservation
from bbt_client.errors import BudgetExhausted
from bbt_client.run.ledger import BudgetLedger


class MeteredScorer:
    """Sends :class:`ScoreJob`\\ s to ``backend`` within ``budget``; ``ledger`` (None: no run directory) makes
    each reservation durable before the request is sent. ``elapsed`` is the run's wall time so far."""

    def __init__(self, backend: Backend, budget: Budget, ledger: BudgetLedger | None, elapsed: Callable[[], float]):
        self.backend, self.budget, self.ledger, self.elapsed = backend, budget, ledger, elapsed
        self._text_token_counts: dict[tuple[str, int], list[int]] = {}

    async def score(self, label: str, job: ScoreJob, reserve_after: int = 0) -> ScoreResult:
        """The backend's answer to ``job``, paid for; ``reserve_after`` calls must stay free after it.
        ``label`` names the ledger entry and keys the cached token counts of the job's texts."""
        tokens = await self._estimate(label, job)

        async def send() -> tuple[ScoreResult, int]:
            result = await self.backend.score(job)
            return result, result.tokens

        return await self._paid(label, job.num_calls, tokens, reserve_after, "for the next step", send)

    async def call(self, label: str, factory: Callable[[], Awaitable[tuple[Any, int]]],
                   tokens_estimate: int = 64) -> Any:
        """One counted request other than a score (an endpoint probe): ``factory`` returns its value and the
        tokens the endpoint metered; one call and ``tokens_estimate`` tokens are reserved first."""
        return await self._paid(label, 1, tokens_estimate, 0, "to probe the endpoint", factory)

    async def _paid(self, label: str, calls: int, tokens: int, reserve_after: int, needed_for: str,
                    send: Callable[[], Awaitable[tuple[Any, int]]]) -> Any:
        """Reserve, record durably, send, settle at the metered tokens — under the rules of the module doc."""
        cap = self.budget.blocking_cap(calls + reserve_after, tokens)
        if cap is not None:
            raise BudgetExhausted(cap, f"not enough {cap} budget left {needed_for}")
        server = await server_counters(self.backend) if self.ledger is not None else None
        r: Reservation = self.budget.reserve(calls, tokens)
        rid = self.ledger.reserve(r, label, server) if self.ledger is not None else None  # durable before sending
        remaining = None
        if self.budget.limits.wall_seconds is not None:
            remaining = max(0.0, self.budget.limits.wall_seconds - self.elapsed())
        try:
            value, metered = await asyncio.wait_for(send(), timeout=remaining)
        except asyncio.TimeoutError:
            self._spend(r, rid)  # the endpoint may have done the work: count it
            raise BudgetExhausted("time", "wall-time cap reached while a request was in flight") from None
        except Exception:
            self.budget.release(r)  # answered with an error or never reached: nothing to bill
            if rid is not None:
                self.ledger.release(rid)
            raise
        except BaseException as exc:
            if rid is not None and isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                self.budget.commit(r)  # in full until settle_interrupted learns what the endpoint served
                self.ledger.interrupt(rid)
            else:
                self._spend(r, rid)  # the endpoint may have done the work
            raise
        self._spend(r, rid, metered if metered else None)
        return value

    async def _estimate(self, label: str, job: ScoreJob) -> int:
        """An upper bound on the job's tokens, for token and cost caps (0 when neither is set)."""
        lim = self.budget.limits
        if lim.tokens is None and lim.cost is None:
            return 0  # uncapped: metered usage is still recorded on commit
        key = (label, len(job.texts))  # a split with or without the content-free inputs
        if key not in self._text_token_counts:
            resp = await self.backend.tokenize(texts=list(job.texts))
            self._text_token_counts[key] = list(resp.text_token_counts)
        counts = self._text_token_counts[key]
        if job.prompts.kind == "text":  # the prompt strings are counted too (not billed: /tokenize does no work)
            prompt_counts = (await self.backend.tokenize(texts=list(job.prompts.texts))).text_token_counts
            return self.backend.estimate_tokens(job, counts, prompt_token_counts=prompt_counts)
        return self.backend.estimate_tokens(job, counts)

    def _spend(self, r: Reservation, rid: int | None, tokens: int | None = None) -> None:
        """Commit ``r`` in memory and settle it in the ledger at the same figures."""
        self.budget.commit(r, tokens=tokens)
        if rid is not None:
            t = r.tokens if tokens is None else int(tokens)
            self.ledger.settle(rid, t, self.budget.cost_of(t))


_COUNTERS = ("requests", "candidates", "tokens")


async def server_counters(backend: Backend) -> dict[str, Any] | None:
    """The endpoint's cumulative usage counters and URL, for backends that report them (our server's
    ``GET /v1/usage``); None otherwise or when the endpoint does not answer (the request then stays chargeable
    in full if cut off)."""
    usage = getattr(backend, "usage", None)
    if usage is None:
        return None
    try:
        now = await usage()
    except Exception:  # noqa: BLE001 - the snapshot only ever lowers a charge; without it nothing is lowered
        return None
    return {"url": getattr(getattr(backend, "http", None), "base_url", None),
            **{k: int(getattr(now, k)) for k in _COUNTERS}}


async def settle_interrupted(ledger: BudgetLedger, backend: Backend, cost_of: Callable[[int], float]) -> None:
    """Charge each request an interrupt cut off what the endpoint served of it, where the endpoint can say.

    The server's counters grow when it finishes work, whether or not the caller is still there, and a request
    whose caller hung up while it was queued is dropped unserved. A tokenize request goes to the same
    first-in-first-out model queue, so once it is answered every earlier request is computed or dropped; the
    growth of the counters since the snapshot taken before the cut-off request then bounds what it cost
    (other clients' work only adds to it). Counters below the snapshot mean a restarted server or another
    endpoint: that request stays charged in full.
    """
    pending = ledger.totals().unserved_interrupts
    if not pending or getattr(backend, "usage", None) is None:
        return
    try:
        await backend.tokenize(texts=[f"bbt settle {uuid.uuid4().hex}"])  # unique text: never answered from a cache
    except Exception:  # noqa: BLE001 - the endpoint cannot say now; the charge stays in full until it can
        return
    now = await server_counters(backend)
    for res in pending:
        before = res.get("server")
        if not before or now is None or now["url"] != before.get("url") or any(
                now[k] < before.get(k, 0) for k in _COUNTERS):
            continue
        tokens = min(int(res["tokens"]), now["tokens"] - before["tokens"])
        ledger.served(res["id"], min(int(res["calls"]), now["candidates"] - before["candidates"]), tokens,
                      cost_of(tokens))
