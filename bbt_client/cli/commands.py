"""The ``bbt`` command: argument parsing, progress display and exit codes — nothing else.

Exit codes (docs/cli.md): 0 done, 2 bad configuration or input, 3 endpoint failure, 4 run directory problem
(missing, unwritable, or already holding another run), 130 interrupted (the last finished generation is
checkpointed: continue with ``bbt tune --resume DIR``, or re-run the same ``bbt sweep``); ``bbt sweep`` exits 1
when some job failed (listed in its summary).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig, parse_config
from bbt_client.errors import BBTError, CheckpointError, ConfigError, EndpointError
from bbt_client.run.job import Progress, TuningJob, evaluate_run
from bbt_client.run.results import CONFIG_FILE
from bbt_client.tasks.datasets import task_names
from bbt_client.cli.plot import RUN_METRICS

log = logging.getLogger("bbt_client.cli.commands")


# ---------------------------------------------------------------- progress display


class ProgressDisplay:
    """One refreshing line on a terminal; a log line per dev evaluation otherwise; JSON lines with --json."""

    def __init__(self, mode: str, stream=sys.stderr):
        self.mode, self.stream = mode, stream
        self.tty = stream.isatty()
        self._last = 0.0
        self._open_line = False  # a terminal line written without its newline yet

    def close(self) -> None:
        """End a refreshing line, so that what is printed next starts on a line of its own."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

    def __call__(self, p: Progress) -> None:
        if self.mode == "json":
            rec = p.record.__dict__ if p.record else None
            print(json.dumps({"event": p.event, "generation": p.generation, "calls_used": p.calls_used,
                              "budget_calls": p.budget_calls, "tokens_used": p.tokens_used,
                              "best_dev_accuracy": p.best_dev_accuracy, "phase": p.phase, "record": rec,
                              "message": p.message}), flush=True)
            return
        if self.mode == "quiet":
            return
        line = self._line(p)
        if self.tty:
            now = time.monotonic()
            if p.event in ("generation",) and now - self._last < 0.2:
                return
            self._last = now
            self.stream.write("\r\x1b[2K" + line + ("\n" if p.event == "end" else ""))
            self.stream.flush()
            self._open_line = p.event != "end"
        elif p.event in ("start", "eval", "end"):
            self.stream.write(line + "\n")
            self.stream.flush()

    @staticmethod
    def _line(p: Progress) -> str:
        budget = p.budget_calls
        if budget:
            frac = min(1.0, p.calls_used / budget)
            bar = "[" + "#" * int(frac * 20) + "." * (20 - int(frac * 20)) + "]"
            calls = f"calls {p.calls_used}/{budget} {bar}"
        else:
            calls = f"calls {p.calls_used}"
        dev = f"best dev acc {p.best_dev_accuracy:.3f}" if p.best_dev_accuracy is not None else "best dev acc -"
        loss = f"loss {p.last_loss:.4f}" if p.last_loss is not None else ""
        parts = [calls, dev, loss, p.phase, p.message]
        return "  ".join(x for x in parts if x)


# ---------------------------------------------------------------- argument parsing


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--opt expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _parse_label_words(text: str) -> list[str] | dict[str, str]:
    items = [w.strip() for w in text.split(",") if w.strip()]
    if not any("=" in w for w in items):
        return items
    if not all("=" in w for w in items):
        raise ConfigError(f"--label-words mixes LABEL=WORD and plain words: {text!r}")
    return {k.strip(): v.strip() for k, v in (w.split("=", 1) for w in items)}


