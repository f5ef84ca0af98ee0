"""OpenAITextBackend contract tests from the OpenAI Completions / Chat Completions formats (respx mocks)."""

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
from bbt_client.backends.openai_text import OpenAITextBackend
from bbt_client.errors import AuthenticationError, ConfigError, ProtocolError, RateLimitError, UnsupportedError
from bbt_client.backends.tokens import bundled_cl100k

URL = "https://api.openai.test/v1"
BASE = "https://api.openai.test"
TEMPLATE = "Review: {text}\nSentiment:{mask}"
WORDS = ["negative", "positive"]
KEY = "sk-test-ABCDEFGHIJKLMNOP"
FAST = RetryPolicy(max_retries=2, backoff_initial_s=0.001, backoff_max_s=0.002, jitter_s=0, retry_after_cap_s=0.01)


def backend(**kw) -> OpenAITextBackend:
    kw.setdefault("retry", FAST)
    kw.setdefault("model", "gpt-4")  # cl100k_base: bundled, so label ids are known offline
    return OpenAITextBackend(URL, **kw)


def completions_handler(seen: list):
    """Fake completions: logprob(' positive') = -i/10 - 0.1, logprob(' negative') = -1 - i/10 for prompt i."""

    def handle(request):
        body = json.loads(request.content)
        seen.append(body)
        choices = [{"index": i, "text": " positive", "finish_reason": "length",
                    "logprobs": {"tokens": [" positive"], "token_logprobs": [-0.1],
                                 "top_logprobs": [{" positive": -i / 10 - 0.1, " negative": -1 - i / 10, " neutral": -3}]}}
                   for i in range(len(body["prompt"]))][::-1]
        n_prompt = sum(len(bundled_cl100k().encode_ordinary(p)) for p in body["prompt"])
        return httpx.Response(200, json={"object": "text_completion", "model": body["model"], "choices": choices,
                                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(choices),
                                                   "total_tokens": n_prompt + len(choices)}})

    return handle


@respx.mock
async def test_completions_body_fields_and_scores():
    seen = []
    respx.post(f"{BASE}/v1/completions").mock(side_effect=completions_handler(seen))
    b = backend(api_key=KEY, prompts_per_request=2)
    texts = ["great fun", "a bore", "fine"]
    job = ScoreJob(TEMPLATE, texts, WORDS, PromptBatch.zero_shot())
    res = await b.score(job)
    assert [len(s["prompt"]) for s in seen] == [2, 1]
    body = seen[0]
    assert body["model"] == "gpt-4" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["prompt"] == ["Review: great fun\nSentiment:", "Review: a bore\nSentiment:"]
    enc = bundled_cl100k()
    ids = [enc.encode_ordinary(" negative"), enc.encode_ordinary(" positive")]
    assert all(len(i) == 1 for i in ids)
    assert body["logit_bias"] == {str(ids[0][0]): 100.0, str(ids[1][0]): 100.0}
    assert body["logprobs"] >= 2
    assert respx.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"
    local = np.array([0, 1, 0])  # index within each request
    np.testing.assert_allclose(res.logits[0, :, 1], -local / 10 - 0.1, rtol=1e-6)
    np.testing.assert_allclose(res.logits[0, :, 0], -1 - local / 10, rtol=1e-6)
    assert res.logits.shape == (1, 3, 2) and res.extra["missing_label_logprobs"] == 0
    assert res.tokens <= b.estimate_tokens(job)  # estimate is an upper bound of metered usage
    assert res.tokens == b.estimate_tokens(job)  # ... and exact here: same tokenizer, no chat framing


@respx.mock
async def test_chat_body_and_top_logprobs_with_missing_label():
    seen = []

    def handle(request):
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={
            "object": "chat.completion", "model": "gpt-4",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"}, "finish_reason": "length",
                         "logprobs": {"content": [{"token": "positive", "logprob": -0.2, "bytes": [112],
                                                   "top_logprobs": [{"token": "positive", "logprob": -0.2, "bytes": []},
                                                                    {"token": "Positive", "logprob": -2.5, "bytes": []}]}]}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}})

    respx.post(f"{BASE}/v1/chat/completions").mock(side_effect=handle)
    b = backend(api="chat", missing_margin=1.0)
    res = await b.score(ScoreJob(TEMPLATE, ["x", "y"], WORDS, PromptBatch.zero_shot()))
    assert len(seen) == 2
    body = seen[0]
    assert body["messages"] == [{"role": "user", "content": "Review: x\nSentiment:"}]
    assert body["logprobs"] is True and 2 <= body["top_logprobs"] <= 20 and body["max_tokens"] == 1
    assert "logit_bias" in body
    np.testing.assert_allclose(res.logits[0, 0], [-3.5, -0.2], rtol=1e-6)  # negative missing: -2.5 - 1
    assert res.extra["missing_label_logprobs"] == 2 and res.tokens == 26


