"""Minimal HTTP/1.1 server on asyncio streams: keep-alive, Content-Length bodies, limits, JSON errors, auth.

Why not ``http.server`` or a framework: one event loop, no thread per connection, explicit limits
(header size and time, body size and time) so a slow or hostile client cannot pin the server, and
no dependency beyond the standard library.

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

from pydantic import BaseModel, ValidationError

from bbt_client.protocol import ErrorDetail, ErrorResponse
from server_stub.errors import BadRequest, ServerError, TooLarge, Unauthorized

log = logging.getLogger(__name__)

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


@dataclass
class _Conn:
    task: asyncio.Task
    busy: bool = False


@dataclass
class HttpServer:
    """Routes are ``{path: {method: handler}}``. ``public_paths`` need no API key."""

    routes: dict[str, dict[str, Handler]]
    api_key: str | None = None
    public_paths: frozenset[str] = frozenset()
    limits: HttpLimits = field(default_factory=HttpLimits)
    _server: asyncio.AbstractServer | None = None
    _conns: dict[int, _Conn] = field(default_factory=dict)
    _closing: bool = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the bound port (pass 0 for a free one)."""
        self._server = await asyncio.start_server(
            self._on_connect, host, port, limit=self.limits.max_header_bytes
        )
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
        try:
            while not self._closing:
                keep = await self._one_request(reader, writer, conn)
                if not keep:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.pop(id(task), None)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn) -> bool:
        """Serve one request; returns whether the connection may be reused."""
        lim = self.limits
        try:
            first = await asyncio.wait_for(reader.readexactly(1), lim.idle_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False  # idle keep-alive connection or client hung up: close quietly
        conn.busy = True
        try:
            return await self._serve(first, reader, writer)
        finally:
            conn.busy = False

    async def _serve(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        lim = self.limits
        started = time.perf_counter()
        try:
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), lim.header_timeout)
        except asyncio.TimeoutError:
            await self._send_error(writer, ServerError("request headers not received in time", status=408,
                                                       code="timeout"), keep=False)
            return False
        except (asyncio.LimitOverrunError, ValueError):
            await self._send_error(writer, ServerError(
                f"request headers exceed {lim.max_header_bytes} bytes", status=431, code="too_large"), keep=False)
            return False
        except asyncio.IncompleteReadError:
            return False
        try:
            req, keep_alive = _parse_head(head)
        except BadRequest as exc:
            await self._send_error(writer, exc, keep=False)
            return False
        status = 500
        body_pending = _has_body(req.headers)
        try:
            handler = self._route(req)
            self._authorize(req)
            if req.method in ("POST", "PUT", "PATCH") or body_pending:
                req.body = await self._read_body(req, reader, writer)
                body_pending = False
                ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    raise ServerError(f"content type must be application/json, got {ctype or 'none'!r}",
                                      status=415, code="unsupported_media_type")
            status, payload = await handler(req)
            keep = keep_alive and not self._closing
            await self._send(writer, status, payload.model_dump_json().encode(), keep)
        except ServerError as exc:
            status = exc.status
            keep = keep_alive and not body_pending and not self._closing and status not in (408, 411, 413)
            await self._send_error(writer, exc, keep=keep)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            return False
        except Exception:
            log.exception("unexpected error serving %s %s", req.method, req.path)
            status = 500
            keep = keep_alive and not body_pending and not self._closing
            await self._send_error(writer, ServerError("internal server error; see the server log"), keep=keep)
        log.info("%s %s %d %.1f ms", req.method, req.path, status, (time.perf_counter() - started) * 1e3)
        return keep

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

    async def _read_body(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        if "transfer-encoding" in req.headers:
            raise ServerError("chunked/transfer-encoded bodies are not supported; send Content-Length",
                              status=411, code="length_required")
        raw = req.headers.get("content-length")
        if raw is None:
            raise ServerError("a request body needs a Content-Length header", status=411, code="length_required")
        if not raw.isdigit():
            raise ServerError(f"bad Content-Length {raw!r}", status=400, code="bad_request")
        size = int(raw)
        if size > self.limits.max_body_bytes:
            raise TooLarge(f"request body is {size} bytes; this server accepts at most {self.limits.max_body_bytes}"
                           " (start it with a larger --max-body-bytes, or send fewer candidates per request)")
        if req.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            return await asyncio.wait_for(reader.readexactly(size), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise ServerError("request body not received in time", status=408, code="timeout") from None

    # ------------------------------------------------------------------ responses

    async def _send_error(self, writer: asyncio.StreamWriter, exc: ServerError, *, keep: bool) -> None:
        body = ErrorResponse(error=ErrorDetail(code=exc.code, message=str(exc))).model_dump_json().encode()
        extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        try:
            await self._send(writer, exc.status, body, keep, extra)
        except ConnectionError:
            pass

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, keep: bool,
                    extra: dict[str, str] | None = None) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"Connection: {'keep-alive' if keep else 'close'}",
        ]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


def _parse_head(head: bytes) -> tuple[Request, bool]:
    try:
        text = head.decode("latin-1")
        lines = text[:-4].split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest("malformed HTTP request line") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest(f"unsupported HTTP version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed HTTP header line")
        headers[name.lower()] = value.strip()
    conn = headers.get("connection", "").lower()
    keep = (version == "HTTP/1.1" and conn != "close") or (version == "HTTP/1.0" and conn == "keep-alive")
    path = target.split("?", 1)[0]
    return Request(method=method.upper(), path=path, headers=headers), keep


def _has_body(headers: dict[str, str]) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")


def _summarize(errors: list[dict], limit: int = 3) -> str:
    """'field.path: message; ...' for the first few validation errors, never echoing the input."""
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "invalid request: " + "; ".join(parts) + more

