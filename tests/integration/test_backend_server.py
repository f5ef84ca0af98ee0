"""ServerBackend against the real local server (fixtures ``tiny_server`` from tests/conftest.py).

Checks what mocks cannot: that our request bodies are what the server accepts, that splitting a job does
not change its logits, that the TensorRef path gives the same answer as sending every layer, and that
our token estimate bounds what the server meters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.backends.http import RetryPolicy
from bbt_client.backends.server import ServerBackend
from bbt_client.protocol import tensor_digest

TEMPLATE = "{text} It was {mask} ."
WORDS = ["bad", "great"]
TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés", "fine."]


def _connect(server, **kw) -> ServerBackend:
    url = getattr(server, "url", None) or getattr(server, "base_url", None) or server
    key = getattr(server, "api_key", None)
    return ServerBackend(str(url), api_key=key, retry=RetryPolicy(max_retries=1, backoff_initial_s=0.01), **kw)


@pytest.fixture
async def backend(tiny_server):
    b = _connect(tiny_server)
    yield b
    await b.aclose()


async def test_model_info_and_tokenize(backend):
    info = await backend.model_info()
    assert info.hidden_size > 0 and len(info.hidden_std) == info.num_layers
    tok = await backend.tokenize(words=WORDS, texts=TEXTS)
    assert [w.word for w in tok.words] == WORDS
    assert len(tok.text_token_counts) == len(TEXTS) and all(c > 0 for c in tok.text_token_counts)


async def test_zero_shot_and_estimate_bounds_metering(backend):
    job = ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot())
    res = await backend.score(job)
    assert res.logits.shape == (1, len(TEXTS), 2) and np.isfinite(res.logits).all()
    counts = (await backend.tokenize(texts=TEXTS)).text_token_counts
    assert 0 < res.tokens <= backend.estimate_tokens(job, counts)


async def test_shallow_split_equals_unsplit_and_estimate(backend):
    info = await backend.model_info()
    rng = np.random.default_rng(0)
    cands = (rng.normal(size=(5, 4, info.hidden_size)) * info.embedding_std).astype(np.float32)
    job = ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch(kind="shallow", candidates=cands))
    whole = await backend.score(job)
    assert whole.logits.shape == (5, len(TEXTS), 2) and np.isfinite(whole.logits).all()
    counts = (await backend.tokenize(texts=TEXTS)).text_token_counts
    assert whole.tokens <= backend.estimate_tokens(job, counts)
    backend._info = info.model_copy(update={"max_candidates": 2, "max_texts": 2})  # force a 3 x 2 grid
    split = await backend.score(job)
    assert split.extra["requests"] == 6
    np.testing.assert_allclose(split.logits, whole.logits, rtol=1e-4, atol=1e-4)
    assert split.tokens == whole.tokens


async def test_deep_reference_path_matches_full_prompts(backend):
    info = await backend.model_info()
    rng = np.random.default_rng(1)
    L, n, D = info.num_layers, 3, info.hidden_size
    scale = np.asarray(info.hidden_std, np.float32)[:, None, None]
    base = (rng.normal(size=(L, n, D)) * scale).astype(np.float32)
    cands = (rng.normal(size=(4, n, D)) * scale[1]).astype(np.float32)
    batch = PromptBatch(kind="deep", base=base, layer=1, candidates=cands)
    by_ref = await backend.score(ScoreJob(TEMPLATE, TEXTS, WORDS, batch))
    again = await backend.score(ScoreJob(TEMPLATE, TEXTS, WORDS, batch))  # base now sent by digest only
    full = await backend.score(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch(kind="deep", candidates=batch.full())))
    np.testing.assert_allclose(by_ref.logits, full.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again.logits, full.logits, rtol=1e-4, atol=1e-4)
    assert backend.tensor_resends == 0
    # a fresh backend believing the server knows the base gets 409 unknown_tensor -> resends once
    other = _connect_like(backend)
    try:
        other._sent_digests.add(tensor_digest(base * 2))
        doubled = dataclasses.replace(batch, base=base * 2)
        res = await other.score(ScoreJob(TEMPLATE, TEXTS, WORDS, doubled))
        assert other.tensor_resends == 1 and np.isfinite(res.logits).all()
    finally:
        await other.aclose()


def _connect_like(b: ServerBackend) -> ServerBackend:
    return ServerBackend(b.http.base_url, api_key=b.http._api_key, retry=b.http.retry)


KEY = "bbt-integration-key-0123456789"


async def test_keyed_small_body_server_auth_and_splitting(tiny_bert_dir, caplog):
    """A server that needs a key and caps bodies at 64 KiB: a wrong key fails fast without leaking it,
    the right key works, and a population too big for one body is split under the cap."""
    from server_stub.testing import run_server

    from bbt_client.errors import AuthenticationError

    with run_server(tiny_bert_dir, threads=1, api_key=KEY, max_body_bytes=64 * 1024) as url:
        wrong = ServerBackend(url, api_key="not-" + KEY, retry=RetryPolicy(max_retries=3, backoff_initial_s=0.01))
        try:
            with pytest.raises(AuthenticationError) as ei:
                await wrong.model_info()
            assert wrong.attempts == 1 and KEY not in str(ei.value)
        finally:
            await wrong.aclose()
        right = ServerBackend(url, api_key=KEY)
        try:
            info = await right.model_info()
            cands = (np.random.default_rng(3).normal(size=(40, 8, info.hidden_size))
                     * info.embedding_std).astype(np.float32)  # 40 * 8 * 32 * 4 B = 40 KiB raw, ~55 KiB base64
            res = await right.score(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch(kind="shallow", candidates=cands)))
            assert res.extra["requests"] > 1 and res.logits.shape == (40, len(TEXTS), 2)
            assert np.isfinite(res.logits).all()
        finally:
            await right.aclose()
    assert KEY not in caplog.text


async def test_usage_counts_what_the_server_computed(tiny_bert_dir):
    from bbt_client.backends.server import ServerBackend
    from server_stub.testing import run_server

    with run_server(tiny_bert_dir, threads=1) as url:
        backend = ServerBackend(url)
        try:
            before = await backend.usage()
            assert (before.requests, before.candidates, before.queue_depth) == (0, 0, 0)
            cands = np.random.default_rng(0).normal(0, 0.1, (3, 2, 32)).astype(np.float32)
            job = ScoreJob(template="{text} It was {mask} .", texts=["a b", "c d e", "f"], label_words=["bad", "great"],
                           prompts=PromptBatch(kind="shallow", candidates=cands))
            result = await backend.score(job)
            after = await backend.usage()
            assert (after.requests, after.candidates, after.sequences) == (1, 3, 9)
            assert after.tokens == result.tokens > 0 and result.endpoint_calls == 3
        finally:
            await backend.aclose()
