import numpy as np
import pytest

from bbt_client.tasks.losses import cross_entropy
from bbt_client.methods.bbt import BBTConfig, BBTTuner
from bbt_client.errors import ConfigError

SMALL = dict(intrinsic_dim=20, prompt_tokens=4, popsize=8)


def distance_loss(prompts, target):
    return ((prompts - target[None]) ** 2).reshape(prompts.shape[0], -1).mean(axis=1) / target.var()


def test_ask_shapes_and_kind(model_info):
    t = BBTTuner(model_info, SMALL, seed=1)
    batch = t.ask()
    assert batch.kind == "shallow" and batch.candidates.shape == (8, 4, 16)
    assert batch.candidates.dtype == np.float32 and t.popsize == 8 == batch.num_candidates


def test_deterministic_per_seed(model_info):
    a = BBTTuner(model_info, SMALL, seed=3).ask().candidates
    np.random.seed(0)
    b = BBTTuner(model_info, SMALL, seed=3).ask().candidates
    c = BBTTuner(model_info, SMALL, seed=4).ask().candidates
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_decreases_distance_to_hidden_target(model_info):
    t = BBTTuner(model_info, {**SMALL, "init_prompt": "zeros"}, seed=0)
    target = t.prompts(np.random.default_rng(9).normal(size=20))
    first = None
    for _ in range(40):
        losses = distance_loss(t.ask().candidates, target)
        first = losses.mean() if first is None else first
        t.tell(losses)
    final = distance_loss(t.best_prompt()[None], target)[0]
    assert final < 0.2 * first
    assert t.best_loss == pytest.approx(final, rel=1e-5)


def test_decreases_cross_entropy_on_linear_toy_model(model_info, toy_model):
    model = toy_model(model_info.hidden_size)
    t = BBTTuner(model_info, SMALL, seed=0)
    start = cross_entropy(model.logits(t.best_prompt()[None]), model.labels)[0]
    for _ in range(30):
        batch = t.ask()
        t.tell(cross_entropy(model.logits(batch.candidates), model.labels))
    assert t.best_loss < 0.8 * start
    np.testing.assert_allclose(
        cross_entropy(model.logits(t.best_prompt()[None]), model.labels)[0], t.best_loss, rtol=1e-4
    )


def test_resume_bit_identical(model_info, straight_and_resumed):
    target = np.random.default_rng(5).normal(size=(4, 16)).astype(np.float32) * 0.05

    def gen(tuner):
        c = tuner.ask().candidates
        tuner.tell(distance_loss(c, target))
        return c

    full, resumed = straight_and_resumed(lambda: BBTTuner(model_info, SMALL, seed=8), gen)
    assert len(full) == len(resumed) == 6
    for x, y in zip(full, resumed):
        assert np.array_equal(x, y)


def test_load_state_refuses_other_config(model_info):
    state = BBTTuner(model_info, SMALL, seed=8).state_dict()
    with pytest.raises(ConfigError, match="different"):
        BBTTuner(model_info, SMALL, seed=9).load_state_dict(state)
    raw = BBTTuner(model_info, {**SMALL, "calibrate": False}, seed=8)
    with pytest.raises(ConfigError, match=r"options that differ: calibrate \(checkpoint: auto, now: off\)"):
        raw.load_state_dict(state)  # a field left out of the identity while off reads as "off"


def test_tell_validation_and_last_candidates(model_info):
    t = BBTTuner(model_info, SMALL, seed=1)
    with pytest.raises(ValueError, match="pending"):
        t.tell(np.zeros(8))
    with pytest.raises(RuntimeError):
        t.last_candidate_prompts()
    batch = t.ask()
    with pytest.raises(RuntimeError):
        t.ask()
    with pytest.raises(ValueError, match="expected 8"):
        t.tell(np.zeros(7))
    with pytest.raises(ValueError, match="finite"):
        t.tell(np.r_[np.zeros(7), np.inf])
    t.tell(np.arange(8.0))
    assert np.array_equal(t.last_candidate_prompts(), batch.candidates)
    assert np.array_equal(t.best_prompt(), batch.candidates[0])
    assert t.phase == "generation 2"


def test_projection_scale_follows_embedding_std(model_info):
    cfg = BBTConfig(intrinsic_dim=200, prompt_tokens=8, init_prompt="zeros")
    t = BBTTuner(model_info, cfg, seed=0)
    prompts = t.ask().candidates  # z ~ N(0, sigma0^2): entries ~ N(0, embedding_std^2)
    assert prompts.std() == pytest.approx(model_info.embedding_std, rel=0.1)


def test_config_validation(model_info):
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        BBTTuner(model_info, {"prompt_tokens": 65})
    with pytest.raises(Exception):
        BBTConfig(popsize=1)
    with pytest.raises(Exception):
        BBTConfig(unknown=1)


def test_two_stage_continues_as_a_compass_search_from_the_cma_best_and_resumes_exactly(model_info, straight_and_resumed):
    from bbt_client.search.compass import CompassSearch

    target = np.random.default_rng(5).normal(size=(4, 16)).astype(np.float32) * 0.05
    cfg = {**SMALL, "local_after_calls": 3 * 8, "local_step": 0.5}
    t = BBTTuner(model_info, cfg, seed=8)
    for _ in range(3):
        c = t.ask().candidates
        t.tell(distance_loss(c, target))
    assert isinstance(t._es, CompassSearch) and t.phase.endswith("compass search")
    at_switch = t.best_loss
    centre = t._es.mean
    np.testing.assert_allclose(t.prompts(centre), t.best_prompt(), atol=1e-6)  # it starts at the CMA-ES best
    t.ask()
    steps = t._pending_z - centre
    assert np.all((steps != 0).sum(axis=1) == 1) and np.allclose(np.abs(steps[steps != 0]), 0.5)
    t.tell(distance_loss(t._pending_prompts, target))
    for _ in range(20):
        t.tell(distance_loss(t.ask().candidates, target))
    assert t.best_loss < at_switch  # the local stage keeps improving the loss

    def gen(tuner):
        c = tuner.ask().candidates
        tuner.tell(distance_loss(c, target))
        return c

    full, resumed = straight_and_resumed(lambda: BBTTuner(model_info, cfg, seed=8), gen, generations=7, split=4)
    assert all(np.array_equal(x, y) for x, y in zip(full, resumed))
    plain = BBTTuner(model_info, SMALL, seed=8)
    with pytest.raises(ConfigError):  # a checkpoint of the two-stage run does not resume a one-stage config
        plain.load_state_dict(t.state_dict())
