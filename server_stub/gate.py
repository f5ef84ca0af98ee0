"""Test gates: hold each model job until a test releases it, so tests wait on events instead of time.

A gate is the ``before_job`` hook of :class:`server_stub.engine.worker.ModelWorker`: it runs on the model thread
right before a job computes. "The request is in flight" is then a fact a test observes (the gate reports
the job entered) rather than a guess ("it must still be running 0.5 s after it was sent"), and "finish it
now" is an action the test takes.

- :class:`RequestGate`: in-process servers (:func:`server_stub.testing.run_server`), threading primitives.
- :class:`FifoGate`: ``python -m server_stub --test-gate PATH`` subprocesses; it prints
  ``test-gate: holding job K`` on stderr, then blocks until the test writes one byte into the FIFO at PATH.
"""

from __future__ import annotations

import sys
import threading


class RequestGate:
    """Counts jobs that entered and jobs the test released; a job proceeds once its release is given."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.entered = 0
        self._released = 0

    def __call__(self) -> None:
        with self._cond:
            self.entered += 1
            ticket = self.entered
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._released >= ticket)

    def wait_entered(self, count: int = 1, timeout: float = 60.0) -> None:
        """Block until ``count`` jobs have entered (``timeout`` only guards against a hung test)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.entered >= count, timeout):
                raise TimeoutError(f"only {self.entered} of {count} jobs reached the model")

    def release(self, count: int = 1) -> None:
        """Let ``count`` more held (or future) jobs proceed."""
        with self._cond:
            self._released += count
            self._cond.notify_all()

    def open(self) -> None:
        """Release everything, now and later (for ``finally`` blocks)."""
        self.release(1 << 30)


class FifoGate:
    """Cross-process gate: announce each job on stderr, then wait for one byte on a named pipe."""

    def __init__(self, path: str):
        self.path = path
        self._jobs = 0

    def __call__(self) -> None:
        self._jobs += 1
        print(f"test-gate: holding job {self._jobs}", file=sys.stderr, flush=True)
        with open(self.path, "rb") as fifo:  # blocks until the test opens the pipe for writing
            fifo.read(1)
