"""``bbt sweep``: tasks × methods × variants × seeds × nested budgets, run concurrently, resumable, summarised.

Why nested budgets: accuracy at 100, 200, 400 … calls costs only the largest budget. For one
(task, method, variant, seed) the job runs to the smallest budget and keeps that result
(``result-<budget>.json``), then the *same* run continues with ``resume`` and the next budget (see
:meth:`bbt_client.run.job.TuningJob.run`): the generations are exactly those of one longer run. What a stop in
between adds: its final dev check and test evaluation (≤ 2 calls per stage, counted in the budget like every
call), and that dev check's prompt is one more candidate for the dev-best prompt later.

Layout of a sweep directory::

    sweep.json                      the spec of the last command run on it
    runs/<task>/<method>-<variant>-seed<seed>/   one run directory per job (config.json, checkpoint, ...)
        result-<budget>.json        the result at each budget; sweep-job.json names the job
    summary.json, summary.md        mean ± std over seeds per task, method, variant and budget

A re-run of the same command skips finished (job, budget) pairs and resumes interrupted runs. Jobs run
in-process on one asyncio loop (no subprocesses: they share nothing but the endpoints, and a job is mostly
waiting on its endpoint), at most ``jobs`` at once and at most ``per_endpoint`` per endpoint URL, spread over
the endpoints. Zero-shot test accuracy does not depend on the method: it is measured by one job per
(task settings, seed) — the first in grid order — and shared in the summary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bbt_client.run import checkpoint as ckpt
from bbt_client.run.budget import BudgetLimits
from bbt_client.config import BackendKind, Method, TuneConfig, parse_config
from bbt_client.errors import CheckpointError, ConfigError
from bbt_client.run.ledger import LEDGER_FILE
from bbt_client.methods.registry import make_config
from bbt_client.methods.presets import apply_to_config, preset_names, resolve_preset, split_overrides
from bbt_client.run.results import RESULT_FILE, RunResult, load_result
from bbt_client.tasks.datasets import load_task_data

log = logging.getLogger("bbt_client.cli.sweep")

SPEC_FILE = "sweep.json"
JOB_FILE = "sweep-job.json"
CONFIG_FILE = "config.json"  # as ``bbt tune`` writes it, so ``bbt tune --resume`` works on a sweep's run too
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

Runner = Callable[[TuneConfig, bool], Awaitable[RunResult]]


def result_file(budget: int) -> str:
    return f"result-{budget}.json"


# ---------------------------------------------------------------- spec


class Variant(BaseModel):
    """A named set of overrides: a preset (optional) under ``key=value`` overrides of method options, task
    fields (``template``, ``search_label_words`` …) and job fields (``loss``, ``eval_every``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    preset: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"variant name {v!r} must be letters, digits and _.+- (it names directories)")
        return v


def parse_variant(text: str) -> Variant:
    """``reference`` (a preset name) or ``NAME:key=value,key=value`` (``preset=NAME`` among them picks a
    preset). Values are JSON when they parse (``0.2``, ``true``, ``[1,2]``), else strings; a comma starts a
    new pair only where ``key=`` follows, so templates may contain commas."""
    text = text.strip()
    name, sep, rest = text.partition(":")
    if not sep:
        if text not in preset_names():
            raise ConfigError(f"--variant {text!r} is neither a preset ({', '.join(preset_names())}) nor "
                              "NAME:key=value,...")
        return Variant(name=text, preset=text)
    overrides: dict[str, Any] = {}
    for pair in re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_.]*\s*=)", rest):
        if not pair.strip():
            continue
        if "=" not in pair:
            raise ConfigError(f"--variant {text!r}: expected key=value, got {pair!r}")
        key, raw = (s.strip() for s in pair.split("=", 1))
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    preset = overrides.pop("preset", None)
    try:
        return Variant(name=name.strip(), preset=preset, overrides=overrides)
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"--variant {text!r}: {problems}") from None


