"""Tune a prompt against the local black-box server on the bundled model: what ``make tune`` runs.

    python examples/tune_local.py --task agnews --out runs/agnews-42     # ~5-8 min on a 2-core CPU
    python examples/tune_local.py --task sst2 --method bbt               # SST-2 works too (see docs/server.md:
                                                                          # the default model is at chance on it)
    python examples/tune_local.py --budget-calls 40 --test-limit 20      # a smoke run in seconds

It starts ``python -m server_stub --model default`` in a child process on a free 127.0.0.1 port (or uses
``--endpoint URL`` if you already run one), runs one tuning job (BBTv2, 16-shot, seed 42 by default)
through the same code path as ``bbt tune``, prints a summary, and stops the server. The run directory
(``--out``) then holds ``result.json``, ``prompt.npy`` and ``history.jsonl``: try ``bbt report --run DIR``
and ``bbt plot --run DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from bbt_client.run.checkpoint import CHECKPOINT_FILE
from bbt_client.config import TuneConfig, parse_config
from bbt_client.errors import BBTError, ConfigError
from bbt_client.run.job import Progress, tune
from bbt_client.run.results import RunResult

log = logging.getLogger("examples.tune_local")

#: Budgets sized so each task finishes in ~5-8 minutes on 2 CPU cores (20 candidates per generation,
#: ~70 sequences/s). The same sizes as benchmarks/tune_sst2.py uses.
TASK_DEFAULTS: dict[str, dict] = {
    "agnews": {"budget_calls": 400, "test_limit": 1000},
    "sst2": {"budget_calls": 600, "test_limit": None},
}
#: The papers' d=500 and popsize 20 are kept; 50 prompt tokens are cut to 5 because every prompt token
#: lengthens every scored sequence on a CPU (see docs/deviations.md).
METHOD_OPTIONS = {"prompt_tokens": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="agnews", choices=sorted(TASK_DEFAULTS))
    ap.add_argument("--method", default="bbtv2", choices=["bbt", "bbtv2", "gdfo"])
    ap.add_argument("--budget-calls", type=int, help="API-call budget (default: per task, see TASK_DEFAULTS)")
    ap.add_argument("--test-limit", type=int, help="evaluate on at most N test examples")
    ap.add_argument("--shots", type=int, default=16, help="training (and dev) examples per class")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--prompt-tokens", type=int, default=METHOD_OPTIONS["prompt_tokens"])
    ap.add_argument("--popsize", type=int, help="candidates per generation (default 20, as the papers)")
    ap.add_argument("--out", type=Path, help="run directory (must not hold a run already)")
    ap.add_argument("--endpoint", help="use this running server instead of starting one")
    ap.add_argument("--model", default="default", help="model folder for the started server (default: bundled)")
    ap.add_argument("--threads", type=int, help="torch threads of the started server")
    ap.add_argument("--quiet", action="store_true", help="print only the summary")
    args = ap.parse_args(argv)
    for name in ("budget_calls", "test_limit", "shots", "prompt_tokens", "popsize", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def build_config(args: argparse.Namespace, url: str) -> TuneConfig:
    """The job's full description; everything that decides the result is in here (and in result.json)."""
    defaults = TASK_DEFAULTS[args.task]
    options = {**METHOD_OPTIONS, "prompt_tokens": args.prompt_tokens}
    if args.popsize is not None:
        options["popsize"] = args.popsize
    return parse_config({
        "endpoint": {"url": url, "backend": "server", "timeout_s": 600},
        "task": {"name": args.task, "shots": args.shots,
                 "test_limit": args.test_limit if args.test_limit is not None else defaults["test_limit"]},
        "method": args.method,
        "seed": args.seed,
        "budget": {"calls": args.budget_calls or defaults["budget_calls"]},
        "method_options": options,
        "out": args.out,
    })


def print_progress(p: Progress) -> None:
    """One line per dev evaluation: enough to see the run move without flooding a log."""
    if p.event == "eval" and p.record is not None:
        print(f"  gen {p.generation:4d}  calls {p.calls_used:5d}/{p.budget_calls}  {p.phase:12s}  "
              f"train loss {p.record.best_loss:.4f}  dev acc {p.record.dev_accuracy:.3f}", flush=True)
    elif p.event == "end":
        print(f"  {p.message}", flush=True)


def summary(result: RunResult) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    return "\n".join([
        f"{result.method} on {result.task} ({result.shots}-shot, seed {result.seed}) against {result.model}",
        f"  zero-shot test accuracy  {pct(result.zero_shot_test_accuracy)}" + (
            f"   ({pct(result.zero_shot_calibrated_test_accuracy)} calibrated, as the tuned prompt is read)"
            if result.calibrated and result.zero_shot_calibrated_test_accuracy is not None else ""),
        *([f"  {result.verbalizer_note()}"] if result.verbalizer_note() else []),
        f"  tuned test accuracy      {pct(result.test_accuracy)}   (best dev {pct(result.best_dev_accuracy)}, "
        f"{result.test_examples} test examples)",
        f"  API calls                {result.api_calls_used} of {result.budget_calls}  "
        f"({result.generations} generations, stopped by the {result.stop_reason} cap)",
        f"  wall time                {result.wall_seconds:.0f} s",
    ])


def server(args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """The URL of a running server: the user's, or a child process we start (and stop) here."""
    if args.endpoint:
        return contextlib.nullcontext(args.endpoint)
    from server_stub.testing import spawn_server  # needs the server extra (torch, transformers)

    # the server's per-request log would bury the progress lines; its warnings and errors still show
    extra = ["--log-level", "WARNING"] + (["--threads", str(args.threads)] if args.threads else [])
    return spawn_server(args.model, *extra)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.out is not None and (args.out / CHECKPOINT_FILE).exists():
            raise ConfigError(f"{args.out} already holds a run: pick another --out "
                              f"(or continue it with bbt tune --resume {args.out})")
        with server(args) as url:
            cfg = build_config(args, url)
            if not args.quiet:
                print(f"server {url}; tuning {cfg.task.name} with {cfg.method}, budget {cfg.budget.calls} calls",
                      flush=True)
            result = asyncio.run(tune(cfg, progress=None if args.quiet else print_progress))
    except BBTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    if args.out is not None:
        print(f"run directory {args.out}: bbt report --run {args.out}; bbt plot --run {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
