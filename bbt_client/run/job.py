"""The async tuning loop: ask → batched request → tell → checkpoint, under hard budgets.

This is the only module that combines a tuner, an endpoint, a budget and the run directory. Each
generation is one batched request (the whole population), reserved against the budget before it is sent
and checkpointed atomically after it is told, so a crash or Ctrl-C loses at most the generation in flight
and ``resume`` continues bit-identically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bbt_client.run import checkpoint as ckpt
from bbt_client.backends import make_backend
from bbt_client.backends.base import Backend, PromptBatch
from bbt_client.backends.causal_template import check_causal_template
from bbt_client.backends.scoring import WORD_COUNT_FREE
from bbt_client.run.budget import Budget, BudgetUsage
from bbt_client.config import TuneConfig
from bbt_client.errors import BudgetExhausted, CheckpointError, ConfigError, UnsupportedError
from bbt_client.run.ledger import BudgetLedger, LedgerTotals
from bbt_client.run.metered import settle_interrupted
from bbt_client.run.scorer import TaskScorer
from bbt_client.methods.base import Tuner
from bbt_client.methods.registry import make_config, make_tuner, tuner_class
from bbt_client.protocol import ModelInfo
from bbt_client.run.rescore import evaluate_run, prompt_batch
from bbt_client.run.results import CONFIG_FILE, RESULT_FILE, GenerationRecord, RunResult, write_history, write_prompt
from bbt_client.tasks.datasets import TaskData, for_next_token, load_task_data
from bbt_client.tasks.fitted_verbalizer import DEFAULT_PER_CLASS, FittedVerbalizer

log = logging.getLogger("bbt_client.run.job")

ProgressCallback = Callable[["Progress"], None]


@dataclasses.dataclass
class Progress:
    """What the loop reports after every generation (and at start/end) to a progress display."""

    event: str  # "start" | "generation" | "eval" | "end"
    generation: int
    calls_used: int
    budget_calls: int | None
    tokens_used: int
    best_dev_accuracy: float | None
    last_loss: float | None
    phase: str
    record: GenerationRecord | None = None
    message: str = ""


@dataclasses.dataclass
class _State:
    """The loop's own state, checkpointed beside the tuner's."""

    generation: int = 0
    history: list[GenerationRecord] = dataclasses.field(default_factory=list)
    best_dev_accuracy: float | None = None
    best_dev_loss: float | None = None
    best_prompt: np.ndarray | None = None
    best_generation: int | None = None
    last_dev_generation: int | None = None
    zero_shot_test_accuracy: float | None = None
    #: The same call read with content-free calibration (methods with ``calibrate``); None otherwise.
    zero_shot_calibrated_test_accuracy: float | None = None
    zero_shot_dev_accuracy: float | None = None
    wall_seconds: float = 0.0
    #: Spent on requests whose results a crash lost (cumulative over resumes; see :mod:`bbt_client.run.ledger`).
    lost_to_crashes: BudgetUsage = dataclasses.field(default_factory=BudgetUsage)
    #: Spent on requests an interrupt (Ctrl-C) cut off, as the endpoint reported serving them where it could.
    lost_to_interrupts: BudgetUsage = dataclasses.field(default_factory=BudgetUsage)
    #: What the endpoint itself reported spending (calls, tokens) beside the client's own count.
    endpoint_calls: int = 0
    endpoint_tokens: int = 0
    #: Label words per class a ``search_label_words`` run scores (the searched ones or the task's own), fixed.
    verbalizer: tuple[tuple[str, ...], ...] | None = None
    #: What the search found, used or not (the verbalizer is the task's own words when they read dev better).
    searched_verbalizer: tuple[tuple[str, ...], ...] | None = None
    #: What ``fit_verbalizer`` fitted, used or not, and whether it read dev better than the task's own words.
    fitted_verbalizer: FittedVerbalizer | None = None
    fitted_verbalizer_used: bool = False
    #: ``calibrate="auto"``: whether the run calibrates, chosen on dev before generation 1 (None: not yet).
    calibrated: bool | None = None
    #: How label scores are read (``bbt_client.backends.scoring``), chosen before the first score, fixed for the run.
    scoring: dict | None = None
    #: Label scores read over the run, and how many of them were floors (see ``TaskScorer.label_score_coverage``).
    label_scores: int = 0
    floored_label_scores: int = 0
    #: Coverage of the bare template on the training texts, measured once before tuning (floor-prone strategies).
    zero_shot_train_coverage: float | None = None
    #: Dev (accuracy, loss) of every prompt dev-checked, by :func:`_prompt_key`: an unchanged best is not paid again.
    dev_scores: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def __setstate__(self, state: dict) -> None:
        """Checkpoints pickled before a field existed get its default (unpickling skips ``__init__``)."""
        self.__dict__.update(dataclasses.asdict(_State()) | {"lost_to_crashes": BudgetUsage(),
                                                             "lost_to_interrupts": BudgetUsage()} | state)


def _account_crash(ledger: BudgetLedger, counted: BudgetUsage, st: _State) -> BudgetUsage:
    """What a (resumed) run has spent: the ledger's total, which includes work lost after the last checkpoint
    (``counted``); of that difference, what requests an interrupt cut off cost goes to ``st.lost_to_interrupts``
    (an interrupt is not a crash) and the rest to ``st.lost_to_crashes``."""
    totals: LedgerTotals = ledger.totals()
    if totals.next_id == 0 and counted.calls + counted.tokens > 0:
        ledger.open_with(counted)  # a checkpoint from before ledgers existed: start the ledger from it
        return counted.model_copy()
    spent, cut, was_cut = totals.spent, totals.interrupted, st.lost_to_interrupts
    lost = st.lost_to_crashes
    lost.calls += max(0, spent.calls - counted.calls - (cut.calls - was_cut.calls))
    lost.tokens += max(0, spent.tokens - counted.tokens - (cut.tokens - was_cut.tokens))
    lost.cost += max(0.0, spent.cost - counted.cost - (cut.cost - was_cut.cost))
    st.lost_to_interrupts = cut.model_copy()
    return BudgetUsage(calls=max(spent.calls, counted.calls), tokens=max(spent.tokens, counted.tokens),
                       cost=max(spent.cost, counted.cost))


def same_run(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether a checkpoint's config fingerprint admits this resumed config. Method options the checkpoint's config
    did not name may be added (pinned): a default that changed since the run began is set back that way, and
    the tuner's own state check, which knows every value the run used, refuses a pin that differs from it."""
    was, new = dict(saved), dict(now)
    was_opts, new_opts = was.pop("method_options", None) or {}, new.pop("method_options", None) or {}
    return was == new and all(k in new_opts and new_opts[k] == v for k, v in was_opts.items())


