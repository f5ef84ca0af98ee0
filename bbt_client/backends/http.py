"""The one place for HTTP concerns shared by every backend: auth, timeouts, concurrency, retries, errors.

A backend builds an :class:`HttpEndpoint` and calls :meth:`HttpEndpoint.request`; it never touches httpx
itself. One ``request`` is one *logical* call however many HTTP attempts it takes: callers count budget
once per ``score()``, and :attr:`HttpEndpoint.attempts` counts attempts for reports.

Retry policy (why each choice):

- Retried: connection errors, timeouts, truncated bodies (httpx raises ``RemoteProtocolError`` /
  ``ReadError`` when a body ends before its declared length: the server died mid-answer), and statuses
  408, 429, 500, 502, 503, 504. Backoff is exponential with jitter, or the server's ``Retry-After``
  (seconds or HTTP-date) when it sends one, capped at :attr:`RetryPolicy.retry_after_cap_s`.
- Not retried: 401/403 (a wrong key stays wrong), other 4xx (the request itself is wrong), 409
  (in our protocol it means "resend with the tensor", which only the backend can do), and a complete
  body that is not valid JSON or does not match the expected model (a server bug; retrying would pay
  again for the same wrong answer) -> :class:`~bbt_client.errors.ProtocolError`.

The API key is read once (argument or environment variable), added to each request's headers and
never put in ``repr``, logs or exception messages.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from bbt_client.backends.base import Backend
from bbt_client.errors import (
    AuthenticationError,
    ConfigError,
    EndpointError,
    ProtocolError,
    RateLimitError,
    RequestRejected,
)

log = logging.getLogger("bbt_client.http")

M = TypeVar("M", bound=BaseModel)

#: Statuses worth another attempt: the server is busy, restarting or a proxy timed out.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. ``max_retries`` retries after the first attempt; waits are in seconds."""

    max_retries: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    jitter_s: float = 0.5
    retry_after_cap_s: float = 60.0
    retry_statuses: frozenset[int] = RETRY_STATUSES


class _Transient(Exception):
    """An attempt failed in a way another attempt may fix; carries what the final error needs."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.retry_after, self.code = message, status, retry_after, code


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait (>= 0), from delta-seconds or an HTTP-date; None if absent/garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def resolve_api_key(api_key: str | None, api_key_env: str | None) -> str | None:
    """The key passed in wins; else the named environment variable; else None (no auth header)."""
    if api_key:
        return api_key
    if api_key_env:
        return os.environ.get(api_key_env) or None
    return None


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    """The server's own error text and code if it sent JSON (ours or OpenAI's shape), else a short body excerpt."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = response.text.strip().replace("\n", " ")
        return (text[:300] or response.reason_phrase or "no body"), None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:300]
            code = err.get("code") if isinstance(err.get("code"), str) else err.get("type")
            return str(msg), code if isinstance(code, str) else None
        if isinstance(err, str):
            return err, None
        if "detail" in body:
            return str(body["detail"])[:300], None
    return json.dumps(body)[:300], None