class SweepSpec(BaseModel):
    """Everything one ``bbt sweep`` command asks for."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    tasks: list[str] = Field(min_length=1)
    methods: list[Method] = Field(min_length=1)
    variants: list[Variant] = Field(default_factory=lambda: [Variant(name="default")], min_length=1)
    seeds: list[int] = Field(min_length=1)
    #: Call budgets, ascending: each job reaches them one after the other in one continued run.
    budgets: list[int] = Field(min_length=1)
    endpoints: list[str] = Field(min_length=1)
    backend: BackendKind = "server"
    #: Backend options for every job (``bbt tune --backend-opt``), e.g. the model an OpenAI endpoint serves.
    backend_options: dict[str, Any] = Field(default_factory=dict)
    #: Jobs at once against one endpoint (each job has one request in flight at a time).
    per_endpoint: int = Field(default=4, ge=1)
    #: Jobs at once in all.
    jobs: int = Field(default=4, ge=1)
    shots: int = Field(default=16, ge=1)
    test_limit: int | None = Field(default=None, ge=1)
    #: Method options for every job (e.g. ``prompt_tokens=5``), under each variant's.
    method_options: dict[str, Any] = Field(default_factory=dict)
    eval_every: int = Field(default=5, ge=1)
    timeout_s: float = Field(default=600.0, gt=0)
    #: Tune even where under 0.9 of the label scores the endpoint returns are exact (``bbt tune``'s flag).
    allow_floored_scores: bool = False

    @field_validator("budgets")
    @classmethod
    def _sort_budgets(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("budgets must be positive call counts")
        return sorted(set(v))

    @field_validator("variants")
    @classmethod
    def _unique_variants(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be distinct, got {names}")
        return v


@dataclasses.dataclass
class SweepJob:
    """One (task, method, variant, seed): one run directory, reaching every budget in turn."""

    task: str
    method: str
    variant: str
    seed: int
    run_dir: Path
    #: Its TuneConfig (budget and endpoint URL are set per stage).
    config: TuneConfig

    @property
    def label(self) -> str:
        return f"{self.task} {self.method} {self.variant} seed {self.seed}"

    @property
    def ident(self) -> dict[str, Any]:
        return {"task": self.task, "method": self.method, "variant": self.variant, "seed": self.seed}


def _task_label(task: str) -> str:
    label = Path(task).stem if ("/" in task or "." in task) else task
    if not _NAME.match(label):
        raise ConfigError(f"task {task!r}: use a built-in task name (sst2, agnews)")
    return label


def _zero_shot_key(cfg: TuneConfig) -> str:
    """What zero-shot test accuracy depends on: the task settings (template, words, test subset) and the seed
    (the training texts, through label-word search) — not the method."""
    return json.dumps([cfg.task.model_dump(mode="json"), cfg.seed], sort_keys=True)


def _job_config(spec: SweepSpec, task: str, method: str, variant: Variant, seed: int, run_dir: Path) -> TuneConfig:
    v_method, v_task, v_job = split_overrides(variant.overrides)
    data: dict[str, Any] = {
        "endpoint": {"url": spec.endpoints[0], "backend": spec.backend, "timeout_s": spec.timeout_s,
                     "options": spec.backend_options},
        "task": {"name": task, "shots": spec.shots, "test_limit": spec.test_limit, **v_task},
        "method": method, "seed": seed, "budget": {"calls": spec.budgets[0]},
        "method_options": {**spec.method_options, **v_method},
        "eval_every": spec.eval_every, **v_job, "out": str(run_dir),
        "allow_floored_scores": spec.allow_floored_scores,
    }
    if variant.preset is not None:
        settings = resolve_preset(variant.preset, method, task)
        if settings.skipped:
            log.info("preset %s for %s: %s not applicable (the method's config has no such field)",
                     variant.preset, method, ", ".join(settings.skipped))
        data = apply_to_config(data, settings)
    cfg = parse_config(data)
    make_config(method, cfg.method_options)  # unknown or invalid method options fail here, before any call
    return cfg


def build_jobs(spec: SweepSpec) -> list[SweepJob]:
    """The job grid in run order (seed, task, variant, method: a sweep stopped early has whole seeds), every
    config validated; the first job of each zero-shot key measures zero-shot. An existing run directory keeps
    its stored config, which must match (apart from who measures zero-shot)."""
    jobs: list[SweepJob] = []
    measured: set[str] = set()
    tasks_checked: set[str] = set()
    for seed in spec.seeds:
        for task in spec.tasks:
            for variant in spec.variants:
                for method in spec.methods:
                    run_dir = Path(spec.out) / "runs" / _task_label(task) / f"{method}-{variant.name}-seed{seed}"
                    cfg = _job_config(spec, task, method, variant, seed, run_dir)
                    if (task_key := cfg.task.model_dump_json()) not in tasks_checked:
                        load_task_data(cfg.task, seed)  # an unknown task or a bad template fails before any call
                        tasks_checked.add(task_key)
                    key = _zero_shot_key(cfg)
                    cfg = cfg.model_copy(update={"evaluate_zero_shot": key not in measured})
                    cfg = _stored_config(run_dir, cfg)
                    if cfg.evaluate_zero_shot:
                        measured.add(key)
                    jobs.append(SweepJob(task, method, variant.name, seed, run_dir, cfg))
    return jobs


def _stored_config(run_dir: Path, cfg: TuneConfig) -> TuneConfig:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return cfg
    try:
        stored = TuneConfig.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); move that run directory away") from None
    mine = {**cfg.fingerprint(), "evaluate_zero_shot": None}
    theirs = {**stored.fingerprint(), "evaluate_zero_shot": None}
    if mine != theirs:
        raise ConfigError(f"{run_dir} holds a run with a different configuration than this sweep asks for; "
                          "use another --out directory (or the same flags as before)")
    return cfg.model_copy(update={"evaluate_zero_shot": stored.evaluate_zero_shot})


# ---------------------------------------------------------------- endpoints


class EndpointSlots:
    """At most ``per_endpoint`` jobs per endpoint URL at once; a job gets the URL with the most free slots
    (ties: the order given), so jobs spread over the endpoints."""

    def __init__(self, urls: Iterable[str], per_endpoint: int):
        self.free = {u: per_endpoint for u in urls}
        self._cond = asyncio.Condition()

    async def acquire(self) -> str:
        async with self._cond:
            await self._cond.wait_for(lambda: max(self.free.values()) > 0)
            url = max(self.free, key=lambda u: self.free[u])
            self.free[url] -= 1
            return url

    async def release(self, url: str) -> None:
        async with self._cond:
            self.free[url] += 1
            self._cond.notify_all()


# ---------------------------------------------------------------- running


@dataclasses.dataclass
class StageOutcome:
    job: SweepJob
    budget: int
    status: str  # "done" | "skipped" | "failed" | "unreachable"
    result: RunResult | None = None
    error: str = ""


async def _default_runner(config: TuneConfig, resume: bool) -> RunResult:
    from bbt_client.run.job import tune

    return await tune(config, resume=resume)


class Sweep:
    """``await Sweep(spec).run()`` runs (or continues) the grid and writes the summary; returns it.

    ``runner(config, resume)`` runs one stage (default: :func:`bbt_client.run.job.tune` against the config's
    endpoint); ``progress(line)`` gets one line per finished stage."""

    def __init__(self, spec: SweepSpec, runner: Runner | None = None,
                 progress: Callable[[str], None] | None = None):
        self.spec = spec
        self.runner = runner or _default_runner
        self.progress = progress or (lambda line: None)
        self.jobs = build_jobs(spec)
        self.outcomes: list[StageOutcome] = []

    async def run(self) -> dict[str, Any]:
        out = ckpt.ensure_writable_dir(Path(self.spec.out))
        ckpt.atomic_write_json(out / SPEC_FILE, self.spec.model_dump(mode="json"))
        slots = EndpointSlots(self.spec.endpoints, self.spec.per_endpoint)
        limit = asyncio.Semaphore(self.spec.jobs)
        await asyncio.gather(*(self._run_job(job, slots, limit) for job in self.jobs))
        summary = summarize(self.jobs, self.spec.budgets, self.outcomes)
        write_summary(out, summary)
        return summary

    async def _run_job(self, job: SweepJob, slots: EndpointSlots, limit: asyncio.Semaphore) -> None:
        todo = [b for b in self.spec.budgets if not (job.run_dir / result_file(b)).exists()]
        for b in self.spec.budgets:
            if b not in todo:
                self.outcomes.append(StageOutcome(job, b, "skipped"))
        if not todo:
            return
        async with limit:
            url = await slots.acquire()
            try:
                for budget in todo:
                    outcome = await self._run_stage(job, budget, url)
                    self.outcomes.append(outcome)
                    self.progress(_outcome_line(outcome))
                    if outcome.status == "failed":
                        break  # later budgets continue the same run: they would fail alike
            finally:
                await slots.release(url)

    async def _run_stage(self, job: SweepJob, budget: int, url: str) -> StageOutcome:
        run_dir, dest = job.run_dir, job.run_dir / result_file(budget)
        try:
            ckpt.ensure_writable_dir(run_dir)
            if (run_dir / RESULT_FILE).exists():
                last = load_result(run_dir)
                if last.budget_calls == budget:  # finished, but stopped before its copy was written
                    ckpt.atomic_write_json(dest, last.model_dump(mode="json"))
                    return StageOutcome(job, budget, "done", last)
                if last.api_calls_used > budget:
                    return StageOutcome(job, budget, "unreachable", error=(
                        f"the run already spent {last.api_calls_used} calls; a smaller budget needs a new sweep "
                        "directory"))
            resume = any((run_dir / f).exists() for f in (ckpt.CHECKPOINT_FILE, LEDGER_FILE))
            endpoint = job.config.endpoint.model_copy(update={"url": url})
            cfg = job.config.model_copy(update={"budget": BudgetLimits(calls=budget), "endpoint": endpoint})
            if not resume:
                ckpt.atomic_write_json(run_dir / CONFIG_FILE, cfg.model_dump(mode="json"))
                ckpt.atomic_write_json(run_dir / JOB_FILE, job.ident)
            result = await self.runner(cfg, resume)
            ckpt.atomic_write_json(dest, result.model_dump(mode="json"))
            return StageOutcome(job, budget, "done", result)
        except Exception as exc:  # noqa: BLE001 - one failed job must not stop a long sweep; it is reported
            log.exception("%s, budget %d failed", job.label, budget)
            return StageOutcome(job, budget, "failed", error=f"{type(exc).__name__}: {exc}")


def _outcome_line(o: StageOutcome) -> str:
    head = f"{o.job.label}, budget {o.budget}:"
    if o.status == "done" and o.result is not None:
        acc = "-" if o.result.test_accuracy is None else f"{o.result.test_accuracy:.4f}"
        return f"{head} test acc {acc} ({o.result.api_calls_used} calls, {o.result.wall_seconds:.0f} s)"
    return f"{head} {o.status} {o.error}".rstrip()


# ---------------------------------------------------------------- summary


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean and std over seeds; std is numpy's population std (ddof=0), 0 for a single run."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "runs": int(arr.size)}


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def summarize(jobs: list[SweepJob], budgets: list[int], outcomes: Iterable[StageOutcome] = ()) -> dict[str, Any]:
    """Mean ± std of test accuracy (and calls used, dev accuracy, wall time) per task, method, variant and
    budget, read from the jobs' ``result-<budget>.json`` files; zero-shot per task and variant."""
    groups: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    zero_shot_by_key: dict[str, float] = {}
    missing = []
    for job in jobs:
        per_budget = groups.setdefault((job.task, job.method, job.variant), {})
        for b in budgets:
            path = job.run_dir / result_file(b)
            if not path.exists():
                missing.append({**job.ident, "budget": b, "reason": "not run yet"})
                continue
            r = RunResult.model_validate_json(path.read_text())
            if r.zero_shot_test_accuracy is not None:
                zero_shot_by_key[_zero_shot_key(job.config)] = r.zero_shot_test_accuracy
            if r.test_accuracy is None:  # the budget left no call for the test evaluation
                missing.append({**job.ident, "budget": b, "reason": "no test accuracy in the result"})
            else:
                per_budget.setdefault(str(b), []).append({"seed": job.seed, **r.model_dump(mode="json")})
    out_groups = []
    for (task, method, variant), per_budget in groups.items():
        entry: dict[str, Any] = {"task": task, "method": method, "variant": variant, "budgets": {}}
        for b in budgets:
            rows = per_budget.get(str(b), [])
            if not rows:
                continue
            entry["budgets"][str(b)] = {
                **_stats([r["test_accuracy"] for r in rows]),
                "seeds": [r["seed"] for r in rows],
                "test_accuracy": [r["test_accuracy"] for r in rows],
                "api_calls_used": _stats([r["api_calls_used"] for r in rows])["mean"],
                "best_dev_accuracy": _mean_or_none([r["best_dev_accuracy"] for r in rows]),
                "wall_seconds": _stats([r["wall_seconds"] for r in rows])["mean"],
            }
        out_groups.append(entry)
    zero_shot: dict[tuple[str, str], dict[int, float]] = {}
    for job in jobs:
        key = _zero_shot_key(job.config)
        if key in zero_shot_by_key:
            zero_shot.setdefault((job.task, job.variant), {})[job.seed] = zero_shot_by_key[key]
    failed = [{**o.job.ident, "budget": o.budget, "status": o.status, "error": o.error}
              for o in outcomes if o.status in ("failed", "unreachable")]
    return {
        "budgets": list(budgets),
        "groups": out_groups,
        "zero_shot": [{"task": t, "variant": v, "seeds": sorted(by_seed), **_stats(list(by_seed.values()))}
                      for (t, v), by_seed in zero_shot.items()],
        "missing": missing,
        "failed": failed,
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """One table per task: a row per method/variant, a column per budget, ``mean ± std (runs; calls)``."""
    budgets = summary["budgets"]
    lines = []
    for task in dict.fromkeys(g["task"] for g in summary["groups"]):
        lines += [f"## {task}", "", "| method | variant | " + " | ".join(f"{b} calls" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for z in summary["zero_shot"]:
            if z["task"] == task:
                lines.append(f"| zero-shot | {z['variant']} | " + " | ".join(
                    [f"{z['mean']:.3f} ± {z['std']:.3f} ({z['runs']})"] * len(budgets)) + " |")
        for g in summary["groups"]:
            if g["task"] != task:
                continue
            cells = []
            for b in budgets:
                s = g["budgets"].get(str(b))
                cells.append("-" if s is None else
                             f"{s['mean']:.3f} ± {s['std']:.3f} ({s['runs']}; {s['api_calls_used']:.0f} calls)")
            lines.append(f"| {g['method']} | {g['variant']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Test accuracy, mean ± std over seeds (std: numpy's, ddof=0), (runs; mean API calls used). "
                 "Zero-shot is the same prompt-free template for every method.")
    if summary["missing"]:
        lines.append(f"\n{len(summary['missing'])} (job, budget) results missing: re-run the same command.")
    for f in summary["failed"]:
        lines.append(f"- {f['task']} {f['method']} {f['variant']} seed {f['seed']} budget {f['budget']}: "
                     f"{f['status']} {f['error']}")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    ckpt.atomic_write_json(Path(out) / SUMMARY_JSON, summary)
    ckpt.atomic_write_bytes(Path(out) / SUMMARY_MD, summary_markdown(summary).encode())


def load_summary(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SUMMARY_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no {SUMMARY_JSON} in {sweep_dir}: run `bbt sweep` on it first") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not a sweep summary: {exc}") from None
