"""The ``bbt`` command: report table, --json output, plot, and exit code 2 with a clear message on bad input."""

from __future__ import annotations

import json

import pytest

from bbt_client.cli import commands as cli
from bbt_client.run.checkpoint import atomic_write_json
from bbt_client.run.results import RESULT_FILE, GenerationRecord, RunResult, write_history


def write_run(run_dir, method="bbt", test_accuracy=0.625):
    run_dir.mkdir(parents=True)
    result = RunResult(method=method, task="sst2", seed=13, shots=16, model="toy", prompt_kind="shallow",
                       budget_calls=100, api_calls_used=97, tokens_used=1234, generations=4, stop_reason="calls",
                       best_dev_accuracy=0.59375, best_generation=3, test_accuracy=test_accuracy,
                       zero_shot_test_accuracy=0.5, test_examples=872, wall_seconds=12.5, prompt_shape=[5, 8],
                       config={})
    atomic_write_json(run_dir / RESULT_FILE, result.model_dump(mode="json"))
    write_history(run_dir, [GenerationRecord(generation=g, calls=20 * g, tokens=0, phase="", best_loss=1.0 / g,
                                             mean_loss=2.0 / g, best_train_accuracy=0.5, wall_seconds=g,
                                             dev_accuracy=0.5 if g % 2 == 0 else None) for g in range(1, 5)])
    return result