def _default(model: type, name: str) -> Any:
    """A config field's default, so ``--help`` shows what a flag left out means without restating it here."""
    field = model.model_fields[name]
    return field.default_factory() if field.default_factory is not None else field.default


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bbt", description="Black-box prompt tuning against a model you can only query.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tune", help="tune a prompt (or --resume a run)")
    t.add_argument("--config", type=Path, help="JSON file with a full TuneConfig; flags override it")
    t.add_argument("--endpoint", help="endpoint base URL, e.g. http://127.0.0.1:8080 (required)")
    t.add_argument("--backend", choices=["server", "vllm", "openai"],
                   help=f"endpoint kind (default: {_default(EndpointConfig, 'backend')})")
    t.add_argument("--api-key-env", help="environment variable holding the API key "
                   f"(default: {_default(EndpointConfig, 'api_key_env')})")
    t.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. --backend-opt embeddings_from=/models/llama --backend-opt "
                        "model=meta-llama/Llama-3.2-1B for vllm (repeatable; see docs/backends.md)")
    t.add_argument("--task", help=f"built-in task ({', '.join(task_names())}) or a TSV/JSONL file of training examples "
                   f"with text and label columns (default: {_default(TaskConfig, 'name')})")
    t.add_argument("--test-file", type=Path, help="test examples for a task file (default: the file's examples not "
                   "drawn for train and dev)")
    t.add_argument("--template", help='template for a task file, e.g. "{text} It was {mask} ."')
    t.add_argument("--label-words", help='a word per label value ("negative=bad,positive=great"), or, for labels '
                   '0,1,...,K-1, one word per class in that order ("bad,great"); each must be one token for the '
                   "endpoint (default: the built-in task's)")
    t.add_argument("--method", choices=["bbt", "bbtv2", "gdfo", "bdpl", "cmaes-tokens"],
                   help=f"tuning method; bbt methods lists them (default: {_default(TuneConfig, 'method')})")
    t.add_argument("--shots", type=int, help="training examples per class, and as many dev examples "
                   f"(default: {_default(TaskConfig, 'shots')})")
    t.add_argument("--seed", type=int, help="seed of the few-shot sample and the search "
                   f"(default: {_default(TuneConfig, 'seed')})")
    t.add_argument("--budget-calls", type=int, help="API calls at most (one per candidate prompt scored; default: "
                   f"{_default(TuneConfig, 'budget').calls})")
    t.add_argument("--budget-tokens", type=int, help="tokens at most (default: no cap)")
    t.add_argument("--budget-cost", type=float, help="cost at most, with --price-per-1k-tokens (default: no cap)")
    t.add_argument("--price-per-1k-tokens", type=float, help="price for --budget-cost (default: none)")
    t.add_argument("--budget-seconds", type=float, help="wall time at most (default: no cap)")
    t.add_argument("--eval-every", type=int, help="dev evaluation every N generations "
                   f"(default: {_default(TuneConfig, 'eval_every')})")
    t.add_argument("--test-limit", type=int, help="evaluate on at most N test examples (default: all)")
    t.add_argument("--search-label-words", type=int, metavar="M",
                   help="before tuning, choose M label words per class from the training texts (one API call), "
                        "kept if they read dev better than yours (one more; default: 0, score --label-words as given)")
    t.add_argument("--fit-verbalizer", type=int, metavar="M",
                   help="before tuning, fit class weights over up to M candidate words per class on the training "
                        "texts (one API call), kept if they read dev better than yours (one more; default: 30 "
                        "where the endpoint scores any words in one sequence per text, else 0; 0: no fit)")
    t.add_argument("--loss", choices=["ce", "hinge"], help="training loss, cross-entropy or hinge "
                   f"(default: {_default(TuneConfig, 'loss')})")
    t.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --opt prompt_tokens=10 --opt popsize=20 (repeatable)")
    t.add_argument("--preset", help="named settings under your flags: default, reference (the papers' code's "
                   "choices; see bbt_client/methods/presets.py; default: none)")
    t.add_argument("--allow-floored-scores", action="store_true",
                   help="tune even when under 90%% of the zero-shot label scores on the training texts are the "
                        "endpoint's own values (see docs/scoring.md)")
    t.add_argument("--out", type=Path, help="run directory (result.json, prompt.npy, checkpoint; default: a new "
                   "runs/TASK-METHOD-SEED-TIME)")
    t.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="print only the final result")
    mode.add_argument("--json", action="store_true", help="JSON lines on stdout: one per event, then the result")

    e = sub.add_parser("evaluate", help="re-score a finished run's prompt on its test set")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--endpoint", help="endpoint URL (default: the one the run used)")
    e.add_argument("--api-key-env")

    r = sub.add_parser("report", help="print a summary table of one or more runs")
    r.add_argument("--run", type=Path, nargs="+", action="extend", required=True, help="run directories")
    r.add_argument("--json", action="store_true")

    p = sub.add_parser("plot", help="PNG of a run's tuning curve, of several runs, or of a sweep (needs the plot extra)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, nargs="+", action="extend",
                     help="run directories: one = its loss and accuracy curves; several = one line per method and "
                          "variant with a band over seeds")
    src.add_argument("--sweep", type=Path, nargs="+", metavar="DIR",
                     help="bbt sweep directories (several: one picture): test accuracy vs API calls")
    p.add_argument("--metric", choices=list(RUN_METRICS), default="dev",
                   help="several runs: dev accuracy at each dev check, best train accuracy or best train loss per "
                        "generation")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax", help="band over seeds")
    p.add_argument("--ceiling", type=float, help="draw a reference line at this accuracy (e.g. the white-box ceiling)")
    p.add_argument("--out", type=Path, help="PNG path (default RUN/curve.png, DIR/accuracy_vs_calls.png)")

    pr = sub.add_parser("probe", help="what an endpoint can do for label scoring, and the strategy bbt tune will use")
    pr.add_argument("--endpoint", required=True, help="endpoint base URL")
    pr.add_argument("--backend", choices=["server", "vllm", "openai"], default="openai")
    pr.add_argument("--api-key-env", default="BBT_API_KEY")
    pr.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="backend option, as for bbt tune (e.g. model=NAME, embeddings_from=DIR)")
    pr.add_argument("--label-words", help="the label words the strategy is chosen for (default: any single-token "
                                          "words)")
    pr.add_argument("--json", action="store_true", help="print the report as one JSON object")

    m = sub.add_parser("methods", help="list the methods, or one method's options with their defaults")
    m.add_argument("name", nargs="?", help="a method: print each option, its type, default and meaning")

    s = sub.add_parser("sweep", help="tasks x methods x variants x seeds x nested budgets, concurrent and resumable")
    s.add_argument("--out", type=Path, required=True, help="sweep directory (re-run the command to continue it)")
    s.add_argument("--endpoint", action="append", required=True, metavar="URL",
                   help="endpoint base URL (repeatable: jobs spread over the endpoints)")
    s.add_argument("--backend", choices=["server", "vllm", "openai"], default="server")
    s.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option for every job, as for bbt tune (e.g. model=NAME)")
    s.add_argument("--per-endpoint", type=int, default=4, metavar="K", help="jobs at once per endpoint (default 4)")
    s.add_argument("--jobs", type=int, default=4, metavar="N", help="jobs at once in all (default 4)")
    s.add_argument("--tasks", default="agnews", help="comma-separated built-in tasks (default agnews)")
    s.add_argument("--methods", default="bbt,bbtv2,gdfo", help="comma-separated (default bbt,bbtv2,gdfo)")
    s.add_argument("--variant", action="append", default=[], metavar="SPEC",
                   help="a preset name (default, reference) or NAME:key=value,... with method options, task fields "
                        "(template, search_label_words) or preset=NAME (repeatable; default: default)")
    s.add_argument("--seeds", default="13,42,100", help="comma-separated (default 13,42,100)")
    s.add_argument("--budgets", default="100,200,400", help="comma-separated call budgets, reached in one continued "
                                                            "run per job (default 100,200,400)")
    s.add_argument("--shots", type=int, default=16)
    s.add_argument("--test-limit", type=int, help="evaluate on at most N test examples")
    s.add_argument("--eval-every", type=int, default=5, help="dev evaluation every N generations")
    s.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option for every job, under each variant's (repeatable)")
    s.add_argument("--allow-floored-scores", action="store_true",
                   help="tune even where the endpoint's label scores are mostly floors (as bbt tune)")
    s.add_argument("--quiet", action="store_true", help="print only the summary")
    return ap


