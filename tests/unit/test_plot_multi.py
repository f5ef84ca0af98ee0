"""Several runs and a sweep in one picture: mean line and band over seeds, one colour per method/variant."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from bbt_client import cli  # noqa: E402
from bbt_client.errors import CheckpointError  # noqa: E402
from bbt_client.cli.plot import _curve, _step_mean, plot_runs, plot_sweep  # noqa: E402
from bbt_client.run.results import GenerationRecord, write_history  # noqa: E402
from bbt_client.cli.sweep import write_summary  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _run(path, method, offset, variant=None):
    path.mkdir(parents=True)
    write_history(path, [GenerationRecord(generation=g, calls=20 * g + offset, tokens=0, phase="", best_loss=1 / g,
                                          mean_loss=2 / g, best_train_accuracy=0.5 + g / 40, wall_seconds=g,
                                          dev_accuracy=0.4 + g / 50 + offset / 100 if g % 5 == 0 else None)
                         for g in range(1, 21)])
    (path / "config.json").write_text(json.dumps({"method": method}))
    if variant:
        (path / "sweep-job.json").write_text(json.dumps({"method": method, "variant": variant, "task": "t",
                                                         "seed": offset}))


def test_step_mean_holds_each_curve_between_its_points():
    a = (np.array([10.0, 20.0, 30.0]), np.array([0.1, 0.2, 0.3]))
    b = (np.array([15.0, 25.0, 35.0]), np.array([0.5, 0.6, 0.7]))
    x, v = _step_mean([a, b])
    assert x.tolist() == [15, 20, 25, 30]  # only where both runs have started and not yet ended
    assert v.tolist() == [[0.1, 0.2, 0.2, 0.3], [0.5, 0.5, 0.6, 0.6]]


@pytest.mark.parametrize("metric, band", [("dev", "minmax"), ("train", "std"), ("loss", "minmax")])
def test_several_runs_in_one_png_via_the_cli(tmp_path, capsys, metric, band):
    runs = [tmp_path / f"r{i}" for i in range(4)]
    for i, r in enumerate(runs):
        _run(r, "bbt" if i < 2 else "bbtv2", offset=i, variant="default" if i else None)
    out = tmp_path / "many.png"
    argv = ["plot", "--run", *map(str, runs), "--metric", metric, "--band", band, "--ceiling", "0.745",
            "--out", str(out)]
    assert cli.main(argv) == 0
    assert out.read_bytes()[:8] == PNG and f"wrote {out}" in capsys.readouterr().out


def test_loss_curve_is_each_generations_best_so_a_drift_upwards_shows():
    losses = [1.3, 1.2, 1.25, 1.33]  # GDFO's old failure: the search's best rose after the first generations
    history = [GenerationRecord(generation=g, calls=20 * g, tokens=0, phase="", best_loss=loss, mean_loss=loss + 0.1,
                                best_train_accuracy=0.5, wall_seconds=g) for g, loss in enumerate(losses, 1)]
    x, y = _curve(history, "loss")
    assert x.tolist() == [20, 40, 60, 80] and y.tolist() == losses


def test_runs_without_dev_checks_are_a_clear_error(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    write_history(run, [GenerationRecord(generation=1, calls=20, tokens=0, phase="", best_loss=1.0, mean_loss=1.0,
                                         best_train_accuracy=0.5, wall_seconds=1.0)])
    with pytest.raises(CheckpointError, match="no dev checks"):
        plot_runs([run])
    assert plot_runs([run], tmp_path / "train.png", metric="train").read_bytes()[:8] == PNG


def _summary(tmp_path):
    group = lambda m, v, accs: {  # noqa: E731
        "task": "agnews", "method": m, "variant": v,
        "budgets": {str(b): {"mean": float(np.mean(a)), "std": float(np.std(a)), "runs": len(a), "seeds": [13, 42],
                             "test_accuracy": a, "api_calls_used": b - 14, "best_dev_accuracy": 0.5,
                             "wall_seconds": 1.0} for b, a in zip((100, 200), accs)}}
    summary = {"budgets": [100, 200], "groups": [group("bbt", "default", [[0.3, 0.34], [0.36, 0.4]]),
                                                 group("bbt", "reference", [[0.31, 0.33], [0.41, 0.45]])],
               "zero_shot": [{"task": "agnews", "variant": "default", "seeds": [13, 42], "mean": 0.24, "std": 0.0,
                              "runs": 2}], "missing": [], "failed": []}
    write_summary(tmp_path, summary)


def test_sweep_plot_is_written_next_to_the_summary(tmp_path, capsys):
    _summary(tmp_path)
    assert cli.main(["plot", "--sweep", str(tmp_path), "--ceiling", "0.745"]) == 0
    assert (tmp_path / "accuracy_vs_calls.png").read_bytes()[:8] == PNG
    out = plot_sweep(tmp_path, tmp_path / "std.png", band="std")
    assert out.read_bytes()[:8] == PNG


def test_several_sweeps_in_one_picture_keep_every_group_and_one_zero_shot_line(tmp_path, capsys):
    from bbt_client.cli.plot import _merged_summaries

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _summary(a)
    _summary(b)
    summary = json.loads((b / "summary.json").read_text())
    summary["groups"][0]["budgets"]["400"] = dict(summary["groups"][0]["budgets"]["200"], api_calls_used=386)
    summary["groups"].append({**summary["groups"][1], "variant": "other"})
    write_summary(b, summary)
    merged = _merged_summaries([a, b])
    assert len(merged["groups"]) == 3 and len(merged["zero_shot"]) == 1  # bbt/default once: b's, to 400 calls
    assert [len(g["budgets"]) for g in merged["groups"]] == [3, 2, 2]
    out = tmp_path / "both.png"
    assert cli.main(["plot", "--sweep", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_sweep_plot_without_summary_exits_4(tmp_path, capsys):
    assert cli.main(["plot", "--sweep", str(tmp_path)]) == 4
    assert "bbt sweep" in capsys.readouterr().err
