"""BDPL: categorical prompt distributions over the candidate vocabulary, learnt by variance-reduced policy gradient."""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.errors import ConfigError
from bbt_client.methods.text.bdpl import BDPLTuner, policy_gradient, project_simplex
from bbt_client.methods.registry import make_tuner
from bbt_client.tasks.datasets import Split, Task

VOCAB = [f"w{i}" for i in range(30)]
TARGET = np.array([3, 17, 29, 8])


def tuner(seed: int = 0, **cfg) -> BDPLTuner:
    cfg.setdefault("prompt_tokens", 4)
    return BDPLTuner(None, cfg, seed, vocabulary=VOCAB)


def toy_losses(t: BDPLTuner) -> np.ndarray:
    """Fraction of slots that miss the target entry: the toy black box."""
    return (t._pending != TARGET).mean(axis=1)  # the prompts asked: those not scored before


def test_ask_is_a_text_batch_of_vocabulary_entries():
    t = tuner(popsize=6)
    batch = t.ask()
    assert batch.kind == "text" and batch.num_candidates == 6 == t.popsize
    assert all(len(p.split()) == 4 and set(p.split()) <= set(VOCAB) for p in batch.texts)
    assert t.pending_batch().texts == batch.texts
    assert batch.texts == tuner(popsize=6).ask().texts  # same seed, same samples
    assert batch.texts != tuner(seed=1, popsize=6).ask().texts


def test_policy_gradient_is_the_reference_codes_estimate():
    """The reference code's derivative (+1/p at the sample, -1/p at every other entry), summed with the
    advantages, equals twice the score-function estimate exactly: the advantages sum to zero."""
    probs = np.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    samples = np.array([[0, 1], [2, 1], [2, 0]])
    losses = np.array([1.0, 3.0, 0.5])
    adv = (losses - losses.mean()) / 2
    reference = np.zeros_like(probs)
    for k in range(3):
        d = -1 / probs
        d[np.arange(2), samples[k]] *= -1
        reference += adv[k] * d
    np.testing.assert_allclose(policy_gradient(probs, samples, losses), reference, atol=1e-12)
    score_function = np.zeros_like(probs)
    for k in range(3):
        score_function[np.arange(2), samples[k]] += adv[k] / probs[np.arange(2), samples[k]]
    np.testing.assert_allclose(policy_gradient(probs, samples, losses), 2 * score_function, atol=1e-12)


def test_one_update_moves_probability_toward_the_better_sample():
    t = tuner(popsize=4, prompt_tokens=1)
    t.ask()
    t._pending = t._pending_full = np.array([[5], [6], [7], [8]])  # what was sampled, made explicit
    t.tell(np.array([0.1, 1.0, 1.0, 1.0]))
    p = t.probs[0]
    assert p[5] > 1 / 30 and p[6] < 1 / 30 and p[7] < 1 / 30 and p[8] < 1 / 30
    assert abs(p.sum() - 1) < 1e-9 and p.min() >= 0
    assert list(t.mode_prompt()) == [5] and list(t.best_prompt()) == [5] and t.best_loss == pytest.approx(0.1)


def test_learns_the_toy_objective():
    t = tuner(popsize=10)
    first = None
    for _ in range(40):
        t.ask()
        f = toy_losses(t)
        first = f.mean() if first is None else first
        t.tell(f)
    assert first > 0.8  # random prompts miss almost every slot
    assert t.best_loss <= 0.25 and (t.mode_prompt() == TARGET).mean() >= 0.75
    assert t.extra_metrics()["max_prob"] > 0.1 and t.generation >= 40  # uniform: 1/30; cached ones are free


def test_project_simplex():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7))
    p = project_simplex(x)
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-12)
    assert p.min() >= 0
    q = np.full((1, 4), 0.25)
    np.testing.assert_allclose(project_simplex(q), q)  # already on the simplex: unchanged


def test_resume_bit_identical(straight_and_resumed):
    def step(t):
        batch = t.ask()
        t.tell(toy_losses(t))
        return batch.texts

    full, resumed = straight_and_resumed(lambda: tuner(popsize=5), step, generations=6, split=3)
    assert full == resumed


def test_state_refuses_other_config_or_vocabulary_and_tell_validation():
    t = tuner()
    state = t.state_dict()
    with pytest.raises(ConfigError, match=rf"options that differ: lr \(checkpoint: {t.config.lr}, now: 0.2\)"):
        tuner(lr=0.2).load_state_dict(state)
    with pytest.raises(ConfigError, match="different"):
        BDPLTuner(None, {"prompt_tokens": 4}, 0, vocabulary=VOCAB[::-1]).load_state_dict(state)
    with pytest.raises(ValueError, match="without a pending"):
        t.tell(np.zeros(10))
    t.ask()
    with pytest.raises(RuntimeError, match="twice"):
        t.ask()
    with pytest.raises(ValueError, match="expected 10"):
        t.tell(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        t.tell(np.full(10, np.nan))
    with pytest.raises(RuntimeError, match="no generation"):
        tuner().last_candidate_prompts()


def test_registry_builds_it_from_the_training_texts(model_info):
    task = Task(name="t", template="{text} Topic: {mask}", label_words=("money", "sport"), class_names=("b", "s"))
    train = Split(texts=["Stocks and money markets rallied", "money markets fell", "The team won the cup",
                         "team won again"], labels=[0, 0, 1, 1])
    t = make_tuner("bdpl", model_info, {"prompt_tokens": 2, "vocab_size": 5}, 42, task=task, train=train)
    assert t.vocabulary[0] == "team won" and not any("money" in w for w in t.vocabulary)  # label words excluded
    assert t.prompt_text(np.array([0, 1])) == f"{t.vocabulary[0]} {t.vocabulary[1]}"
    with pytest.raises(ConfigError, match="training split"):
        make_tuner("bdpl", model_info, {}, 42)
    with pytest.raises(ConfigError, match="invalid config"):
        make_tuner("bdpl", model_info, {"learning_rate": 1}, 42, task=task, train=train)


def test_a_prompt_is_scored_once_per_run_and_resumes_with_its_cache():
    """Repeats within and across generations are not asked again; their cached loss still teaches the search."""
    t = tuner(popsize=10, lr=0.05)  # a fast rate: the distribution narrows and proposes repeats
    asked = []
    for g in range(30):
        batch = t.ask()
        asked += list(batch.texts)
        if g == 15:
            state = t.state_dict()
            t = tuner(popsize=10, lr=0.05)  # a fast rate: the distribution narrows and proposes repeats
            t.load_state_dict(state)
        t.tell(toy_losses(t))
    assert len(asked) == len(set(asked))
    assert len(asked) < 10 * t.generation  # the search did propose repeats: they came from the cache
