"""bbt_client.backends.tokens: offline tiktoken counting and cost."""

from __future__ import annotations

import pytest

from bbt_client.backends import tokens
from bbt_client.backends.openai_text import OpenAITextBackend


def test_bundled_cl100k_matches_known_ids():
    enc = tokens.bundled_cl100k()
    # ids from tiktoken's own README / cl100k_base
    assert enc.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert enc.encode("hello world") == [15339, 1917]
    assert enc.n_vocab == 100277


async def test_openai_model_counts_with_tiktoken_offline():
    b = OpenAITextBackend("https://api.openai.test/v1", model="gpt-4")
    assert b.token_counter == "tiktoken"
    assert (await b.tokenize(texts=["hello world", ""])).text_token_counts == [2, 0]


async def test_forced_bytes_is_an_upper_bound():
    b = OpenAITextBackend("https://api.openai.test/v1", model="meta-llama/Llama-3-8B", tokenizer="bytes")
    text = "naïve café ☕ tokens"
    counts = (await b.tokenize(texts=[text])).text_token_counts
    assert counts == [len(text.encode())] and counts[0] >= len(tokens.bundled_cl100k().encode_ordinary(text))


async def test_missing_encoding_offline_degrades_to_bytes(monkeypatch, caplog):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        tokens.get_encoding("o200k_base")
    b = OpenAITextBackend("https://api.openai.test/v1", model="gpt-4o")  # o200k_base: not bundled
    assert b.token_counter == "bytes" and "TIKTOKEN_CACHE_DIR" in caplog.text
    assert (await b.tokenize(texts=["abc"])).text_token_counts == [3]  # no /tokenize probe: OpenAI has none


def test_cost():
    assert tokens.cost(2500, 0.002) == pytest.approx(0.005)
    assert tokens.cost(2500, None) == 0.0
