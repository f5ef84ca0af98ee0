"""The job loop with a text-prompt method against an in-memory text endpoint: content-free calibration rides in
each candidate's call, calls are counted per candidate, result.json carries prompt_text, evaluate reproduces it.

The toy endpoint prefers class 0 by a wide margin whatever the input (as the bundled tied-head model prefers one
AG News class), and the text's true label adds a smaller margin, so raw accuracy is the class-0 share while
calibrated accuracy is perfect: what calibration is for. A longer prompt widens the true label's margin, so
the search has something to find beyond the bare template (which the job keeps unless a prompt beats it on dev).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from bbt_client.backends.base import Backend, ScoreJob, ScoreResult
from bbt_client.tasks.calibration import CONTENT_FREE_INPUTS
from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
from bbt_client.errors import UnsupportedError
from bbt_client.run.job import evaluate_run, tune
from bbt_client.methods.registry import make_config
from bbt_client.protocol import ModelInfo, TokenizeResponse, WordTokens
from bbt_client.run.results import load_result
from bbt_client.tasks.datasets import load_task_data


class TextToyBackend(Backend):
    supported_prompts = frozenset({"none", "text"})

    def __init__(self, labels_by_text: dict[str, int]):
        self.labels = labels_by_text
        self.calls = 0
        self.jobs: list[ScoreJob] = []

    async def model_info(self) -> ModelInfo:
        return ModelInfo(name="toy-text", kind="causal", architecture="Toy", hidden_size=1, num_layers=1,
                         max_seq_len=128, vocab_size=1, embedding_std=0.0, hidden_std=[0.0], max_prompt_tokens=0,
                         max_candidates=1, max_texts=4096, max_body_bytes=1 << 26, device="cpu")

    async def tokenize(self, words=(), texts=()) -> TokenizeResponse:
        return TokenizeResponse(words=[WordTokens(word=w, ids=[1]) for w in words],
                                text_token_counts=[len(t.split()) for t in texts])

    async def score(self, job: ScoreJob) -> ScoreResult:
        self.jobs.append(job)
        prompts = job.prompts.texts if job.prompts.kind == "text" else ("",)
        c, n = len(prompts), len(job.texts)
        logits = np.zeros((c, n, 2), np.float32)
        logits[..., 0] = 4.0  # the template's bias
        for k, p in enumerate(prompts):
            for i, t in enumerate(job.texts):
                if t in self.labels:
                    logits[k, i, self.labels[t]] += 2.0 + self.prompt_effect(p, t)
        self.calls += c
        return ScoreResult(logits=logits, tokens=c * n * 5)

    @staticmethod
    def prompt_effect(prompt: str, text: str) -> float:
        return 0.02 * len(prompt)  # a longer prompt is surer of the right label: lower loss, same accuracy


class HarmfulPromptBackend(TextToyBackend):
    """Every non-empty prompt scrambles the label margin text by text: no prompt beats the bare template."""

    @staticmethod
    def prompt_effect(prompt: str, text: str) -> float:
        return 0.0 if not prompt else -4.0 * (zlib.crc32(f"{prompt}|{text}".encode()) % 2)


class MisleadingContentFreeBackend(TextToyBackend):
    """No template bias on real texts, but the content-free inputs lean to class 1: calibrating would subtract a
    bias the texts do not have."""

    async def score(self, job: ScoreJob) -> ScoreResult:
        res = await super().score(job)
        logits = res.logits.copy()
        logits[..., 0] -= 4.0
        for i, t in enumerate(job.texts):
            if t in CONTENT_FREE_INPUTS:
                logits[:, i, 1] += 6.0
        return ScoreResult(logits=logits, tokens=res.tokens)


@pytest.fixture(scope="module")
def labels_by_text():
    cfg = TaskConfig(name="sst2", shots=4, test_limit=40)
    data = load_task_data(cfg, 7)
    return {t: int(y) for split in (data.train, data.dev, data.test) for t, y in zip(split.texts, split.labels)}


def _config(tmp_path, method="bdpl", calls=40, **opts) -> TuneConfig:
    return TuneConfig(endpoint=EndpointConfig(url="http://toy.invalid", backend="openai"),
                      # this toy reads two words whatever it is asked: the task's own, no fitted verbalizer
                      task=TaskConfig(name="sst2", shots=4, test_limit=40, fit_verbalizer=0), method=method, seed=7,
                      budget={"calls": calls, "tokens": 100_000},
                      method_options={"prompt_tokens": 2, "popsize": 4, "vocab_size": 8, **opts},
                      eval_every=2, out=tmp_path / "run")


@pytest.mark.parametrize("method", ["bdpl", "cmaes-tokens"])
async def test_calibrated_text_run_and_evaluate(tmp_path, labels_by_text, method):
    backend = TextToyBackend(labels_by_text)
    cfg = _config(tmp_path, method)
    result = await tune(cfg, backend=backend)
    n_train = len(load_task_data(cfg.task, cfg.seed).train.texts)
    gen_jobs = [j for j in backend.jobs if j.prompts.kind == "text" and j.prompts.num_candidates == 4]
    assert gen_jobs and all(list(j.texts[n_train:]) == list(CONTENT_FREE_INPUTS) for j in gen_jobs)
    assert all(len(j.texts) == n_train + len(CONTENT_FREE_INPUTS) for j in gen_jobs)
    assert result.api_calls_used == backend.calls <= 40  # content-free inputs cost tokens, not calls
    assert result.tokens_used <= 100_000 and result.calibrated and result.prompt_kind == "text"
    test_share0 = np.mean([labels_by_text[t] == 0 for t in load_task_data(cfg.task, cfg.seed).test.texts])
    assert result.zero_shot_test_accuracy == pytest.approx(test_share0)  # raw: class 0 everywhere
    assert result.zero_shot_calibrated_test_accuracy == 1.0 and result.test_accuracy == 1.0
    assert result.prompt_text and len(result.prompt_text.split()) >= 2
    assert load_result(cfg.out).prompt_text == result.prompt_text and not (cfg.out / "prompt.npy").exists()
    again = await evaluate_run(cfg.out, backend=TextToyBackend(labels_by_text))
    assert again["matches"] and again["test_accuracy"] == 1.0


async def test_the_bare_template_is_kept_when_no_prompt_beats_it_on_dev(tmp_path, labels_by_text):
    backend = HarmfulPromptBackend(labels_by_text)
    cfg = _config(tmp_path)
    result = await tune(cfg, backend=backend)
    assert result.prompt_text == "" and result.best_generation == 0  # the empty prompt, chosen before generation 1
    assert result.generations > 0 and result.api_calls_used == backend.calls <= 40  # it still searched, in budget
    assert result.test_accuracy == result.zero_shot_calibrated_test_accuracy == 1.0
    again = await evaluate_run(cfg.out, backend=HarmfulPromptBackend(labels_by_text))
    assert again["matches"]


async def test_auto_calibration_reads_raw_when_calibrating_hurts_on_dev(tmp_path, labels_by_text):
    backend = MisleadingContentFreeBackend(labels_by_text)
    result = await tune(_config(tmp_path), backend=backend)
    assert result.calibrated is False and result.test_accuracy == 1.0
    assert result.zero_shot_test_accuracy == 1.0 > result.zero_shot_calibrated_test_accuracy  # both were read
    gen_jobs = [j for j in backend.jobs if j.prompts.kind == "text" and j.prompts.num_candidates == 4]
    assert gen_jobs and not any("N/A" in j.texts for j in gen_jobs)  # decided before generation 1: no extra tokens
    again = await evaluate_run(cfg_out := tmp_path / "run", backend=MisleadingContentFreeBackend(labels_by_text))
    assert again["matches"] and load_result(cfg_out).calibrated is False
    with pytest.raises(ValueError, match="empty_prompt_baseline"):
        make_config("bdpl", {"empty_prompt_baseline": False})
    assert make_config("bdpl", {"empty_prompt_baseline": False, "calibrate": True}).calibrate is True


async def test_uncalibrated_run_scores_only_the_texts(tmp_path, labels_by_text):
    backend = TextToyBackend(labels_by_text)
    result = await tune(_config(tmp_path, calibrate=False), backend=backend)
    assert not result.calibrated and result.zero_shot_calibrated_test_accuracy is None
    assert not any("N/A" in j.texts for j in backend.jobs)
    assert result.test_accuracy < 1.0  # the bias wins without calibration


async def test_text_methods_refused_by_backends_without_text(tmp_path, labels_by_text):
    backend = TextToyBackend(labels_by_text)
    backend.supported_prompts = frozenset({"none", "shallow"})
    with pytest.raises(UnsupportedError, match="text prompts"):
        await tune(_config(tmp_path), backend=backend)
    assert backend.calls == 0  # refused before anything was spent


@pytest.mark.parametrize("method", ["bdpl", "cmaes-tokens"])
async def test_no_prompt_is_paid_for_twice(tmp_path, labels_by_text, method):
    """A small search space makes the search propose repeats: none reaches the endpoint twice, on train or dev."""
    backend = TextToyBackend(labels_by_text)
    cfg = _config(tmp_path, method, calls=14, vocab_size=4, lr=0.3) if method == "bdpl" else \
        _config(tmp_path, method, calls=14, vocab_size=4)
    result = await tune(cfg, backend=backend)
    data = load_task_data(cfg.task, cfg.seed)
    sent: dict[str, list[str]] = {"train": [], "dev": []}
    for j in backend.jobs:
        split = "train" if data.train.texts[0] in j.texts else "dev" if data.dev.texts[0] in j.texts else None
        if split and j.prompts.kind == "text":
            sent[split] += list(j.prompts.texts)
    assert sent["train"] and len(sent["train"]) == len(set(sent["train"]))
    assert len(sent["dev"]) == len(set(sent["dev"]))
    assert result.metrics["from_cache"] > 0  # repeats were proposed, and answered from the cache


async def test_the_tasks_own_label_words_stay_out_of_the_vocabulary_after_a_word_search(tmp_path, labels_by_text):
    from bbt_client.methods.text.bdpl import BDPLTuner
    from bbt_client.tasks.datasets import get_task
    import dataclasses

    task = get_task("sst2")
    searched = dataclasses.replace(task, verbalizer=(("poor",), ("fine",)))
    train = load_task_data(TaskConfig(name="sst2", shots=4), 7).train
    texts = tuple(f"{t} bad great" for t in train.texts)  # the label words are the most frequent words here
    vocab = BDPLTuner(None, {"vocab_size": 30}, 7, task=searched, train=dataclasses.replace(train, texts=texts)).vocabulary
    assert not any(w in entry.split() for entry in vocab for w in ("bad", "great", "poor", "fine"))
