"""End to end, as a user runs it: ``bbt tune`` against the real server on the bundled model beats zero-shot.

AG News, 8-shot, a 160-call budget on 200 test examples: the smallest setting in which tuning is clearly
above the zero-shot template (~0.25, chance) on this model. SST-2 is not used here because the default
model's mask-slot readout barely carries sentiment — even white-box gradient prompt tuning gains only ~4
points over zero-shot (README "Results") — so a test on it could not show learning with a clear margin.
"""

from __future__ import annotations

import json

import pytest

from bbt_client.cli.commands import main

MARGIN = 0.08  # accuracy points above zero-shot; measured runs gain 0.11-0.13


def _tune(url: str, out, method: str, *extra: str, calls: int = 160) -> dict:
    argv = ["tune", "--endpoint", url, "--task", "agnews", "--method", method, "--shots", "8", "--seed", "42",
            "--budget-calls", str(calls), "--test-limit", "200", "--opt", "prompt_tokens=5", "--out", str(out),
            "--quiet", *extra]
    assert main(argv) == 0
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_bbtv2_beats_zero_shot_and_evaluate_reproduces_it(live_server, tmp_path, capsys):
    """The prompt search alone: the task's own label words, no fitted verbalizer."""
    result = _tune(live_server, tmp_path / "bbtv2", "bbtv2", "--fit-verbalizer", "0")
    assert result["api_calls_used"] <= 160 and result["stop_reason"] == "calls"
    assert result["test_accuracy"] >= result["zero_shot_test_accuracy"] + MARGIN, result
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "bbtv2")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test_accuracy"] == result["test_accuracy"] and again["matches"]


@pytest.mark.slow
def test_the_default_fitted_verbalizer_beats_the_tasks_own_words_and_evaluate_reproduces_it(live_server, tmp_path,
                                                                                           capsys):
    """Defaults: our server scores any words at no extra cost, so the run fits a verbalizer first (2 calls)."""
    own = _tune(live_server, tmp_path / "own", "bbtv2", "--fit-verbalizer", "0", "--opt", "popsize=4", calls=12)
    result = _tune(live_server, tmp_path / "fit", "bbtv2", "--opt", "popsize=4", calls=12)
    assert result["fitted_verbalizer_used"] and len(result["fitted_verbalizer"]["words"]) > 4 * 10
    assert result["fitted_verbalizer"]["words"][:4] == ["World", "Sports", "Business", "Tech"]
    assert result["test_accuracy"] >= own["zero_shot_test_accuracy"] + MARGIN, (result, own)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "fit")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["matches"], again


@pytest.mark.slow
def test_gdfo_with_an_independent_student_runs_within_budget_and_does_not_regress(live_server, tmp_path):
    """GDFO end to end with its default student (e5-small, not the served MiniLM), verified independent against
    the real server's weight digests, on 80 calls (four generations, gradient steps included). No margin over
    zero-shot is asserted: with the leaking MiniLM student a 160-call run gained 11-13 points; with the
    independent one it measured 0.260 against zero-shot 0.245 (144 calls; 0.255 at 80) -- the old lead was the
    leak, and the three-seed sweep in README "Results" says the same at 400 calls."""
    pytest.importorskip("torch")
    result = _tune(live_server, tmp_path / "gdfo", "gdfo", calls=80)  # plumbing, not learning: 4 generations
    assert result["api_calls_used"] <= 80
    assert result["test_accuracy"] >= result["zero_shot_test_accuracy"], result
    metrics = result["metrics"]
    assert metrics["student_shared_weight_tensors"] == 0  # digests listed by the server, none shared
    assert metrics["gradient_steps"] > 0 and metrics["distill_kl"] >= 0 and 0 <= metrics["student_accuracy"] <= 1