class HttpEndpoint:
    """Owns an ``httpx.AsyncClient`` for one base URL, with auth, timeouts, a concurrency limit and retries.

    ``attempts`` counts every HTTP attempt made (retries included); ``requests`` counts logical calls.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_concurrency: int = 4,
        retry: RetryPolicy | None = None,
        auth_header: str = "Authorization",
        auth_scheme: str | None = "Bearer",
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1:
            raise ConfigError("max_concurrency must be at least 1")
        if timeout_s <= 0:
            raise ConfigError("timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.retry = retry or RetryPolicy()
        self._api_key = resolve_api_key(api_key, api_key_env)
        self._auth_header = auth_header
        self._auth_scheme = auth_scheme
        self._headers = dict(headers or {})
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.attempts = 0
        self.requests = 0

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return f"HttpEndpoint({self.base_url!r}, api_key={key}, max_concurrency={self.max_concurrency})"

    def _redact(self, text: str) -> str:
        """Belt and braces: a server that echoes our headers must not leak the key into our errors."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text

    def _get_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # asyncio.run() per CLI command means a new loop each time: pooled connections and the
            # semaphore belong to the old one and cannot be reused there.
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._client = None
        if self._client is None or self._client.is_closed:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                limits=limits,
                transport=self._transport,
                headers={"User-Agent": "bbt-client", **self._headers},
            )
        return self._client

    def _request_headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._api_key:
            headers[self._auth_header] = f"{self._auth_scheme} {self._api_key}" if self._auth_scheme else self._api_key
        return headers

    async def aclose(self) -> None:
        if self._client is not None:
            if self._loop is asyncio.get_running_loop():
                await self._client.aclose()
            self._client = None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry.retry_after_cap_s)
        backoff = wait_exponential_jitter(
            initial=self.retry.backoff_initial_s, max=self.retry.backoff_max_s, jitter=self.retry.jitter_s
        )
        return float(backoff(state))

    async def _attempt(self, method: str, path: str, *, json_body: Any, content: bytes | None,
                       headers: dict[str, str], timeout: float | None) -> httpx.Response:
        client = self._get_client()
        async with self._semaphore:  # held per attempt, not across backoff sleeps
            self.attempts += 1
            try:
                response = await client.request(
                    method, path, json=json_body, content=content, headers=headers,
                    timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
                )
            except httpx.TimeoutException as exc:
                raise _Transient(f"timed out after {timeout or self.timeout_s:g} s ({type(exc).__name__})") from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise _Transient(self._redact(f"{type(exc).__name__}: {exc}")) from None
        status = response.status_code
        if status < 400:
            return response
        message, code = _error_message(response)
        message = self._redact(message)
        if status in self.retry.retry_statuses:
            log.info("%s %s -> %d, will retry: %s", method, path, status, message)
            raise _Transient(message, status=status, code=code,
                             retry_after=parse_retry_after(response.headers.get("Retry-After")))
        url = f"{self.base_url}{path}"
        if status in (401, 403):
            hint = ("set the API key in the environment variable named by --api-key-env (default BBT_API_KEY)"
                    if not self._api_key else "check that the API key is valid for this endpoint")
            raise AuthenticationError(f"{url} refused the request ({status}: {message}); {hint}",
                                      status=status, code=code)
        raise RequestRejected(f"{url} rejected the request ({status}{' ' + code if code else ''}: {message})",
                              status=status, code=code)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        model: type[M] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> M | Any:
        """Send one logical request with retries; returns ``model`` parsed from the JSON body (or the raw JSON).
        ``retries`` overrides the policy's count (a probe that expects a server error asks once).

        Raises AuthenticationError, RateLimitError, RequestRejected, EndpointError (unreachable after retries)
        or ProtocolError (answer is not the promised JSON/model).
        """
        self.requests += 1
        hdrs = self._request_headers(headers)
        retrying = AsyncRetrying(
            stop=stop_after_attempt((self.retry.max_retries if retries is None else retries) + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )
        url = f"{self.base_url}{path}"
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self._attempt(method, path, json_body=json_body, content=content,
                                                   headers=hdrs, timeout=timeout)
        except _Transient as exc:
            tries = (self.retry.max_retries if retries is None else retries) + 1
            if exc.status == 429:
                raise RateLimitError(
                    f"{url} kept answering 429 (rate limited) through {tries} attempts: {exc.message}; "
                    "lower --max-concurrency or wait and resume the run",
                    status=429, code=exc.code) from None
            if exc.status is not None:
                raise EndpointError(
                    f"{url} kept failing with HTTP {exc.status} through {tries} attempts: {exc.message}; "
                    "check the server's logs and health, then resume the run",
                    status=exc.status, code=exc.code) from None
            raise EndpointError(
                f"{url} is unreachable after {tries} attempts ({exc.message}); check that the server is "
                "running, the URL and port are right, and the network/proxy allows it; then resume the run"
            ) from None
        return self._parse(response, model, url)

    def _parse(self, response: httpx.Response, model: type[M] | None, url: str) -> M | Any:
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"{url} answered {response.status_code} with a body that is not JSON ({exc})") from None
        if model is None:
            return data
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
            raise ProtocolError(
                f"{url} answered JSON that is not a valid {model.__name__} ({first}); "
                "is this endpoint running the expected protocol version?") from None


class HttpBackend(Backend):
    """A :class:`Backend` that reaches its endpoint through one :class:`HttpEndpoint` (``self.http``):
    shares building it from the usual constructor arguments, the traffic counter, closing and ``repr``
    (which shows the endpoint without its key, plus :meth:`_repr_fields`)."""

    http: HttpEndpoint

    def _connect(
        self,
        base_url: str,
        *,
        http: HttpEndpoint | None,
        api_key: str | None,
        api_key_env: str | None,
        timeout: float,
        max_concurrency: int,
        max_retries: int,
        retry: RetryPolicy | None,
    ) -> None:
        """Use ``http`` if given (tests inject one), else build an endpoint for ``base_url``."""
        self.http = http or HttpEndpoint(
            base_url, api_key=api_key, api_key_env=api_key_env, timeout_s=timeout,
            max_concurrency=max_concurrency, retry=retry or RetryPolicy(max_retries=max_retries),
        )

    def _repr_fields(self) -> str:
        """Extra ``name=value`` text for ``repr`` after the endpoint; empty by default."""
        return ""

    def __repr__(self) -> str:
        extra = self._repr_fields()
        return f"{type(self).__name__}({self.http!r}{', ' + extra if extra else ''})"

    @property
    def attempts(self) -> int:
        """HTTP attempts made, retries included (budgets count logical calls, not these)."""
        return self.http.attempts

    async def aclose(self) -> None:
        await self.http.aclose()
