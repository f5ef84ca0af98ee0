"""Errors the server turns into JSON responses: each carries its HTTP status and protocol error code.

Raised by the engine and the route handlers alike, so neither has to know about HTTP responses;
:mod:`server_stub.http.framing` maps them.
"""

from __future__ import annotations

from bbt_client.protocol import (
    ERROR_BAD_REQUEST,
    ERROR_OVERLOADED,
    ERROR_TOO_LARGE,
    ERROR_UNAUTHORIZED,
    ERROR_UNKNOWN_TENSOR,
)


class ServerError(Exception):
    """Base: ``status`` and ``code`` become the response; the message is shown to the client as is."""

    status = 500
    code = "internal_error"
    #: The request field at fault, where known (OpenAI's error ``param``).
    param: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param


class InvalidInput(ServerError):
    """422: the request parsed but cannot be served as asked (bad shape, NaN, multi-token label word)."""

    status = 422
    code = ERROR_BAD_REQUEST


class BadRequest(ServerError):
    """400: not parseable (bad UTF-8, malformed JSON, bad HTTP framing)."""

    status = 400
    code = ERROR_BAD_REQUEST


class UnknownTensor(ServerError):
    """409: a TensorRef named a tensor the server does not hold; resend it with ``tensor`` set."""

    status = 409
    code = ERROR_UNKNOWN_TENSOR


class TooLarge(ServerError):
    status = 413
    code = ERROR_TOO_LARGE


class Unauthorized(ServerError):
    status = 401
    code = ERROR_UNAUTHORIZED


class Overloaded(ServerError):
    """503: the model queue is full; clients should back off and retry."""

    status = 503
    code = ERROR_OVERLOADED
