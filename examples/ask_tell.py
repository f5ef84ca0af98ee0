"""Drive the ask–tell loop yourself: a tuner proposes prompts, you score them however you like.

    python examples/ask_tell.py                      # starts the local server on the bundled model
    python examples/ask_tell.py --endpoint URL       # or uses one you run

``bbt tune`` does this loop for you (with budgets, checkpoints and dev evaluation). Write it yourself when
the scoring is yours: your own batching, caching, a model behind something other than HTTP, or a loss
that is not cross-entropy. A tuner is pure — ``ask()`` returns one generation of candidate prompts as a
``PromptBatch``, ``tell(losses)`` takes one loss per candidate, in order — and never does I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import numpy as np

from bbt_client.backends import make_backend
from bbt_client.backends.base import Backend, PromptBatch, ScoreJob
from bbt_client.tasks.losses import accuracy, cross_entropy
from bbt_client.methods.registry import make_tuner
from bbt_client.tasks.datasets import Split, Task, few_shot, get_task


async def score(backend: Backend, task: Task, split: Split, prompts: PromptBatch) -> np.ndarray:
    """Label-word logits (C, N, K) of every candidate prompt on every text: one batched request."""
    job = ScoreJob(template=task.template, texts=split.texts, text_pairs=split.text_pairs,
                   label_words=task.label_words, prompts=prompts)
    return (await backend.score(job)).logits


async def run(url: str, method: str, generations: int, shots: int, popsize: int, seed: int) -> dict:
    data = few_shot("sst2", k=shots, seed=seed)
    task = get_task("sst2")
    backend = make_backend("server", url)
    try:
        info = await backend.model_info()  # hidden size, layers, embedding/hidden std: what projections need
        tuner = make_tuner(method, info, {"prompt_tokens": 5, "popsize": popsize}, seed)
        zero = await score(backend, task, data.dev, PromptBatch.zero_shot())
        print(f"{info.name}: {info.num_layers} layers, hidden {info.hidden_size}; "
              f"zero-shot dev accuracy {accuracy(zero, data.dev.labels)[0]:.3f}")
        for g in range(generations):
            batch = tuner.ask()                                 # popsize candidates = popsize API calls
            logits = await score(backend, task, data.train, batch)  # (C, N, K)
            losses = cross_entropy(logits, data.train.labels)   # (C,) lower is better
            tuner.tell(losses, logits)
            print(f"generation {g + 1:3d}  {tuner.phase:20s}  best loss {losses.min():.4f}  "
                  f"mean {losses.mean():.4f}")
        best = tuner.best_prompt()  # (n, D) for bbt, (L, n, D) for bbtv2
        prompts = (PromptBatch(kind="deep", base=best) if tuner.prompt_kind == "deep"
                   else PromptBatch(kind="shallow", candidates=best[None]))
        dev = await score(backend, task, data.dev, prompts)
    finally:
        await backend.aclose()
    dev_acc = float(accuracy(dev, data.dev.labels)[0])
    print(f"best prompt {best.shape}: dev accuracy {dev_acc:.3f}")
    zero_acc = float(accuracy(zero, data.dev.labels)[0])
    return {"best_prompt": best, "dev_accuracy": dev_acc, "zero_shot_dev_accuracy": zero_acc,
            "generations": generations, "calls": generations * tuner.popsize}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", help="a running server (default: start one on the bundled model)")
    ap.add_argument("--method", default="bbt", choices=["bbt", "bbtv2"])
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    if args.endpoint:
        server = contextlib.nullcontext(args.endpoint)
    else:
        from server_stub.testing import spawn_server

        server = spawn_server("default")
    with server as url:
        asyncio.run(run(url, args.method, args.generations, args.shots, args.popsize, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
