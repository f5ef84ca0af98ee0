"""examples/ask_tell.py: a hand-written ask → score → tell loop against the tiny server."""

from __future__ import annotations

import asyncio

import pytest


@pytest.mark.parametrize("method,shape", [("bbt", (5, 32)), ("bbtv2", (3, 5, 32))])
def test_loop_runs_and_returns_best_prompt(example, tiny_server, capsys, method, shape):
    mod = example("ask_tell")
    out = asyncio.run(mod.run(tiny_server, method, generations=3, shots=2, popsize=4, seed=0))
    assert out["best_prompt"].shape == shape  # tiny BERT: 3 layers, hidden 32, 5 prompt tokens
    assert 0.0 <= out["dev_accuracy"] <= 1.0 and out["calls"] == 12
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("generation")]
    assert len(lines) == 3


def test_main_with_endpoint(example, tiny_server, capsys):
    mod = example("ask_tell")
    assert mod.main(["--endpoint", tiny_server, "--generations", "2", "--shots", "2", "--popsize", "4"]) == 0
    assert "best prompt (5, 32): dev accuracy" in capsys.readouterr().out
