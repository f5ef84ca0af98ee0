"""Re-score a finished run's tuned prompt on its test set (``bbt evaluate``), exactly as the run scored it.

Kept apart from the tuning loop: no budget, no checkpoint, one request. The prompt comes from the run directory
(``prompt.npy``, or result.json's ``prompt_text`` for text methods), scored with the run's (searched or fitted)
verbalizer and, when the run calibrated, with the same content-free inputs alongside.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from bbt_client.tasks import calibration
from bbt_client.backends import make_backend
from bbt_client.backends.base import Backend, PromptBatch, ScoreJob
from bbt_client.config import TuneConfig
from bbt_client.tasks.losses import accuracy
from bbt_client.methods.registry import make_config
from bbt_client.tasks.datasets import load_task_data
from bbt_client.tasks.fitted_verbalizer import FittedVerbalizer


def prompt_batch(kind: str, prompt: np.ndarray | str | None, method_config: Any = None) -> PromptBatch:
    """One prompt as a single-candidate batch, in the prompt mode (and slot tokens) of the method's config;
    a ``text`` prompt is its string; None or a continuous prompt of no tokens is the bare template."""
    if prompt is None or (kind != "text" and np.size(prompt) == 0):
        return PromptBatch.zero_shot()
    if kind == "text":
        if not isinstance(prompt, str):
            raise TypeError("a text prompt travels as its string")
        return PromptBatch.from_texts([prompt])
    slots = {"mode": getattr(method_config, "prompt_mode", "replace"),
             "slot_token_ids": getattr(method_config, "slot_token_ids", None)}
    if kind == "deep":
        return PromptBatch(kind="deep", base=np.asarray(prompt, dtype=np.float32), **slots)
    return PromptBatch(kind="shallow", candidates=np.asarray(prompt, dtype=np.float32)[None], **slots)


async def evaluate_run(run_dir: Path, *, backend: Backend | None = None, config: TuneConfig | None = None) -> dict:
    """Re-score a finished run's tuned prompt on its test set: reproduces ``test_accuracy`` of result.json."""
    from bbt_client.run.results import load_result, read_prompt

    run_dir = Path(run_dir)
    result = load_result(run_dir)
    cfg = config or TuneConfig.model_validate(result.config)
    prompt = result.prompt_text if result.prompt_kind == "text" else read_prompt(run_dir)
    data = load_task_data(cfg.task, cfg.seed)
    task = dataclasses.replace(data.task, verbalizer=tuple(tuple(ws) for ws in result.verbalizer)
                               if result.verbalizer else None,
                               fitted=FittedVerbalizer.from_dict(result.fitted_verbalizer)
                               if result.fitted_verbalizer_used else None)
    texts, pairs, m = list(data.test.texts), data.test.text_pairs, 0
    if result.calibrated:  # re-score as the run scored: with the content-free inputs alongside
        texts = calibration.with_content_free(data.test.texts)
        m = len(texts) - len(data.test.texts)
        pairs = None if pairs is None else calibration.with_content_free(pairs)
    owns = backend is None
    backend = backend or make_backend(cfg.endpoint)
    if result.scoring:  # read the labels the way the run read them
        backend.apply_scoring(result.scoring.get("facts") or {})
    try:
        job = ScoreJob(template=result.template or data.task.template, texts=texts, text_pairs=pairs,
                       label_words=task.scored_words,
                       prompts=prompt_batch(result.prompt_kind, prompt, make_config(cfg.method, cfg.method_options)))
        scored = await backend.score(job)
    finally:
        if owns:
            await backend.aclose()
    logits = task.class_logits(scored.logits)
    if m:
        logits = calibration.calibrate(logits, m)
    acc = float(accuracy(logits, data.test.labels)[0])
    return {"run": str(run_dir), "test_accuracy": acc, "recorded_test_accuracy": result.test_accuracy,
            "matches": result.test_accuracy is not None and abs(acc - result.test_accuracy) < 1e-9,
            "test_examples": len(data.test.labels)}