def _config_from_args(args: argparse.Namespace) -> TuneConfig:
    data: dict[str, Any] = {}
    if args.resume is not None:
        path = args.resume / CONFIG_FILE
        if not args.resume.is_dir():
            raise CheckpointError(f"run directory {args.resume} does not exist: nothing to resume")
        if not path.exists():
            raise CheckpointError(f"{args.resume} holds no bbt run (no {CONFIG_FILE}); start one with --out instead")
        data = json.loads(path.read_text())
    elif args.config is not None:
        try:
            data = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc}") from exc
    endpoint = dict(data.get("endpoint") or {})
    for flag, key in (("endpoint", "url"), ("backend", "backend"), ("api_key_env", "api_key_env")):
        if getattr(args, flag) is not None:
            endpoint[key] = getattr(args, flag)
    if args.backend_opt:
        endpoint["options"] = {**(endpoint.get("options") or {}), **dict(_parse_option(o) for o in args.backend_opt)}
    if args.allow_floored_scores:
        data["allow_floored_scores"] = True
    if "url" not in endpoint:
        raise ConfigError("--endpoint is required (e.g. --endpoint http://127.0.0.1:8080)")
    data["endpoint"] = endpoint
    if args.resume is None:
        task = dict(data.get("task") or {})
        if args.task is not None:
            if Path(args.task).suffix.lower() in (".tsv", ".jsonl", ".json", ".csv", ".txt") or Path(args.task).exists():
                task.update(name="custom", file=args.task)
            else:
                task["name"] = args.task
        for flag, key in (("test_file", "test_file"), ("template", "template"), ("shots", "shots"),
                          ("test_limit", "test_limit"), ("search_label_words", "search_label_words"),
                          ("fit_verbalizer", "fit_verbalizer")):
            if getattr(args, flag) is not None:
                task[key] = getattr(args, flag)
        if args.label_words is not None:
            task["label_words"] = _parse_label_words(args.label_words)
        data["task"] = task
        for flag in ("method", "seed", "eval_every", "loss"):
            if getattr(args, flag) is not None:
                data[flag] = getattr(args, flag)
        opts = dict(data.get("method_options") or {})
        opts.update(dict(_parse_option(o) for o in args.opt))
        data["method_options"] = opts
        if args.preset is not None:
            data = _apply_preset(data, args.preset)
    elif args.task or args.method or args.seed is not None or args.preset is not None:
        raise ConfigError("--resume continues a run as configured: drop --task/--method/--seed/--preset "
                          "(budgets, --endpoint, output modes and --opt pins may change)")
    elif args.opt:  # pins only: an option the run left at a default that has changed since (the tuner checks it)
        opts = dict(data.get("method_options") or {})
        pins = dict(_parse_option(o) for o in args.opt)
        changed = sorted(k for k in pins if k in opts and opts[k] != pins[k])
        if changed:
            raise ConfigError(f"--resume cannot change options the run was made with ({', '.join(changed)}); "
                              "--opt on --resume only pins an option the run did not set")
        data["method_options"] = {**opts, **pins}
    budget = dict(data.get("budget") or {"calls": 8000})
    for flag, key in (("budget_calls", "calls"), ("budget_tokens", "tokens"), ("budget_cost", "cost"),
                      ("price_per_1k_tokens", "price_per_1k_tokens"), ("budget_seconds", "wall_seconds")):
        if getattr(args, flag) is not None:
            budget[key] = getattr(args, flag)
    data["budget"] = budget
    data["out"] = str(args.resume if args.resume is not None else (args.out or data.get("out") or "")) or None
    return parse_config(data)


