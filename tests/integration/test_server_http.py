"""HTTP behaviour: every bad input class gets the right 4xx JSON, and the server keeps serving afterwards."""

from __future__ import annotations

import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import torch

from bbt_client.protocol import (
    ErrorResponse,
    Health,
    ModelInfo,
    ScoreRequest,
    ScoreResponse,
    ShallowPrompt,
    Tensor,
    TokenizeResponse,
)
from server_stub.engine.model import PromptedLM
from server_stub.testing import run_server

torch.set_num_threads(1)

TEMPLATE = "{text} It was {mask} ."
LIMITS = dict(max_body_bytes=300_000, max_header_bytes=4096, header_timeout=1.0, body_timeout=1.0,
              max_candidates=8, max_prompt_tokens=8, max_texts=16, threads=1)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def strict_server(tiny_bert_dir):
    with run_server(tiny_bert_dir, **LIMITS) as url:
        yield url


def good_request(C: int = 2, n: int = 4, D: int = 32) -> dict:
    arr = np.random.default_rng(0).normal(0, 0.5, (C, n, D)).astype(np.float32)
    return ScoreRequest(template=TEMPLATE, texts=["a fine film", "so dull"], label_words=["great", "bad"],
                        prompt=ShallowPrompt(candidates=Tensor.from_array(arr))).model_dump(mode="json")


def assert_serves(url: str) -> None:
    """A correct request right after a bad one is answered correctly."""
    r = httpx.post(url + "/v1/score", json=good_request(), timeout=60)
    assert r.status_code == 200, r.text
    assert ScoreResponse.model_validate_json(r.content).logits.to_array().shape == (2, 2, 2)


def assert_error(r: httpx.Response, status: int, code: str | None = None, says: str | None = None) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = ErrorResponse.model_validate_json(r.content).error
    if code is not None:
        assert err.code == code
    if says is not None:
        assert says in err.message, err.message
    return err.message