async def test_continuous_prompts_refused_with_guidance():
    b = backend()
    assert b.supported_prompts == frozenset({"none", "text"})
    with pytest.raises(UnsupportedError, match="bdpl and cmaes-tokens"):
        await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch(kind="shallow", candidates=np.zeros((1, 2, 4)))))


@respx.mock
async def test_text_prompts_candidate_major_batched_and_estimated_exactly():
    seen = []
    respx.post(f"{BASE}/v1/completions").mock(side_effect=completions_handler(seen))
    b = backend(prompts_per_request=4)
    texts = ["great fun", "a bore", "fine"]
    job = ScoreJob(TEMPLATE, texts, WORDS, PromptBatch.from_texts(["movie review", ""]))
    res = await b.score(job)
    assert [len(s["prompt"]) for s in seen] == [4, 2]  # C*N = 6 sequences, 4 per request
    sent = seen[0]["prompt"] + seen[1]["prompt"]
    assert sent[:3] == [f"movie review Review: {t}\nSentiment:" for t in texts]  # prompt, one space, template
    assert sent[3:] == [f"Review: {t}\nSentiment:" for t in texts]  # an empty prompt adds nothing
    assert res.logits.shape == (2, 3, 2)
    local = np.array([0, 1, 2, 3, 0, 1])  # each sequence's index within its request
    np.testing.assert_allclose(res.logits.reshape(6, 2)[:, 1], -local / 10 - 0.1, rtol=1e-6)
    assert res.tokens == b.estimate_tokens(job)  # tiktoken: the estimate covers the prompt text exactly
    assert b.estimate_tokens(job) > b.estimate_tokens(ScoreJob(TEMPLATE, texts, WORDS, PromptBatch.zero_shot())) * 2


