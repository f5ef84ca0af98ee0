"""Cumulative metering behind ``GET /v1/usage``: what this server has computed since it started.

Why: a client counts what it *meant* to spend; the endpoint knows what it *did*. A crash test (or an operator
reconciling a bill) compares the two. Work is counted when the model finishes it, whether or not the client
was still there to hear the answer: a request whose caller died mid-flight still cost compute. (The server
has a single API key, so there is no per-key breakdown.) The OpenAI/vLLM face counts here too: each
``/v1/completions`` or ``/v1/chat/completions`` request adds one request, one sequence per prompt and the tokens
run through the model (its ``candidates`` stay protocol v1's).
"""

from __future__ import annotations

import threading

from bbt_client.protocol import ServerUsage


class UsageMeter:
    """Thread-safe counters: the model thread adds, the event loop reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {name: 0 for name in ServerUsage.model_fields if name != "queue_depth"}

    def add(self, **amounts: int) -> None:
        """Add ``amounts`` (counter fields of :class:`ServerUsage`)."""
        with self._lock:
            for name, value in amounts.items():
                self._counts[name] += int(value)

    def snapshot(self, queue_depth: int) -> ServerUsage:
        with self._lock:
            return ServerUsage(queue_depth=queue_depth, **self._counts)
