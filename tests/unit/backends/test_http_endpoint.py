"""HttpEndpoint: retries, Retry-After, error mapping, key hygiene. All traffic is mocked with respx."""

from __future__ import annotations

import email.utils
import logging
import time

import httpx
import pytest
import respx
from pydantic import BaseModel

from bbt_client.backends.http import HttpEndpoint, RetryPolicy, parse_retry_after
from bbt_client.errors import (
    AuthenticationError,
    ConfigError,
    EndpointError,
    ProtocolError,
    RateLimitError,
    RequestRejected,
)

URL = "http://bbt.test"
KEY = "sk-secret-key-1234567890"
FAST = RetryPolicy(max_retries=3, backoff_initial_s=0.001, backoff_max_s=0.002, jitter_s=0.0, retry_after_cap_s=0.05)


class Pong(BaseModel):
    value: int


def endpoint(**kw) -> HttpEndpoint:
    kw.setdefault("retry", FAST)
    return HttpEndpoint(URL, **kw)


@respx.mock
async def test_auth_header_from_env_and_model_parsing(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    route = respx.post(f"{URL}/v1/ping").mock(return_value=httpx.Response(200, json={"value": 3}))
    ep = endpoint(api_key_env="MY_KEY")
    out = await ep.request("POST", "/v1/ping", json_body={"a": 1}, model=Pong)
    assert out == Pong(value=3)
    req = route.calls.last.request
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.content == b'{"a":1}' or req.content == b'{"a": 1}'
    assert KEY not in repr(ep)
    assert (ep.attempts, ep.requests) == (1, 1)
    await ep.aclose()


@respx.mock
async def test_no_key_no_header(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    route = respx.get(f"{URL}/x").mock(return_value=httpx.Response(200, json={"value": 1}))
    ep = endpoint(api_key_env="NOPE_KEY")
    await ep.request("GET", "/x")
    assert "Authorization" not in route.calls.last.request.headers


@respx.mock
async def test_retries_503_then_succeeds_counting_attempts():
    route = respx.get(f"{URL}/x").mock(side_effect=[
        httpx.Response(503, json={"error": {"code": "overloaded", "message": "busy"}}),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(200, json={"value": 7}),
    ])
    ep = endpoint()
    assert (await ep.request("GET", "/x", model=Pong)).value == 7
    assert route.call_count == 3
    assert ep.attempts == 3 and ep.requests == 1


@respx.mock
async def test_429_honours_retry_after_seconds(monkeypatch):
    waits = []
    ep = endpoint(retry=RetryPolicy(max_retries=2, backoff_initial_s=0.001, jitter_s=0, retry_after_cap_s=0.03))
    orig = ep._wait
    monkeypatch.setattr(ep, "_wait", lambda s: waits.append(orig(s)) or waits[-1])
    respx.get(f"{URL}/x").mock(side_effect=[
        httpx.Response(429, headers={"Retry-After": "0.02"}, json={"error": {"message": "slow down"}}),
        httpx.Response(429, headers={"Retry-After": "3600"}, json={"error": {"message": "slow down"}}),
        httpx.Response(200, json={"value": 1}),
    ])
    await ep.request("GET", "/x")
    assert waits == [pytest.approx(0.02), pytest.approx(0.03)]  # second one capped


@respx.mock
async def test_persistent_429_is_rate_limit_error():
    route = respx.get(f"{URL}/x").mock(return_value=httpx.Response(429, json={"error": {"message": "quota"}}))
    with pytest.raises(RateLimitError, match="429") as ei:
        await endpoint().request("GET", "/x")
    assert ei.value.status == 429
    assert route.call_count == FAST.max_retries + 1


@respx.mock
async def test_401_is_authentication_error_without_retry_and_key_not_leaked(caplog):
    caplog.set_level(logging.DEBUG)
    route = respx.get(f"{URL}/x").mock(
        return_value=httpx.Response(401, json={"error": {"code": "unauthorized", "message": f"bad key {KEY}"}}))
    ep = endpoint(api_key=KEY)
    with pytest.raises(AuthenticationError) as ei:
        await ep.request("GET", "/x")
    assert route.call_count == 1
    assert ei.value.status == 401
    assert KEY not in str(ei.value) and KEY not in repr(ei.value)
    assert KEY not in caplog.text


@respx.mock
async def test_400_is_rejected_with_server_message():
    respx.post(f"{URL}/x").mock(return_value=httpx.Response(
        400, json={"error": {"code": "bad_request", "message": "template must contain {mask}"}}))
    with pytest.raises(RequestRejected, match="template must contain") as ei:
        await endpoint().request("POST", "/x", json_body={})
    assert ei.value.code == "bad_request" and ei.value.status == 400


@respx.mock
async def test_409_not_retried_carries_code():
    route = respx.post(f"{URL}/x").mock(return_value=httpx.Response(
        409, json={"error": {"code": "unknown_tensor", "message": "send the tensor"}}))
    with pytest.raises(RequestRejected) as ei:
        await endpoint().request("POST", "/x", json_body={})
    assert ei.value.code == "unknown_tensor" and route.call_count == 1


@respx.mock
async def test_connection_errors_exhaust_to_unreachable():
    route = respx.get(f"{URL}/x").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(EndpointError, match="unreachable") as ei:
        await endpoint().request("GET", "/x")
    assert route.call_count == FAST.max_retries + 1
    assert type(ei.value) is EndpointError


@respx.mock
async def test_timeout_then_success():
    respx.get(f"{URL}/x").mock(side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json={"value": 2})])
    assert (await endpoint().request("GET", "/x", model=Pong)).value == 2


