"""BBT vs BBTv2 vs GDFO on one few-shot split, same budget, against the local server on the default model.

    python benchmarks/tune_sst2.py                  # SST-2, 16-shot, seed 42, 1200 calls each (~20 min on 2 CPU cores)
    python benchmarks/tune_sst2.py --task agnews    # AG News: 400 calls each, 1,000 test examples (~25 min)

Starts ``python -m server_stub --model default`` in a subprocess (so the client-side student of GDFO
and the server do not share one interpreter), runs each method as a normal tuning job (same code path
as ``bbt tune``), and measures test accuracy, API calls and wall time of every run. The zero-shot
accuracy of the same template is measured once, on the same test examples. Prints a table, then as its
last line one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
from bbt_client.run.job import tune
from server_stub.testing import spawn_server

#: Method options sized for the CPU default model (MiniLM, D=384, L=6); see docs/deviations.md.
#: The papers' d=500 and popsize 20 are kept; n=50 prompt tokens is cut to 5 because every prompt token
#: lengthens every scored sequence (cost ∝ n + text length) on a 2-core CPU.
METHOD_OPTIONS: dict[str, dict] = {
    "bbt": {"prompt_tokens": 5},
    "bbtv2": {"prompt_tokens": 5},
    "gdfo": {"prompt_tokens": 5},
}
#: Per task: (API calls per method, test examples) sized so the three methods take ~20-25 min on 2 CPU cores.
TASK_DEFAULTS = {"sst2": (1200, None), "agnews": (400, 1000)}


async def _run_all(args: argparse.Namespace, url: str) -> dict:
    out = Path(args.out)
    zero_shot = None
    rows = {}
    for i, method in enumerate(args.methods.split(",")):
        cfg = TuneConfig(
            endpoint=EndpointConfig(url=url, timeout_s=600),
            task=TaskConfig(name=args.task, shots=args.shots, test_limit=args.test_limit),
            method=method, seed=args.seed, budget={"calls": args.budget_calls},
            method_options=METHOD_OPTIONS[method], eval_every=args.eval_every,
            evaluate_zero_shot=(i == 0), out=out / method,
        )
        t0 = time.perf_counter()
        result = await tune(cfg)
        wall = time.perf_counter() - t0
        if i == 0:
            zero_shot = result.zero_shot_test_accuracy
        rows[method] = {
            "test_accuracy": result.test_accuracy, "best_dev_accuracy": result.best_dev_accuracy,
            "api_calls_used": result.api_calls_used, "tokens_used": result.tokens_used,
            "generations": result.generations, "stop_reason": result.stop_reason,
            "wall_seconds": round(wall, 1), **{k: v for k, v in result.metrics.items() if k in
                                               ("distill_kl", "student_accuracy", "gradient_steps")},
        }
        print(f"{method:6s} test acc {result.test_accuracy:.4f}  dev {result.best_dev_accuracy}  "
              f"calls {result.api_calls_used}  {wall:.0f}s", file=sys.stderr, flush=True)
    return {"task": args.task, "shots": args.shots, "seed": args.seed, "budget_calls": args.budget_calls,
            "test_examples": result.test_examples, "model": result.model,
            "zero_shot_test_accuracy": zero_shot, "methods": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--budget-calls", type=int, help="per method (default: by task, see TASK_DEFAULTS)")
    ap.add_argument("--methods", default="bbt,bbtv2,gdfo")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--test-limit", type=int, help="test examples (default: by task)")
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    calls, limit = TASK_DEFAULTS.get(args.task, (400, 1000))
    args.budget_calls = args.budget_calls or calls
    args.test_limit = args.test_limit or limit
    extra = ["--threads", str(args.threads)] if args.threads else []
    t0 = time.perf_counter()
    with spawn_server("default", *extra) as url:
        report = asyncio.run(_run_all(args, url))
    report["total_wall_seconds"] = round(time.perf_counter() - t0, 1)
    zs = report["zero_shot_test_accuracy"]
    print(f"\n{report['task']} {report['shots']}-shot seed {report['seed']}, budget {report['budget_calls']} calls, "
          f"{report['test_examples']} test examples, model {report['model']}")
    print(f"| method | test acc | API calls | wall s |\n|---|---|---|---|\n| zero-shot | {zs:.4f} | - | - |")
    for m, r in report["methods"].items():
        print(f"| {m} | {r['test_accuracy']:.4f} | {r['api_calls_used']} | {r['wall_seconds']:.0f} |")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
