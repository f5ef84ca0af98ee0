"""Minimal HTTP/1.1 server on asyncio streams: keep-alive, Content-Length bodies, limits, JSON errors, auth.

Why not ``http.server`` or a framework: one event loop, no thread per connection, explicit limits
(header size and time, body size and time) so a slow or hostile client cannot pin the server. The framing
(request heads, bodies, keep-alive, HTTP/1.0 and ``Connection: close``) is ``h11``'s, a sans-I/O HTTP/1.1
library (a dependency of httpx), rather than hand parsing: third-party clients and proxies talk to this
server too (docs/openai_face.md). Chunked request bodies stay refused (411): every client we serve sends
Content-Length, and it lets the size limit be checked before a byte of the body is read.

Handlers are ``async (Request) -> (status, pydantic model)``; they raise :class:`ServerError`
subclasses for client mistakes. Anything else becomes a logged 500 and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import h11
from pydantic import BaseModel, ValidationError

from bbt_client.protocol import ErrorDetail, ErrorResponse
from server_stub.errors import BadRequest, ServerError, TooLarge, Unauthorized

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
_READ_SIZE = 65536

_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
}

M = TypeVar("M", bound=BaseModel)


@dataclass
class HttpLimits:
    """Bytes and seconds. ``idle_timeout`` closes silent keep-alive connections without a response."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 75.0


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def json(self, model: type[M]) -> M:
        """Parse the body as ``model``: bad UTF-8 / JSON -> 400, schema violations -> 422 with a short message."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
        try:
            return model.model_validate_json(text)
        except ValidationError as exc:
            errors = exc.errors(include_input=False, include_url=False)
            if any(e["type"] == "json_invalid" for e in errors):
                raise BadRequest(f"request body is not valid JSON: {errors[0]['msg']}") from None
            raise ServerError(_summarize(errors), status=422, code="bad_request") from None


Handler = Callable[[Request], Awaitable[tuple[int, BaseModel]]]
#: ``(path, error) -> (status, JSON body)`` for routes whose clients expect another error shape, or None.
ErrorFormat = Callable[[str, ServerError], "tuple[int, bytes] | None"]


@dataclass
class _Conn:
    task: asyncio.Task
    busy: bool = False


@dataclass
class HttpServer:
    """Routes are ``{path: {method: handler}}``. ``public_paths`` need no API key. ``error_format`` may render
    errors on some paths in another shape (the OpenAI face's); protocol v1's :class:`ErrorResponse` otherwise."""

    routes: dict[str, dict[str, Handler]]
    api_key: str | None = None
    public_paths: frozenset[str] = frozenset()
    limits: HttpLimits = field(default_factory=HttpLimits)
    error_format: ErrorFormat | None = None
    _server: asyncio.AbstractServer | None = None
    _conns: dict[int, _Conn] = field(default_factory=dict)
    _closing: bool = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the bound port (pass 0 for a free one)."""
        self._server = await asyncio.start_server(self._on_connect, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace`` s), close idle connections."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            if not conn.busy:
                conn.task.cancel()
        pending = [c.task for c in self._conns.values()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for t in still:
                t.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------------ connection loop

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(task)
        self._conns[id(task)] = conn
        # h11 bounds the bytes it buffers while a request head is incomplete; complete heads are measured below.
        wire = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            while not self._closing:
                if not await self._one_request(wire, reader, writer, conn):
                    break
                wire.start_next_cycle()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.pop(id(task), None)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _one_request(self, wire: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           conn: _Conn) -> bool:
        """Serve one request; returns whether the connection may be reused."""
        try:
            event = wire.next_event()  # a pipelined request may already be buffered
        except h11.RemoteProtocolError as exc:
            await self._send_error(wire, writer, _framing_error(exc, self.limits.max_header_bytes), keep=False)
            return False
        if event is h11.NEED_DATA:
            try:
                first = await asyncio.wait_for(reader.read(_READ_SIZE), self.limits.idle_timeout)
            except asyncio.TimeoutError:
                return False  # idle keep-alive connection: close quietly
            if not first:
                return False  # the client hung up between requests
            event = None
        conn.busy = True
        try:
            return await self._serve(wire, reader, writer, event, first if event is None else b"")
        finally:
            conn.busy = False

    async def _read_head(self, reader: asyncio.StreamReader, first: bytes) -> bytes | None:
        """Bytes up to and past the end of the request head (within the header size and time limits), or None
        when the client hung up first. h11 parses them; this only bounds what a slow or huge head may cost."""
        lim = self.limits
        buf = bytearray(first)
        deadline = asyncio.get_running_loop().time() + lim.header_timeout
        while True:
            end = buf.find(b"\r\n\r\n")
            if end > lim.max_header_bytes or (end < 0 and len(buf) > lim.max_header_bytes + 3):
                raise ServerError(f"request headers exceed {lim.max_header_bytes} bytes", status=431, code="too_large")
            if end >= 0:
                return bytes(buf)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ServerError("request headers not received in time", status=408, code="timeout")
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), remaining)
            except asyncio.TimeoutError:
                raise ServerError("request headers not received in time", status=408, code="timeout") from None
            if not data:
                return None
            buf += data

    async def _serve(self, wire: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     event: object, first: bytes) -> bool:
        started = time.perf_counter()
        if event is None:  # a new head: read it (bounded), then let h11 parse it
            try:
                head = await self._read_head(reader, first)
            except ServerError as exc:
                await self._send_error(wire, writer, exc, keep=False)
                return False
            if head is None:
                return False
            wire.receive_data(_with_host(head))
            try:
                event = wire.next_event()
            except h11.RemoteProtocolError as exc:
                await self._send_error(wire, writer, _framing_error(exc, self.limits.max_header_bytes), keep=False)
                return False
        if not isinstance(event, h11.Request):
            return False  # the client closed the connection
        req = _request(event)
        status = 500
        try:
            handler = self._route(req)
            self._authorize(req)
            req.body = await self._read_body(wire, req, reader, writer)
            if req.method in ("POST", "PUT", "PATCH") or req.body:
                ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    raise ServerError(f"content type must be application/json, got {ctype or 'none'!r}",
                                      status=415, code="unsupported_media_type")
            status, payload = await self._unless_client_leaves(handler(req), wire, reader)
            await self._send(wire, writer, status, payload.model_dump_json().encode(), not self._closing)
        except ServerError as exc:
            keep = not self._closing and exc.status not in (408, 411, 413)
            status = await self._send_error(wire, writer, exc, keep=keep, path=req.path)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, h11.RemoteProtocolError):
            return False  # the client vanished or broke framing mid-body: nobody to answer
        except Exception:
            log.exception("unexpected error serving %s %s", req.method, req.path)
            status = await self._send_error(wire, writer, ServerError("internal server error; see the server log"),
                                            keep=not self._closing, path=req.path)
        log.info("%s %s %d %.1f ms", req.method, req.path, status, (time.perf_counter() - started) * 1e3)
        return wire.our_state is h11.DONE and wire.their_state is h11.DONE

    async def _unless_client_leaves(self, work, wire: h11.Connection, reader: asyncio.StreamReader):
        """Await a handler, cancelling it if the client closes the connection meanwhile: a queued model job whose
        caller gave up (a client timeout, a killed job) is then dropped instead of computed for nobody. Bytes a
        pipelining client sends meanwhile go to h11 for the next request."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                watch = asyncio.ensure_future(reader.read(_READ_SIZE))
                await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not watch.done():
                    watch.cancel()
                    await asyncio.wait({watch})  # its read lets go of the stream before the next request reads it
                    return task.result()
                data = watch.result()
                if not data:  # end of stream: nobody is left to answer
                    raise ConnectionError("the client closed the connection while its request was being served")
                wire.receive_data(data)
                if task.done():
                    return task.result()
        finally:
            task.cancel()

    async def _next_event(self, wire: h11.Connection, reader: asyncio.StreamReader, timeout: float):
        """The next h11 event, reading from the socket as needed for at most ``timeout`` seconds in all."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            event = wire.next_event()
            if event is not h11.NEED_DATA:
                return event
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            wire.receive_data(await asyncio.wait_for(reader.read(_READ_SIZE), remaining))

    def _route(self, req: Request) -> Handler:
        methods = self.routes.get(req.path)
        if methods is None:
            raise ServerError(f"no route {req.path}; routes: {', '.join(sorted(self.routes))}", status=404,
                              code="not_found")
        handler = methods.get(req.method)
        if handler is None:
            raise ServerError(f"{req.method} not allowed on {req.path}; use {', '.join(sorted(methods))}",
                              status=405, code="method_not_allowed")
        return handler

    def _authorize(self, req: Request) -> None:
        if self.api_key is None or req.path in self.public_paths:
            return
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def _read_body(self, wire: h11.Connection, req: Request, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bytes:
        """The whole body (b"" for none), after the framing and size checks; nothing is read before them."""
        if "transfer-encoding" in req.headers:
            raise ServerError("chunked/transfer-encoded bodies are not supported; send Content-Length",
                              status=411, code="length_required")
        raw = req.headers.get("content-length")
        if raw is None and req.method in ("POST", "PUT", "PATCH"):
            raise ServerError("a request body needs a Content-Length header", status=411, code="length_required")
        size = int(raw or 0)  # h11 has checked it is a number
        if size > self.limits.max_body_bytes:
            raise TooLarge(f"request body is {size} bytes; this server accepts at most {self.limits.max_body_bytes}"
                           " (start it with a larger --max-body-bytes, or send fewer candidates per request)")
        if wire.they_are_waiting_for_100_continue:
            writer.write(wire.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks: list[bytes] = []
        while True:
            try:
                event = await self._next_event(wire, reader, self.limits.body_timeout)
            except asyncio.TimeoutError:
                raise ServerError("request body not received in time", status=408, code="timeout") from None
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise ConnectionError("the client closed the connection mid-body")

    # ------------------------------------------------------------------ responses

    async def _send_error(self, wire: h11.Connection, writer: asyncio.StreamWriter, exc: ServerError, *,
                          keep: bool, path: str = "") -> int:
        """Send ``exc`` as JSON; returns the status sent."""
        custom = self.error_format(path, exc) if self.error_format is not None and path else None
        if custom is not None:
            status, body = custom
        else:
            status = exc.status
            body = ErrorResponse(error=ErrorDetail(code=exc.code, message=str(exc))).model_dump_json().encode()
        extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        try:
            await self._send(wire, writer, status, body, keep, extra)
        except (ConnectionError, h11.LocalProtocolError):
            pass  # the client is gone, or h11 cannot answer in this state: the connection closes
        return status

    async def _send(self, wire: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes, keep: bool,
                    extra: dict[str, str] | None = None) -> None:
        """One JSON response. ``keep=False`` says ``Connection: close``; h11 also closes when the client asked to,
        spoke HTTP/1.0, or left a request body unread."""
        if keep and wire.their_state is not h11.DONE:
            keep = False  # the request body was not read (refused before it): the framing is lost
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("Connection", "keep-alive" if keep else "close"), *(extra or {}).items()]
        writer.write(wire.send(h11.Response(status_code=status, headers=headers,
                                            reason=_REASONS.get(status, "Unknown").encode())))
        writer.write(wire.send(h11.Data(data=body)))
        writer.write(wire.send(h11.EndOfMessage()))
        await writer.drain()


def _request(event: h11.Request) -> Request:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}  # names: lowercase
    path = event.target.decode("latin-1").split("?", 1)[0]
    return Request(method=event.method.decode("latin-1").upper(), path=path, headers=headers)