def raw_exchange(url: str, data: bytes, *, timeout: float = 10.0):
    """Send raw bytes; read until the server closes; return (status, parsed JSON body or None)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not b:
                break
            chunks.append(b)
    resp = b"".join(chunks)
    if not resp:
        return None, None
    head, _, body = resp.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, (json.loads(body) if body else None)


# ---------------------------------------------------------------------- routes


def test_health_model_and_tokenize(strict_server):
    assert Health.model_validate_json(httpx.get(strict_server + "/v1/health").content).status == "ok"
    info = ModelInfo.model_validate_json(httpx.get(strict_server + "/v1/model").content)
    assert (info.kind, info.hidden_size, info.num_layers, info.max_seq_len) == ("masked", 32, 3, 128)
    assert (info.max_candidates, info.max_prompt_tokens, info.max_body_bytes) == (8, 8, 300_000)
    assert len(info.hidden_std) == 3 and info.embedding_std > 0
    r = httpx.post(strict_server + "/v1/tokenize", json={"words": ["great", "unbelievably"], "texts": ["a b c", ""]})
    tok = TokenizeResponse.model_validate_json(r.content)
    assert tok.words[0].single_token and not tok.words[1].single_token
    assert tok.text_token_counts == [3, 0]


def test_keep_alive_reuses_one_connection(strict_server):
    with httpx.Client(base_url=strict_server) as c:
        for _ in range(3):
            assert c.get("/v1/health").status_code == 200
        assert c.post("/v1/score", json=good_request()).status_code == 200
        assert c.get("/v1/health").headers["connection"] == "keep-alive"


# ---------------------------------------------------------------------- bad input classes


@pytest.mark.parametrize(
    "body, headers, status, says",
    [
        (b'{"template": ', JSON, 400, "not valid JSON"),
        (b'{"template": "\xff\xfe"}', JSON, 400, "UTF-8"),
        (json.dumps(good_request()).encode(), {"content-type": "text/plain"}, 415, "application/json"),
        (b'{"texts": ["x"], "label_words": ["a", "b"], "template": "no slots"}', JSON, 422, "template must contain"),
        (b'{"texts": [], "label_words": ["a", "b"], "template": "{text} {mask}"}', JSON, 422, "texts"),
        (b'{"texts": ["x"], "label_words": ["a"], "template": "{text} {mask}", "zzz": 1}', JSON, 422, "zzz"),
    ],
    ids=["malformed-json", "bad-utf8", "wrong-content-type", "bad-template", "empty-texts", "extra-field"],
)
def test_unparseable_or_invalid_bodies(strict_server, body, headers, status, says):
    r = httpx.post(strict_server + "/v1/score", content=body, headers=headers)
    msg = assert_error(r, status, says=says)
    assert len(msg) < 500  # a readable summary, not a dump of the body
    assert_serves(strict_server)


def _with_prompt(arr: np.ndarray, *, deep: bool = False) -> dict:
    req = good_request()
    t = Tensor.from_array(arr).model_dump()
    req["prompt"] = {"kind": "deep", "candidates": t} if deep else {"kind": "shallow", "candidates": t}
    return req


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: _with_prompt(np.full((2, 4, 32), np.nan, np.float32)), "NaN"),
        (lambda: _with_prompt(np.full((2, 4, 32), np.inf, np.float32)), "NaN or infinite"),
        (lambda: _with_prompt(np.zeros((2, 4, 31), np.float32)), "D = 32"),
        (lambda: _with_prompt(np.zeros((2, 9, 32), np.float32)), "1..8 tokens"),
        (lambda: _with_prompt(np.zeros((9, 4, 32), np.float32)), "1..8 candidates"),
        (lambda: _with_prompt(np.zeros((2, 4, 4, 32), np.float32)), "(C, n, D)"),
        (lambda: _with_prompt(np.zeros((2, 2, 4, 32), np.float32), deep=True), "L = 3"),
        (lambda: {**good_request(), "label_words": ["great", "unbelievably"]}, "'unbelievably'"),
        (lambda: {**good_request(), "texts": ["x"] * 17}, "at most 16"),
    ],
    ids=["nan", "inf", "wrong-D", "too-many-tokens", "too-many-candidates", "wrong-rank", "wrong-L",
         "multi-token-word", "too-many-texts"],
)
def test_semantically_invalid_requests_are_422(strict_server, make, says):
    r = httpx.post(strict_server + "/v1/score", json=make(), timeout=60)
    assert_error(r, 422, code="bad_request", says=says)
    assert_serves(strict_server)


def test_tensor_data_not_matching_its_shape_is_422(strict_server):
    req = good_request()
    req["prompt"]["candidates"]["shape"] = [2, 4, 33]
    assert_error(httpx.post(strict_server + "/v1/score", json=req), 422, says="base64 chars")
    req = good_request()
    data = req["prompt"]["candidates"]["data"]
    req["prompt"]["candidates"]["data"] = "!" + data[1:]
    assert_error(httpx.post(strict_server + "/v1/score", json=req), 422, says="base64")
    assert_serves(strict_server)


def test_deep_base_digest_mismatch_is_422(strict_server):
    base = Tensor.from_array(np.zeros((3, 4, 32), np.float32)).model_dump()
    req = good_request()
    req["prompt"] = {"kind": "deep", "base": {"sha256": "0" * 64, "tensor": base}}
    assert_error(httpx.post(strict_server + "/v1/score", json=req), 422, says="digest")
    assert_serves(strict_server)


def test_causal_template_must_end_with_mask(tiny_gpt2_dir):
    with run_server(tiny_gpt2_dir, threads=1) as url:
        req = ScoreRequest(template="{text} It was {mask} .", texts=["x"], label_words=["great", "bad"])
        r = httpx.post(url + "/v1/score", content=req.model_dump_json(), headers=JSON)
        assert_error(r, 422, says="must end the template")


def test_unknown_route_and_wrong_method(strict_server):
    assert_error(httpx.get(strict_server + "/v2/score"), 404, code="not_found")
    assert_error(httpx.get(strict_server + "/v1/score"), 405, code="method_not_allowed", says="POST")
    assert_error(httpx.post(strict_server + "/v1/health", json={}), 405)
    assert_serves(strict_server)


def test_body_over_limit_is_413_without_reading_it(strict_server):
    big = _with_prompt(np.zeros((8, 8, 32 * 40), np.float32))  # ~1.4 MB of base64
    assert_error(httpx.post(strict_server + "/v1/score", json=big), 413, code="too_large", says="--max-body-bytes")
    assert_serves(strict_server)


def test_chunked_and_missing_length_are_411(strict_server):
    status, body = raw_exchange(strict_server, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in body["error"]["message"]
    status, body = raw_exchange(strict_server, b"POST /v1/score HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Type: application/json\r\nConnection: close\r\n\r\n")
    assert status == 411
    assert_serves(strict_server)


def test_malformed_request_line_and_oversized_headers(strict_server):
    status, _ = raw_exchange(strict_server, b"NONSENSE\r\n\r\n")
    assert status == 400
    status, body = raw_exchange(strict_server, b"GET /v1/health HTTP/1.1\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n")
    assert status == 431 and body["error"]["code"] == "too_large"
    assert_serves(strict_server)


def test_slow_headers_and_slow_body_time_out(strict_server):
    # The rest of the request never comes: the server's own timeout must end the wait with a 408.
    status, _ = raw_exchange(strict_server, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n", timeout=30)
    assert status == 408
    body = json.dumps(good_request()).encode()
    head = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    status, _ = raw_exchange(strict_server, head + body[:100], timeout=30)
    assert status == 408
    assert_serves(strict_server)


def test_idle_keep_alive_connection_closed_quietly(tiny_bert_dir):
    with run_server(tiny_bert_dir, threads=1, idle_timeout=0.5) as url:
        u = urlparse(url)
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            assert s.recv(1024) == b""  # the server closes it, without an unsolicited response


# ---------------------------------------------------------------------- auth


def test_api_key_required_except_health(tiny_bert_dir):
    with run_server(tiny_bert_dir, threads=1, api_key="s3cret-key") as url:
        assert httpx.get(url + "/v1/health").status_code == 200
        r = httpx.get(url + "/v1/model")
        assert_error(r, 401, code="unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert "s3cret" not in r.text
        assert_error(httpx.get(url + "/v1/model", headers={"Authorization": "Bearer s3cret-kez"}), 401)
        assert_error(httpx.get(url + "/v1/model", headers={"Authorization": "s3cret-key"}), 401)
        assert_error(httpx.post(url + "/v1/score", json=good_request()), 401)
        ok = {"Authorization": "Bearer s3cret-key"}
        assert httpx.get(url + "/v1/model", headers=ok).status_code == 200
        assert httpx.post(url + "/v1/score", json=good_request(), headers=ok, timeout=60).status_code == 200


# ---------------------------------------------------------------------- robustness


def test_concurrent_clients_all_answered_correctly(strict_server):
    reqs = [good_request(C=1 + i % 3) for i in range(12)]

    def one(req):
        r = httpx.post(strict_server + "/v1/score", json=req, timeout=120)
        assert r.status_code == 200, r.text
        return ScoreResponse.model_validate_json(r.content).logits.to_array()

    serial = [one(r) for r in reqs[:3]]
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, reqs))
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, serial[i % 3], rtol=1e-5, atol=1e-5)


def test_unexpected_exception_is_500_and_server_keeps_serving(tiny_bert_dir, monkeypatch):
    lm = PromptedLM(tiny_bert_dir, device="cpu")
    real = lm.run_score_jobs  # what /v1/score runs (possibly for several queued requests at once)
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom: simulated model failure")
        return real(*a, **kw)

    monkeypatch.setattr(lm, "run_score_jobs", flaky)
    with run_server(tiny_bert_dir, lm=lm, threads=1) as url:
        r = httpx.post(url + "/v1/score", json=good_request(), timeout=60)
        msg = assert_error(r, 500, code="internal_error")
        assert "boom" not in msg  # internals stay in the server log
        assert_serves(url)


# ---------------------------------------------------------------------- framing (h11)


def test_pipelined_requests_are_answered_in_order(strict_server):
    u = urlparse(strict_server)
    one = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(one * 2 + last)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)] == [200, 200, 404]


def test_http_1_0_is_answered_then_closed_and_bad_lengths_are_400(strict_server):
    u = urlparse(strict_server)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(b"GET /v1/health HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # the server closes after answering
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b'"ok"' in data
    status, _ = raw_exchange(strict_server, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 12x\r\n\r\n")
    assert status == 400
    assert_serves(strict_server)


def test_expect_100_continue_gets_an_interim_response(strict_server):
    u = urlparse(strict_server)
    body = json.dumps(good_request()).encode()
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 100")
        s.sendall(body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
