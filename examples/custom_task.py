"""Bring your own task: a TSV file, your own template and label words, tuned against the local server.

    python examples/custom_task.py                                  # the bundled question-topic example
    python examples/custom_task.py --train my_train.tsv --test my_test.tsv \\
        --template "Review: {text} It was {mask} ." --label-words negative=bad,positive=great

A task file is a TSV with a header row and the columns ``text`` and ``label`` (JSONL with those keys works
too). The template holds ``{text}`` where the input goes and exactly one ``{mask}``: the model's scores of
the label words at the mask are the class scores. ``--label-words`` maps every label value in the file to
one word, in class order; pick words the model's vocabulary holds as one token.

The same run on the command line (with a server from ``python -m server_stub --model default``):

    bbt tune --endpoint http://127.0.0.1:8080 --task examples/data/questions_train.tsv \\
        --test-file examples/data/questions_test.tsv --template "Question: {text} Topic: {mask} ." \\
        --label-words cooking=food,sports=sports,computers=computer --shots 4 --method bbt --budget-calls 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
from bbt_client.errors import BBTError, ConfigError
from bbt_client.run.job import tune
from bbt_client.tasks.datasets import load_task_data

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "data" / "questions_train.tsv"
TEST = HERE / "data" / "questions_test.tsv"
TEMPLATE = "Question: {text} Topic: {mask} ."
LABEL_WORDS = "cooking=food,sports=sports,computers=computer"


def parse_label_words(text: str) -> dict[str, str]:
    """``"a=x,b=y"`` -> ``{"a": "x", "b": "y"}`` (label value in the file -> its word), order kept."""
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ConfigError(f"--label-words expects LABEL=WORD pairs separated by commas, got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, default=TRAIN, help="training pool (few-shot train and dev are drawn here)")
    ap.add_argument("--test", type=Path, default=TEST, help="test examples")
    ap.add_argument("--template", default=TEMPLATE)
    ap.add_argument("--label-words", default=LABEL_WORDS, help="LABEL=WORD,... in class order")
    ap.add_argument("--shots", type=int, default=4, help="examples per class for train (and again for dev)")
    ap.add_argument("--method", default="bbt", choices=["bbt", "bbtv2", "gdfo"])
    ap.add_argument("--budget-calls", type=int, default=200)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--endpoint", help="use this running server instead of starting one on the bundled model")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        task = TaskConfig(name="questions", file=args.train, test_file=args.test, template=args.template,
                          label_words=parse_label_words(args.label_words), shots=args.shots)
        data = load_task_data(task, args.seed)  # fails here, before any server starts, on a bad file/template
        print(f"task {data.task.name}: classes {list(data.task.class_names)} -> words {list(data.task.label_words)}; "
              f"{len(data.train)} train, {len(data.dev)} dev, {len(data.test)} test examples")
        print(f"first query: {data.task.template.replace('{text}', data.train.texts[0])}")
        if args.endpoint:
            server = contextlib.nullcontext(args.endpoint)
        else:
            from server_stub.testing import spawn_server

            server = spawn_server("default")
        with server as url:
            cfg = TuneConfig(endpoint=EndpointConfig(url=url), task=task, method=args.method, seed=args.seed,
                             budget={"calls": args.budget_calls}, eval_every=2, out=args.out,
                             method_options={"prompt_tokens": 5, "popsize": args.popsize})
            result = asyncio.run(tune(cfg))
    except BBTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    zs = result.zero_shot_test_accuracy
    print(f"{result.method}: zero-shot test accuracy {zs:.3f} -> tuned {result.test_accuracy:.3f} "
          f"(best dev {result.best_dev_accuracy:.3f}) with {result.api_calls_used} API calls "
          f"in {result.wall_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
