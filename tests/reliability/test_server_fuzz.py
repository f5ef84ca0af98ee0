"""Hostile input to the server: every case is answered 4xx (or the connection is cut cleanly), never 5xx;
the server process never dies, keeps answering correct requests, and its memory stays bounded.

One server *process* per module (so a crash is visible as an exit and memory as its RSS), with short
header/body timeouts and a 1 MiB body limit so the slow and huge cases are quick.
"""

from __future__ import annotations

import base64
import json
import socket

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbt_client.protocol import Tensor
from tests.reliability.helpers import ServerProcess

BODY_LIMIT = 1 << 20
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ROUTES = ["/v1/health", "/v1/model", "/v1/tokenize", "/v1/score"]


@pytest.fixture(scope="module")
def fuzz_server(tiny_bert_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    sp = ServerProcess(tiny_bert_dir, log_path=log, options={
        "max_body_bytes": BODY_LIMIT, "header_timeout": 0.5, "body_timeout": 0.5, "idle_timeout": 2.0,
        "max_queue": 16, "max_candidates": 8, "max_texts": 16})
    sp.start()
    with httpx.Client(base_url=sp.url, timeout=10) as client:
        sp.client = client  # type: ignore[attr-defined]
        sp.statuses = []  # type: ignore[attr-defined]
        yield sp
    assert sp.alive(), f"the server died; see {log}"
    sp.stop()
    assert "Traceback" not in log.read_text(), f"the server logged an unexpected exception; see {log}"


def _valid_score(C: int = 2) -> dict:
    cands = np.random.default_rng(0).normal(0, 0.02, (C, 2, 32)).astype(np.float32)
    return {"template": "{text} It was {mask} .", "texts": ["a fine film", "a dull film"],
            "label_words": ["bad", "great"],
            "prompt": {"kind": "shallow", "candidates": Tensor.from_array(cands).model_dump()}}


def _post(sp, path: str, content: bytes, ctype: str = "application/json") -> int:
    r = sp.client.post(path, content=content, headers={"Content-Type": ctype})
    sp.statuses.append(r.status_code)
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()  # errors are JSON with a code and a message, never a stack trace
        assert set(body["error"]) >= {"code", "message"} and "Traceback" not in body["error"]["message"]
    return r.status_code


def _still_correct(sp) -> None:
    r = sp.client.post("/v1/score", json=_valid_score())
    assert r.status_code == 200 and len(base64.b64decode(r.json()["logits"]["data"])) == 2 * 2 * 2 * 4


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
    max_leaves=25)


@FUZZ
@given(path=st.sampled_from(["/v1/tokenize", "/v1/score"]), value=json_values)
def test_arbitrary_json_bodies(fuzz_server, path, value):
    _post(fuzz_server, path, json.dumps(value).encode())


@FUZZ
@given(field=st.sampled_from(["template", "texts", "label_words", "prompt", "text_pairs", "request_id", "extra"]),
       value=json_values)
def test_valid_score_request_with_one_field_replaced(fuzz_server, field, value):
    body = _valid_score()
    body[field] = value
    _post(fuzz_server, "/v1/score", json.dumps(body).encode())


@FUZZ
@given(dtype=st.sampled_from(["float32", "float16", "int8", "float64", ""]),
       shape=st.lists(st.integers(-1, 40), min_size=0, max_size=9),
       data=st.one_of(st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=80)),
       kind=st.sampled_from(["shallow", "deep"]))
def test_binary_tensor_fields(fuzz_server, dtype, shape, data, kind):
    body = _valid_score()
    body["prompt"] = {"kind": kind, "candidates": {"dtype": dtype, "shape": shape, "data": data}}
    _post(fuzz_server, "/v1/score", json.dumps(body).encode())


@FUZZ
@given(special=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]), where=st.integers(0, 7))
def test_non_finite_or_huge_prompt_values(fuzz_server, special, where):
    body = _valid_score()
    arr = np.zeros((2, 2, 32), dtype=np.float32)
    arr.flat[where] = special
    body["prompt"]["candidates"] = Tensor.from_array(arr).model_dump()
    status = _post(fuzz_server, "/v1/score", json.dumps(body).encode())
    if not np.isfinite(special):
        assert status == 422


