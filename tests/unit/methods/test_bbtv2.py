import numpy as np
import pytest

from bbt_client.errors import ConfigError
from bbt_client.tasks.losses import cross_entropy
from bbt_client.methods.bbtv2 import BBTv2Config, BBTv2Tuner

SMALL = dict(intrinsic_dim=20, prompt_tokens=4, popsize=8)


def test_ask_is_deep_with_base_layer_candidates(model_info):
    t = BBTv2Tuner(model_info, SMALL, seed=1)
    batch = t.ask()
    assert batch.kind == "deep" and batch.layer == 0
    assert batch.base.shape == (3, 4, 16) and batch.candidates.shape == (8, 4, 16)
    assert batch.full().shape == (8, 3, 4, 16)
    assert t.prompt_kind == "deep" and t.popsize == 8


def test_round_robin_schedule_and_held_prompts(model_info):
    t = BBTv2Tuner(model_info, {**SMALL, "generations_per_layer": 2}, seed=1)
    layers = []
    for g in range(12):
        batch = t.ask()
        layers.append(batch.layer)
        before = t.current_prompt()
        t.tell(np.arange(8.0) + g)  # candidate 0 is always this generation's best
        after = t.current_prompt()
        other = [l for l in range(3) if l != batch.layer]
        assert np.array_equal(before[other], after[other])  # only the optimised layer moves
    assert layers == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert t.round == 2 and t.phase == "layer 1/3, round 3"


def test_layer_scales_follow_embedding_and_hidden_std(model_info):
    t = BBTv2Tuner(model_info, {"intrinsic_dim": 100, "prompt_tokens": 8, "init_prompt": "zeros"}, seed=0)
    expected = [model_info.embedding_std, model_info.hidden_std[1], model_info.hidden_std[2]]
    for layer in range(3):
        batch = t.ask()
        assert batch.layer == layer
        assert batch.candidates.std() == pytest.approx(expected[layer], rel=0.1)
        t.tell(np.ones(t.popsize))


def test_decreases_cross_entropy_on_linear_toy_model(model_info, toy_model):
    model = toy_model(model_info.hidden_size)
    t = BBTv2Tuner(model_info, SMALL, seed=0)
    start = cross_entropy(model.logits(t.best_prompt()[None]), model.labels)[0]
    for _ in range(30):
        batch = t.ask()
        t.tell(cross_entropy(model.logits(batch.full()), model.labels))
    assert t.best_loss < 0.8 * start
    np.testing.assert_allclose(cross_entropy(model.logits(t.best_prompt()[None]), model.labels)[0], t.best_loss, rtol=1e-6)


@pytest.mark.parametrize("cache_mib", [1024, 0])
def test_resume_bit_identical(model_info, cache_mib, straight_and_resumed):
    target = np.random.default_rng(5).normal(size=(3, 4, 16)).astype(np.float32)
    cfg = {**SMALL, "projection_cache_mib": cache_mib}

    def gen(tuner):
        b = tuner.ask()
        full = b.full()
        tuner.tell(((full - target[None]) ** 2).reshape(len(full), -1).mean(axis=1))
        return b

    full, resumed = straight_and_resumed(lambda: BBTv2Tuner(model_info, cfg, seed=8), gen)
    assert len(full) == len(resumed) == 6
    for x, y in zip(full, resumed):
        assert x.layer == y.layer
        assert np.array_equal(x.base, y.base) and np.array_equal(x.candidates, y.candidates)


def test_tell_validation_best_and_last(model_info):
    t = BBTv2Tuner(model_info, SMALL, seed=2)
    with pytest.raises(ValueError, match="pending"):
        t.tell(np.zeros(8))
    batch = t.ask()
    with pytest.raises(RuntimeError):
        t.ask()
    with pytest.raises(ValueError, match="finite"):
        t.tell(np.r_[np.zeros(7), np.nan])
    with pytest.raises(ValueError, match="expected 8"):
        t.tell(np.zeros(9))
    losses = np.arange(8.0)[::-1]
    t.tell(losses)
    assert np.array_equal(t.best_prompt(), batch.full()[7])
    assert np.array_equal(t.last_candidate_prompts(), batch.full())
    with pytest.raises(ConfigError, match="different"):
        BBTv2Tuner(model_info, SMALL, seed=3).load_state_dict(t.state_dict())