def minimum_calls(cfg: TuneConfig, method_config: Any) -> dict[str, int]:
    """The calls a new run spends before it can report a tuned prompt, by step ({} when the method does not say
    how many calls a generation costs): a smaller call budget could only stop with nothing to show."""
    popsize = getattr(method_config, "popsize", None)
    if popsize is None:
        return {}
    steps = {"label-word search and its dev check": 2 if cfg.task.search_label_words else 0,
             "verbalizer fit on train and dev": 2 if fit_per_class(cfg.task, _known_strategy(cfg)) else 0,
             "zero-shot test": 1 if cfg.evaluate_zero_shot else 0,
             "bare-template dev check": 1 if getattr(method_config, "empty_prompt_baseline", False) else 0,
             "one generation": int(popsize),
             # --eval-every 1 reserves generation 1's dev check on top of the final one
             "dev check": 2 if cfg.eval_every == 1 else 1,
             "test evaluation": 1 if cfg.evaluate_test else 0}
    return {k: v for k, v in steps.items() if v}


def _known_strategy(cfg: TuneConfig) -> str | None:
    """The scoring strategy before any call: the server protocol's one, or the one the user told; None: a probe
    will choose."""
    if cfg.endpoint.backend == "server":
        return "full-vocab"
    told = cfg.endpoint.options.get("scoring")
    return None if told in (None, "auto") else str(told)


