"""Tune against a hosted model: a vLLM server with prompt embeddings, or an OpenAI-compatible text API.

Configured through environment variables, so no secret lands in a shell history or a config file:

    BBT_ENDPOINT         base URL, e.g. http://gpu-box:8000 (required)
    BBT_BACKEND          vllm (default) or openai
    BBT_API_KEY          the key, sent as "Authorization: Bearer ..." (optional for a private vLLM)
    BBT_MODEL            the model name the endpoint serves (required for openai; vllm: folder name)
    BBT_EMBEDDINGS_FROM  vllm only: a local copy of the model's tokenizer + input-embedding weights
                         (HF folder); the client builds prompt embeddings itself (see docs/backends.md)

    # vLLM >= 0.9 on the GPU box (prompt embeddings, processed logprobs so label restriction is exact):
    #   vllm serve meta-llama/Llama-3.2-1B --enable-prompt-embeds --logprobs-mode processed_logprobs
    export BBT_ENDPOINT=http://gpu-box:8000 BBT_EMBEDDINGS_FROM=/models/Llama-3.2-1B BBT_MODEL=meta-llama/Llama-3.2-1B
    python examples/hosted_endpoint.py --dry-run          # check the set-up; sends no scoring request
    python examples/hosted_endpoint.py --budget-calls 400 --out runs/vllm-sst2

    # An OpenAI-compatible text API takes text only: a discrete prompt is tuned (bdpl by default).
    BBT_BACKEND=openai BBT_ENDPOINT=https://api.openai.com BBT_MODEL=gpt-3.5-turbo-instruct \\
        BBT_API_KEY=sk-... python examples/hosted_endpoint.py --budget-calls 200 --test-limit 100

vLLM gets BBT (shallow prompt, what ``prompt_embeds`` can carry); BBTv2's deep prompts need our server.
A text API gets ``bdpl`` or ``cmaes-tokens`` (``--method``); the tuned prompt is printed as text.
A causal LM scores the *next* token, so the template must end with ``{mask}``; a built-in task is read through
its next-token template unless ``--template`` gives one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from bbt_client.backends import make_backend
from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.config import EndpointConfig, TuneConfig, parse_config
from bbt_client.errors import BBTError, ConfigError
from bbt_client.run.job import for_causal_endpoint, tune
from bbt_client.methods.registry import make_config
from bbt_client.tasks.datasets import load_task_data


def endpoint_from_env(env: os._Environ | dict[str, str] = os.environ) -> EndpointConfig:
    """The endpoint the environment describes; a ConfigError naming the missing variable otherwise."""
    url = env.get("BBT_ENDPOINT")
    if not url:
        raise ConfigError("set BBT_ENDPOINT to the endpoint's base URL, e.g. export BBT_ENDPOINT=http://gpu-box:8000")
    backend = env.get("BBT_BACKEND", "vllm")
    options: dict[str, str] = {}
    if env.get("BBT_MODEL"):
        options["model"] = env["BBT_MODEL"]
    if backend == "vllm":
        if not env.get("BBT_EMBEDDINGS_FROM"):
            raise ConfigError("the vllm backend needs BBT_EMBEDDINGS_FROM: a local folder with the served model's "
                              "tokenizer and embedding weights (the client builds prompt embeddings itself)")
        options["embeddings_from"] = env["BBT_EMBEDDINGS_FROM"]
    elif backend == "openai":
        if "model" not in options:
            raise ConfigError("the openai backend needs BBT_MODEL, the model name the API serves")
    else:
        raise ConfigError(f"BBT_BACKEND must be vllm or openai, got {backend!r}")
    return parse_config({"endpoint": {"url": url, "backend": backend, "api_key_env": "BBT_API_KEY",
                                      "options": options}}).endpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2", choices=["sst2", "agnews"])
    ap.add_argument("--template", help="must end with {mask} for a causal LM (default: the task's next-token one)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--budget-calls", type=int, default=400)
    ap.add_argument("--method", choices=["bbt", "bdpl", "cmaes-tokens"],
                    help="default: bbt for vllm, bdpl for openai (a text API takes only text prompts)")
    ap.add_argument("--popsize", type=int, help="candidates per generation (default: the method's)")
    ap.add_argument("--prompt-tokens", type=int, default=5)
    ap.add_argument("--test-limit", type=int, default=200, help="test examples to evaluate (each one costs tokens)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the set-up and print the cost of one generation; send no scoring request")
    return ap.parse_args(argv)


async def dry_run(cfg: TuneConfig) -> dict:
    """Everything up to the first paid call: config, local tokenizer/embeddings, token cost of a generation."""
    data = load_task_data(cfg.task, cfg.seed)
    backend = make_backend(cfg.endpoint)
    try:
        info = await backend.model_info()
        task = for_causal_endpoint(data, cfg.task.template is not None).task if info.kind == "causal" else data.task
        kinds = sorted(backend.supported_prompts)
        plan = {"backend": cfg.endpoint.backend, "model": info.name, "hidden_size": info.hidden_size,
                "supported_prompts": kinds, "train": len(data.train), "dev": len(data.dev), "test": len(data.test)}
        if "shallow" in backend.supported_prompts:
            import numpy as np

            method_cfg = make_config(cfg.method, cfg.method_options)
            n, popsize = method_cfg.prompt_tokens, method_cfg.popsize
            prompts = PromptBatch(kind="shallow", candidates=np.zeros((popsize, n, info.hidden_size), np.float32))
            job = ScoreJob(template=task.template, texts=data.train.texts, label_words=task.label_words,
                           prompts=prompts)
            counts = (await backend.tokenize(texts=list(data.train.texts))).text_token_counts
            plan["tokens_per_generation"] = backend.estimate_tokens(job, counts)
            plan["calls_per_generation"] = job.num_calls
    finally:
        await backend.aclose()
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        endpoint = endpoint_from_env(os.environ)  # the backend reads BBT_API_KEY from os.environ too
        method = args.method or ("bdpl" if endpoint.backend == "openai" else "bbt")
        options = {"prompt_tokens": args.prompt_tokens, **({"popsize": args.popsize} if args.popsize else {})}
        cfg = parse_config({
            "endpoint": endpoint.model_dump(), "method": method, "seed": args.seed,
            "budget": {"calls": args.budget_calls}, "out": args.out,
            "task": {"name": args.task, "template": args.template, "shots": args.shots, "test_limit": args.test_limit},
            "method_options": options,
        })
        if args.dry_run:
            plan = asyncio.run(dry_run(cfg))
            for key, value in plan.items():
                print(f"{key:22s} {value}")
            print("dry run: configuration is valid; no scoring request was sent")
            return 0
        result = asyncio.run(tune(cfg))
    except BBTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.method} on {result.task} via {endpoint.backend} ({result.model}): zero-shot "
          f"{result.zero_shot_test_accuracy:.3f} -> tuned {result.test_accuracy:.3f}; {result.api_calls_used} API calls, "
          f"{result.tokens_used} tokens, {result.wall_seconds:.0f} s")
    if result.prompt_text:
        print(f"tuned prompt (put it before each input): {result.prompt_text!r}")
    elif result.bare_template:
        print("no tuned prompt beat the bare template on dev: send the template as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