def _apply_preset(data: dict[str, Any], name: str) -> dict[str, Any]:
    """``data`` with preset ``name`` filled in under what the config file and the flags set."""
    from bbt_client.methods.presets import apply_to_config, resolve_preset

    task = data.get("task") or {}
    settings = resolve_preset(name, data.get("method", "bbtv2"), task.get("name", "sst2"))
    if settings.skipped:
        log.warning("preset %s: %s does not apply to method %s", name, ", ".join(settings.skipped),
                    data.get("method", "bbtv2"))
    return apply_to_config(data, settings)


def _csv(text: str, kind: type = str) -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None


# ---------------------------------------------------------------- commands


def _fresh_run_dir(cfg: TuneConfig) -> Path:
    """``runs/TASK-METHOD-SEED-TIME`` (TIME to the second, then -2, -3 ... if taken): a run always has a
    directory that ``bbt report``, ``plot`` and ``tune --resume`` can name."""
    task = Path(cfg.task.file).stem if cfg.task.file is not None else cfg.task.name
    base = Path("runs") / f"{task}-{cfg.method}-{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _cmd_tune(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    if cfg.out is None:
        cfg = cfg.model_copy(update={"out": _fresh_run_dir(cfg)})
        print(f"run directory: {cfg.out} (no --out given)", file=sys.stderr, flush=True)
    args.run_dir = cfg.out  # for the interrupt and endpoint-failure hints
    mode = "json" if args.json else "quiet" if args.quiet else "human"
    display = ProgressDisplay(mode)
    job = TuningJob(cfg, progress=display)
    try:
        result = asyncio.run(job.run(resume=args.resume is not None))
    finally:
        display.close()
    summary = result.model_dump(mode="json", exclude={"config"})
    if mode == "json":
        print(json.dumps({"event": "result", **summary}), flush=True)
        return 0
    print(_format_table([{"run": str(cfg.out), **summary}]))
    for line in _calls_note(summary):
        print(line)
    template = f" {summary['template']!r}" if summary.get("template") else ""
    if summary.get("prompt_text"):
        print(f"\nprompt_text (put it, then one space, before each text rendered in the template{template}): "
              f"{summary['prompt_text']!r}")
    elif summary.get("prompt_text") is not None or summary.get("bare_template"):
        print(f"\nno tuned prompt beat the bare template on dev; send the template{template} as it is (no prompt)")
    written = [f for f in ("result.json", "prompt.npy") if (cfg.out / f).exists()]
    print(f"\nwrote {' and '.join(f'{cfg.out}/{f}' for f in written)}")
    return 0


