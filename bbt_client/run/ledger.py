"""A write-ahead ledger of budget spent, so a crash can never hide what the endpoint was asked to do.

Why: the checkpoint is written after a generation is told, so a process killed while a request was in flight
(OOM, pre-emption, a laptop lid) restarts from a checkpoint that never heard of that request — yet the endpoint
may have served it and billed it. Counting only what checkpoints know lets every crash overspend one more
generation.

Protocol (``budget.wal`` in the run directory, one JSON object per line, each append fsynced):

- ``{"op": "reserve", "id": k, "calls", "tokens", "cost", "what"}`` is durable *before* request k is sent;
- ``{"op": "settle", "id": k, "tokens", "cost"}`` once its answer is committed (metered tokens and cost);
- ``{"op": "release", "id": k}`` when the request failed without an answer the endpoint could bill;
- ``{"op": "interrupt", "id": k}`` when Ctrl-C (or a cancellation) cut request k off: charged in full, like an
  unsettled reservation, until ``{"op": "served", "id": k, "calls", "tokens", "cost"}`` records what the
  endpoint reports having served of it (never more than reserved; see :func:`bbt_client.run.metered.settle_interrupted`);
- ``{"op": "opening", "id": k, "calls", "tokens", "cost"}``: spend carried over from a checkpoint made before
  this run directory had a ledger.

Replaying the file gives what was spent: settled records at their metered figures, and every reservation
never settled nor released at its reserved (upper-bound) figures — the endpoint may have done that work.
A torn last line (a crash mid-append) is ignored: its request was never sent, since sending waits for the
fsync.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from bbt_client.run.budget import BudgetUsage, Reservation
from bbt_client.errors import CheckpointError

LEDGER_FILE = "budget.wal"


@dataclass
class LedgerTotals:
    """What the ledger says was spent, and how many reservations were left open by a crash."""

    spent: BudgetUsage
    unsettled: int
    next_id: int
    #: Spent on requests an interrupt cut off (included in ``spent``), at the endpoint's figures where known.
    interrupted: BudgetUsage = field(default_factory=BudgetUsage)
    #: Reserve records of interrupted requests the endpoint has not yet accounted for.
    unserved_interrupts: list[dict] = field(default_factory=list)


class BudgetLedger:
    """Append-only, fsynced record of reservations and their outcomes for one run directory."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LEDGER_FILE
        self._next_id = replay(self.path).next_id if self.path.exists() else 0

    def reserve(self, r: Reservation, what: str, server: dict | None = None) -> int:
        """Record ``r`` durably and return its id; call before the request leaves. ``server``: the endpoint's
        usage counters just before, so an interrupted request can later be settled by what the endpoint served."""
        rid = self._next_id
        self._next_id += 1
        rec = {"op": "reserve", "id": rid, "calls": r.calls, "tokens": r.tokens, "cost": r.cost, "what": what}
        self._append(rec | ({"server": server} if server else {}))
        return rid

    def settle(self, rid: int, tokens: int, cost: float) -> None:
        self._append({"op": "settle", "id": rid, "tokens": int(tokens), "cost": float(cost)})

    def release(self, rid: int) -> None:
        self._append({"op": "release", "id": rid})

    def interrupt(self, rid: int) -> None:
        self._append({"op": "interrupt", "id": rid})

    def served(self, rid: int, calls: int, tokens: int, cost: float) -> None:
        self._append({"op": "served", "id": rid, "calls": int(calls), "tokens": int(tokens), "cost": float(cost)})

    def open_with(self, used: BudgetUsage) -> None:
        """Carry ``used`` (from a checkpoint older than the ledger) into a ledger that is still empty."""
        rid = self._next_id
        self._next_id += 1
        self._append({"op": "opening", "id": rid, "calls": used.calls, "tokens": used.tokens, "cost": used.cost})

    def totals(self) -> LedgerTotals:
        return replay(self.path)

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CheckpointError(f"cannot record budget in {self.path}: {exc.strerror or exc}; nothing was sent") from exc


def replay(path: Path) -> LedgerTotals:
    """Spent totals from a ledger file (see the module docstring); a missing file spent nothing."""
    path = Path(path)
    if not path.exists():
        return LedgerTotals(BudgetUsage(), 0, 0)
    open_: dict[int, dict] = {}
    cut: dict[int, dict] = {}  # interrupted: reserve records, lowered by "served"
    spent = BudgetUsage()
    next_id = 0
    lines = path.read_bytes().split(b"\n")
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            op, rid = rec["op"], int(rec["id"])
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                break  # torn final append: that request was never sent
            raise CheckpointError(f"{path} line {i + 1} is damaged; the budget spent cannot be known") from None
        next_id = max(next_id, rid + 1)
        if op == "opening":
            spent.calls += int(rec["calls"])
            spent.tokens += int(rec["tokens"])
            spent.cost += float(rec["cost"])
        elif op == "reserve":
            open_[rid] = rec
        elif op == "interrupt" and rid in open_:
            cut[rid] = open_.pop(rid)
        elif op == "served" and rid in cut:
            res = cut[rid]
            cut[rid] = res | {k: min(res[k], rec[k]) for k in ("calls", "tokens", "cost")} | {"served": True}
        elif op in ("settle", "release") and rid in open_:
            res = open_.pop(rid)
            if op == "settle":
                spent.calls += int(res["calls"])
                spent.tokens += int(rec["tokens"])
                spent.cost += float(rec["cost"])
    interrupted = BudgetUsage()
    for total, records in ((spent, open_.values()), (spent, cut.values()), (interrupted, cut.values())):
        for res in records:  # reserved, maybe served, never settled: count it in full (or as the endpoint served)
            total.calls += int(res["calls"])
            total.tokens += int(res["tokens"])
            total.cost += float(res["cost"])
    unserved = [res for res in cut.values() if not res.get("served")]
    return LedgerTotals(spent, len(open_), next_id, interrupted, unserved)
