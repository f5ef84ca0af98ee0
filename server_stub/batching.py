"""One model worker thread fed by a bounded queue, so the asyncio loop never blocks on torch.

Concurrent requests are queued in arrival order (each request is already micro-batched by the model);
when the queue is full the request is refused with :class:`Overloaded` (503) so clients back off
instead of piling up unbounded memory.

``before_job`` runs on the worker thread before each job. Tests pass a gate
(:class:`server_stub.testing.RequestGate`, or ``--test-gate FIFO`` for a subprocess) that holds a job until
the test releases it, so "a request is in flight" is an event they wait for, never a guess about time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable

from server_stub.errors import Overloaded

log = logging.getLogger(__name__)

_STOP = object()


class ModelWorker:
    """Runs callables one at a time on a dedicated thread; ``submit`` returns an awaitable result."""

    def __init__(self, max_queue: int = 64, num_threads: int | None = None, name: str = "model-worker",
                 before_job: Callable[[], None] | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._num_threads = num_threads
        self._before_job = before_job
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._num_threads:
            import torch

            torch.set_num_threads(self._num_threads)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            loop, future, fn, args, kwargs = item
            if future.cancelled():
                continue
            try:
                if self._before_job is not None:
                    self._before_job()
                result = fn(*args, **kwargs)
            except BaseException as exc:  # delivered to the awaiting request handler
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    async def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self._queue.put_nowait((loop, future, fn, args, kwargs))
        except queue.Full:
            raise Overloaded("the model queue is full; retry after a short back-off") from None
        return await future

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish queued work, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
