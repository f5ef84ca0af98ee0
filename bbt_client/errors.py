"""One error tree, so callers catch at the level they mean (``except BBTError`` for all of ours)."""

from __future__ import annotations


class BBTError(Exception):
    """Root of every error bbt-client raises on purpose."""


class ConfigError(BBTError, ValueError):
    """A configuration or input file is invalid; the message says which field and what is allowed."""


class UnsupportedError(BBTError):
    """The endpoint kind cannot do what was asked (e.g. deep prompts on a text-only API)."""


class EndpointError(BBTError):
    """The endpoint failed or refused a request after retries. ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class AuthenticationError(EndpointError):
    """401/403: the API key is missing or wrong. Set it with --api-key-env / BBT_API_KEY."""


class RateLimitError(EndpointError):
    """429 that persisted through every retry."""


class RequestRejected(EndpointError):
    """A 4xx other than auth/rate limit: the request itself is wrong; retrying will not help."""


class ProtocolError(BBTError):
    """The endpoint answered, but not with what the protocol promises (bad JSON, wrong shape, NaN)."""


class BudgetExhausted(BBTError):
    """A hard cap would be exceeded by the next step. ``cap`` names it: calls, tokens, cost or time."""

    def __init__(self, cap: str, message: str):
        super().__init__(message)
        self.cap = cap


class CheckpointError(BBTError):
    """A checkpoint or output directory cannot be written or read back."""
