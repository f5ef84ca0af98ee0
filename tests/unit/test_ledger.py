"""The write-ahead budget ledger: what it says was spent, after clean runs, failures and crashes."""

from __future__ import annotations

import pytest

from bbt_client.run.budget import Budget, BudgetLimits, BudgetUsage
from bbt_client.errors import CheckpointError
from bbt_client.run.ledger import LEDGER_FILE, BudgetLedger, replay


def _budget() -> Budget:
    return Budget(BudgetLimits(calls=100, tokens=10_000, price_per_1k_tokens=2.0, cost=100.0))


def test_settled_released_and_unsettled_reservations(tmp_path):
    ledger, budget = BudgetLedger(tmp_path), _budget()
    a = budget.reserve(20, 1000)
    ledger.settle(ledger.reserve(a, "train"), tokens=800, cost=budget.cost_of(800))  # answered: metered figures
    b = budget.reserve(20, 1000)
    ledger.release(ledger.reserve(b, "train"))  # failed without an answer: nothing spent
    c = budget.reserve(5, 300)
    ledger.reserve(c, "dev")  # the process died here: counted in full
    totals = replay(tmp_path / LEDGER_FILE)
    assert (totals.spent.calls, totals.spent.tokens, totals.spent.cost) == (25, 1100, pytest.approx(2.2))
    assert totals.unsettled == 1 and totals.next_id == 3
    assert BudgetLedger(tmp_path).reserve(c, "dev") == 3  # ids continue after a restart


def test_a_torn_last_line_was_never_sent_and_is_ignored(tmp_path):
    ledger = BudgetLedger(tmp_path)
    ledger.settle(ledger.reserve(_budget().reserve(4, 0), "train"), tokens=0, cost=0.0)
    with open(tmp_path / LEDGER_FILE, "ab") as f:
        f.write(b'{"op":"reserve","id":1,"cal')  # crash mid-append, before the fsync returned
    assert replay(tmp_path / LEDGER_FILE).spent.calls == 4


def test_damage_before_the_last_line_is_an_error_not_a_guess(tmp_path):
    (tmp_path / LEDGER_FILE).write_bytes(b'garbage\n{"op":"reserve","id":0,"calls":1,"tokens":0,"cost":0}\n')
    with pytest.raises(CheckpointError, match="damaged"):
        replay(tmp_path / LEDGER_FILE)


def test_opening_balance_carries_an_older_checkpoints_spend(tmp_path):
    ledger = BudgetLedger(tmp_path)
    ledger.open_with(BudgetUsage(calls=40, tokens=500, cost=1.0))
    ledger.reserve(_budget().reserve(20, 100), "train")
    spent = replay(tmp_path / LEDGER_FILE).spent
    assert (spent.calls, spent.tokens, spent.cost) == (60, 600, pytest.approx(1.2))


def test_missing_ledger_spent_nothing(tmp_path):
    totals = replay(tmp_path / LEDGER_FILE)
    assert totals.spent == BudgetUsage() and totals.next_id == 0
