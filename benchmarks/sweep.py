"""Multi-seed accuracy-versus-calls benchmark: a thin wrapper over ``bbt sweep`` on the local server.

    python benchmarks/sweep.py            # AG News, BBT/BBTv2/GDFO, seeds 13,42,100, 100 and 200 calls (~40 min)
    python benchmarks/sweep.py --quick    # smoke run: 20 and 40 calls, 4-shot, 100 test examples, 2 seeds
    python benchmarks/sweep.py --budgets 100,200,400,800,2000 --variant default --variant reference --jobs 2

Starts ``python -m server_stub --model default`` in a child process (or uses ``--endpoint URL``), runs
``bbt sweep`` into ``--out`` (re-running the same command continues it: finished (job, budget) pairs are
skipped), writes the accuracy-vs-calls PNG next to the summary, and prints as its last line one JSON object
``{"task", "seeds", "methods": {name: {"<budget>": {"mean", "std", "runs"}}}, "whitebox_ceiling", ...}``
(a name is ``method`` for the default variant, ``method+variant`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from bbt_client.cli import commands as cli
from bbt_client.cli.sweep import load_summary

#: White-box prompt-tuning ceilings of the default model (MiniLM-L6, tied head, n = 5, 16-shot, seed 42), as
#: measured by ``benchmarks/whitebox_ceiling.py`` (60 Adam steps on the prompt; AG News on 1,000 test
#: examples, SST-2 on its 872). Not re-run here: it takes ~5 minutes.
WHITEBOX_CEILING = {"agnews": 0.745, "sst2": 0.546}

#: Sized for ~40 minutes on an otherwise idle 2-core CPU — an estimate from 400-call timings, halved:
#: per seed, 200 calls of BBT (~210 s), BBTv2 (~140 s) and GDFO (~300 s), plus the test evaluations at 100
#: calls. (--quick took 18 min of wall time with the 2 cores shared by four other busy processes.)
DEFAULTS = {"tasks": "agnews", "methods": "bbt,bbtv2,gdfo", "seeds": "13,42,100", "budgets": "100,200",
            "shots": 16, "test_limit": 1000, "opts": ["prompt_tokens=5"]}
#: --quick: one generation or two per stage, small splits; checks the wiring, measures nothing.
QUICK = {"seeds": "13,42", "budgets": "20,40", "shots": 4, "test_limit": 100,
         "opts": ["prompt_tokens=5", "popsize=6", "intrinsic_dim=50"]}


def _sweep_argv(args: argparse.Namespace, url: str) -> list[str]:
    argv = ["sweep", "--out", str(args.out), "--endpoint", url, "--tasks", args.tasks, "--methods", args.methods,
            "--seeds", args.seeds, "--budgets", args.budgets, "--shots", str(args.shots), "--jobs", str(args.jobs),
            "--per-endpoint", str(args.jobs), "--eval-every", str(args.eval_every)]
    if args.test_limit:
        argv += ["--test-limit", str(args.test_limit)]
    for v in args.variant:
        argv += ["--variant", v]
    for o in args.opt:
        argv += ["--opt", o]
    return argv


def report(summary: dict, tasks: list[str], seeds: list[int]) -> dict:
    """The benchmark's JSON line from a sweep summary."""
    many = len(tasks) > 1
    methods: dict[str, dict] = {}
    for g in summary["groups"]:
        name = g["method"] if g["variant"] == "default" else f"{g['method']}+{g['variant']}"
        if many:
            name = f"{g['task']}/{name}"
        methods[name] = {b: {k: s[k] for k in ("mean", "std", "runs")} | {"api_calls_used": s["api_calls_used"]}
                         for b, s in g["budgets"].items()}
    zero_shot = {(f"{z['task']}/" if many else "") + z["variant"]: {k: z[k] for k in ("mean", "std", "runs")}
                 for z in summary["zero_shot"]}
    ceiling = {t: WHITEBOX_CEILING.get(t) for t in tasks}
    return {"task": tasks[0] if not many else tasks, "seeds": seeds, "methods": methods,
            "whitebox_ceiling": ceiling[tasks[0]] if not many else ceiling, "zero_shot": zero_shot,
            "budgets": summary["budgets"], "failed": len(summary["failed"]), "missing": len(summary["missing"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets and splits: a smoke run")
    ap.add_argument("--tasks", help=f"comma-separated (default {DEFAULTS['tasks']})")
    ap.add_argument("--methods", help=f"comma-separated (default {DEFAULTS['methods']})")
    ap.add_argument("--variant", action="append", default=[], help="as bbt sweep --variant (repeatable)")
    ap.add_argument("--seeds", help=f"comma-separated (default {DEFAULTS['seeds']})")
    ap.add_argument("--budgets", help=f"comma-separated call budgets (default {DEFAULTS['budgets']})")
    ap.add_argument("--shots", type=int)
    ap.add_argument("--test-limit", type=int)
    ap.add_argument("--opt", action="append", default=None, help="method option for every job (repeatable; "
                    f"default {' '.join(DEFAULTS['opts'])})")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="jobs at once (default 2: keeps the server's queue fed)")
    ap.add_argument("--endpoint", help="use this running server instead of starting one")
    ap.add_argument("--threads", type=int, help="server torch threads")
    ap.add_argument("--out", type=Path, help="sweep directory (default runs/sweep-<tasks>[-quick])")
    args = ap.parse_args(argv)
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key in ("tasks", "methods", "seeds", "budgets", "shots", "test_limit"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.opt = args.opt if args.opt is not None else base["opts"]
    args.out = args.out or Path("runs") / f"sweep-{args.tasks.replace(',', '-')}{'-quick' if args.quick else ''}"

    t0 = time.perf_counter()
    if args.endpoint:
        code = cli.main(_sweep_argv(args, args.endpoint))
    else:
        from server_stub.testing import spawn_server

        extra = ["--threads", str(args.threads)] if args.threads else []
        # a SIGTERM (kill, a scheduler) unwinds instead of exiting at once, so the server below is stopped too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        with spawn_server("default", *extra) as url:
            code = cli.main(_sweep_argv(args, url))
    if code not in (0, 1):  # 1: some jobs failed, the rest are summarised
        return code
    tasks = [t for t in args.tasks.split(",") if t]
    ceiling = WHITEBOX_CEILING.get(tasks[0]) if len(tasks) == 1 else None
    if cli.main(["plot", "--sweep", str(args.out)] + (["--ceiling", str(ceiling)] if ceiling else [])) != 0:
        print("(no plot written; see the message above)", file=sys.stderr)
    out = report(load_summary(args.out), tasks, [int(s) for s in args.seeds.split(",") if s])
    out["total_wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["sweep_dir"] = str(args.out)
    print(json.dumps(out))
    return code


if __name__ == "__main__":
    sys.exit(main())
