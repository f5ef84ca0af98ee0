"""Label words found on training texts: candidates, selection, aggregation — and the job spends one call on it."""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.verbalizer import candidate_words, class_logits, flat_words, select_words


def test_candidates_start_with_the_label_words_and_prefer_class_specific_words():
    texts = ["the striker scored a goal", "goal in the final minute", "stocks fell on wall street",
             "shares and stocks rallied", "the final report"]
    labels = np.array([0, 0, 1, 1, 0])
    words = candidate_words(texts, labels, 2, ["Sports", "Business"], per_class=3)
    assert words[:2] == ["Sports", "Business"]
    assert "goal" in words and "stocks" in words and "the" not in words  # stop words never compete


def test_candidates_seen_in_two_class_texts_come_first_and_ties_go_to_the_more_frequent_word():
    texts = ["oil prices rose", "oil output fell again", "aardvark oil exports", "zebra prices climbed",
             "the match ended", "the team won"]
    labels = np.array([0, 0, 0, 0, 1, 1])
    words = candidate_words(texts, labels, 2, ["Business", "Sports"], per_class=2)
    assert words[2:4] == ["oil", "prices"]  # 3 and 2 class texts; the once-seen "aardvark" does not lead


def test_selection_takes_each_class_its_most_discriminative_words_without_sharing():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 10)
    words = ["a0", "a1", "b0", "b1", "c0", "noise"]
    logits = rng.normal(0, 0.1, (30, 6))
    for k, cols in enumerate([(0, 1), (2, 3), (4,)]):
        for c in cols:
            logits[labels == k, c] += 2.0 - 0.5 * (c % 2)
    found = select_words(logits, labels, words, 3, per_class=2)
    assert set(found[0]) == {"a0", "a1"} and set(found[1]) == {"b0", "b1"}  # scale-free: separation counts
    assert found[2][0] == "c0" and len(set(flat_words(found))) == 6  # every word serves one class only
    # log-probs (what a text API returns) differ from logits by a per-text shift: the same words are chosen
    shifted = logits + rng.normal(0, 50, (30, 1))
    assert select_words(shifted, labels, words, 3, per_class=2) == found


def test_class_logits_average_each_class_words():
    sets = (("a", "b"), ("c",))
    logits = np.array([[[1.0, 3.0, 5.0]]])
    np.testing.assert_array_equal(class_logits(logits, sets), [[[2.0, 5.0]]])
    with pytest.raises(ValueError):
        class_logits(np.zeros((1, 1, 4)), sets)
