"""A fault-injecting HTTP proxy (stdlib asyncio) that sits between the client and a real server.

Why a proxy and not mocks: the client's retry, timeout and validation code runs exactly as in production
(real sockets, real httpx), and the real server computes the honest answers the faults are applied to.

Each request whose path matches ``fault_paths`` takes the next fault from :attr:`FaultyProxy.faults`
(a FIFO list; empty means pass through). Faults:

- ``"ok"``: forward unchanged.
- ``"status:CODE"``: answer CODE with a JSON error without forwarding (``Retry-After: 0`` on 429/503).
- ``"truncate"``: forward, then send the headers and only half of the body, and close.
- ``"drop"``: close the connection without any answer (the request is not forwarded).
- ``"drop_after"``: forward (the server does the work), then close without answering.
- ``"hang"``: never answer; wait until the client gives up and closes the connection (its timeout fires
  by construction, whatever the machine's speed).
- ``"nan"``: forward, then replace the score logits with NaN of the same shape.
- ``"shape"``: forward, then replace the score logits with an array of a different shape.
- ``"garbage"``: answer 200 with a body that is not JSON.

Counts: ``received`` (requests per path), ``forwarded`` (per path), ``applied`` (faults used).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

import numpy as np


class FaultyProxy:
    """Run with :func:`faulty_proxy`; thread-safe to mutate ``faults`` from the test thread (list ops are atomic)."""

    def __init__(self, upstream: str, fault_paths: tuple[str, ...] = ("/v1/score",)):
        u = urlparse(upstream)
        self.up_host, self.up_port = u.hostname, u.port
        self.fault_paths = fault_paths
        self.faults: list[str] = []
        self.received: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.applied: Counter[str] = Counter()
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                headers = _headers(head)
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                path = head.split(b" ", 2)[1].decode("latin-1").split("?")[0]
                self.received[path] += 1
                fault = self.faults.pop(0) if (path in self.fault_paths and self.faults) else "ok"
                if fault != "ok":
                    self.applied[fault.split(":")[0]] += 1
                if not await self._answer(fault, path, head, body, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # client gone, or the proxy is shutting down mid-fault (e.g. during a hang)
        finally:
            writer.close()

    async def _answer(self, fault: str, path: str, head: bytes, body: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Write the (possibly faulty) answer; returns whether the connection stays open."""
        kind, _, arg = fault.partition(":")
        if kind == "drop":
            return False
        if kind == "status":
            code = int(arg)
            payload = json.dumps({"error": {"code": "injected", "message": f"injected {code}"}}).encode()
            extra = b"Retry-After: 0\r\n" if code in (429, 503) else b""
            writer.write(_response(code, payload, extra))
            await writer.drain()
            return True
        if kind == "garbage":
            writer.write(_response(200, b"<html>not json</html>"))
            await writer.drain()
            return True
        if kind == "hang":
            await reader.read()  # until EOF: the client timed out and closed
            return False
        status, resp_head, resp_body = await self._forward(head, body)
        self.forwarded[path] += 1
        if kind == "drop_after":
            return False
        if kind in ("nan", "shape") and status == 200:
            resp_body = _corrupt_logits(resp_body, kind)
        if kind == "truncate":
            writer.write(_response(status, resp_body)[: -max(1, len(resp_body) // 2)])
            await writer.drain()
            return False
        writer.write(_response(status, resp_body))
        await writer.drain()
        return True

    async def _forward(self, head: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        """One request on a fresh upstream connection (Connection: close keeps the framing trivial)."""
        lines = [ln for ln in head.decode("latin-1").split("\r\n") if ln and not ln.lower().startswith("connection:")]
        new_head = ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1")
        r, w = await asyncio.open_connection(self.up_host, self.up_port)
        try:
            w.write(new_head + body)
            await w.drain()
            raw = await r.read()
        finally:
            w.close()
        resp_head, _, resp_body = raw.partition(b"\r\n\r\n")
        if not resp_head:
            raise ConnectionResetError("upstream closed without answering")
        status = int(resp_head.split(b" ", 2)[1])
        return status, resp_head, resp_body


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            ).encode() + extra + b"\r\n" + body


def _corrupt_logits(body: bytes, kind: str) -> bytes:
    data = json.loads(body)
    shape = list(data["logits"]["shape"])
    if kind == "nan":
        arr = np.full(shape, np.nan, dtype=np.float32)
    else:
        shape[-1] += 1
        arr = np.zeros(shape, dtype=np.float32)
    data["logits"] = {"dtype": "float32", "shape": shape, "data": base64.b64encode(arr.tobytes()).decode()}
    return json.dumps(data).encode()


@contextmanager
def faulty_proxy(upstream: str, fault_paths: tuple[str, ...] = ("/v1/score",)) -> Iterator[FaultyProxy]:
    """Start the proxy on 127.0.0.1:free port in a background thread; yield it; stop it on exit."""
    proxy = FaultyProxy(upstream, fault_paths)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        proxy.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await stop[0].wait()
        server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:  # connection handlers still waiting on idle keep-alive sockets
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True, name="faulty-proxy")
    thread.start()
    if not ready.wait(10):
        raise TimeoutError("fault proxy did not start")
    try:
        yield proxy
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()