@respx.mock
async def test_truncated_body_is_retried():
    respx.get(f"{URL}/x").mock(side_effect=[httpx.RemoteProtocolError("peer closed connection without sending "
                                                                        "complete message body"),
                                            httpx.Response(200, json={"value": 5})])
    assert (await endpoint().request("GET", "/x", model=Pong)).value == 5


@respx.mock
async def test_malformed_json_is_protocol_error_without_retry():
    route = respx.get(f"{URL}/x").mock(return_value=httpx.Response(200, text="{not json"))
    with pytest.raises(ProtocolError, match="not JSON"):
        await endpoint().request("GET", "/x")
    assert route.call_count == 1


@respx.mock
async def test_wrong_model_is_protocol_error():
    respx.get(f"{URL}/x").mock(return_value=httpx.Response(200, json={"value": "many"}))
    with pytest.raises(ProtocolError, match="Pong"):
        await endpoint().request("GET", "/x", model=Pong)


def test_parse_retry_after_forms():
    now = time.time()
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1.5)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


def test_bad_config_refused():
    with pytest.raises(ConfigError):
        HttpEndpoint("ftp://x")
    with pytest.raises(ConfigError):
        HttpEndpoint(URL, max_concurrency=0)


@respx.mock
async def test_concurrency_limit_is_respected():
    import asyncio

    active = 0
    peak = 0

    two_inside = asyncio.Event()

    async def slow(request):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 2:
            two_inside.set()
        await two_inside.wait()  # nobody leaves until two are inside at once: the limit is reached, not raced
        await asyncio.sleep(0)
        active -= 1
        return httpx.Response(200, json={"value": 1})

    respx.get(f"{URL}/x").mock(side_effect=slow)
    ep = endpoint(max_concurrency=2)
    await asyncio.gather(*(ep.request("GET", "/x") for _ in range(6)))
    assert peak == 2


def test_usable_from_successive_event_loops():
    """The CLI runs asyncio.run() per command; one endpoint object must survive that."""
    import asyncio

    ep = endpoint(max_concurrency=1)
    with respx.mock:
        respx.get(f"{URL}/x").mock(return_value=httpx.Response(200, json={"value": 1}))

        async def twice():
            await asyncio.gather(ep.request("GET", "/x"), ep.request("GET", "/x"))  # contends the semaphore

        asyncio.run(twice())
        asyncio.run(twice())
    assert ep.attempts == 4
