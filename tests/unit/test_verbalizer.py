"""Label words found on training texts: candidates, selection, aggregation — and the job spends one call on it."""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.tasks.verbalizer import MAX_PER_CLASS, candidate_words, class_logits, flat_words, select_words


def test_candidates_start_with_each_class_label_word_and_prefer_class_specific_words():
    texts = ["the striker scored a goal", "goal in the final minute", "stocks fell on wall street",
             "shares and stocks rallied", "the final report"]
    labels = np.array([0, 0, 1, 1, 0])
    pools = candidate_words(texts, labels, 2, ["Sports", "Business"], at_least=3)
    assert [p[0] for p in pools] == ["Sports", "Business"]
    assert pools[0][1:] == ["final", "goal"] and pools[1][1] == "stocks"  # seen twice there, never elsewhere
    assert "the" not in pools[0]  # stop words never compete


def test_words_seen_once_only_fill_a_class_and_a_word_serves_the_class_it_is_most_over_represented_in():
    texts = ["oil prices rose", "oil output fell again", "aardvark oil exports", "zebra prices climbed",
             "the match ended with oil", "the match won"]
    labels = np.array([0, 0, 0, 0, 1, 1])
    pools = candidate_words(texts, labels, 2, ["Business", "Sports"], at_least=3)
    assert pools[0] == ["Business", "prices", "oil"]  # 2/4 - 0 before 3/4 - 1/2; nothing seen once needed
    assert pools[1] == ["Sports", "match", "ended"]  # "match" twice, then the once-seen words fill to 3
    assert "oil" not in pools[1]  # in one of two Sports texts but three of four Business texts
    assert len(candidate_words(texts, labels, 2, ["Business", "Sports"], at_least=5)[0]) == 5


def test_many_shots_keep_the_candidate_lists_bounded():
    words = [f"q{a}{b}" for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghij"]  # 260 distinct words
    texts = [f"{w} {w}x" for w in words] * 2  # each word in two texts of class 0
    labels = np.zeros(len(texts), int)
    texts, labels = texts + ["the match"], np.append(labels, 1)
    pools = candidate_words(texts, labels, 2, ["A", "B"], at_least=3)
    assert len(pools[0]) == 1 + MAX_PER_CLASS


def test_selection_takes_each_class_its_most_discriminative_own_candidates():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 10)
    owners = [0, 0, 0, 1, 1, 2, 2]  # candidate 2 belongs to class 0 but separates class 1
    logits = rng.normal(0, 0.1, (30, 7))
    for k, cols in enumerate([(0, 1), (3, 4), (5,)]):
        for c in cols:
            logits[labels == k, c] += 2.0 - 0.5 * (c % 2)
    logits[labels == 1, 2] += 5.0
    found = select_words(logits, labels, owners, 3, per_class=2)
    assert [set(f) for f in found[:2]] == [{0, 1}, {3, 4}]  # scale-free: separation counts, not size
    assert found[2][0] == 5 and 2 not in found[1]  # a class never takes another class's candidate
    # log-probs (what a text API returns) differ from logits by a per-text shift: the same words are chosen
    shifted = logits + rng.normal(0, 50, (30, 1))
    assert select_words(shifted, labels, owners, 3, per_class=2) == found
    assert flat_words((("a", "b"), ("c",))) == ["a", "b", "c"]


def test_class_logits_average_each_class_words():
    sets = (("a", "b"), ("c",))
    logits = np.array([[[1.0, 3.0, 5.0]]])
    np.testing.assert_array_equal(class_logits(logits, sets), [[[2.0, 5.0]]])
    with pytest.raises(ValueError):
        class_logits(np.zeros((1, 1, 4)), sets)
