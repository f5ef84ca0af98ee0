"""ServerBackend against a respx-mocked server: bodies field by field, splitting, TensorRef caching, validation."""

from __future__ import annotations

import json
import logging

import httpx
import numpy as np
import pytest
import respx

from bbt_client.backends import make_backend
from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.backends.http import RetryPolicy
from bbt_client.backends.server import ServerBackend, template_token_bound
from bbt_client.errors import AuthenticationError, ConfigError, ProtocolError, RequestRejected
from bbt_client.protocol import ModelInfo, Tensor, tensor_digest

URL = "http://srv.test"
KEY = "bbt-key-abcdef0123456789"
FAST = RetryPolicy(max_retries=2, backoff_initial_s=0.001, backoff_max_s=0.002, jitter_s=0.0)
TEMPLATE = "{text} It was {mask} ."
WORDS = ["bad", "great"]


def info(**over) -> dict:
    d = dict(name="tiny", kind="masked", architecture="BertModel", hidden_size=8, num_layers=2, max_seq_len=128,
             vocab_size=100, embedding_std=0.05, hidden_std=[0.05, 0.5], max_prompt_tokens=50, max_candidates=64,
             max_texts=256, max_body_bytes=10_000_000, device="cpu")
    d.update(over)
    return ModelInfo(**d).model_dump(mode="json")


def fake_logits(body: dict) -> np.ndarray:
    """Deterministic logits that encode which candidate/text they came from, so stitching is checkable."""
    p = body["prompt"]
    if p["kind"] == "none":
        c_vals = np.zeros(1)
    elif p.get("candidates") is not None:
        arr = Tensor(**p["candidates"]).to_array()
        c_vals = arr.reshape(arr.shape[0], -1)[:, 0]
    else:
        c_vals = np.array([Tensor(**p["base"]["tensor"]).to_array().ravel()[0]]) if p["base"].get("tensor") else np.zeros(1)
    t_vals = np.array([float(t.split()[-1]) for t in body["texts"]])
    K = len(body["label_words"])
    return (c_vals[:, None, None] * 1000 + t_vals[None, :, None] + np.arange(K)[None, None, :] * 0.1).astype(np.float32)


