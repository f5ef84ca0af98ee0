"""One model worker thread fed by a bounded queue, so the asyncio loop never blocks on torch.

Requests are queued in arrival order; when the queue is full a request is refused with :class:`Overloaded`
(503) so clients back off instead of piling up unbounded memory.

Cross-request batching: jobs submitted with :meth:`ModelWorker.submit_group` name a *group runner*. When the
worker picks such a job it also takes every other queued job with the same runner (up to ``max_group``) and
hands them all to one call ``runner([arg, ...])``, which returns one result -- or one exception -- per job. So
eight tuning jobs hitting one server share model passes instead of waiting for each other's requests in turn,
and a bad request fails alone. A job not yet picked keeps its place: the group is formed when the worker
becomes free, from what is queued then (no waiting for stragglers, so one client alone is never slowed).

``before_job`` runs on the worker thread before each job (once per job of a group, in queue order). Tests
pass a gate (:class:`server_stub.gate.RequestGate`, or ``--test-gate FIFO`` for a subprocess) that holds a
job until the test releases it, so "a request is in flight" is an event they wait for, never a guess about time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from server_stub.errors import Overloaded

log = logging.getLogger(__name__)

#: ``runner(args) -> results``: one result or exception instance per argument, in order.
GroupRunner = Callable[[Sequence[Any]], Sequence[Any]]


@dataclass(eq=False)  # identity: a job leaves the queue as itself, never compared field by field
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    fn: Callable[..., Any] | None  # a single job: fn(*args, **kwargs)
    args: tuple
    kwargs: dict
    runner: GroupRunner | None = None  # a groupable job: runner([args[0], ...])


_STOP = object()


class ModelWorker:
    """Runs jobs one at a time (or a group of compatible jobs at once) on a dedicated thread."""

    def __init__(self, max_queue: int = 64, num_threads: int | None = None, name: str = "model-worker",
                 before_job: Callable[[], None] | None = None, max_group: int = 16):
        if max_group < 1:
            raise ValueError("max_group must be >= 1")
        self.max_queue = max_queue
        self.max_group = max_group
        self._num_threads = num_threads
        self._before_job = before_job
        self._pending: deque[_Job | object] = deque()
        self._cond = threading.Condition()
        #: Group runs so far and the jobs they served (tests and logs: did requests share passes?).
        self.groups_run = 0
        self.grouped_jobs = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side

    async def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the worker thread, alone."""
        return await self._enqueue(_Job(asyncio.get_running_loop(), None, fn, args, kwargs))  # type: ignore[arg-type]

    async def submit_group(self, runner: GroupRunner, arg: Any) -> Any:
        """Run ``runner([arg, ...])`` together with other queued jobs of the same ``runner``; return this job's
        entry (raised if it is an exception)."""
        return await self._enqueue(_Job(asyncio.get_running_loop(), None, None, (arg,), {}, runner))  # type: ignore[arg-type]

    async def _enqueue(self, job: _Job) -> Any:
        job.future = job.loop.create_future()
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise Overloaded("the model queue is full; retry after a short back-off")
            self._pending.append(job)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:  # the caller left (e.g. its client hung up): the job leaves the queue
            with self._cond:
                if job in self._pending:
                    self._pending.remove(job)
            raise

    @property
    def pending(self) -> int:
        """Jobs queued and not yet picked by the worker."""
        with self._cond:
            return sum(1 for j in self._pending if j is not _STOP)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish queued work, then stop the thread."""
        with self._cond:
            self._pending.append(_STOP)
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread

    def _take(self) -> list[_Job] | None:
        """The next job, plus the queued jobs that share its group runner; None to stop."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._pending))
            first = self._pending.popleft()
            if first is _STOP:
                return None
            jobs = [first]
            if first.runner is not None and self.max_group > 1:
                keep: deque = deque()
                while self._pending:
                    job = self._pending.popleft()
                    if job is _STOP:  # stop after everything queued before it
                        keep.append(job)
                        keep.extend(self._pending)
                        self._pending.clear()
                        break
                    if job.runner == first.runner and len(jobs) < self.max_group:  # bound methods: ==, not is
                        jobs.append(job)
                    else:
                        keep.append(job)
                self._pending = keep
            return jobs

    def _run(self) -> None:
        if self._num_threads:
            import torch

            torch.set_num_threads(self._num_threads)
        while True:
            jobs = self._take()
            if jobs is None:
                return
            live = []
            for job in jobs:
                if job.future.cancelled():
                    continue
                try:
                    if self._before_job is not None:
                        self._before_job()
                except BaseException as exc:
                    _deliver(job, exc, failed=True)
                else:
                    live.append(job)
            if not live:
                continue
            if live[0].runner is None:
                job = live[0]
                try:
                    result = job.fn(*job.args, **job.kwargs)  # type: ignore[misc]
                except BaseException as exc:  # delivered to the awaiting request handler
                    _deliver(job, exc, failed=True)
                else:
                    _deliver(job, result)
                continue
            self._run_group(live)

    def _run_group(self, jobs: list[_Job]) -> None:
        try:
            results = list(jobs[0].runner([j.args[0] for j in jobs]))  # type: ignore[misc]
            if len(results) != len(jobs):
                raise RuntimeError(f"group runner returned {len(results)} results for {len(jobs)} jobs")
        except BaseException as exc:  # the runner itself broke: every job of the group hears it
            log.exception("group of %d jobs failed", len(jobs))
            results = [exc] * len(jobs)
        self.groups_run += 1
        self.grouped_jobs += len(jobs)
        for job, res in zip(jobs, results):
            _deliver(job, res, failed=isinstance(res, BaseException))


def _deliver(job: _Job, value: Any, failed: bool = False) -> None:
    job.loop.call_soon_threadsafe(_set_exception if failed else _set_result, job.future, value)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
