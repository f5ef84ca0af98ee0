import asyncio

import pytest

from bbt_client.run.budget import Budget, BudgetLimits, BudgetUsage
from bbt_client.errors import BudgetExhausted


def test_reserve_commit_counts_calls_once():
    b = Budget(BudgetLimits(calls=40))
    r = b.reserve(20, 0)
    b.commit(r)
    assert b.used.calls == 20
    with pytest.raises(ValueError):
        b.commit(r)  # a retried call cannot be counted twice
    assert b.used.calls == 20


def test_reservations_in_flight_block_overshoot():
    b = Budget(BudgetLimits(calls=50))
    r1 = b.reserve(20, 0)
    r2 = b.reserve(20, 0)
    with pytest.raises(BudgetExhausted) as exc:
        b.reserve(20, 0)
    assert exc.value.cap == "calls"
    b.release(r2)  # failed request: nothing spent
    b.commit(r1)
    assert b.used.calls == 20
    assert b.remaining_calls() == 30


def test_token_and_cost_caps_checked_before_spending():
    b = Budget(BudgetLimits(tokens=1000, cost=0.5, price_per_1k_tokens=1.0))
    b.commit(b.reserve(1, 400), tokens=300)
    assert b.used.tokens == 300 and b.used.cost == pytest.approx(0.3)
    with pytest.raises(BudgetExhausted) as exc:
        b.reserve(1, 300)  # 0.3 + 0.3 > 0.5 cost
    assert exc.value.cap == "cost"
    b2 = Budget(BudgetLimits(tokens=1000))
    b2.commit(b2.reserve(1, 900))
    with pytest.raises(BudgetExhausted) as exc:
        b2.reserve(1, 101)
    assert exc.value.cap == "tokens"


def test_cost_cap_requires_price():
    with pytest.raises(ValueError):
        BudgetLimits(cost=1.0)


def test_time_cap():
    b = Budget(BudgetLimits(wall_seconds=10))
    b.check_time(5, needed=4)
    with pytest.raises(BudgetExhausted) as exc:
        b.check_time(5, needed=6)
    assert exc.value.cap == "time"


def test_usage_restored_from_checkpoint():
    b = Budget(BudgetLimits(calls=100), BudgetUsage(calls=90, tokens=5))
    with pytest.raises(BudgetExhausted):
        b.reserve(20, 0)
    b.reserve(10, 0)


async def test_concurrent_reservations_never_exceed_cap():
    """Many tasks racing for the budget: the committed total never passes the cap."""
    b = Budget(BudgetLimits(calls=100))
    spent = 0

    async def worker():
        nonlocal spent
        while True:
            try:
                r = b.reserve(7, 0)
            except BudgetExhausted:
                return
            await asyncio.sleep(0)
            b.commit(r)
            spent += 7

    await asyncio.gather(*(worker() for _ in range(16)))
    assert spent == b.used.calls <= 100
    assert b.used.calls == 98