def _with_host(head: bytes) -> bytes:
    """Supply ``Host`` to an HTTP/1.1 head that lacks it. RFC 9112 makes it mandatory and h11 refuses its absence,
    but this server has one host and always accepted such requests (raw-socket tests, minimal clients)."""
    end = head.find(b"\r\n\r\n")
    lines = head[:end].split(b"\r\n")
    if not lines[0].rstrip().endswith(b"HTTP/1.1") or any(ln.lower().startswith(b"host:") for ln in lines[1:]):
        return head
    return lines[0] + b"\r\nHost: localhost" + head[len(lines[0]):]


def _framing_error(exc: h11.RemoteProtocolError, max_header_bytes: int) -> ServerError:
    """h11's verdict on a request head it could not parse, as one of our 4xx errors."""
    hint = exc.error_status_hint
    if hint == 431:
        return ServerError(f"request headers exceed {max_header_bytes} bytes", status=431, code="too_large")
    if hint == 501:  # a transfer coding other than chunked
        return ServerError("transfer-encoded bodies are not supported; send Content-Length", status=411,
                           code="length_required")
    return BadRequest(f"malformed HTTP request: {str(exc)[:200]}")


def _summarize(errors: list[dict], limit: int = 3) -> str:
    """'field.path: message; ...' for the first few validation errors, never echoing the input."""
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "invalid request: " + "; ".join(parts) + more

