"""This repository's server against a real vLLM on the same folder: same requests, same answers (to 1e-3), and
the ``vllm`` backend tuning against vLLM with its calls and tokens equal to what vLLM itself counted."""

from __future__ import annotations

import base64
import inspect
import io
import json

import httpx
import numpy as np
import pytest
import torch

from bbt_client.backends import make_backend
from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.backends.vllm import VLLMBackend
from bbt_client.cli.commands import main
from server_stub.testing import vllm_counters
from tests.vllm.conftest import SERVED

pytestmark = pytest.mark.vllm

TEMPLATE = "{text} it was {mask}"
WORDS = ["great", "bad", "good", "terrible"]
TEXTS = ["a fine film with warm performances", "dull and far too long", "stocks fell on monday"]
PROMPT = "the capital of france is"
ATOL = 1e-3


def post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def both(vllm_url: str, stub_url: str, body: dict, path: str = "/v1/completions") -> tuple[dict, dict]:
    theirs, ours = post(vllm_url, body, path), post(stub_url, body, path)
    assert ours.status_code == theirs.status_code, (body, ours.text, theirs.text)
    return theirs.json(), ours.json()


def same(ours, theirs, where: str = "") -> None:
    """Equal JSON, floats to ATOL; vLLM's keys this server does not write are not compared."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        for k, v in theirs.items():
            if k in ours:
                same(ours[k], v, f"{where}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) or isinstance(ours, float):
        assert ours == pytest.approx(theirs, abs=ATOL), where
    else:
        assert ours == theirs, (where, ours, theirs)


def answer(resp: dict) -> dict:
    return {"choices": resp["choices"], "usage": {k: resp["usage"][k] for k in
                                                  ("prompt_tokens", "completion_tokens", "total_tokens")}}


def _save(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------- the same requests, the same answers


BODIES = {
    "logprobs5": {"prompt": PROMPT, "max_tokens": 1, "logprobs": 5},
    "logprobs20_ids": {"prompt": [PROMPT, "hello world"], "max_tokens": 1, "logprobs": 20,
                       "return_tokens_as_token_ids": True},
    "echo_max_tokens0": {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0},
    "echo_batch": {"prompt": [PROMPT, "it was great", "a dull film"], "echo": True, "logprobs": 0, "max_tokens": 1},
    "echo_token_ids": {"prompt": [[101, 1996, 3007], [101, 7592]], "echo": True, "logprobs": 1, "max_tokens": 1},
    "prompt_logprobs": {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0},
    "logit_bias_raw": {"prompt": PROMPT, "max_tokens": 1, "logprobs": 5, "logit_bias": {"2307": 100}},
    "allowed_raw": {"prompt": PROMPT, "max_tokens": 1, "logprobs": 4, "allowed_token_ids": [2307, 2919, 2204],
                    "return_tokens_as_token_ids": True},
    "logprob_token_ids": {"prompt": PROMPT, "max_tokens": 1, "logprobs": 2, "return_tokens_as_token_ids": True,
                          "logprob_token_ids": list(range(2000, 2025))},
}


@pytest.mark.parametrize("name", list(BODIES))
def test_same_completions(vllm_url, stub_url, name):
    theirs, ours = both(vllm_url, stub_url, {"model": SERVED, "temperature": 0, **BODIES[name]})
    same(answer(ours), answer(theirs))


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": PROMPT, "logprob_token_ids": [5]}, "logprob_token_ids"),
    ({"prompt": ""}, "prompt"),
    ({"prompt_embeds": _save(torch.zeros(2, 384)), "echo": True}, None),
    ({"messages": [{"role": "user", "content": PROMPT}]}, None),
], ids=["logprobs21", "prompt_logprobs21", "token_ids_without_logprobs", "empty", "echo_embeds", "no_chat_template"])
def test_same_refusals(vllm_url, stub_url, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    theirs, ours = both(vllm_url, stub_url, {"model": SERVED, **body}, path)
    mine = ours["error"]["message"]
    assert theirs["error"]["message"].startswith(mine.split(" (parameter=")[0]), (mine, theirs)
    if param:
        assert ours["error"]["param"] == theirs["error"]["param"] == param


def test_label_scores_on_the_same_prompt_embeds(vllm_url, stub_url, llama_dir):
    """The vllm backend's own request bodies (BOS, prompt rows, text embeddings), sent to both servers; the label
    words' log-probs read exactly with logprob_token_ids."""
    b = make_backend("vllm", vllm_url, embeddings_from=str(llama_dir), embeds_dtype="float32", model=SERVED)
    cands = np.random.default_rng(0).normal(0, 0.02, (2, 3, 384)).astype(np.float32)
    seqs = b._sequences(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch(kind="shallow", candidates=cands)))
    ids = b._label_ids(WORDS)
    body = {**b.request_body(seqs, ids), "logprob_token_ids": ids}
    theirs, ours = both(vllm_url, stub_url, body)
    keys = [f"token_id:{i}" for i in ids]
    got = np.array([[c["logprobs"]["top_logprobs"][0][k] for k in keys] for c in ours["choices"]])
    want = np.array([[c["logprobs"]["top_logprobs"][0][k] for k in keys] for c in theirs["choices"]])
    assert got.shape == (len(seqs), len(ids)) and (got > -9999).all()
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert ours["usage"] == {k: theirs["usage"][k] for k in ours["usage"]}
    # the backend's default request as it stands (allowed_token_ids under raw log-probs): the same answer too
    theirs, ours = both(vllm_url, stub_url, b.request_body(seqs, ids))
    same(answer(ours), answer(theirs))