def score_handler(seen: list, *, known: set | None = None, tokens_per_seq: int = 10):
    """A fake /v1/score that records bodies and (optionally) enforces the TensorRef cache."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        base = body["prompt"].get("base")
        if known is not None and base is not None:
            if base.get("tensor") is None and base["sha256"] not in known:
                return httpx.Response(409, json={"error": {"code": "unknown_tensor", "message": "resend it"}})
            known.add(base["sha256"])
        logits = fake_logits(body)
        C, N, _ = logits.shape
        return httpx.Response(200, json={
            "logits": Tensor.from_array(logits).model_dump(), "model": "tiny", "request_id": body["request_id"],
            "usage": {"candidates": C, "sequences": C * N, "forward_passes": 1, "tokens_processed": C * N * tokens_per_seq},
        })

    return handle


def texts(n: int) -> list[str]:
    return [f"text number {i}" for i in range(n)]


def expected(c_vals, n, k=2):
    return np.asarray(c_vals)[:, None, None] * 1000 + np.arange(n)[None, :, None] + np.arange(k)[None, None, :] * 0.1


def backend(**kw) -> ServerBackend:
    kw.setdefault("retry", FAST)
    return ServerBackend(URL, **kw)


@respx.mock
async def test_zero_shot_body_fields_and_result():
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info()))
    seen = []
    respx.post(f"{URL}/v1/score").mock(side_effect=score_handler(seen))
    async with backend(api_key=KEY) as b:
        res = await b.score(ScoreJob(TEMPLATE, texts(3), WORDS, PromptBatch.zero_shot()))
    assert len(seen) == 1
    body = seen[0]
    assert body["template"] == TEMPLATE
    assert body["texts"] == texts(3)
    assert body["label_words"] == WORDS
    assert body["prompt"] == {"kind": "none"}
    assert "text_pairs" not in body and isinstance(body["request_id"], str)
    assert res.logits.shape == (1, 3, 2) and res.logits.dtype == np.float32
    np.testing.assert_allclose(res.logits, expected([0], 3), rtol=1e-6)
    assert res.tokens == 30
    assert respx.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"


@respx.mock
async def test_shallow_candidates_roundtrip_and_split_by_max_candidates():
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info(max_candidates=3, max_texts=4)))
    seen = []
    respx.post(f"{URL}/v1/score").mock(side_effect=score_handler(seen))
    rng = np.random.default_rng(0)
    cands = rng.normal(size=(7, 5, 8)).astype(np.float32)
    async with backend() as b:
        res = await b.score(ScoreJob(TEMPLATE, texts(10), WORDS, PromptBatch(kind="shallow", candidates=cands)))
    # 7 candidates / 3 -> 3 chunks; 10 texts / 4 -> 3 chunks
    assert len(seen) == 9
    assert all(Tensor(**s["prompt"]["candidates"]).to_array().shape[0] <= 3 for s in seen)
    assert all(len(s["texts"]) <= 4 for s in seen)
    assert len({s["request_id"] for s in seen}) == 9
    sent = np.concatenate([Tensor(**s["prompt"]["candidates"]).to_array() for s in seen if s["texts"][0] == texts(1)[0]])
    np.testing.assert_array_equal(sent, cands)
    np.testing.assert_allclose(res.logits, expected(cands[:, 0, 0], 10), rtol=1e-5)
    assert res.tokens == 7 * 10 * 10


@respx.mock
async def test_split_by_body_bytes():
    # each (5, 8) float32 candidate is 160 bytes -> ~216 base64 chars; allow only a few per request
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info(max_body_bytes=4000)))
    seen = []
    respx.post(f"{URL}/v1/score").mock(side_effect=score_handler(seen))
    cands = np.random.default_rng(1).normal(size=(20, 5, 8)).astype(np.float32)
    async with backend() as b:
        res = await b.score(ScoreJob(TEMPLATE, texts(2), WORDS, PromptBatch(kind="shallow", candidates=cands)))
    assert len(seen) > 1
    assert all(len(json.dumps(s)) <= 4000 for s in seen)
    np.testing.assert_allclose(res.logits, expected(cands[:, 0, 0], 2), rtol=1e-5)


@respx.mock
async def test_deep_base_sent_once_then_by_reference():
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info(max_candidates=2)))
    seen, known = [], set()
    respx.post(f"{URL}/v1/score").mock(side_effect=score_handler(seen, known=known))
    rng = np.random.default_rng(2)
    base = rng.normal(size=(2, 5, 8)).astype(np.float32)
    cands = rng.normal(size=(4, 5, 8)).astype(np.float32)
    digest = tensor_digest(base)
    async with backend() as b:
        batch = PromptBatch(kind="deep", base=base, layer=1, candidates=cands)
        res = await b.score(ScoreJob(TEMPLATE, texts(2), WORDS, batch))
        assert len(seen) == 2
        first, second = seen
        assert first["prompt"]["base"]["sha256"] == digest and first["prompt"]["layer"] == 1
        np.testing.assert_array_equal(Tensor(**first["prompt"]["base"]["tensor"]).to_array(), base)
        assert "tensor" not in second["prompt"]["base"]
        np.testing.assert_allclose(res.logits, expected(cands[:, 0, 0], 2), rtol=1e-5)
        # a later job with the same base refers to it from the start
        await b.score(ScoreJob(TEMPLATE, texts(2), WORDS, batch))
        assert all("tensor" not in s["prompt"]["base"] for s in seen[2:])
        assert b.tensor_resends == 0


@respx.mock
async def test_unknown_tensor_409_resends_with_tensor_once():
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info()))
    seen, known = [], set()
    respx.post(f"{URL}/v1/score").mock(side_effect=score_handler(seen, known=known))
    base = np.ones((2, 3, 8), np.float32)
    cands = np.zeros((2, 3, 8), np.float32)
    batch = PromptBatch(kind="deep", base=base, layer=0, candidates=cands)
    async with backend() as b:
        await b.score(ScoreJob(TEMPLATE, texts(1), WORDS, batch))
        known.clear()  # the server restarted and forgot the base
        res = await b.score(ScoreJob(TEMPLATE, texts(1), WORDS, batch))
    assert res.logits.shape == (2, 1, 2)
    assert b.tensor_resends == 1
    assert "tensor" not in seen[1]["prompt"]["base"] and "tensor" in seen[2]["prompt"]["base"]
    assert len(seen) == 3


@respx.mock
async def test_deep_full_candidates_and_base_alone():
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info()))
    seen = []
    respx.post(f"{URL}/v1/score").mock(side_effect=score_handler(seen))
    full = np.random.default_rng(3).normal(size=(3, 2, 4, 8)).astype(np.float32)
    async with backend() as b:
        r1 = await b.score(ScoreJob(TEMPLATE, texts(2), WORDS, PromptBatch(kind="deep", candidates=full)))
        r2 = await b.score(ScoreJob(TEMPLATE, texts(2), WORDS, PromptBatch(kind="deep", base=full[0])))
    assert seen[0]["prompt"]["kind"] == "deep" and "base" not in seen[0]["prompt"]
    np.testing.assert_array_equal(Tensor(**seen[0]["prompt"]["candidates"]).to_array(), full)
    assert "candidates" not in seen[1]["prompt"] and "layer" not in seen[1]["prompt"]
    assert r1.logits.shape == (3, 2, 2) and r2.logits.shape == (1, 2, 2)


@pytest.mark.parametrize("corrupt", ["shape", "nan", "inf", "request_id", "json"])
@respx.mock
async def test_bad_responses_are_protocol_errors(corrupt):
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info()))

    def handle(request):
        body = json.loads(request.content)
        logits = np.zeros((1, len(body["texts"]), 2), np.float32)
        rid = body["request_id"]
        if corrupt == "shape":
            logits = np.zeros((1, len(body["texts"]), 3), np.float32)
        elif corrupt == "nan":
            logits[0, 0, 0] = np.nan
        elif corrupt == "inf":
            logits[0, 0, 1] = np.inf
        elif corrupt == "request_id":
            rid = "someone-else"
        elif corrupt == "json":
            return httpx.Response(200, text='{"logits": ')
        return httpx.Response(200, json={"logits": Tensor.from_array(logits).model_dump(), "model": "m",
                                         "request_id": rid, "usage": {"candidates": 1, "sequences": 1,
                                                                      "forward_passes": 1, "tokens_processed": 1}})

    route = respx.post(f"{URL}/v1/score").mock(side_effect=handle)
    async with backend() as b:
        with pytest.raises(ProtocolError):
            await b.score(ScoreJob(TEMPLATE, texts(2), WORDS, PromptBatch.zero_shot()))
    assert route.call_count == 1


@respx.mock
async def test_score_retries_503_and_counts_one_logical_call():
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info()))
    seen = []
    ok = score_handler(seen)
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"code": "overloaded",
                                                                                      "message": "busy"}})
        return ok(request)

    respx.post(f"{URL}/v1/score").mock(side_effect=flaky)
    async with backend() as b:
        res = await b.score(ScoreJob(TEMPLATE, texts(2), WORDS, PromptBatch.zero_shot()))
        assert res.logits.shape == (1, 2, 2)
        assert b.attempts == 3  # model + 2 score attempts
        assert b.http.requests == 2


@respx.mock
async def test_401_no_retry_and_key_hidden(caplog):
    caplog.set_level(logging.DEBUG)
    route = respx.get(f"{URL}/v1/model").mock(
        return_value=httpx.Response(401, json={"error": {"code": "unauthorized", "message": "wrong key"}}))
    async with backend(api_key=KEY) as b:
        with pytest.raises(AuthenticationError) as ei:
            await b.model_info()
        assert KEY not in repr(b)
    assert route.call_count == 1
    assert KEY not in str(ei.value) and KEY not in caplog.text


@respx.mock
async def test_tokenize_chunks_and_caches():
    seen = []

    def handle(request):
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"words": [{"word": w, "ids": [1]} for w in body["words"]],
                                         "text_token_counts": [len(t.split()) for t in body["texts"]]})

    respx.post(f"{URL}/v1/tokenize").mock(side_effect=handle)
    many = [f"w{i} x y" for i in range(6001)]
    async with backend() as b:
        r = await b.tokenize(words=WORDS, texts=many)
        r2 = await b.tokenize(words=WORDS, texts=many)
    assert r2 is r and len(seen) == 2
    assert seen[0]["words"] == WORDS and seen[1]["words"] == []
    assert len(seen[0]["texts"]) == 5000 and len(seen[1]["texts"]) == 1001
    assert r.text_token_counts == [3] * 6001 and [w.word for w in r.words] == WORDS


@respx.mock
async def test_tokenize_count_mismatch_is_protocol_error():
    respx.post(f"{URL}/v1/tokenize").mock(return_value=httpx.Response(200, json={"words": [], "text_token_counts": [1]}))
    async with backend() as b:
        with pytest.raises(ProtocolError):
            await b.tokenize(texts=["a", "b"])


def test_estimate_is_upper_bound_of_simple_metering():
    job = ScoreJob(TEMPLATE, ["a b c", "d"], WORDS, PromptBatch(kind="shallow", candidates=np.zeros((4, 5, 8))))
    # a server metering (prompt + text + template words + [MASK] + 2 specials) per sequence
    metered = 4 * sum(5 + n + 4 + 2 for n in (3, 1))
    est = ServerBackend(URL).estimate_tokens(job, [3, 1])
    assert est >= metered
    assert est <= 4 * 2 * (5 + 3 + template_token_bound(TEMPLATE))  # and not absurdly loose


def test_make_backend_forms(monkeypatch):
    from bbt_client.config import EndpointConfig

    b = make_backend(EndpointConfig(url=URL, max_concurrency=3, timeout_s=5), api_key="k")
    assert isinstance(b, ServerBackend) and b.http.max_concurrency == 3 and b.http.timeout_s == 5
    assert isinstance(make_backend("server", URL), ServerBackend)
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("grpc", URL)
    with pytest.raises(ConfigError, match="no option"):
        make_backend(EndpointConfig(url=URL, options={"bogus": 1}))


@respx.mock
async def test_request_rejected_surfaces_server_message():
    respx.get(f"{URL}/v1/model").mock(return_value=httpx.Response(200, json=info()))
    respx.post(f"{URL}/v1/score").mock(return_value=httpx.Response(
        413, json={"error": {"code": "too_large", "message": "body over 1000 bytes"}}))
    async with backend() as b:
        with pytest.raises(RequestRejected, match="body over 1000 bytes"):
            await b.score(ScoreJob(TEMPLATE, texts(1), WORDS, PromptBatch.zero_shot()))


def test_make_backend_refuses_unknown_options_for_every_kind():
    from bbt_client.config import EndpointConfig

    with pytest.raises(ConfigError, match="accepts: .*embeddings_from"):
        make_backend(EndpointConfig(url=URL, backend="vllm", options={"embedings_from": "/x"}))
    with pytest.raises(ConfigError, match="temprature"):
        make_backend(EndpointConfig(url=URL, backend="openai", options={"model": "gpt-4", "temprature": 1}))
