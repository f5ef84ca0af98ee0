"""Label-scoring strategies and the endpoint probe against recorded answers: a real vLLM 0.32.0 (default raw
logprobs, and processed), llama.cpp's and llama-cpp-python's documented shapes (see tests/unit/backends/replays.py)."""

from __future__ import annotations

import pytest
import respx

from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.backends.http import RetryPolicy
from bbt_client.backends.openai_text import OpenAITextBackend
from bbt_client.errors import ProtocolError
from tests.unit.backends.replays import ReplayServer, bert_tokenizer, load

URL = "http://vllm.test"
SERVED = "/work/staging/vllm/tiny-llama"
FAST = RetryPolicy(max_retries=1, backoff_initial_s=0.001, backoff_max_s=0.002, jitter_s=0)
RAW = ["models", "completions_logprobs21", "completions_logprobs20", "completions_logit_bias_one",
       "completions_batch_echo_max_tokens0", "completions_echo_max_tokens0", "completions_prompt_logprobs0",
       "completions_logprob_token_ids", "completions_logprobs5", "completions_allowed_token_ids",
       "embeds_of_token_ids_match", "embeds_logprob_token_ids", "embeds_float16", "embeds_echo_max_tokens0"]
PROCESSED = ["processed_completions_logit_bias_one", "processed_embeds_client_shape_float32",
             "processed_completions_logprob_token_ids"]


def vllm(*extra: str) -> ReplayServer:
    return ReplayServer(load(*(f"vllm/{n}" for n in RAW + list(extra))))


def text_backend(**kw) -> OpenAITextBackend:
    kw.setdefault("model", SERVED)
    return OpenAITextBackend(URL, retry=FAST, **kw)


def serve(fake: ReplayServer) -> None:
    respx.route(host="vllm.test").mock(side_effect=fake)


def test_the_fake_tokenizer_is_the_recorded_servers():
    tok = bert_tokenizer()
    for rec in load("vllm/tokenize_label_words", "vllm/tokenize_no_special_tokens"):
        assert tok.encode(rec["request"]["body"]["prompt"], add_special_tokens=False).ids == rec["response"]["tokens"]


@respx.mock
async def test_probe_of_a_default_vllm_finds_raw_logprobs_and_picks_logprob_token_ids():
    fake = vllm()
    serve(fake)
    b = text_backend()
    r = await b.probe(label_words=["good", "bad", "happy"])
    assert r["models"] == [SERVED] and r["model_served"] is True
    assert r["tokenize"] == {"route": True, "field": "prompt"}
    assert r["logprobs_cap"] == 20 and r["completions_shape"] == "openai"
    assert r["bias_in_logprobs"] is False  # raw mode: the biased token comes back at its unbiased value
    assert r["echo"] is True and r["batching"] == "list" and r["prompt_logprobs"] is True
    assert r["logprob_token_ids"] is True and r["chat_only"] is False
    assert r["scoring"]["strategy"] == "logprob_token_ids" and r["scoring"]["exact"] is True
    assert r["calls"] == 6 and b.strategy == "logprob_token_ids" and b.max_logprobs == 20


@respx.mock
async def test_probe_of_a_processed_vllm_sees_the_bias_in_logprobs():
    serve(vllm(*PROCESSED))
    b = text_backend(scoring="bias")
    r = await b.probe(label_words=["great", "bad", "positive", "negative"])
    assert r["bias_in_logprobs"] is True
    assert r["scoring"] | {"facts": None} == {"strategy": "bias", "exact": True, "sequences_per_text": 1,
                                              "cost": r["scoring"]["cost"], "facts": None, "told": True}


@respx.mock
@pytest.mark.parametrize("how", ["echo", "prompt_logprobs"])
async def test_exact_scores_are_the_label_tokens_own_logprobs_summed(how):
    serve(vllm())
    b = text_backend(scoring=how)
    # "The capital of France is": [CLS] the capital of france is, logprobs recorded by the server
    france, is_ = -10.284852027893066, -10.551684379577637
    one = await b.score(ScoreJob("{text} {mask}", ["The capital of France"], ["is"], PromptBatch.zero_shot()))
    two = await b.score(ScoreJob("{text} {mask}", ["The capital of"], ["France is"], PromptBatch.zero_shot()))
    assert one.logits[0, 0, 0] == pytest.approx(is_, abs=1e-5) and one.floored_scores == 0
    assert two.logits[0, 0, 0] == pytest.approx(france + is_, abs=1e-5) and two.floored_scores == 0
    assert one.tokens > 0 and one.extra["scoring"] == how


@respx.mock
async def test_a_label_tokenized_otherwise_in_context_is_refused_not_guessed():
    serve(vllm())
    b = text_backend(scoring="prompt_logprobs", label_token_ids={"is": 2605})  # says " is" is "france"'s id
    with pytest.raises(ProtocolError, match="tokenizes the label word differently"):
        await b.score(ScoreJob("{text} {mask}", ["The capital of France"], ["is"], PromptBatch.zero_shot()))


@respx.mock
async def test_logprob_token_ids_reads_every_label_exactly():
    serve(vllm())
    b = text_backend(scoring="logprob_token_ids")
    res = await b.score(ScoreJob("{text} {mask}", ["The capital of France is"], ["good", "bad", "happy"],
                                 PromptBatch.zero_shot()))
    assert res.logits[0, 0].tolist() == pytest.approx([-10.776488304138184, -10.072159767150879, -10.225529670715332])
    assert res.floored_scores == 0 and res.label_scores == 3