async def test_vllm_backend_scores_the_same_on_both(vllm_url, stub_url, llama_dir):
    jobs = [ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot()),
            ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch(kind="shallow", candidates=np.random.default_rng(1).normal(
                0, 0.02, (2, 3, 384)).astype(np.float32)))]
    for job in jobs:
        res = [await make_backend("vllm", url, embeddings_from=str(llama_dir), embeds_dtype="float32",
                                  model=SERVED).score(job) for url in (vllm_url, stub_url)]
        np.testing.assert_allclose(res[1].logits, res[0].logits, atol=ATOL)
        assert res[1].tokens == res[0].tokens and res[1].extra == res[0].extra


def _client_scoring_option(backend_cls) -> str | None:
    """The name of the client's scoring-strategy option, when it has one (echo / logprob_token_ids scoring)."""
    params = inspect.signature(backend_cls.__init__).parameters
    return next((p for p in ("scoring", "score_with", "strategy") if p in params), None)


async def test_vllm_backend_covers_every_label_through_exact_scoring(vllm_url, stub_url, llama_dir):
    option = _client_scoring_option(VLLMBackend)
    if option is None:
        pytest.skip("bbt_client's vllm backend has no scoring strategy option yet: under vLLM's raw log-probs its "
                    "allowed_token_ids request returns one label's log-prob (logprob_token_ids scoring fixes that)")
    job = ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot())
    res = [await make_backend("vllm", url, embeddings_from=str(llama_dir), embeds_dtype="float32", model=SERVED,
                              **{option: "logprob_token_ids"}).score(job) for url in (vllm_url, stub_url)]
    for r in res:
        assert r.extra.get("missing_label_logprobs", 0) == 0
    np.testing.assert_allclose(res[1].logits, res[0].logits, atol=ATOL)


# ---------------------------------------------------------------------- tuning against vLLM, metered by vLLM


@pytest.mark.parametrize("method", ["bbt", "gdfo"])
def test_vllm_backend_tunes_and_its_counts_are_vllms(vllm_url, llama_dir, tmp_path, method):
    before = vllm_counters(vllm_url)
    argv = ["tune", "--backend", "vllm", "--endpoint", vllm_url, "--backend-opt", f"embeddings_from={llama_dir}",
            "--backend-opt", f"model={SERVED}", "--backend-opt", "embeds_dtype=float32", "--task", "sst2",
            "--template", TEMPLATE, "--method", method, "--shots", "2", "--seed", "42", "--budget-calls", "9",
            "--test-limit", "8", "--eval-every", "1", "--opt", "popsize=2", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    after = vllm_counters(vllm_url)
    delta = {k: after[k] - before[k] for k in after}
    assert result["tokens_used"] == delta["prompt_tokens"] + delta["generation_tokens"] > 0, (result, delta)
    # the budget counts candidate evaluations; the backend packs several candidates into one HTTP request
    assert 0 < delta["calls"] <= result["api_calls_used"] <= 9, (result, delta)
    # logprob_token_ids reads any words in one sequence: the default fit asked vLLM for many ids at once
    assert len(result["fitted_verbalizer"]["words"]) > 10 and result["label_score_coverage"] == 1.0


def _openai_echo_option() -> str | None:
    from bbt_client.backends.openai_text import OpenAITextBackend

    return _client_scoring_option(OpenAITextBackend)


@pytest.mark.parametrize("method", ["bdpl", "cmaes-tokens"])
def test_openai_backend_tunes_text_prompts_through_echo_scoring(vllm_url, tmp_path, method):
    option = _openai_echo_option()
    if option is None:
        pytest.skip("bbt_client's openai backend has no echo scoring yet: under vLLM's raw log-probs its logit_bias "
                    "label reading does not see the biased labels")
    before = vllm_counters(vllm_url)
    argv = ["tune", "--backend", "openai", "--endpoint", vllm_url, "--backend-opt", f"model={SERVED}",
            "--backend-opt", f"{option}=echo", "--task", "sst2", "--template", TEMPLATE, "--method", method,
            "--shots", "2", "--seed", "42", "--budget-calls", "8", "--test-limit", "8", "--opt", "popsize=4",
            "--opt", "prompt_tokens=2", "--opt", "vocab_size=10", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    delta = {k: v - before[k] for k, v in vllm_counters(vllm_url).items()}
    assert result["tokens_used"] == delta["prompt_tokens"] + delta["generation_tokens"] > 0
    assert 0 < delta["calls"] <= result["api_calls_used"] <= 8
