"""Hard caps on what a tuning job may spend: API calls, tokens, cost and wall time.

Reserve before spending, commit after: a request is only sent once its worst case fits under every cap,
counting what other in-flight requests have reserved, so concurrency and retries can never overshoot.
Pure: the caller passes elapsed time in; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bbt_client.errors import BudgetExhausted


class BudgetLimits(BaseModel):
    """Caps; ``None`` means uncapped. Cost is ``tokens / 1000 * price_per_1k_tokens``."""

    model_config = ConfigDict(extra="forbid")

    calls: int | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, gt=0)
    cost: float | None = Field(default=None, gt=0)
    price_per_1k_tokens: float | None = Field(default=None, ge=0)
    wall_seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _cost_needs_price(self) -> "BudgetLimits":
        if self.cost is not None and self.price_per_1k_tokens is None:
            raise ValueError("a cost cap needs price_per_1k_tokens")
        return self


class BudgetUsage(BaseModel):
    """What has been committed (spent) so far; persisted in checkpoints."""

    calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    wall_seconds: float = 0.0


@dataclass
class Reservation:
    calls: int
    tokens: int
    cost: float
    open: bool = True


class Budget:
    """Tracks usage against :class:`BudgetLimits` with reservations for in-flight requests."""

    def __init__(self, limits: BudgetLimits, used: BudgetUsage | None = None):
        self.limits = limits
        self.used = used.model_copy() if used is not None else BudgetUsage()
        self._held = Reservation(0, 0, 0.0)

    def cost_of(self, tokens: int) -> float:
        return 0.0 if self.limits.price_per_1k_tokens is None else tokens / 1000.0 * self.limits.price_per_1k_tokens

    def remaining_calls(self) -> int | None:
        if self.limits.calls is None:
            return None
        return self.limits.calls - self.used.calls - self._held.calls

    def blocking_cap(self, calls: int, tokens: int) -> str | None:
        """The first cap that ``calls``/``tokens`` more would exceed (with what is held), or None."""
        lim, used, held = self.limits, self.used, self._held
        if lim.calls is not None and used.calls + held.calls + calls > lim.calls:
            return "calls"
        if lim.tokens is not None and used.tokens + held.tokens + tokens > lim.tokens:
            return "tokens"
        if lim.cost is not None and used.cost + held.cost + self.cost_of(tokens) > lim.cost + 1e-12:
            return "cost"
        return None

    def reserve(self, calls: int, tokens: int) -> Reservation:
        """Hold ``calls`` and an upper-bound ``tokens`` estimate, or raise :class:`BudgetExhausted`."""
        if calls < 0 or tokens < 0:
            raise ValueError("reservations must be non-negative")
        cap = self.blocking_cap(calls, tokens)
        if cap is not None:
            raise BudgetExhausted(cap, self._message(cap, calls, tokens))
        r = Reservation(calls, tokens, self.cost_of(tokens))
        self._hold(r, +1)
        return r

    def commit(self, r: Reservation, tokens: int | None = None) -> None:
        """Turn a reservation into usage; ``tokens`` is the metered figure (defaults to the estimate).

        A metered figure above the estimate is still recorded (the endpoint has spent it), so the
        job sees the cap as reached and stops; estimates are built as upper bounds to avoid this.
        """
        self._close(r)
        t = r.tokens if tokens is None else int(tokens)
        self.used.calls += r.calls
        self.used.tokens += t
        self.used.cost += self.cost_of(t)

    def release(self, r: Reservation) -> None:
        """Give a reservation back: the request was never answered, so nothing was spent."""
        self._close(r)

    def check_time(self, elapsed: float, needed: float = 0.0) -> None:
        """Raise ``BudgetExhausted('time')`` if ``elapsed + needed`` seconds would pass the wall-time cap."""
        cap = self.limits.wall_seconds
        if cap is not None and elapsed + needed > cap:
            raise BudgetExhausted(
                "time", f"wall-time cap of {cap:.0f}s reached ({elapsed:.0f}s used, next step needs ~{needed:.0f}s)"
            )

    def _hold(self, r: Reservation, sign: int) -> None:
        self._held.calls += sign * r.calls
        self._held.tokens += sign * r.tokens
        self._held.cost += sign * r.cost

    def _close(self, r: Reservation) -> None:
        if not r.open:
            raise ValueError("reservation already committed or released")
        r.open = False
        self._hold(r, -1)

    def _message(self, cap: str, calls: int, tokens: int) -> str:
        lim, used = self.limits, self.used
        if cap == "calls":
            return f"call budget: {used.calls}/{lim.calls} used, {self._held.calls} in flight, next step needs {calls}"
        if cap == "tokens":
            return f"token budget: {used.tokens}/{lim.tokens} used, next step needs up to {tokens}"
        return f"cost budget: {used.cost:.4f}/{lim.cost} used, next step needs up to {self.cost_of(tokens):.4f}"