def _calls_note(row: dict[str, Any]) -> list[str]:
    """How many calls a generation costs, and what a call budget left unused: why a run ran so few generations."""
    per = row.get("calls_per_generation")
    if not per:
        return []
    note = f"one generation costs {per} calls"
    budget = row.get("budget_calls")
    left = (budget or 0) - row["api_calls_used"]
    if row.get("stop_reason") == "calls" and left > 0:
        note += f"; {left} of the {budget} calls were left, too few for another"
    return [note]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bbt_client.run.results import load_result

    result = load_result(args.run)
    cfg = TuneConfig.model_validate(result.config)
    if args.endpoint or args.api_key_env:
        ep = cfg.endpoint.model_copy(update={k: v for k, v in (("url", args.endpoint),
                                                                 ("api_key_env", args.api_key_env)) if v})
        cfg = cfg.model_copy(update={"endpoint": ep})
    out = asyncio.run(evaluate_run(args.run, config=cfg))
    print(json.dumps(out, indent=2))
    return 0


#: Column -> format of its numbers: one format per column, whatever the value.
_COLUMNS = {"run": "{}", "method": "{}", "task": "{}", "seed": "{}", "zero_shot_test_accuracy": "{:.4f}",
            "zero_shot_calibrated_test_accuracy": "{:.4f}", "best_dev_accuracy": "{:.4f}",
            "test_accuracy": "{:.4f}", "api_calls_used": "{}", "tokens_used": "{}", "wall_seconds": "{:.1f}",
            "stop_reason": "{}"}


def _format_table(rows: Sequence[dict[str, Any]]) -> str:
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    table = [list(_COLUMNS)] + [[cell(r.get(c), f) for c, f in _COLUMNS.items()] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)


def _cmd_report(args: argparse.Namespace) -> int:
    from bbt_client.run.results import load_result

    results = [load_result(r) for r in args.run]
    rows = [res.model_dump(mode="json", exclude={"config"}) for res in results]
    if not args.json:
        for row, res in zip(rows, results):
            row["verbalizer_note"] = res.verbalizer_note()
    print(json.dumps(rows, indent=2) if args.json else _format_table(
        [{"run": str(run), **row} for run, row in zip(args.run, rows)]))
    if not args.json:
        for run, row in zip(args.run, rows):
            if row.get("prompt_text") is not None:
                print(f"{run}: prompt_text {row['prompt_text']!r}")
            if row.get("verbalizer_note"):
                print(f"{run}: {row['verbalizer_note']}")
            if row.get("label_score_coverage") is not None or row.get("scoring"):
                sc, cov = row.get("scoring") or {}, row.get("label_score_coverage")
                print(f"{run}: label scores {sc.get('strategy', '?')}"
                      f"{' (exact)' if sc.get('exact') else ''}, coverage "
                      f"{'-' if cov is None else f'{cov:.4f}'} (exact / all label scores)")
            for line in _calls_note(row) + _accounting_notes(row):
                print(f"{run}: {line}")
    return 0


