"""bbt_client.tokens: offline tiktoken counting and cost."""

from __future__ import annotations

import pytest

from bbt_client import tokens


def test_bundled_cl100k_matches_known_ids():
    enc = tokens.bundled_cl100k()
    # ids from tiktoken's own README / cl100k_base
    assert enc.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert enc.encode("hello world") == [15339, 1917]
    assert enc.n_vocab == 100277


def test_counter_for_openai_model_is_tiktoken_offline():
    count, desc = tokens.counter_for_model("gpt-4")
    assert desc == "tiktoken cl100k_base"
    assert count(["hello world", ""]) == [2, 0]


def test_unknown_model_falls_back_to_byte_upper_bound():
    count, desc = tokens.counter_for_model("meta-llama/Llama-3-8B")
    assert "bytes" in desc
    text = "naïve café ☕ tokens"
    assert count([text]) == [len(text.encode())]
    assert count([text])[0] >= len(tokens.bundled_cl100k().encode_ordinary(text))


def test_missing_encoding_offline_degrades(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        tokens.get_encoding("o200k_base")
    count, desc = tokens.counter_for_model("gpt-4o")
    assert "bytes" in desc and count(["abc"]) == [3]


def test_cost():
    assert tokens.cost(2500, 0.002) == pytest.approx(0.005)
    assert tokens.cost(2500, None) == 0.0