def test_keep_mean_holds_cma_mean(model_info):
    t = BBTv2Tuner(model_info, {**SMALL, "keep": "mean"}, seed=2)
    t.ask()
    t.tell(np.arange(8.0))
    expected = t._project(0, t._optimisers[0].mean)
    assert np.array_equal(t.current_prompt()[0], expected)
    assert BBTv2Config().generations_per_layer == 1


def test_two_stage_re_measures_each_layers_held_prompt_then_probes_single_axes(model_info, straight_and_resumed):
    from bbt_client.search.compass import CompassSearch

    target = np.random.default_rng(5).normal(size=(3, 4, 16)).astype(np.float32)
    cfg = {**SMALL, "local_after_calls": 4 * 8}

    def gen(tuner):
        b = tuner.ask()
        full = b.full()
        tuner.tell(((full - target[None]) ** 2).reshape(len(full), -1).mean(axis=1))
        return b

    t = BBTv2Tuner(model_info, cfg, seed=8)
    for _ in range(4):
        gen(t)
    assert all(isinstance(es, CompassSearch) for es in t._optimisers) and "compass search" in t.phase
    at_switch = t.best_loss
    for _ in range(9):
        b = gen(t)
        np.testing.assert_allclose(b.candidates[0], b.base[b.layer], atol=1e-5)  # row 0: the held prompt, again
        assert not np.array_equal(b.candidates[1], b.base[b.layer])
    assert t.best_loss < at_switch
    full, resumed = straight_and_resumed(lambda: BBTv2Tuner(model_info, cfg, seed=8), gen, generations=8, split=3)
    for x, y in zip(full, resumed):
        assert x.layer == y.layer and np.array_equal(x.base, y.base) and np.array_equal(x.candidates, y.candidates)


def test_joint_schedule_moves_every_layer_from_one_z(model_info):
    t = BBTv2Tuner(model_info, {**SMALL, "schedule": "joint"}, seed=1)
    assert len(t._optimisers) == 1 and t.phase == "all 3 layers"
    for g in range(4):
        batch = t.ask()
        assert batch.kind == "deep" and batch.base is None and batch.layer is None
        assert batch.candidates.shape == (8, 3, 4, 16)
        np.testing.assert_array_equal(t.pending_batch().full(), batch.full())
        z = t._pending[0]
        for layer in range(3):  # every layer is its own projection of the one z
            np.testing.assert_array_equal(batch.candidates[:, layer], t._project(layer, z))
        losses = np.arange(8.0)[::-1] - g  # the last candidate is each generation's best, and a new best
        t.tell(losses)
        assert np.array_equal(t.best_prompt(), batch.candidates[7])
        assert np.array_equal(t.last_candidate_prompts(), batch.candidates)
        held = t._optimisers[0].best_x
        np.testing.assert_array_equal(t.current_prompt(), np.stack([t._project(l, held) for l in range(3)]))
    assert t.layer == 0 and t.round == 0 and t.generation == 4
    with pytest.raises(ConfigError, match="schedule"):  # a checkpoint of the other schedule is refused
        BBTv2Tuner(model_info, SMALL, seed=1).load_state_dict(t.state_dict())


def test_joint_schedule_resumes_bit_identical_and_learns(model_info, toy_model, straight_and_resumed):
    cfg = {**SMALL, "schedule": "joint"}
    model = toy_model(model_info.hidden_size)

    def gen(tuner):
        b = tuner.ask()
        tuner.tell(cross_entropy(model.logits(b.full()), model.labels))
        return b

    full, resumed = straight_and_resumed(lambda: BBTv2Tuner(model_info, cfg, seed=8), gen)
    for x, y in zip(full, resumed):
        assert np.array_equal(x.candidates, y.candidates)
    t = BBTv2Tuner(model_info, cfg, seed=0)
    start = cross_entropy(model.logits(t.best_prompt()[None]), model.labels)[0]
    for _ in range(30):
        gen(t)
    assert t.best_loss < 0.8 * start