def _accounting_notes(row: dict[str, Any]) -> list[str]:
    """Where the endpoint's own count differs from the client's, and what crashes cost: said, not hidden."""
    notes = []
    rep, lost = row.get("endpoint_reported") or {}, row.get("lost_to_crashes") or {}
    cut = row.get("lost_to_interrupts") or {}
    unanswered = {k: int(lost.get(k, 0)) + int(cut.get(k, 0)) for k in ("calls", "tokens")}
    if rep.get("calls") and rep["calls"] != row["api_calls_used"] - unanswered["calls"]:
        notes.append(f"the endpoint reported {rep['calls']} calls served; the client counted "
                     f"{row['api_calls_used'] - unanswered['calls']} answered")
    if rep.get("tokens") and rep["tokens"] != row["tokens_used"] - unanswered["tokens"]:
        notes.append(f"the endpoint reported {rep['tokens']} tokens; the client counted "
                     f"{row['tokens_used'] - unanswered['tokens']} for answered requests")
    shared = (row.get("metrics") or {}).get("student_shared_weight_tensors")
    if shared is not None and shared > 0:
        notes.append(f"student shares weights with the endpoint (leak): {int(shared)} weight tensors match")
    elif shared is not None and shared < 0:
        notes.append("student independence unverified: the endpoint lists no weight digests")
    if lost.get("calls") or lost.get("tokens"):
        notes.append(f"{int(lost.get('calls', 0))} calls and {int(lost.get('tokens', 0))} tokens were spent on work a "
                     "crash lost (included in the *_used figures)")
    if cut.get("calls") or cut.get("tokens"):
        notes.append(f"{int(cut.get('calls', 0))} calls and {int(cut.get('tokens', 0))} tokens went to requests an "
                     "interrupt (Ctrl-C) cut off, as the endpoint reported serving them where it could (included in "
                     "the *_used figures)")
    return notes


def _cmd_plot(args: argparse.Namespace) -> int:
    from bbt_client.cli.plot import plot_run, plot_runs, plot_sweep

    if args.sweep is not None:
        path = plot_sweep(args.sweep, args.out, band=args.band, ceiling=args.ceiling)
    elif len(args.run) == 1:
        path = plot_run(args.run[0], args.out)
    else:
        path = plot_runs(args.run, args.out, metric=args.metric, band=args.band, ceiling=args.ceiling)
    print(f"wrote {path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bbt_client.cli.sweep import Sweep, SweepSpec, Variant, parse_variant, summary_markdown

    try:
        spec = SweepSpec(
            out=args.out, endpoints=args.endpoint, backend=args.backend,
            backend_options=dict(_parse_option(o) for o in args.backend_opt), per_endpoint=args.per_endpoint,
            jobs=args.jobs, tasks=_csv(args.tasks), methods=_csv(args.methods),
            variants=[parse_variant(v) for v in args.variant] or [Variant(name="default")],
            seeds=_csv(args.seeds, int), budgets=_csv(args.budgets, int), shots=args.shots,
            test_limit=args.test_limit, eval_every=args.eval_every, allow_floored_scores=args.allow_floored_scores,
            method_options=dict(_parse_option(o) for o in args.opt))
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid sweep:\n" + "\n".join(lines)) from None
    sweep = Sweep(spec, progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True))
    summary = asyncio.run(sweep.run())
    print(summary_markdown(summary))
    print(f"wrote {args.out}/summary.json and {args.out}/summary.md")
    return 1 if summary["failed"] else 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from bbt_client.backends import make_backend

    words = [w for w in (args.label_words or "").split(",") if w.strip()]
    opts = dict(_parse_option(o) for o in args.backend_opt)
    backend = make_backend(args.backend, args.endpoint, api_key_env=args.api_key_env, **opts)

    async def run() -> dict:
        async with backend:
            return await backend.probe(label_words=[w.strip() for w in words])

    report = asyncio.run(run())
    print(json.dumps(report, indent=2) if args.json else format_probe(report))
    return 0


