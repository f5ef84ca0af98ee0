"""``bbt tune --backend openai --method bdpl|cmaes-tokens`` end to end against the real server's OpenAI face.

The bundled model (all-MiniLM-L6-v2, tied head) answers through ``/v1/completions`` exactly as any
OpenAI-compatible endpoint would: text in, next-token logprobs out. Tiny budgets (2-shot AG News, 4 candidates
of 2 slots) keep each run to seconds; what is checked is the plumbing a user relies on: result.json's readable
``prompt_text``, budgets never exceeded, bit-identical resume, ``bbt evaluate`` reproducing the test accuracy.
"""

from __future__ import annotations

import json

import httpx
import pytest

from bbt_client.cli.commands import main
from bbt_client.protocol import join_text_prompt

MODEL = "all-MiniLM-L6-v2"
TEMPLATE = "{text} Topic: {mask}"


def _tune(url: str, out, *extra: str, method: str = "bdpl") -> dict:
    argv = ["tune", "--backend", "openai", "--endpoint", url, "--backend-opt", f"model={MODEL}", "--task", "agnews",
            "--template", TEMPLATE, "--method", method, "--shots", "2", "--seed", "42", "--test-limit", "16",
            "--eval-every", "1", "--opt", "popsize=4", "--opt", "prompt_tokens=2", "--opt", "vocab_size=10",
            "--opt", "empty_prompt_baseline=false", "--opt", "calibrate=true",  # a real prompt's plumbing is under test
            "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    return json.loads((out / "result.json").read_text())


def _history(run) -> list[tuple[float, float]]:
    return [(r["best_loss"], r["mean_loss"]) for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_bdpl_prompt_text_budget_resume_and_evaluate(live_server, tmp_path, capsys):
    straight = _tune(live_server, tmp_path / "straight", "--budget-calls", "20")
    assert straight["prompt_kind"] == "text" and straight["calibrated"] is True
    words = straight["prompt_text"].split()
    assert 2 <= len(words) <= 6 and straight["prompt_sha256"] is None  # 2 slots, each a word or phrase
    assert not (tmp_path / "straight" / "prompt.npy").exists()
    assert straight["api_calls_used"] <= 20 and straight["generations"] >= 2
    assert straight["zero_shot_test_accuracy"] is not None and straight["zero_shot_calibrated_test_accuracy"] is not None
    assert straight["endpoint_reported"]["tokens"] == straight["tokens_used"]  # metered by the endpoint, all counted

    # stopped early, then resumed with the bigger budget: the same run, bit for bit
    head = _tune(live_server, tmp_path / "split", "--budget-calls", "12")
    assert head["api_calls_used"] <= 12 and head["generations"] < straight["generations"]
    assert main(["tune", "--resume", str(tmp_path / "split"), "--budget-calls", "20", "--quiet"]) == 0
    resumed = json.loads((tmp_path / "split" / "result.json").read_text())
    assert _history(tmp_path / "split") == _history(tmp_path / "straight")
    assert resumed["prompt_text"] == straight["prompt_text"] and resumed["test_accuracy"] == straight["test_accuracy"]

    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "straight")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["matches"] and again["test_accuracy"] == straight["test_accuracy"]
    assert main(["report", "--run", str(tmp_path / "straight")]) == 0
    assert straight["prompt_text"] in capsys.readouterr().out

    # the prompt is plain text any client can send: prompt, one space, the rendered template
    body = {"model": MODEL, "prompt": join_text_prompt(straight["prompt_text"], "Oil prices rose. Topic:"),
            "max_tokens": 1, "logprobs": 5}
    assert httpx.post(f"{live_server}/v1/completions", json=body, timeout=30).status_code == 200


@pytest.mark.slow
def test_cmaes_tokens_stops_at_the_token_budget(live_server, tmp_path):
    result = _tune(live_server, tmp_path / "cma", "--budget-calls", "100", "--budget-tokens", "5000",
                   method="cmaes-tokens")
    assert result["stop_reason"] == "tokens" and result["tokens_used"] <= 5000
    assert result["endpoint_reported"]["tokens"] == result["tokens_used"] and result["prompt_text"]


@pytest.mark.slow
def test_label_word_search_through_the_text_api_matches_protocol_v1(live_server, tmp_path):
    """The search scores dozens of candidate words; a text API returns 20 log-probs per token, so the openai
    backend scores them in aligned logit_bias rounds. It must choose the words protocol v1 chooses from raw logits."""
    # the face runs processed logprobs (bias shown): told, so the calls go to the search, not to a probe; 10 calls:
    # the search and its dev check, zero-shot, one generation of 4 and its dev checks (--eval-every 1), the test
    text = _tune(live_server, tmp_path / "text", "--budget-calls", "10", "--search-label-words", "2",
                 "--backend-opt", "scoring=bias", "--backend-opt", "bias_in_logprobs=true")
    assert main(["tune", "--backend", "server", "--endpoint", live_server, "--task", "agnews", "--template", TEMPLATE,
                 "--method", "bbt", "--shots", "2", "--seed", "42", "--test-limit", "16", "--budget-calls", "10",
                 "--search-label-words", "2", "--opt", "popsize=4", "--opt", "prompt_tokens=2",
                 "--opt", "intrinsic_dim=8", "--out", str(tmp_path / "v1"), "--quiet"]) == 0
    v1 = json.loads((tmp_path / "v1" / "result.json").read_text())
    found = text["searched_label_words"]
    assert len(found) == 4 and all(len(ws) == 2 for ws in found) and found == v1["searched_label_words"]
    assert text["verbalizer"] == v1["verbalizer"]  # the same dev check of them, too
    assert text["api_calls_used"] <= 10 and text["endpoint_reported"]["tokens"] == text["tokens_used"]
