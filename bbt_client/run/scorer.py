"""Scoring a task's splits through the budget: label-word sets, content-free calibration, accuracy and loss.

Kept apart from the run loop (:mod:`bbt_client.run.job`) so that what a score *means* (which words, calibrated
or raw, which loss) is decided in one place, and the loop only decides *when* to score.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from bbt_client.backends.base import Backend, PromptBatch, ScoreJob
from bbt_client.backends.scoring import coverage
from bbt_client.errors import ConfigError, UnsupportedError
from bbt_client.run.budget import Budget
from bbt_client.run.ledger import BudgetLedger
from bbt_client.run.metered import MeteredScorer
from bbt_client.tasks import calibration
from bbt_client.tasks.datasets import TaskData
from bbt_client.tasks.losses import accuracy, cross_entropy, hinge
from bbt_client.tasks.fitted_verbalizer import FittedVerbalizer, fit_on_dev
from bbt_client.tasks.verbalizer import candidate_words, class_logits, flat_words, select_words

log = logging.getLogger(__name__)


class TaskScorer:
    """Scores prompts on ``data``'s splits (``"train"``, ``"dev"``, ``"test"``) under ``budget``.

    ``state`` is the run's checkpointed state: the scorer adds the endpoint's own counts of every call to its
    ``endpoint_calls``/``endpoint_tokens``, every score's label scores and floored ones to its
    ``label_scores``/``floored_label_scores``, and reads its ``calibrated`` choice (None until made on dev), which
    applies when the method's ``calibrate`` option (``calibrate_option``) is ``"auto"``.
    """

    def __init__(self, backend: Backend, budget: Budget, ledger: BudgetLedger | None, elapsed: Callable[[], float],
                 data: TaskData, loss: str, state: Any):
        self.backend, self.data, self.state = backend, data, state
        self.metered = MeteredScorer(backend, budget, ledger, elapsed)
        self.loss_fn = cross_entropy if loss == "ce" else hinge
        self.calibrate_option: bool | str = False
        #: Coverage of the last score alone (see :attr:`label_score_coverage`).
        self.last_coverage: float | None = None

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
        split, task = getattr(self.data, split_name), self.data.task
        texts, pairs, m = list(split.texts), split.text_pairs, 0
        if self.calibrate:
            texts = calibration.with_content_free(split.texts)
            m = len(texts) - len(split.texts)
            pairs = None if pairs is None else calibration.with_content_free(pairs)
        job = ScoreJob(template=task.template, texts=texts, text_pairs=pairs, label_words=task.scored_words,
                       prompts=prompts)
        scores = await self._score_job(split_name, job, reserve_after)
        logits = task.class_logits(scores, training=split_name == "train")
        if not m:
            return logits, None
        return calibration.split_content_free(logits, m), calibration.calibrate(logits, m)

    def metrics(self, split_name: str, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-candidate accuracy and loss (C,) of (C, N, K) class logits on a split."""
        labels = getattr(self.data, split_name).labels
        return accuracy(logits, labels), self.loss_fn(logits, labels)

    async def resolve_scoring(self) -> dict:
        """How the run reads label scores (``state.scoring``): a resumed run's choice reapplied, else the backend's
        told strategy, else (``scoring=auto``) the one a probe of the endpoint picks; probe requests that run the
        model are counted in the budget. A model the endpoint does not serve, or prompt embeddings it refuses, stop
        the run here, before any score."""
        words = flat_words(self.data.task.word_sets)
        if self.state.scoring is not None:
            self.backend.apply_scoring(self.state.scoring.get("facts") or {})
            return self.state.scoring
        report = None
        if self.backend.scoring_option == "auto":
            report = await self.backend.probe(self._counted_probe, words)
            if report.get("model_served") is False:
                raise ConfigError(f"the endpoint does not serve model {report.get('model')!r}; it serves "
                                  f"{report.get('models')} (set the backend option model)")
            if report.get("prompt_embeds") is False:
                raise UnsupportedError(f"the endpoint refused prompt embeddings ({report.get('prompt_embeds_refused')}"
                                       "); start vLLM with --enable-prompt-embeds")
        scoring = self.backend.scoring(len(words)).as_dict()
        if report is not None:
            scoring["probe"] = {k: v for k, v in report.items() if k != "scoring"}
        self.state.scoring = scoring
        log.info("label scoring: %s", self.scoring_line())
        return scoring

    async def _counted_probe(self, factory):
        """One probe request through the budget; what the endpoint metered is added to its own count too."""
        async def tracked():
            value, tokens = await factory()
            self.state.endpoint_calls += 1
            self.state.endpoint_tokens += int(tokens)
            return value, tokens

        return await self.metered.call("probe", tracked)

    def scoring_line(self) -> str:
        """One line for logs and progress: the strategy, whether exact, its cost."""
        sc = self.state.scoring
        if not sc:
            return ""
        how = "exact" if sc["exact"] else "labels outside what the endpoint returns are floored"
        return f"scoring {sc['strategy']} ({how}; {sc['cost']})"

    async def check_coverage(self, allow_floored: bool, reserve_after: int, minimum: float = 0.9) -> float | None:
        """With a strategy that may floor labels, score the bare template on the training texts once (counted) and
        refuse to tune when under ``minimum`` of the label scores are the endpoint's own values, unless
        ``allow_floored``. Exact strategies need no such call. Returns the coverage measured (None: not needed)."""
        st = self.state
        if (st.scoring or {}).get("exact", True) or st.zero_shot_train_coverage is not None:
            return st.zero_shot_train_coverage
        await self.score("train", PromptBatch.zero_shot(), reserve_after=reserve_after)
        st.zero_shot_train_coverage = cov = self.last_coverage
        if cov is not None and cov < minimum and not allow_floored:
            k = (st.scoring.get("facts") or {}).get("top_logprobs")
            raise ConfigError(
                f"only {cov:.0%} of the zero-shot label scores on the training texts are the endpoint's own values "
                f"(scoring {st.scoring['strategy']}); the rest are floors put below what it returned, so tuning "
                "would optimise made-up numbers. Fixes: echo scoring (--backend-opt scoring=echo where the endpoint "
                "supports echo or prompt_logprobs; bbt probe tells), fewer or other label words (ones the model "
                f"ranks in its top {k or 'k'} next tokens), or an instruction in the template that lists the labels; "
                "or --allow-floored-scores to tune anyway")
        return cov

    async def search_verbalizer(self, per_class: int, reserve_after: int) -> tuple[tuple[str, ...], ...]:
        """Choose ``per_class`` label words per class from the training texts, spending one call (see
        :mod:`bbt_client.tasks.verbalizer`); candidates that are not one token for the endpoint are dropped first."""
        task, train = self.data.task, self.data.train
        words, owners = await self._single_token_candidates(2 * per_class, None, per_class, "search_label_words")
        logits = await self.score("train", PromptBatch.zero_shot(), reserve_after=reserve_after, words=words)
        found = tuple(tuple(words[v] for v in cols)
                      for cols in select_words(logits[0], train.labels, owners, task.num_classes, per_class))
        log.info("label words found on the training texts: %s", {c: list(ws) for c, ws in zip(task.class_names, found)})
        return found

    async def _single_token_candidates(self, pool_size: int, limit: int | None, at_least: int,
                                       option: str) -> tuple[list[str], list[int]]:
        """Candidate words from the training texts (``pool_size`` per class at least, see
        :func:`~bbt_client.tasks.verbalizer.candidate_words`) that are one token for the endpoint, one word per
        token id (an uncased vocabulary merges cases), the task's label words first; at most ``limit`` per class;
        and the class each serves. Fewer than ``at_least`` for a class is a :class:`ConfigError` naming
        ``option``. Tokenizing does no model work and is not billed."""
        task, train = self.data.task, self.data.train
        pools = candidate_words(train.texts, train.labels, task.num_classes, task.label_words, pool_size)
        spelled = await self.backend.tokenize(words=[w for pool in pools for w in pool])
        ids = {t.word: t.ids for t in spelled.words}
        words, owners, by_id = [], [], set()
        for k, w in [(k, p[0]) for k, p in enumerate(pools)] + [(k, w) for k, p in enumerate(pools) for w in p[1:]]:
            if len(ids.get(w, ())) == 1 and ids[w][0] not in by_id and (limit is None or owners.count(k) < limit):
                by_id.add(ids[w][0])
                words.append(w)
                owners.append(k)
        short = [task.class_names[k] for k in range(task.num_classes) if owners.count(k) < at_least]
        if short:
            raise ConfigError(f"fewer than {at_least} candidate label words are single tokens for this endpoint "
                              f"for class(es) {short}; lower {option}")
        return words, owners

    async def fit_verbalizer(self, per_class: int, reserve_after: int) -> tuple[FittedVerbalizer, bool]:
        """Fit class weights over up to ``per_class`` candidate words per class (see
        :mod:`bbt_client.tasks.fitted_verbalizer`): one call scores them on the training texts, one on dev, both
        with the bare template, raw. Returns the fit and whether it reads dev better than the task's own words
        (which are among the candidates, so the same dev call reads them)."""
        task, train, dev = self.data.task, self.data.train, self.data.dev
        words, _ = await self._single_token_candidates(per_class, per_class, 1, "fit_verbalizer")
        zero = PromptBatch.zero_shot()
        on_train = await self.score("train", zero, reserve_after=reserve_after + 1, words=words)
        on_dev = await self.score("dev", zero, reserve_after=reserve_after, words=words)
        fitted, fitted_acc = fit_on_dev(on_train[0], train.labels, on_dev[0], dev.labels, task.num_classes, words)
        own_acc = self._dev_accuracy(on_dev, words, task.word_sets)
        better = fitted_acc > own_acc
        log.info("fitted verbalizer over %d words (l2 %g) on dev, bare template: %.3f, the task's own words %.3f: %s",
                 len(words), fitted.l2, fitted_acc, own_acc, "the fit is used" if better else "the task's own are kept")
        return fitted, better

    async def keep_better_words(self, found: tuple[tuple[str, ...], ...],
                                reserve_after: int) -> tuple[tuple[str, ...], ...]:
        """``found`` if the bare template reads dev better with them than with the task's own words, else the
        task's own: words picked on the training texts can fail to transfer, and the whole run is read through
        them. One call: both sets scored together, raw."""
        own = self.data.task.word_sets
        words = list(dict.fromkeys(flat_words(own) + flat_words(found)))
        logits = await self.score("dev", PromptBatch.zero_shot(), reserve_after=reserve_after, words=words)
        acc = [self._dev_accuracy(logits, words, sets) for sets in (found, own)]
        keep = acc[0] > acc[1]
        log.info("label words on dev, bare template: searched %.3f, the task's own %.3f: %s", *acc,
                 "the searched words are used" if keep else "the task's own are kept")
        return found if keep else own

    def _dev_accuracy(self, logits: np.ndarray, words: Sequence[str], sets: Sequence[Sequence[str]]) -> float:
        """Dev accuracy of the word sets ``sets``, read from (1, N, V) dev scores of ``words`` (which hold them)."""
        cols = [words.index(w) for w in flat_words(sets)]
        return float(accuracy(class_logits(logits[..., cols], sets), self.data.dev.labels)[0])

    async def _score_job(self, split_name: str, job: ScoreJob, reserve_after: int) -> np.ndarray:
        result = await self.metered.score(split_name, job, reserve_after)
        self.state.endpoint_calls += result.endpoint_calls if result.endpoint_calls is not None else job.num_calls
        self.state.endpoint_tokens += int(result.tokens)
        self.state.label_scores += result.label_scores
        self.state.floored_label_scores += int(result.floored_scores)
        self.last_coverage = coverage(result.label_scores, int(result.floored_scores))
        return result.logits

    @property
    def label_score_coverage(self) -> float | None:
        """Exact label scores / all label scores over the run so far (None before any score)."""
        return coverage(self.state.label_scores, self.state.floored_label_scores)