@FUZZ
@given(raw=st.binary(min_size=1, max_size=400), path=st.sampled_from(ROUTES[2:]))
def test_invalid_utf8_and_random_bytes(fuzz_server, raw, path):
    status = _post(fuzz_server, path, raw)
    assert status >= 400 or raw.strip().startswith((b"{", b"["))


@FUZZ
@given(ctype=st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                              "application/octet-stream", "", "application/jsonx", "json"]))
def test_wrong_content_types_are_415(fuzz_server, ctype):
    assert _post(fuzz_server, "/v1/score", json.dumps(_valid_score()).encode(), ctype) == 415


@FUZZ
@given(head=st.binary(max_size=300))
def test_garbage_request_heads_get_4xx_or_a_closed_connection(fuzz_server, head):
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=5) as s:
        s.sendall(head + b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    if answer:
        status = int(answer.split(b" ", 2)[1])
        fuzz_server.statuses.append(status)
        assert status < 500, answer[:300]


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json(fuzz_server, depth):
    assert _post(fuzz_server, "/v1/score", b"[" * depth + b"]" * depth) in (400, 422)
    assert _post(fuzz_server, "/v1/tokenize", b'{"words":' * depth + b"1" + b"}" * depth) in (400, 422)
    _still_correct(fuzz_server)


def test_huge_bodies_are_413_without_being_read(fuzz_server):
    assert _post(fuzz_server, "/v1/score", b"x" * (BODY_LIMIT + 1)) == 413
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=5) as s:  # claims 10 GB, sends none
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000000\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 413")
    texts = ["word " * 200] * 2000  # ~2 MB of valid JSON
    assert _post(fuzz_server, "/v1/tokenize", json.dumps({"texts": texts}).encode()) == 413
    _still_correct(fuzz_server)


def test_slow_loris_connections_time_out_and_do_not_block_others(fuzz_server):
    # 50 connections that never finish their headers, all open before the correct request is sent.
    socks = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=30)
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            socks.append(s)
        _still_correct(fuzz_server)  # served while 50 connections dangle
        results = []
        for s in socks:  # the server's header timeout answers each one (or closes it)
            try:
                results.append(s.recv(4096))
            except OSError as exc:
                results.append(exc)
    finally:
        for s in socks:
            s.close()
    assert all(isinstance(r, bytes) and (r == b"" or r.startswith(b"HTTP/1.1 408")) for r in results), results
    # A body that stalls after its headers also gets 408 within the body timeout.
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=10) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 408")


def test_many_concurrent_connections_all_answered(fuzz_server):
    import asyncio

    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=fuzz_server.url, timeout=60, limits=limits) as c:
            health = [c.get("/v1/health") for _ in range(200)]
            scores = [c.post("/v1/score", json=_valid_score()) for _ in range(60)]
            return [r.status_code for r in await asyncio.gather(*health, *scores)]

    statuses = asyncio.run(flood())
    fuzz_server.statuses.extend(statuses)
    assert statuses[:200] == [200] * 200
    assert set(statuses[200:]) <= {200, 503} and statuses[200:].count(200) >= 16  # queue of 16: overflow is 503
    _still_correct(fuzz_server)


def test_memory_stays_bounded_after_the_abuse(fuzz_server):
    """Runs last in this module: RSS after all the cases above, then after 10 more rounds, must not keep growing."""
    before = fuzz_server.rss_bytes()
    for _ in range(10):
        _post(fuzz_server, "/v1/score", b"x" * (BODY_LIMIT - 10))
        _post(fuzz_server, "/v1/score", json.dumps(_valid_score(8)).encode())
        _post(fuzz_server, "/v1/score", b"[" * 50_000)
    _still_correct(fuzz_server)
    grown = fuzz_server.rss_bytes() - before
    assert grown < 64 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB over 30 requests"
    assert fuzz_server.rss_bytes() < 1.5 * 2**30
    # 503 only from the deliberate overload flood (queue full), never from bad input.
    assert len(fuzz_server.statuses) > 300 and all(s < 500 or s == 503 for s in fuzz_server.statuses)
