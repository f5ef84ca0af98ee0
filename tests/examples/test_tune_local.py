"""examples/tune_local.py: what ``make tune`` runs.

One run goes the real way (a subprocess that starts the server on the bundled model, exactly as the
Makefile does, on a budget of a few generations); the others use the in-process tiny server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bbt_client.run.results import load_result, read_history

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~30 s: starts a real server process on the default model; still run by default
def test_make_tune_path_smoke(tmp_path):
    """The `make tune` command line, shrunk: spawns the default-model server, tunes, prints, stops it."""
    out = tmp_path / "agnews"
    proc = subprocess.run(
        [sys.executable, "examples/tune_local.py", "--task", "agnews", "--out", str(out), "--budget-calls", "20",
         "--popsize", "4", "--shots", "2", "--test-limit", "16", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bbtv2 on agnews (2-shot, seed 42) against all-MiniLM-L6-v2" in proc.stdout
    assert "zero-shot test accuracy" in proc.stdout and "tuned test accuracy" in proc.stdout
    result = load_result(out)
    assert (result.method, result.task, result.model) == ("bbtv2", "agnews", "all-MiniLM-L6-v2")
    assert result.test_examples == 16 and result.generations >= 2
    assert result.api_calls_used <= 20
    assert result.prompt_shape == ([0] if result.bare_template else [6, 5, 384])  # (L, n, D): 6-layer MiniLM
    assert (out / "prompt.npy").exists() and len(read_history(out)) == result.generations


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
def test_against_running_server(example, tiny_server, tmp_path, capsys, method):
    mod = example("tune_local")
    out = tmp_path / method
    rc = mod.main(["--endpoint", tiny_server, "--task", "sst2", "--method", method, "--budget-calls", "30",
                   "--popsize", "4", "--shots", "2", "--test-limit", "8", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"{method} on sst2 (2-shot, seed 42)" in text and "gen " in text  # dev evaluations were printed
    result = load_result(out)
    assert result.method == method and result.api_calls_used <= 30 and result.generations >= 3
    cfg = json.loads((out / "result.json").read_text())["config"]
    assert cfg["method_options"] == {"prompt_tokens": 5, "popsize": 4}


def test_refuses_a_used_run_directory(example, tiny_server, tmp_path, capsys):
    mod = example("tune_local")
    args = ["--endpoint", tiny_server, "--task", "sst2", "--method", "bbt", "--budget-calls", "12", "--popsize", "4",
            "--shots", "2", "--test-limit", "4", "--out", str(tmp_path / "run"), "--quiet"]
    assert mod.main(args) == 0
    assert mod.main(args) == 2
    assert "already" in capsys.readouterr().err


def test_bad_flags_exit_2(example, capsys):
    mod = example("tune_local")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--budget-calls", "0"])
    assert exc.value.code == 2
    assert "--budget-calls must be at least 1" in capsys.readouterr().err