def format_probe(r: dict[str, Any]) -> str:
    """A probe report as aligned lines, one per fact, the strategy last."""
    def yes(v: Any) -> str:
        return "-" if v is None else "yes" if v is True else "no" if v is False else str(v)

    rows = [("endpoint", r.get("endpoint")), ("backend", r.get("backend"))]
    if "models" in r:
        served = r.get("model_served")
        rows.append(("served models", f"{r['models']}" + ("" if served is None else
                                                           f" (model {r.get('model')!r} {'served' if served else 'NOT served'})")))
    if "tokenize" in r:
        t = r["tokenize"]
        rows.append(("/tokenize", "no route" if not t.get("route") else
                     f"reads {t['field']!r}" if t.get("field") else t.get("note", "unusable")))
    rows.append(("logprobs cap", yes(r.get("logprobs_cap")) + (f" (refused: {r['logprobs_refused']})"
                                                               if r.get("logprobs_refused") else "")))
    for key, name in (("completions_shape", "completions shape"), ("batching", "prompt lists"),
                      ("chat_only", "chat-only"), ("bias_in_logprobs", "logit_bias shown in logprobs"),
                      ("restricted_in_logprobs", "allowed_token_ids shown in logprobs"), ("echo", "echo"),
                      ("prompt_logprobs", "prompt_logprobs"), ("logprob_token_ids", "logprob_token_ids"),
                      ("prompt_embeds", "prompt_embeds")):
        if key in r:
            rows.append((name, yes(r[key])))
    sc = r.get("scoring")
    if sc:
        rows.append(("strategy", f"{sc['strategy']} ({'exact' if sc['exact'] else 'may floor labels'}"
                                 f"{', told' if sc.get('told') else ''}): {sc['cost']}"))
    else:
        rows.append(("strategy", "none: the endpoint cannot score labels as configured (see above)"))
    if "calls" in r:
        rows.append(("probe calls", f"{r['calls']} (counted in the run's budget when bbt tune probes)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _cmd_methods(args: argparse.Namespace) -> int:
    from bbt_client.methods.registry import describe_options, known_methods, tuner_class

    if args.name is None:
        for name in known_methods():
            cls = tuner_class(name)
            print(f"{name:<13} {cls.prompt_kind:<8} {(cls.__doc__ or '').strip().splitlines()[0]}")
        print("\nbbt methods NAME lists a method's options; set them with bbt tune --opt KEY=VALUE")
        return 0
    rows = [(n, k, json.dumps(d, default=str), doc) for n, k, d, doc in describe_options(args.name)]
    widths = [max(len(r[i]) for r in [("option", "type", "default"), *rows]) for i in range(3)]
    print(f"{'option':<{widths[0]}}  {'type':<{widths[1]}}  {'default':<{widths[2]}}  meaning")
    for row in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) + "  " + row[3])
    return 0


def _resumable(args: argparse.Namespace) -> Path | None:
    """The run directory ``bbt tune --resume`` can continue after a failure, or None (nothing was written)."""
    where = getattr(args, "run_dir", None)
    return where if where is not None and (Path(where) / CONFIG_FILE).exists() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"tune": _cmd_tune, "evaluate": _cmd_evaluate, "report": _cmd_report, "plot": _cmd_plot,
                "sweep": _cmd_sweep, "methods": _cmd_methods, "probe": _cmd_probe}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        where = _resumable(args)
        hint = f": continue with bbt tune --resume {where}" if where else ""
        if args.command == "sweep":
            hint = ": re-run the same bbt sweep command to continue"
        print(f"\ninterrupted; the last finished generation is checkpointed{hint}", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EndpointError as exc:
        where = _resumable(args)
        hint = f"\ncontinue with: bbt tune --resume {where}" if where else ""
        print(f"endpoint error: {exc}{hint}", file=sys.stderr)
        return 3
    except CheckpointError as exc:
        print(f"run directory error: {exc}", file=sys.stderr)
        return 4
    except BBTError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