def fit_per_class(task: Any, strategy: str | None) -> int:
    """Candidate words per class the verbalizer fit uses (0: no fit): the task config's ``fit_verbalizer``, or
    when unset :data:`DEFAULT_PER_CLASS` where ``strategy`` reads any number of words at no extra cost (None:
    not yet known, counted as such) and no label-word search is asked."""
    if task.fit_verbalizer is not None:
        return int(task.fit_verbalizer)
    free = strategy is None or strategy in WORD_COUNT_FREE
    return DEFAULT_PER_CLASS if free and not task.search_label_words else 0


def check_call_budget(cfg: TuneConfig, method_config: Any) -> None:
    """Refuse, before any call, a call budget that cannot pay for one generation and the checks around it."""
    steps = minimum_calls(cfg, method_config)
    need = sum(steps.values())
    if cfg.budget.calls is not None and steps and cfg.budget.calls < need:
        parts = " + ".join(f"{k} {v}" for k, v in steps.items())
        raise ConfigError(f"--budget-calls {cfg.budget.calls} cannot pay for one generation: {parts} = {need} "
                          f"calls; raise --budget-calls to at least {need} (or lower --opt popsize)")


async def check_label_words(backend: Backend, task: Any) -> None:
    """A class is scored by its label word's one token, so a word the endpoint splits is refused here, before any
    scoring call: tokenizing does no model work and is not billed."""
    words = [w for ws in task.word_sets for w in ws]
    spelled = await backend.tokenize(words=words)
    split = [f"{t.word!r} is {len(t.ids)} tokens" for t in spelled.words if len(t.ids) > 1]
    if split:
        raise ConfigError(f"label words must each be one token for this endpoint's tokenizer: {', '.join(split)}; "
                          "choose other words with --label-words")


def for_causal_endpoint(data: TaskData, own_template: bool) -> TaskData:
    """The task as a next-token endpoint must read it, checked before any call: a built-in task's own template
    (``own_template`` False) becomes its ``causal_template`` where it needs one; a template that still does not
    end with ``{mask}`` is refused here rather than after the label-score probe has spent calls."""
    task = data.task if own_template else for_next_token(data.task)
    if task is not data.task:
        log.info("a next-token endpoint reads the answer after the whole input: task %s uses its template %r",
                 task.name, task.template)
    check_causal_template(task.template)
    return dataclasses.replace(data, task=task)


async def _measured_model_info(backend: Backend, info: ModelInfo, method_config: Any, data: TaskData) -> ModelInfo:
    """``info`` with ``hidden_std`` measured on the job's own training texts when the method asks for it
    (``hidden_std_source="train"``, the reference BBTv2 code's statistics); deterministic, so resumes agree."""
    if getattr(method_config, "hidden_std_source", "model") != "train":
        return info
    stats = await backend.layer_stats(
        template=data.task.template, texts=list(data.train.texts), text_pairs=data.train.text_pairs,
        prompt_tokens=method_config.prompt_tokens, slot_token_ids=method_config.slot_token_ids)
    return info.model_copy(update={"hidden_std": stats})


def _prompt_key(prompt: np.ndarray) -> str:
    a = np.ascontiguousarray(prompt)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


