"""Multi-task benchmark: does a default beat doing nothing, and how much of the way to the ceiling does it go?

    python benchmarks/tasks.py --out runs/bench-tasks                      # every phase (hours on 2 CPU cores)
    python benchmarks/tasks.py --out DIR --phases zero,short               # zero-shot, then 100 and 400 calls
    python benchmarks/tasks.py --out DIR --report                          # the JSON line from what exists

Per bundled task: zero-shot test accuracy read raw and with content-free calibration (one call), the method's
defaults (``--method``; n = 5 prompt tokens as every benchmark here, except that a text method such as ``bdpl``
runs at its own defaults through the server's OpenAI face set like vLLM) at ``--budgets`` over seeds 13/42/100 (one
``bbt sweep`` directory per task under ``--out``), the same sweep continued to 2,000 calls for ``--long-tasks``,
and the white-box ceiling (Adam on a free prompt of the same length through the same model until the training
loss stops falling; seed 42) with a linear probe on the mask-slot state (``benchmarks/whitebox_ceiling.py``).
Every phase resumes: re-running skips finished cells. ``partial.json`` in ``--out`` is rewritten after every
task; the last stdout line is one JSON object: per task ``zero_shot_raw``, ``zero_shot_calibrated``,
``whitebox``, ``probe`` and the method's ``{budget: {mean, std, runs}}``; ``gap_closed`` = mean over tasks of
(tuned - best zero-shot) / (ceiling - best zero-shot) per budget (tasks whose ceiling is not above the best
zero-shot are left out and named); ``tasks_below_zero_shot`` (mean at 400 calls under the better zero-shot);
``missing``: the cells not run (of the budgets measured on any task).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from bbt_client.backends import make_backend
from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.cli import commands as cli
from bbt_client.cli.sweep import load_summary
from bbt_client.config import EndpointConfig, TaskConfig
from bbt_client.errors import CheckpointError
from bbt_client.methods.registry import tuner_class
from bbt_client.tasks import calibration
from bbt_client.tasks.datasets import for_next_token, get_task, load_task_data, task_names
from bbt_client.tasks.losses import accuracy
from bbt_client.tasks.verbalizer import class_logits, flat_words

#: Cheapest first (training texts per call x text length), so an interrupted run has covered the most tasks.
TASK_ORDER = ("sst2", "mr", "cr", "agnews", "yahoo", "sst5", "yelp2", "yelp5", "dbpedia")
SEEDS = "13,42,100"


def _tasks(arg: str | None) -> list[str]:
    names = [t for t in arg.split(",") if t] if arg else [t for t in TASK_ORDER if t in task_names()]
    return names + [t for t in (task_names() if not arg else []) if t not in names]


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two phases may run as two processes
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


async def zero_shot(url: str, task: str, test_limit: int | None, template: str | None = None) -> dict:
    """Raw and calibrated zero-shot test accuracy of the bare template, from one call."""
    data = load_task_data(TaskConfig(name=task, test_limit=test_limit, template=template), seed=42)
    texts = calibration.with_content_free(data.test.texts)
    m = len(texts) - len(data.test.texts)
    sets = data.task.word_sets
    backend = make_backend(EndpointConfig(url=url))
    try:
        scored = await backend.score(ScoreJob(template=data.task.template, texts=texts, text_pairs=None,
                                              label_words=flat_words(sets), prompts=PromptBatch.zero_shot()))
    finally:
        await backend.aclose()
    logits = class_logits(scored.logits, sets)
    raw = float(accuracy(calibration.split_content_free(logits, m), data.test.labels)[0])
    cal = float(accuracy(calibration.calibrate(logits, m), data.test.labels)[0])
    return {"zero_shot_raw": round(raw, 4), "zero_shot_calibrated": round(cal, 4), "test_examples": len(data.test)}


def next_token_template(task: str) -> str:
    """The template a text method's runs read ``task`` through: the OpenAI face is a next-token endpoint, so a
    built-in task whose own template does not end with the answer slot is read through its ``causal_template``
    (by the runs themselves; its zero-shot is measured with the same template)."""
    return for_next_token(get_task(task)).template


def is_text(method: str) -> bool:
    """Whether ``method`` sends text prompts (bdpl, cmaes-tokens): it is run as on a text-only API."""
    return tuner_class(method).prompt_kind == "text"


def sweep(url: str, out: Path, task: str, method: str, budgets: str, test_limit: int | None, jobs: int) -> int:
    """A text method runs through the server's OpenAI face at its own defaults; the others through the
    protocol with n = 5 prompt tokens."""
    argv = ["sweep", "--out", str(out), "--endpoint", url, "--tasks", task, "--methods", method, "--seeds", SEEDS,
            "--budgets", budgets, "--shots", "16", "--jobs", str(jobs), "--per-endpoint", str(jobs)]
    if is_text(method):
        from server_stub.app import DEFAULT_MODEL_NAME

        argv += ["--backend", "openai", "--backend-opt", f"model={DEFAULT_MODEL_NAME}"]
    else:
        argv += ["--opt", "prompt_tokens=5"]
    return cli.main(argv + (["--test-limit", str(test_limit)] if test_limit else []))


def report(out: Path, tasks: list[str], method: str) -> dict:
    """The JSON line from what ``out`` holds."""
    zs, ceil = _load(out / "zero_shot.json"), _load(out / "ceiling.json")
    rows, missing = {}, []
    for t in tasks:
        row = {k: zs.get(t, {}).get(k) for k in ("zero_shot_raw", "zero_shot_calibrated")}
        c = ceil.get(t, {})
        row |= {"whitebox": c.get("trained_test_accuracy"), "probe": c.get("linear_probe_test_accuracy")}
        try:
            groups = load_summary(out / f"sweep-{t}")["groups"]
        except CheckpointError:
            groups = []
        row[method] = {b: {k: s[k] for k in ("mean", "std", "runs")}
                       for g in groups if g["method"] == method for b, s in g["budgets"].items() if s["runs"]}
        rows[t] = row
    # the ceiling tunes a continuous prompt: it bounds a text method on neither its prompts nor its templates
    expected = ("zero_shot_raw",) if is_text(method) else ("zero_shot_raw", "whitebox")
    budgets = sorted({b for row in rows.values() for b in row[method]}, key=int) or ["100", "400", "2000"]
    for t, row in rows.items():
        missing += [f"{t}/{k}" for k in expected if row[k] is None]
        missing += [f"{t}/{method}@{b}" + (f" ({row[method][b]['runs']} of 3 seeds)" if b in row[method] else "")
                    for b in budgets if row[method].get(b, {}).get("runs", 0) < 3]
    gap, used, below = {}, {}, []
    for b in ("100", "400", "2000"):
        vals = []
        for t, row in rows.items():
            zero = max([v for v in (row["zero_shot_raw"], row["zero_shot_calibrated"]) if v is not None], default=None)
            tuned = row[method].get(b, {}).get("mean")
            if zero is None or tuned is None or row["whitebox"] is None or row["whitebox"] <= zero:
                continue
            vals.append((tuned - zero) / (row["whitebox"] - zero))
            used.setdefault(b, []).append(t)
            if b == "400" and tuned < zero:
                below.append(t)
        gap[b] = round(float(np.mean(vals)), 4) if vals else None
    for t, row in rows.items():  # tasks without a usable ceiling still count for "below zero-shot"
        zero = max([v for v in (row["zero_shot_raw"], row["zero_shot_calibrated"]) if v is not None], default=None)
        tuned = row[method].get("400", {}).get("mean")
        if t not in below and zero is not None and tuned is not None and tuned < zero:
            below.append(t)
    templates = {t: next_token_template(t) for t in tasks if get_task(t).causal_template} if is_text(method) else {}
    return {"method": method, "seeds": [int(s) for s in SEEDS.split(",")], "tasks": rows, "gap_closed": gap,
            "gap_closed_tasks": used, "tasks_below_zero_shot": below, "missing": missing,
            **({"templates": templates} if templates else {})}


def plot(rep: dict, path: Path) -> None:
    """Per task, the method's mean at each budget placed between the better zero-shot (0) and the ceiling (1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, r in rep["tasks"].items() if r["whitebox"] is not None]
    budgets = ("100", "400", "2000")
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2, 3.6))
    for i, b in enumerate(budgets):
        xs, ys = [], []
        for j, t in enumerate(tasks):
            r = rep["tasks"][t]
            zero = max(v for v in (r["zero_shot_raw"], r["zero_shot_calibrated"]) if v is not None)
            mean = r[rep["method"]].get(b, {}).get("mean")
            if mean is not None and r["whitebox"] > zero:
                xs.append(j + (i - 1) * 0.27)
                ys.append((mean - zero) / (r["whitebox"] - zero))
        ax.bar(xs, ys, width=0.25, label=f"{b} calls")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("(tuned - zero-shot) / (ceiling - zero-shot)")
    ax.set_title(f"{rep['method']} defaults, mean of seeds {', '.join(map(str, rep['seeds']))}: "
                 "0 = better zero-shot, 1 = white-box ceiling", fontsize=9)
    ax.legend(fontsize=8)
    absent = [t for t in rep["tasks"] if t not in tasks]
    if absent:
        fig.text(0.01, 0.01, f"not shown (no ceiling measured): {', '.join(absent)}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if absent else 0, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", help="comma-separated (default: every bundled task, cheapest first)")
    ap.add_argument("--method", default="bbtv2", help="the recommended default method (default bbtv2)")
    ap.add_argument("--phases", default="zero,short,ceiling,long", help="any of zero,short,ceiling,long")
    ap.add_argument("--budgets", default="100,400")
    ap.add_argument("--long-tasks", default="agnews,mr,sst5", help="tasks continued to 2,000 calls")
    ap.add_argument("--test-limit", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--ceiling-steps", type=int, default=400, help="most Adam steps of the white-box ceiling")
    ap.add_argument("--endpoint", help="use this running server instead of starting one")
    ap.add_argument("--report", action="store_true", help="only print the JSON line from what --out holds")
    ap.add_argument("--plot", type=Path, help="also draw the per-task picture (PNG) here")
    args = ap.parse_args(argv)
    tasks = _tasks(args.tasks)
    phases = [] if args.report else [p for p in args.phases.split(",") if p]
    t0 = time.perf_counter()

    def partial() -> None:
        _save(args.out / "partial.json", report(args.out, tasks, args.method))

    if "ceiling" in phases and phases == ["ceiling"]:  # needs no server
        run_ceiling(args, tasks, partial)
    elif phases:
        def run(url: str) -> None:
            for phase in phases:
                if phase == "zero":
                    zs = _load(args.out / "zero_shot.json")
                    for t in tasks:
                        if t not in zs:
                            template = next_token_template(t) if is_text(args.method) else None
                            zs[t] = asyncio.run(zero_shot(url, t, args.test_limit, template))
                            _save(args.out / "zero_shot.json", zs)
                            print(f"{t}: zero-shot {zs[t]}", file=sys.stderr, flush=True)
                    partial()
                elif phase in ("short", "long"):
                    long = [t for t in args.long_tasks.split(",") if t]
                    for t in (tasks if phase == "short" else [t for t in tasks if t in long]):
                        budgets = args.budgets if phase == "short" else f"{args.budgets},2000"
                        sweep(url, args.out / f"sweep-{t}", t, args.method, budgets, args.test_limit, args.jobs)
                        partial()
                elif phase == "ceiling":
                    run_ceiling(args, tasks, partial)

        if args.endpoint:
            run(args.endpoint)
        else:
            from server_stub.testing import spawn_server

            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
            # a text method's endpoint answers as vLLM does: log-probs before logit_bias, at most 20 per token
            face = ("--logprobs-mode", "raw_logprobs", "--max-logprobs", "20") if is_text(args.method) else ()
            with spawn_server("default", *face) as url:
                run(url)
    out = report(args.out, tasks, args.method)
    _save(args.out / "partial.json", out)
    if args.plot:
        plot(out, args.plot)
    if phases:  # what the runs took, not the report
        out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


def run_ceiling(args: argparse.Namespace, tasks: list[str], partial) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from whitebox_ceiling import ceiling

    done = _load(args.out / "ceiling.json")
    for t in tasks:
        if t not in done:
            done[t] = ceiling(t, args.ceiling_steps, 5, args.test_limit, 1e-2, patience=25)
            _save(args.out / "ceiling.json", done)
            partial()


if __name__ == "__main__":
    sys.exit(main())
