"""Scoring a task's splits through the budget: label-word sets, content-free calibration, accuracy and loss.

Kept apart from the run loop (:mod:`bbt_client.run.job`) so that what a score *means* (which words, calibrated
or raw, which loss) is decided in one place, and the loop only decides *when* to score.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from bbt_client.backends.base import Backend, PromptBatch, ScoreJob
from bbt_client.errors import ConfigError
from bbt_client.run.budget import Budget
from bbt_client.run.ledger import BudgetLedger
from bbt_client.run.metered import MeteredScorer
from bbt_client.tasks import calibration
from bbt_client.tasks.datasets import TaskData
from bbt_client.tasks.losses import accuracy, cross_entropy, hinge
from bbt_client.tasks.verbalizer import candidate_words, class_logits, flat_words, select_words

log = logging.getLogger(__name__)


class TaskScorer:
    """Scores prompts on ``data``'s splits (``"train"``, ``"dev"``, ``"test"``) under ``budget``.

    ``state`` is the run's checkpointed state: the scorer adds the endpoint's own counts of every call to its
    ``endpoint_calls``/``endpoint_tokens`` and reads its ``calibrated`` choice (None until made on dev), which
    applies when the method's ``calibrate`` option (``calibrate_option``) is ``"auto"``.
    """

    def __init__(self, backend: Backend, budget: Budget, ledger: BudgetLedger | None, elapsed: Callable[[], float],
                 data: TaskData, loss: str, state: Any):
        self.backend, self.data, self.state = backend, data, state
        self.metered = MeteredScorer(backend, budget, ledger, elapsed)
        self.loss_fn = cross_entropy if loss == "ce" else hinge
        self.calibrate_option: bool | str = False

    @property
    def calibrate(self) -> bool:
        """Content-free calibration (Zhao et al. 2021) of every scoring but the label-word search; ``"auto"`` scores
        both ways until the dev choice."""
        if self.calibrate_option == "auto":
            return True if self.state.calibrated is None else self.state.calibrated
        return self.calibrate_option is True

    async def score(self, split_name: str, prompts: PromptBatch, reserve_after: int = 0,
                    words: Sequence[str] | None = None) -> np.ndarray:
        """(C, N, K) class logits of ``prompts`` on a split (calibrated when the run calibrates), budget reserved
        first; ``reserve_after`` calls must stay free. ``words``: score these words instead and return their
        (C, N, V) logits as they are."""
        if words is not None:
            split = getattr(self.data, split_name)
            job = ScoreJob(template=self.data.task.template, texts=split.texts, text_pairs=split.text_pairs,
                           label_words=list(words), prompts=prompts)
            return await self._score_job(split_name, job, reserve_after)
        raw, calibrated = await self.score_both(split_name, prompts, reserve_after)
        return calibrated if calibrated is not None else raw

    async def score_both(self, split_name: str, prompts: PromptBatch,
                         reserve_after: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw (C, N, K) class logits, and the calibrated ones from the same call (None when not calibrating):
        with calibration the content-free inputs ride along in each candidate's call (their tokens are counted)."""
        split = getattr(self.data, split_name)
        sets = self.data.task.word_sets
        texts, pairs, m = list(split.texts), split.text_pairs, 0
        if self.calibrate:
            texts = calibration.with_content_free(split.texts)
            m = len(texts) - len(split.texts)
            pairs = None if pairs is None else calibration.with_content_free(pairs)
        job = ScoreJob(template=self.data.task.template, texts=texts, text_pairs=pairs,
                       label_words=flat_words(sets), prompts=prompts)
        logits = class_logits(await self._score_job(split_name, job, reserve_after), sets)
        if not m:
            return logits, None
        return calibration.split_content_free(logits, m), calibration.calibrate(logits, m)

    def metrics(self, split_name: str, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-candidate accuracy and loss (C,) of (C, N, K) class logits on a split."""
        labels = getattr(self.data, split_name).labels
        return accuracy(logits, labels), self.loss_fn(logits, labels)

    async def search_verbalizer(self, per_class: int, reserve_after: int) -> tuple[tuple[str, ...], ...]:
        """Choose ``per_class`` label words per class from the training texts, spending one call (see
        :mod:`bbt_client.tasks.verbalizer`); candidates that are not one token for the endpoint are dropped first."""
        task, train = self.data.task, self.data.train
        pools = candidate_words(train.texts, train.labels, task.num_classes, task.label_words, 2 * per_class)
        spelled = await self.backend.tokenize(words=[w for pool in pools for w in pool])  # not billed: no model work
        ids = {t.word: t.ids for t in spelled.words}
        words, owners, by_id = [], [], set()  # one word per token id: an uncased vocabulary merges cases
        for k, pool in enumerate(pools):
            for w in pool:
                if len(ids.get(w, ())) == 1 and ids[w][0] not in by_id:
                    by_id.add(ids[w][0])
                    words.append(w)
                    owners.append(k)
        short = [task.class_names[k] for k in range(task.num_classes) if owners.count(k) < per_class]
        if short:
            raise ConfigError(f"fewer than {per_class} candidate label words are single tokens for this endpoint "
                              f"for class(es) {short}; lower search_label_words")
        logits = await self.score("train", PromptBatch.zero_shot(), reserve_after=reserve_after, words=words)
        found = tuple(tuple(words[v] for v in cols)
                      for cols in select_words(logits[0], train.labels, owners, task.num_classes, per_class))
        log.info("label words found on the training texts: %s", {c: list(ws) for c, ws in zip(task.class_names, found)})
        return found

    async def _score_job(self, split_name: str, job: ScoreJob, reserve_after: int) -> np.ndarray:
        result = await self.metered.score(split_name, job, reserve_after)
        self.state.endpoint_calls += result.endpoint_calls if result.endpoint_calls is not None else job.num_calls
        self.state.endpoint_tokens += int(result.tokens)
        return result.logits