class TuningJob:
    """One tuning run. ``await TuningJob(config).run()`` returns the :class:`RunResult` also written to disk."""

    def __init__(
        self,
        config: TuneConfig,
        backend: Backend | None = None,
        progress: ProgressCallback | None = None,
        api_key: str | None = None,
    ):
        self.config = config
        self._backend = backend
        self._owns_backend = backend is None
        self._progress = progress or (lambda p: None)
        self._api_key = api_key
        self.run_dir = Path(config.out) if config.out is not None else None

    # ------------------------------------------------------------------ public

    async def run(self, resume: bool = False) -> RunResult:
        cfg = self.config
        # Input checks that need neither the endpoint nor the run directory come first: a typo costs nothing and
        # leaves no directory behind. The endpoint's own checks (label words) follow before any scoring call.
        data = load_task_data(cfg.task, cfg.seed)
        method_config = make_config(cfg.method, cfg.method_options)
        if not resume:
            check_call_budget(cfg, method_config)
        ledger = None
        if self.run_dir is not None:
            self._prepare_run_dir(resume)
            ledger = BudgetLedger(self.run_dir)
        elif resume:
            raise ConfigError("resuming needs the run directory: set out (bbt tune --resume DIR)")
        saved = self._load_resume_state() if resume else None
        backend = self._backend or make_backend(cfg.endpoint, api_key=self._api_key)
        try:
            return await self._run(backend, data, method_config, saved, ledger)
        finally:
            if self._owns_backend:
                await backend.aclose()

    # ------------------------------------------------------------------ internals

    def _prepare_run_dir(self, resume: bool) -> None:
        """Check the run directory before anything is spent; a new run writes its config.json at once, so the
        CLI's ``--resume`` and Python's ``resume=True`` read one format whichever started the run."""
        if resume and not self.run_dir.is_dir():
            raise CheckpointError(f"run directory {self.run_dir} does not exist: nothing to resume")
        if not resume:
            ckpt.refuse_existing_run(self.run_dir)
        ckpt.ensure_writable_dir(self.run_dir)
        if not resume:
            self.save_config()

    def save_config(self) -> None:
        """``config.json``: what ``bbt tune --resume`` continues with (budgets and options as last accepted)."""
        if self.run_dir is not None:
            ckpt.atomic_write_json(self.run_dir / CONFIG_FILE, self.config.model_dump(mode="json"))

    def _load_resume_state(self) -> dict[str, Any] | None:
        if not (self.run_dir / ckpt.CHECKPOINT_FILE).exists():
            return None  # stopped before its first checkpoint: start over; the ledger keeps what was spent
        saved = ckpt.load_checkpoint(self.run_dir)
        task = saved["fingerprint"].get("task") or {}
        if "fit_verbalizer" not in task and self.config.task.fit_verbalizer is None:
            # made before verbalizer fits existed: it goes on without one
            saved["fingerprint"] = {**saved["fingerprint"], "task": {**task, "fit_verbalizer": 0}}
            self.config = self.config.model_copy(update={"task": self.config.task.model_copy(
                update={"fit_verbalizer": 0})})
        if not same_run(saved["fingerprint"], self.config.fingerprint()):
            raise ConfigError(
                "the checkpoint in {} was made with a different configuration; resume with the same task, "
                "method, seed and options (only budgets, endpoint URL and output may change)".format(self.run_dir)
            )
        return saved

    async def _run(self, backend: Backend, data: TaskData, method_config: Any, saved: dict[str, Any] | None,
                   ledger: BudgetLedger | None) -> RunResult:
        cfg = self.config
        t_start = time.monotonic()
        prompt_kind = tuner_class(cfg.method).prompt_kind
        if prompt_kind not in backend.supported_prompts:
            raise UnsupportedError(
                f"method {cfg.method!r} needs {prompt_kind} prompts, which the {cfg.endpoint.backend!r} "
                f"backend cannot send (it supports: {', '.join(sorted(backend.supported_prompts))})"
            )
        info = await backend.model_info()
        if (info.quantization or "").startswith("int8"):
            log.warning("the endpoint runs int8 weights: what tuning loses depends on how it rounds (BBTv2 on AG "
                        "News: 19 points lost to a per-batch activation scale, torch's stock dynamic int8; under "
                        "one to server_stub's per-token form with float32 outlier channels, 0.485 and 0.496 in two "
                        "three-seed runs against float32's 0.494); if scores look noisy, tune against a float "
                        "endpoint")
        if info.kind == "causal":
            data = for_causal_endpoint(data, own_template=cfg.task.template is not None)
        await check_label_words(backend, data.task)
        info = await _measured_model_info(backend, info, method_config, data)
        st = _State()
        counted = BudgetUsage()  # what the checkpoint knows was spent
        if saved is not None:
            counted = BudgetUsage.model_validate(saved["budget"])
            st = saved["loop"]
        budget = Budget(cfg.budget, counted)
        if ledger is not None:
            await settle_interrupted(ledger, backend, budget.cost_of)
            budget = Budget(cfg.budget, _account_crash(ledger, counted, st))
        if saved is not None or budget.used.calls:
            log.info("resumed at generation %d (%d calls used, %d of them lost to crashes)", st.generation,
                     budget.used.calls, st.lost_to_crashes.calls)
        wall_before = st.wall_seconds
        elapsed = lambda: wall_before + (time.monotonic() - t_start)  # noqa: E731

        scorer = TaskScorer(backend, budget, ledger, elapsed, data, cfg.loss, st)
        ctx = _RunLoop(self, scorer, budget, st, info, elapsed)
        await scorer.resolve_scoring()
        if cfg.task.search_label_words and st.verbalizer is None:
            found = st.searched_verbalizer or await scorer.search_verbalizer(cfg.task.search_label_words,
                                                                             reserve_after=ctx.final_calls + 2)
            st.searched_verbalizer = found
            st.verbalizer = await scorer.keep_better_words(found, reserve_after=ctx.final_calls + 1)
        per_class = fit_per_class(cfg.task, st.scoring["strategy"])
        if per_class and st.fitted_verbalizer is None:
            st.fitted_verbalizer, st.fitted_verbalizer_used = await scorer.fit_verbalizer(
                per_class, reserve_after=ctx.final_calls + 1)
        if st.verbalizer is not None or st.fitted_verbalizer_used:
            scorer.data = data = dataclasses.replace(data, task=dataclasses.replace(
                data.task, verbalizer=st.verbalizer,
                fitted=st.fitted_verbalizer if st.fitted_verbalizer_used else None))
        await scorer.check_coverage(cfg.allow_floored_scores, reserve_after=ctx.final_calls + 1)
        ctx.tuner = tuner = make_tuner(cfg.method, info, method_config, cfg.seed, task=data.task, train=data.train)
        scorer.calibrate_option = getattr(getattr(tuner, "config", None), "calibrate", False)
        if saved is not None:
            tuner.load_state_dict(saved["tuner"])
        self.save_config()  # a resume's new budgets and --opt pins, once the run's state has accepted them
        stop = await ctx.loop()
        return await ctx.finish(stop)

    def _emit(self, p: Progress) -> None:
        try:
            self._progress(p)
        except Exception:  # noqa: BLE001 - a broken progress display must not kill a paid run
            log.exception("progress callback failed")


