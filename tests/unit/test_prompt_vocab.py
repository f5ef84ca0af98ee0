"""The candidate vocabulary of the discrete prompt methods: PMI phrases, frequency ranking, exclusions."""

from __future__ import annotations

import pytest

from bbt_client.methods.text.vocabulary import build_vocabulary, render_prompt

TEXTS = [
    "Wall Street stocks fell as oil prices rose, traders said.",
    "Stocks rallied on Wall Street after the Federal Reserve kept rates steady.",
    "The Federal Reserve raised rates; Wall Street shrugged.",
    "Oil prices hit a record as supply fears grew.",
    "The team won the final in extra time.",
    "Oil prices eased while stocks climbed.",
]


def test_pmi_phrases_glue_and_rank_by_frequency():
    vocab = build_vocabulary(TEXTS, 40)
    # words that always appear together are glued into one phrase, never offered apart
    assert "wall street" in vocab and "oil prices" in vocab and any("federal reserve" in w for w in vocab)
    assert not {"wall", "street", "oil", "reserve"} & set(vocab)
    # ranked by frequency (ties: longer, then alphabetical); entries seen once come last
    assert vocab[:3] == ["oil prices", "wall street", "stocks"]
    assert vocab.index("team") > vocab.index("rates")
    # function words alone never become candidates, possessives and punctuation never leak in
    assert not {"the", "as", "a"} & set(vocab)
    assert all(w.replace(" ", "").isalnum() for w in vocab)


def test_size_exclusions_and_determinism():
    vocab = build_vocabulary(TEXTS, 3, exclude=["Stocks"])
    assert len(vocab) == 3 and not any("stocks" in w.split() for w in vocab)
    assert vocab == build_vocabulary(list(TEXTS), 3, exclude=["Stocks"])
    assert build_vocabulary(TEXTS, 1000) == build_vocabulary(TEXTS, 1000, max_ngram=3)
    assert all(len(w.split()) == 1 for w in build_vocabulary(TEXTS, 50, max_ngram=1))


def test_tiny_data_and_empty_input():
    assert build_vocabulary(["Quantum kittens"], 5) == ["kittens", "quantum"]  # each seen once: still usable
    with pytest.raises(ValueError, match="no usable prompt candidates"):
        build_vocabulary(["the of and", "!!!"], 5)
    with pytest.raises(ValueError, match="at least 1"):
        build_vocabulary(TEXTS, 0)


def test_render_joins_entries_with_spaces():
    assert render_prompt(["wall street", "oil", "rates"], [2, 0, 0]) == "rates wall street wall street"