def test_report_prints_one_row_per_run(tmp_path, capsys):
    write_run(tmp_path / "a", "bbt", 0.625)
    write_run(tmp_path / "b", "bbtv2", 0.75)
    assert cli.main(["report", "--run", str(tmp_path / "a"), "--run", str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    header = lines[0].split()
    assert header[:8] == ["run", "method", "task", "seed", "zero_shot_test_accuracy",
                          "zero_shot_calibrated_test_accuracy", "best_dev_accuracy", "test_accuracy"]
    rows = [dict(zip(header, line.split())) for line in lines[1:]]
    assert [r["run"] for r in rows] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [r["method"] for r in rows] == ["bbt", "bbtv2"]
    assert [r["test_accuracy"] for r in rows] == ["0.6250", "0.7500"]
    assert rows[0]["zero_shot_calibrated_test_accuracy"] == "-"  # this run did not calibrate
    assert rows[0]["api_calls_used"] == "97" and rows[0]["wall_seconds"] == "12.5"


def test_one_number_format_per_column(tmp_path, capsys):
    """Seconds print with one decimal whatever their size; accuracies with four."""
    write_run(tmp_path / "a")
    result = json.loads((tmp_path / "a" / RESULT_FILE).read_text())
    result.update(wall_seconds=4.375, zero_shot_calibrated_test_accuracy=0.5)
    (tmp_path / "a" / RESULT_FILE).write_text(json.dumps(result))
    assert cli.main(["report", "--run", str(tmp_path / "a")]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    row = dict(zip(header.split(), row.split()))
    assert row["wall_seconds"] == "4.4" and row["zero_shot_calibrated_test_accuracy"] == "0.5000"


def test_report_json(tmp_path, capsys):
    expected = write_run(tmp_path / "a")
    assert cli.main(["report", "--json", "--run", str(tmp_path / "a")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [expected.model_dump(mode="json", exclude={"config"})]


def test_report_on_a_directory_without_result_exits_4(tmp_path, capsys):
    assert cli.main(["report", "--run", str(tmp_path)]) == 4
    assert "holds no bbt run" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")  # a run that has not finished: the advice must be one that works
    assert cli.main(["report", "--run", str(tmp_path)]) == 4
    assert f"not finished; continue it with `bbt tune --resume {tmp_path}`" in capsys.readouterr().err


def test_a_mistyped_run_directory_is_named_as_missing_not_as_unfinished(tmp_path, capsys):
    missing = tmp_path / "typo"
    for argv in (["report", "--run", str(missing)], ["evaluate", "--run", str(missing)]):
        assert cli.main(argv) == 4
        err = capsys.readouterr().err
        assert f"run directory {missing} does not exist" in err and "resume" not in err


def test_plot_command_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a")
    out = tmp_path / "curve.png"
    assert cli.main(["plot", "--run", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["tune", "--task", "sst2"], "--endpoint is required"),
    (["tune", "--endpoint", "127.0.0.1:8080"], "must start with http://"),
    (["tune", "--endpoint", "http://x", "--opt", "popsize"], "--opt expects KEY=VALUE"),
    (["tune", "--endpoint", "http://x", "--label-words", "negative=bad,great"], "mixes LABEL=WORD"),
    (["tune", "--endpoint", "http://x", "--task", "data.tsv"], "needs --template and --label-words"),
    (["tune", "--endpoint", "http://x", "--shots", "0"], "shots"),
])
def test_bad_configuration_exits_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("argv,message", [
    (["tune", "--method", "sgd"], "invalid choice: 'sgd'"),
    (["tune", "--quiet", "--json"], "not allowed with argument"),
    (["tune", "--budget-calls", "many"], "invalid int value"),
    (["report"], "--run"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_exit_2_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: bbt" in err and message in err


def test_tune_json_lines_then_result(tiny_server, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["tune", "--endpoint", tiny_server, "--task", "sst2", "--method", "bbt", "--shots", "2",
                   "--budget-calls", "20", "--opt", "popsize=4", "--opt", "prompt_tokens=3", "--eval-every", "2",
                   "--test-limit", "4", "--json", "--out", str(out)])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # every line is JSON
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result" and "generation" in kinds and "eval" in kinds
    result = events[-1]
    assert result["method"] == "bbt" and result["api_calls_used"] <= 20
    assert result["test_accuracy"] == json.loads((out / "result.json").read_text())["test_accuracy"]


def test_tune_quiet_prints_only_the_table(tiny_server, tmp_path, capsys):
    rc = cli.main(["tune", "--endpoint", tiny_server, "--task", "sst2", "--method", "bbt", "--shots", "2",
                   "--budget-calls", "12", "--opt", "popsize=4", "--test-limit", "4", "--quiet",
                   "--out", str(tmp_path / "run")])
    assert rc == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line]
    assert lines[0].split()[0] == "run" and lines[1].split()[0] == str(tmp_path / "run")
    assert lines[2].startswith("one generation costs 4 calls") and lines[3].startswith("wrote ") and len(lines) == 4
    assert captured.err == ""


def test_resume_refuses_an_opt_that_changes_what_the_run_set(tmp_path, capsys):
    """--opt on --resume pins an option the run did not name (the job and tuner check the pin); changing one
    the run named is refused before any call."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"endpoint": {"url": "http://127.0.0.1:9"}, "task": {"name": "sst2"}, "method": "bbt",
           "method_options": {"popsize": 6}, "out": str(run)}
    (run / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["tune", "--resume", str(run), "--opt", "popsize=4"]) == 2
    assert "cannot change options the run was made with (popsize)" in capsys.readouterr().err
    assert cli.main(["tune", "--resume", str(run), "--seed", "3"]) == 2
    assert "--resume continues a run as configured" in capsys.readouterr().err


def test_a_refused_pin_on_resume_is_not_saved_and_a_right_one_is(tiny_server, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--budget-calls", "12", "--test-limit", "4", "--quiet"]
    assert cli.main(["tune", "--endpoint", tiny_server, "--task", "sst2", "--method", "bbt", "--shots", "2",
                     "--opt", "popsize=4", "--out", str(out), *base]) == 0
    before = (out / "config.json").read_text()
    assert cli.main(["tune", "--resume", str(out), "--opt", "calibrate=false", *base]) == 2
    assert "options that differ: calibrate (checkpoint: auto, now: off)" in capsys.readouterr().err
    assert (out / "config.json").read_text() == before  # so the user can still pin the right value
    assert cli.main(["tune", "--resume", str(out), "--opt", "calibrate=auto", "--budget-calls", "20",
                     "--test-limit", "4", "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method_options"]["calibrate"] == "auto" and saved["budget"]["calls"] == 20


def test_methods_lists_every_option_with_its_validated_default_and_a_meaning(capsys):
    from bbt_client.methods.registry import config_class, known_methods

    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in known_methods())
    for method in known_methods():
        assert cli.main(["methods", method]) == 0
        header, *lines = capsys.readouterr().out.splitlines()
        at = [header.index(col) for col in ("type", "default", "meaning")]
        fields = config_class(method).model_fields
        assert [line.split()[0] for line in lines] == list(fields)
        for line in lines:
            name, default, meaning = line[:at[0]].strip(), line[at[1]:at[2]].strip(), line[at[2]:].strip()
            assert json.loads(default) == json.loads(json.dumps(fields[name].default, default=str)), name
            assert meaning, f"{method} option {name} has no meaning"
    assert cli.main(["methods", "nope"]) == 2


def test_a_terminal_progress_line_is_ended_before_the_table(capsys):
    """The final checks' events come after the last generation's line: whatever came last, close() ends it."""
    import io

    from bbt_client.run.job import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    display = cli.ProgressDisplay("human", stream=term)
    display(Progress(event="eval", generation=1, calls_used=9, budget_calls=10, tokens_used=0,
                     best_dev_accuracy=0.5, last_loss=None, phase="layer 1/3"))
    assert not term.getvalue().endswith("\n")
    display.close()
    assert term.getvalue().endswith("\n")
    display.close()  # nothing left open: no blank line
    assert not term.getvalue().endswith("\n\n")
