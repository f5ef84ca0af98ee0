"""``bbt tune`` as a user meets it, against the tiny server: every input check runs before the first scoring call
(exit 2, naming the flag to change, no budget spent), failed runs leave directories the corrected command may reuse
or ``--resume`` can continue, the Python API and the CLI share one run format, and the output says what it did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bbt_client as bbt
from tests.reliability.helpers import TINY_OPT_FLAGS, TINY_OPTS, child_env, cli

TEMPLATE = "{text} It was {mask} ."


def _task_file(path: Path, per_class: int) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"a great film {i}\tpos\nan awful film {i}\tneg\n"
                                               for i in range(per_class)))
    return path


def _tune(url: str, out: Path, *extra: str, calls: int = 20) -> list[str]:
    return ["tune", "--endpoint", url, "--shots", "4", "--budget-calls", str(calls), "--eval-every", "2",
            *TINY_OPT_FLAGS, "--out", str(out), *extra]


def _file_task(path: Path, words: str = "pos=great,neg=bad") -> list[str]:
    return ["--task", str(path), "--template", TEMPLATE, "--label-words", words]


def _spent_nothing(out: Path) -> bool:
    """Nothing reserved: no ledger, checkpoint or result (a config.json alone is free for the corrected command)."""
    return not out.exists() or {p.name for p in out.iterdir()} <= {"config.json"}


def test_a_task_file_with_no_rows_left_for_test_is_refused_naming_test_file(tiny_server, tmp_path):
    data = _task_file(tmp_path / "train.tsv", per_class=8)  # 2 x --shots 4 per class: nothing left to test on
    out = tmp_path / "run"
    r = cli(*_tune(tiny_server, out, *_file_task(data)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--test-file" in r.stderr and "--shots" in r.stderr
    assert not out.exists()
    test = _task_file(tmp_path / "test.tsv", per_class=3)
    r = cli(*_tune(tiny_server, out, *_file_task(data), "--test-file", str(test), "--quiet"))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "result.json").read_text())["test_examples"] == 6


def test_string_labels_with_words_in_class_order_name_the_label_word_form(tiny_server, tmp_path):
    data = _task_file(tmp_path / "train.tsv", per_class=12)
    out = tmp_path / "run"
    r = cli(*_tune(tiny_server, out, *_file_task(data, "great,bad")))
    assert r.returncode == 2
    assert "['pos', 'neg']" in r.stderr and "--label-words pos=WORD,neg=WORD" in r.stderr
    assert not out.exists()


def test_multi_token_label_words_are_refused_before_any_call_and_the_fixed_command_reuses_the_dir(tiny_server,
                                                                                                   tmp_path):
    data = _task_file(tmp_path / "train.tsv", per_class=12)
    out = tmp_path / "run"
    r = cli(*_tune(tiny_server, out, *_file_task(data, "pos=greatness,neg=bad"), "--json"))
    assert r.returncode == 2, r.stderr  # the input is at fault, not the endpoint
    assert "'greatness' is 2 tokens" in r.stderr and "--label-words" in r.stderr and "/v1/tokenize" not in r.stderr
    assert r.stdout == ""  # no progress started
    assert _spent_nothing(out)
    r = cli(*_tune(tiny_server, out, *_file_task(data), "--quiet"))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "train.tsv" and result["api_calls_used"] <= 20


def test_an_unreachable_endpoint_leaves_a_run_that_resume_continues_and_report_explains(tiny_server, tmp_path):
    out = tmp_path / "run"
    r = cli(*_tune("http://127.0.0.1:9", out, "--task", "sst2", "--test-limit", "8"))
    assert r.returncode == 3 and f"bbt tune --resume {out}" in r.stderr
    assert _spent_nothing(out)
    rep = cli("report", "--run", str(out))
    assert rep.returncode == 4 and f"continue it with `bbt tune --resume {out}`" in rep.stderr
    r = cli("tune", "--resume", str(out), "--endpoint", tiny_server, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "result.json").exists()
    assert cli("report", "--run", str(out)).returncode == 0


def test_python_api_and_cli_share_one_run_format(tiny_server, tmp_path):
    out = tmp_path / "py"
    cfg = bbt.TuneConfig(endpoint=bbt.EndpointConfig(url=tiny_server), task=bbt.TaskConfig(shots=4, test_limit=8),
                         budget={"calls": 20}, eval_every=2, method_options=TINY_OPTS, out=out)
    first = bbt.tune(cfg)
    assert json.loads((out / "config.json").read_text())["out"] == str(out)
    try:
        bbt.tune(cfg)
        raise AssertionError("a second run into the same directory must be refused")
    except bbt.CheckpointError as exc:
        assert f"bbt tune --resume {out}" in str(exc)
    r = cli("tune", "--resume", str(out), "--budget-calls", "30", "--json")
    assert r.returncode == 0, r.stderr
    resumed = json.loads(r.stdout.splitlines()[-1])
    assert resumed["generations"] > first.generations and resumed["api_calls_used"] <= 30
    cli_run = tmp_path / "cli"
    assert cli(*_tune(tiny_server, cli_run, "--task", "sst2", "--test-limit", "8", "--quiet")).returncode == 0
    again = bbt.tune(cfg.model_copy(update={"out": cli_run, "budget": bbt.BudgetLimits(calls=30)}), resume=True)
    assert again.api_calls_used <= 30 and again.generations > 0


def test_a_budget_too_small_for_one_generation_is_refused_with_the_minimum(tiny_server, tmp_path):
    out = tmp_path / "run"
    r = cli(*_tune(tiny_server, out, "--task", "sst2", calls=1))
    # verbalizer fit 2 + zero-shot 1 + bare-template dev check 1 + one generation (popsize 4) + dev check 1 + test 1
    assert r.returncode == 2 and "--budget-calls 1 cannot pay for one generation" in r.stderr
    assert "at least 10" in r.stderr and not out.exists()
    r = cli(*_tune(tiny_server, out, "--task", "sst2", "--test-limit", "8", calls=10))
    assert r.returncode == 0, r.stderr
    assert "one generation costs 4 calls" in r.stdout
    assert f"wrote {out}/result.json and {out}/prompt.npy" in r.stdout and (out / "prompt.npy").exists()


def test_help_shows_every_default():
    r = cli("tune", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for shown in ("tuning method; bbt methods lists them (default: bbtv2)", "dev examples (default: 16)",
                  "(default: 42)", "default: 8000)", "(default: ce)", "(default: 5)", "runs/TASK-METHOD-SEED-TIME"):
        assert shown in text, shown


def test_final_table_and_report_show_run_task_and_both_zero_shot_baselines(tiny_server, tmp_path):
    data = _task_file(tmp_path / "train.tsv", per_class=12)
    runs = [tmp_path / "a", tmp_path / "b"]
    r = cli(*_tune(tiny_server, runs[0], *_file_task(data), "--opt", "calibrate=true"))
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    row = dict(zip(header.split(), row.split()))
    assert row["run"] == str(runs[0]) and row["task"] == "train.tsv"
    assert row["zero_shot_calibrated_test_accuracy"] != "-" and row["zero_shot_test_accuracy"] != "-"
    assert cli(*_tune(tiny_server, runs[1], "--task", "sst2", "--test-limit", "8", "--quiet")).returncode == 0
    rep = cli("report", "--run", *map(str, runs))
    assert rep.returncode == 0
    lines = rep.stdout.splitlines()
    assert lines[0].split()[0] == "run" and [ln.split()[0] for ln in lines[1:3]] == [str(p) for p in runs]


def test_json_events_end_after_the_last_eval_and_agree_with_the_result(tiny_server, tmp_path):
    r = cli(*_tune(tiny_server, tmp_path / "run", "--task", "sst2", "--test-limit", "8", "--json", calls=17))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[-2:] == ["end", "result"] and "eval" in kinds
    end, result = events[-2], events[-1]
    assert end["generation"] == result["generations"] and end["phase"] == f"{result['generations']} generations"
    assert "one generation costs 4 calls" in events[0]["message"]


def test_without_out_the_run_goes_to_a_fresh_runs_directory_and_says_where(tiny_server, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bbt_client.cli", "tune", "--endpoint", tiny_server, "--task", "sst2",
                        "--shots", "4", "--test-limit", "8", "--budget-calls", "10", *TINY_OPT_FLAGS, "--seed", "3",
                        "--quiet"], capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    made = list((tmp_path / "runs").iterdir())
    assert len(made) == 1 and made[0].name.startswith("sst2-bbtv2-3-")
    where = Path("runs") / made[0].name
    assert f"run directory: {where}" in r.stderr and f"wrote {where}/result.json" in r.stdout
    assert cli("report", "--run", str(made[0])).returncode == 0


def test_option_and_run_directory_messages_speak_the_cli(tiny_server, tmp_path):
    out = tmp_path / "run"
    r = cli(*_tune(tiny_server, out, "--task", "sst2", "--opt", "popsise=4"))
    assert r.returncode == 2 and "popsise: unknown option" in r.stderr and "popsize" in r.stderr.split("options")[1]
    assert "Extra inputs" not in r.stderr and not out.exists()
    data = tmp_path / "cols.tsv"
    data.write_text("sentence\tlabel\nok\tpos\n")
    r = cli(*_tune(tiny_server, out, *_file_task(data)))
    assert r.returncode == 2 and "text_column" not in r.stderr and "name the header's columns text and label" in r.stderr
    r = cli("tune", "--resume", str(tmp_path / "typo"))
    assert r.returncode == 4 and "does not exist" in r.stderr and "config.json" not in r.stderr
    assert cli(*_tune(tiny_server, out, "--task", "sst2", "--test-limit", "8", "--quiet")).returncode == 0
    r = cli(*_tune(tiny_server, out, "--task", "sst2", "--test-limit", "8"))
    assert r.returncode == 4 and f"bbt tune --resume {out}" in r.stderr  # docs/cli.md: a run-directory problem