class _RunLoop:
    """One run's generations, dev checks, checkpoints and result; what a score means is :class:`TaskScorer`'s."""

    def __init__(self, job: TuningJob, scorer: TaskScorer, budget: Budget, st: _State,
                 info: ModelInfo, elapsed: Callable[[], float]):
        self.job, self.cfg, self.scorer, self.budget = job, job.config, scorer, budget
        self.st, self.info, self.elapsed = st, info, elapsed
        self.tuner: Tuner | None = None
        self.final_calls = 1 + (1 if self.cfg.evaluate_test else 0)  # last dev check + test evaluation
        self._stop_message = ""
        self._gen_seconds: list[float] = []

    @property
    def data(self) -> TaskData:
        return self.scorer.data

    def _batch_of(self, prompt: np.ndarray | None) -> PromptBatch:
        if prompt is not None and self.tuner.prompt_kind == "text":
            return self.tuner.text_batch(prompt)
        return prompt_batch(self.tuner.prompt_kind, prompt, getattr(self.tuner, "config", None))

    async def evaluate(self, split_name: str, prompt: np.ndarray | None, reserve_after: int = 0) -> tuple[float, float]:
        logits = await self.scorer.score(split_name, self._batch_of(prompt), reserve_after)
        acc, loss = self.scorer.metrics(split_name, logits)
        return float(acc[0]), float(loss[0])

    async def _zero_shot(self) -> None:
        """Zero-shot test accuracy, raw and (for calibrating methods) calibrated, from one call."""
        raw, cal = await self.scorer.score_both("test", PromptBatch.zero_shot(), reserve_after=self.final_calls)
        self.st.zero_shot_test_accuracy = float(self.scorer.metrics("test", raw)[0][0])
        if cal is not None:
            self.st.zero_shot_calibrated_test_accuracy = float(self.scorer.metrics("test", cal)[0][0])

    # -------------------------------------------------------------- the loop

    def _progress(self, event: str, record: GenerationRecord | None = None, message: str = "") -> None:
        self.job._emit(Progress(
            event=event, generation=self.st.generation, calls_used=self.budget.used.calls,
            budget_calls=self.budget.limits.calls, tokens_used=self.budget.used.tokens,
            best_dev_accuracy=self.st.best_dev_accuracy,
            last_loss=record.best_loss if record else None, record=record, message=message,
            # the tuner's phase names the generation it would run next: at the end, say what ran instead
            phase=f"{self.st.generation} generations" if event == "end" else self.tuner.phase))

    async def loop(self) -> str:
        """Run generations until a cap stops the job; returns the stop reason."""
        cfg, st = self.cfg, self.st
        cost = f"one generation costs {self.tuner.popsize} calls"
        scoring = self.scorer.scoring_line()
        self._progress("start", message=f"{scoring}; {cost}" if scoring else cost)
        try:
            if st.generation == 0 and cfg.evaluate_zero_shot and st.zero_shot_test_accuracy is None:
                await self._zero_shot()
                self._checkpoint()
            empty = self.tuner.empty_prompt()
            if st.generation == 0 and empty is not None and st.zero_shot_dev_accuracy is None:
                st.zero_shot_dev_accuracy, _ = await self._score_baseline(empty, reserve_after=self.final_calls)
                self._progress("eval", message="empty prompt (the baseline)")
                self._checkpoint()
            while True:
                dev_due = (st.generation + 1) % cfg.eval_every == 0
                self.budget.check_time(self.elapsed(), needed=self._expected_generation_seconds())
                await self._generation(reserve_after=self.final_calls + (1 if dev_due else 0))
                if dev_due:
                    await self._dev_check(reserve_after=self.final_calls)
                self._checkpoint()
        except BudgetExhausted as exc:
            log.info("stopping: %s", exc)
            self._stop_message = f"stopped by {exc.cap} cap: {exc}"
            return exc.cap

    def _expected_generation_seconds(self) -> float:
        recent = self._gen_seconds[-5:]
        return float(np.mean(recent)) if recent else 0.0

    async def _generation(self, reserve_after: int) -> None:
        t0 = time.monotonic()
        # ask/tell run off the event loop: GDFO's student is seconds of torch per generation, and on the loop it
        # would stall every other job's HTTP in a sweep (torch releases the GIL, so the jobs overlap). A budget
        # stop may have left a batch asked and unscored: that one goes first.
        batch = self.tuner.pending_batch() or await asyncio.to_thread(self.tuner.ask)
        logits = await self.scorer.score("train", batch, reserve_after)
        accs, losses = self.scorer.metrics("train", logits)
        await asyncio.to_thread(self.tuner.tell, losses, logits)
        self.st.generation += 1
        self._gen_seconds.append(time.monotonic() - t0)
        rec = GenerationRecord(
            generation=self.st.generation, calls=self.budget.used.calls, tokens=self.budget.used.tokens,
            phase=self.tuner.phase, best_loss=float(losses.min()), mean_loss=float(losses.mean()),
            best_train_accuracy=float(accs.max()), wall_seconds=self.elapsed(), metrics=self.tuner.extra_metrics())
        self.st.history.append(rec)
        self._progress("generation", rec)

    async def _dev_check(self, reserve_after: int) -> None:
        """Dev check of the tuner's best prompt, recorded on the last generation's history row."""
        st = self.st
        acc, loss = await self._score_dev(self.tuner.best_prompt(), reserve_after)
        st.last_dev_generation = st.generation
        st.history[-1].dev_accuracy, st.history[-1].dev_loss = acc, loss
        self._progress("eval", st.history[-1])

    async def _score_baseline(self, empty: np.ndarray, reserve_after: int) -> tuple[float, float]:
        """The bare template on dev, kept as the dev-best so far; with ``calibrate="auto"`` the same call is read
        raw and calibrated and the run keeps the reading with the better dev accuracy (ties: lower loss)."""
        if getattr(self.tuner.config, "calibrate", None) != "auto" or self.st.calibrated is not None:
            return await self._score_dev(empty, reserve_after)
        raw, cal = await self.scorer.score_both("dev", self._batch_of(empty), reserve_after)
        (ra, rl), (ca, cl) = [tuple(float(m[0]) for m in self.scorer.metrics("dev", x)) for x in (raw, cal)]
        self.st.calibrated = (ca, -cl) >= (ra, -rl)
        log.info("calibrate=auto: bare template on dev %.3f raw, %.3f calibrated; the run %s", ra, ca,
                 "calibrates" if self.st.calibrated else "scores raw")
        acc, loss = (ca, cl) if self.st.calibrated else (ra, rl)
        self._keep_if_dev_best(empty, acc, loss)
        return acc, loss

    async def _score_dev(self, prompt: np.ndarray, reserve_after: int) -> tuple[float, float]:
        """Dev accuracy and loss of ``prompt``, which becomes the dev-best when it beats it (ties: lower loss)."""
        key = _prompt_key(prompt)
        if key in self.st.dev_scores:
            return self.st.dev_scores[key]
        acc, loss = self.st.dev_scores[key] = await self.evaluate("dev", prompt, reserve_after)
        self._keep_if_dev_best(prompt, acc, loss)
        return acc, loss

    def _keep_if_dev_best(self, prompt: np.ndarray, acc: float, loss: float) -> None:
        st = self.st
        better = st.best_dev_accuracy is None or acc > st.best_dev_accuracy or (
            acc == st.best_dev_accuracy and loss < (st.best_dev_loss or np.inf))
        if better:
            st.best_dev_accuracy, st.best_dev_loss = acc, loss
            dtype = np.int64 if self.tuner.prompt_kind == "text" else np.float32  # text: vocabulary indices
            st.best_prompt, st.best_generation = np.array(prompt, dtype=dtype), st.generation

    def _checkpoint(self) -> None:
        self.st.wall_seconds = self.elapsed()
        if self.job.run_dir is None:
            return
        ckpt.save_checkpoint(self.job.run_dir, {
            "fingerprint": self.cfg.fingerprint(),
            "tuner": self.tuner.state_dict(),
            "budget": self.budget.used.model_dump(),
            "loop": self.st,
        })
        write_history(self.job.run_dir, self.st.history)

    async def finish(self, stop_reason: str) -> RunResult:
        """Final dev check of the last best prompt (if unchecked) and the test evaluation of the dev-best."""
        st, cfg = self.st, self.cfg
        if st.generation > 0 and st.last_dev_generation != st.generation:
            try:
                await self._dev_check(reserve_after=1 if cfg.evaluate_test else 0)
            except BudgetExhausted as exc:
                log.warning("skipped the final dev check: %s", exc)
        test_acc = None
        prompt = st.best_prompt if st.best_prompt is not None else (
            self.tuner.best_prompt() if st.generation > 0 else None)
        if cfg.evaluate_test and prompt is not None:
            try:
                test_acc, _ = await self.evaluate("test", prompt)
            except BudgetExhausted as exc:
                log.warning("skipped the test evaluation: %s", exc)
        self._checkpoint()
        result = self._result(stop_reason, prompt, test_acc)
        if self.job.run_dir is not None:
            if prompt is not None and result.prompt_text is None:  # a text prompt is result.json's prompt_text
                result.prompt_sha256 = write_prompt(self.job.run_dir, prompt)
            ckpt.atomic_write_json(self.job.run_dir / RESULT_FILE, result.model_dump(mode="json"))
        self._progress("end", message=self._stop_message)  # after the final checks' own events
        return result

    def _result(self, stop_reason: str, prompt: np.ndarray | None, test_acc: float | None) -> RunResult:
        cfg, st, used = self.cfg, self.st, self.budget.used
        text = self.tuner.prompt_text(prompt) if prompt is not None and self.tuner.prompt_kind == "text" else None
        bare = prompt is not None and (text == "" if text is not None else np.size(prompt) == 0)
        if bare:
            log.warning("no tuned prompt beat the bare template on dev (%.3f): the result is the template alone",
                        st.best_dev_accuracy)
        return RunResult(
            method=cfg.method, task=self.data.task.name, seed=cfg.seed, shots=cfg.task.shots,
            model=self.info.name, prompt_kind=self.tuner.prompt_kind,
            budget_calls=cfg.budget.calls, api_calls_used=used.calls, tokens_used=used.tokens,
            cost_used=used.cost if cfg.budget.price_per_1k_tokens is not None else None,
            generations=st.generation, stop_reason=stop_reason,
            best_dev_accuracy=st.best_dev_accuracy, best_generation=st.best_generation,
            test_accuracy=test_acc, zero_shot_test_accuracy=st.zero_shot_test_accuracy,
            zero_shot_calibrated_test_accuracy=st.zero_shot_calibrated_test_accuracy,
            prompt_text=text, calibrated=self.scorer.calibrate, bare_template=bare,
            template=self.data.task.template, test_examples=len(self.data.test.labels),
            wall_seconds=round(self.elapsed(), 3),
            prompt_shape=list(prompt.shape) if prompt is not None else None,
            metrics=st.history[-1].metrics if st.history else {},
            verbalizer=[list(ws) for ws in st.verbalizer] if st.verbalizer is not None else None,
            searched_label_words=[list(ws) for ws in st.searched_verbalizer] if st.searched_verbalizer else None,
            fitted_verbalizer=st.fitted_verbalizer.as_dict() if st.fitted_verbalizer is not None else None,
            fitted_verbalizer_used=st.fitted_verbalizer_used,
            lost_to_crashes=st.lost_to_crashes.model_dump(exclude={"wall_seconds"}),
            lost_to_interrupts=st.lost_to_interrupts.model_dump(exclude={"wall_seconds"}),
            calls_per_generation=self.tuner.popsize,
            endpoint_reported={"calls": st.endpoint_calls, "tokens": st.endpoint_tokens},
            label_score_coverage=self.scorer.label_score_coverage, scoring=st.scoring,
            config=cfg.model_dump(mode="json"),
        )


async def tune(config: TuneConfig, *, resume: bool = False, backend: Backend | None = None,
               progress: ProgressCallback | None = None) -> RunResult:
    """Run (or resume) a tuning job: the Python twin of ``bbt tune``."""
    return await TuningJob(config, backend=backend, progress=progress).run(resume=resume)


__all__ = ["TuningJob", "Progress", "tune", "evaluate_run", "CheckpointError"]