@respx.mock
async def test_top_k_on_raw_vllm_floors_the_label_outside_it_and_counts_it():
    serve(vllm())
    b = text_backend(scoring="top-k")
    res = await b.score(ScoreJob("{text} {mask}", ["The capital of France is"], ["ventilation", "great"],
                                 PromptBatch.zero_shot()))
    assert res.floored_scores == 1 and res.label_scores == 2
    assert res.logits[0, 0, 1] < res.logits[0, 0, 0]


@respx.mock
async def test_llama_cpp_server_shapes_are_read():
    fake = ReplayServer(load(*(f"llamacpp/{n}" for n in (
        "models", "completions_logprobs21", "completions_logit_bias", "completions_echo_list",
        "completions_prompt_logprobs", "completions_by_ids", "completions_two_texts"))), tokenize="llamacpp")
    serve(fake)
    b = text_backend(model="model.gguf")
    r = await b.probe(label_words=["great"])
    assert r["tokenize"] == {"route": True, "field": "content"} and b.tokenize_field == "content"
    assert r["completions_shape"] == "llama.cpp (logprobs.content)" and r["batching"] == "array"
    assert r["bias_in_logprobs"] is False and r["echo"] is False and r["prompt_logprobs"] is False
    assert r["logprob_token_ids"] is False and r["scoring"]["strategy"] == "top-k"
    res = await b.score(ScoreJob("Review: {text} Sentiment:{mask}", ["fun", "dull"], ["good", "bad"],
                                 PromptBatch.zero_shot()))
    assert res.logits[0].ravel().tolist() == pytest.approx([-0.3, -1.9, -3.0, -0.2]) and res.floored_scores == 0
    assert res.tokens == 12  # the array's usage, summed


@respx.mock
async def test_llama_cpp_python_gets_one_prompt_per_request_after_the_probe():
    fake = ReplayServer(load(*(f"llamacpp_python/{n}" for n in (
        "models", "tokenize_prompt", "completions_logprobs21", "completions_echo_list", "completions_list",
        "completions_prompt_logprobs", "completions_text0", "completions_text1"))), tokenize=None)
    serve(fake)
    b = text_backend(model="model")
    r = await b.probe(label_words=["good", "bad"])
    assert r["batching"] == "one per request" and b.prompts_per_request == 1
    assert r["echo"] is None  # not tried alone: llama-cpp-python reads max_tokens 0 as "until the context is full"
    assert r["tokenize"]["route"] is False and r["scoring"]["strategy"] == "top-k"
    assert sum(1 for path, body in fake.seen if isinstance(body, dict) and body.get("echo")) == 1
    res = await b.score(ScoreJob("Review: {text} Sentiment:{mask}", ["fun", "dull"], ["good", "bad"],
                                 PromptBatch.zero_shot()))
    assert res.floored_scores == 1  # " good" is not in the second text's top logprobs


# ---------------------------------------------------------------------- vLLM prompt embeddings (backend "vllm")

pytest.importorskip("torch")
from bbt_client.backends.vllm import VLLMBackend  # noqa: E402
from tests.unit.backends.test_vllm_backend import model_dir  # noqa: E402,F401 - the tiny model folder fixture

LABELS = ["great", "bad", "positive", "negative"]  # ids 2307, 2919, 3893, 4997 in the recorded server's vocabulary


def embeds_backend(model_dir, **kw) -> VLLMBackend:
    return VLLMBackend(URL, embeddings_from=str(model_dir), retry=FAST, embeds_dtype="float32", **kw)


@respx.mock
@pytest.mark.parametrize("processed", [False, True])
async def test_embeds_probe_picks_logprob_token_ids_and_sees_the_logprobs_mode(model_dir, processed):
    serve(vllm(*PROCESSED) if processed else vllm())
    b = embeds_backend(model_dir)
    r = await b.probe(label_words=LABELS)
    assert r["model"] == SERVED and r["prompt_embeds"] is True and r["logprobs_cap"] == 20
    assert r["logprob_token_ids"] is True and r["restricted_in_logprobs"] is processed
    assert r["scoring"]["strategy"] == "logprob_token_ids" and r["scoring"]["exact"] is True and r["calls"] == 5
    res = await b.score(ScoreJob("{text} It was {mask}", ["fun"], LABELS, PromptBatch.zero_shot()))
    want = [-10.558961868286133, -10.016397476196289, -10.57125473022461, -11.542530059814453]
    assert res.logits[0, 0].tolist() == pytest.approx(want) and res.floored_scores == 0


@respx.mock
async def test_allowed_token_ids_on_a_default_vllm_floors_all_labels_but_the_sampled_one(model_dir):
    serve(vllm())
    b = embeds_backend(model_dir, scoring="allowed_token_ids", model=SERVED)
    res = await b.score(ScoreJob("{text} It was {mask}", ["fun"], LABELS, PromptBatch.zero_shot()))
    assert res.floored_scores == 3 and b.scoring(4).exact is False


@respx.mock
def test_bbt_probe_prints_what_the_endpoint_can_do_and_the_strategy(capsys):
    from bbt_client.cli.commands import main

    serve(vllm())
    assert main(["probe", "--endpoint", URL, "--backend", "openai", "--backend-opt", f"model={SERVED}",
                 "--label-words", "good,bad,happy"]) == 0
    rows = {line[:30].strip(): line[30:] for line in capsys.readouterr().out.splitlines()}
    assert rows["logprobs cap"] == "20" and rows["logit_bias shown in logprobs"] == "no"
    assert rows["echo"] == rows["prompt_logprobs"] == rows["logprob_token_ids"] == "yes"
    assert rows["/tokenize"] == "reads 'prompt'" and rows["prompt lists"] == "list"
    assert rows["strategy"].startswith("logprob_token_ids (exact)") and rows["probe calls"].startswith("6 ")