@respx.mock
async def test_text_prompts_through_chat_one_request_per_sequence():
    seen = []

    def handle(request):
        body = json.loads(request.content)
        seen.append(body["messages"][0]["content"])
        return httpx.Response(200, json={"choices": [{"index": 0, "logprobs": {"content": [
            {"token": "positive", "logprob": -0.2, "top_logprobs": [{"token": "positive", "logprob": -0.2},
                                                                    {"token": "negative", "logprob": -1.5}]}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})

    respx.post(f"{BASE}/v1/chat/completions").mock(side_effect=handle)
    res = await backend(api="chat").score(ScoreJob(TEMPLATE, ["x", "y"], WORDS, PromptBatch.from_texts(["a", "b c"])))
    assert sorted(seen) == sorted(["a Review: x\nSentiment:", "a Review: y\nSentiment:",
                                   "b c Review: x\nSentiment:", "b c Review: y\nSentiment:"])
    assert res.logits.shape == (2, 2, 2) and res.tokens == 44


def test_text_prompt_estimate_from_endpoint_counts_covers_the_prompt():
    b = backend(model="my-llama")  # endpoint counter: the texts' and prompts' own counts, template as bytes
    texts = ["one two three", "four"]
    zero = ScoreJob(TEMPLATE, texts, WORDS, PromptBatch.zero_shot())
    text = ScoreJob(TEMPLATE, texts, WORDS, PromptBatch.from_texts(["alpha beta", "gamma"]))
    base = b.estimate_tokens(zero, [3, 1])
    with_counts = b.estimate_tokens(text, [3, 1], prompt_token_counts=[2, 1])
    assert with_counts == 2 * base + 2 * (2 + 1) + 2 * (1 + 1)  # each prompt + 1 for the join, on every text
    # without the prompts' counts, their UTF-8 bytes bound them
    assert b.estimate_tokens(text, [3, 1]) == 2 * base + 2 * (10 + 1) + 2 * (5 + 1)


async def test_config_refusals():
    with pytest.raises(ConfigError, match="model"):
        OpenAITextBackend(URL)
    with pytest.raises(ConfigError, match="exceeds max_logprobs=5"):
        OpenAITextBackend(URL, model="gpt-4", top_logprobs=6, max_logprobs=5)
    with pytest.raises(ConfigError, match="end"):
        await backend().score(ScoreJob("{text} was {mask} !", ["x"], WORDS, PromptBatch.zero_shot()))
    with pytest.raises(ConfigError, match="single-token"):
        await backend().score(ScoreJob(TEMPLATE, ["x"], ["no", "antidisestablishmentarianism"], PromptBatch.zero_shot()))


@respx.mock
async def test_unknown_model_without_tokenize_route_skips_bias_unless_ids_given(caplog):
    seen = []
    respx.post(f"{BASE}/v1/completions").mock(side_effect=completions_handler(seen))
    tokenize = respx.post(f"{BASE}/tokenize").mock(return_value=httpx.Response(404, json={"detail": "Not Found"}))
    b = backend(model="my-llama")
    await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))
    assert "logit_bias" not in seen[-1] and b.token_counter == "bytes" and "no /tokenize" in caplog.text
    await b.score(ScoreJob(TEMPLATE, ["y"], WORDS, PromptBatch.zero_shot()))
    assert tokenize.call_count == 1  # probed once, then remembered
    await backend(model="my-llama", label_token_ids={"negative": 11, "positive": 12}).score(
        ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))
    assert seen[-1]["logit_bias"] == {"11": 100.0, "12": 100.0}
    # byte bound is an upper bound of any byte-level BPE count
    job = ScoreJob(TEMPLATE, ["héllo wörld"], WORDS, PromptBatch.zero_shot())
    assert b.estimate_tokens(job) >= backend().estimate_tokens(job)
    with pytest.raises(UnsupportedError, match="no usable /tokenize"):
        await backend(model="my-llama", tokenizer="endpoint").tokenize(texts=["x"])


def fake_tokenize(seen: list):
    """A vLLM-style ``POST /tokenize``: one id per whitespace word (ids from a fixed table)."""
    vocab = {"negative": 901, "positive": 902}

    def handle(request):
        body = json.loads(request.content)
        seen.append(body)
        ids = [vocab.get(w, 500 + len(w)) for w in body["prompt"].split()]
        return httpx.Response(200, json={"count": len(ids), "max_model_len": 4096, "tokens": ids})

    return handle


@respx.mock
async def test_non_openai_model_counts_and_label_ids_from_endpoint_tokenize():
    seen_tok, seen = [], []
    respx.post(f"{BASE}/tokenize").mock(side_effect=fake_tokenize(seen_tok))
    respx.post(f"{BASE}/v1/completions").mock(side_effect=completions_handler(seen))
    b = backend(model="meta-llama/Llama-3.1-8B")
    texts = ["a truly great film", "dull"]
    resp = await b.tokenize(words=WORDS, texts=texts)
    assert resp.text_token_counts == [4, 1] and [w.ids for w in resp.words] == [[901], [902]]
    assert {"model": "meta-llama/Llama-3.1-8B", "prompt": " negative", "add_special_tokens": False} in seen_tok
    assert b.token_counter == "endpoint"
    job = ScoreJob(TEMPLATE, texts, WORDS, PromptBatch.zero_shot())
    await b.score(job)
    assert seen[-1]["logit_bias"] == {"901": 100.0, "902": 100.0}
    n_before = len(seen_tok)
    await b.tokenize(texts=texts)
    assert len(seen_tok) == n_before  # cached: no second round trip for the same texts
    # reservation from the endpoint counts: tighter than bytes, still above the words + template
    est = b.estimate_tokens(job, resp.text_token_counts)
    assert sum(resp.text_token_counts) < est < backend(model="my-llama", tokenizer="bytes").estimate_tokens(job)
    with pytest.raises(ConfigError, match="tiktoken"):
        backend(model="meta-llama/Llama-3.1-8B", tokenizer="tiktoken")
    with pytest.raises(ConfigError, match="tokenizer must be"):
        backend(tokenizer="sentencepiece")


@respx.mock
async def test_provider_errors_surface_clearly(caplog):
    caplog.set_level(logging.DEBUG)
    respx.post(f"{BASE}/v1/completions").mock(return_value=httpx.Response(401, json={
        "error": {"message": "Incorrect API key provided: sk-test-***MNOP.", "type": "invalid_request_error",
                  "param": None, "code": "invalid_api_key"}}))
    with pytest.raises(AuthenticationError, match="Incorrect API key") as ei:
        await backend(api_key=KEY).score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))
    assert ei.value.code == "invalid_api_key" and KEY not in str(ei.value) and KEY not in caplog.text


@respx.mock
async def test_rate_limit_with_retry_after_then_gives_up():
    route = respx.post(f"{BASE}/v1/completions").mock(return_value=httpx.Response(
        429, headers={"retry-after": "0"},
        json={"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}))
    with pytest.raises(RateLimitError, match="Rate limit reached"):
        await backend().score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))
    assert route.call_count == FAST.max_retries + 1


@respx.mock
async def test_missing_logprobs_is_protocol_error():
    respx.post(f"{BASE}/v1/chat/completions").mock(return_value=httpx.Response(200, json={
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": None}]}))
    with pytest.raises(ProtocolError, match="logprobs"):
        await backend(api="chat").score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))


def test_factory_builds_openai():
    b = make_backend("openai", URL, model="gpt-4", api="chat")
    assert isinstance(b, OpenAITextBackend) and b.api == "chat" and b.http.base_url == BASE
