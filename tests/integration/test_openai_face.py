"""The server's OpenAI/vLLM face against independent clients: the official ``openai`` SDK, raw HTTP, and the
``vllm`` and ``openai`` backends scoring end to end with real logits (no fakes).

Where the face and protocol v1 see the same token sequence ([CLS] text It was [MASK] [SEP]) their label scores
must agree up to a shift: the face returns log-softmax values, ``/v1/score`` raw logits, and a log-softmax (over
the vocabulary, or over the allowed labels) only subtracts a per-sequence constant.
"""

from __future__ import annotations

import base64
import io
import pickle

import httpx
import numpy as np
import openai
import pytest
import torch

from bbt_client.backends import make_backend
from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.backends.causal_template import prefix_before_mask
from bbt_client.backends.local_embeddings import LocalEmbeddings
from bbt_client.backends.vllm import encode_prompt_embeds
from bbt_client.errors import ConfigError, RequestRejected
from bbt_client.protocol import ScoreRequest, ScoreResponse, ShallowPrompt, Tensor
from server_stub.testing import run_server

torch.set_num_threads(1)

NAME = "all-MiniLM-L6-v2"
KEY = "face-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = "{text} It was {mask}"
WORDS = ["great", "bad", "good", "terrible"]
TEXTS = ["a fine film with warm performances", "dull and far too long", "stocks fell on monday"]


#: MiniLM's tokenizer has none; chat needs one, as on vLLM.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def face(default_model_dir):
    """OpenAI-like: log-probs after logit_bias (what the openai backend's label bias relies on), a chat template."""
    with run_server("default", threads=1, api_key=KEY, enable_prompt_embeds=True, max_body_bytes=2_000_000,
                    logprobs_mode="processed_logprobs", chat_template=CHAT_TEMPLATE) as url:
        yield url


@pytest.fixture(scope="module")
def client(face):
    return openai.OpenAI(base_url=face + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def emb(default_model_dir):
    return LocalEmbeddings(default_model_dir)


@pytest.fixture(scope="module")
def plain_face(tiny_bert_dir):
    """No --enable-prompt-embeds, no chat template, the default (vLLM's raw) logprobs mode and a logprob cap of 5."""
    with run_server(tiny_bert_dir, threads=1, max_logprobs=5) as url:
        yield url


def post(url: str, path: str, body: dict | bytes, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={**AUTH, "content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, headers=AUTH, timeout=60, **kw)


def v1_logits(url: str, texts, prompt=None) -> np.ndarray:
    req = ScoreRequest(template=TEMPLATE, texts=list(texts), label_words=WORDS, **({"prompt": prompt} if prompt else {}))
    r = post(url, "/v1/score", req.model_dump(mode="json"))
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content).logits.to_array()


def label_ids(url: str) -> list[int]:
    out = []
    for w in WORDS:
        r = post(url, "/tokenize", {"prompt": " " + w, "add_special_tokens": False})
        assert r.status_code == 200, r.text
        (tid,) = r.json()["tokens"]
        out.append(tid)
    return out


def centred(x: np.ndarray) -> np.ndarray:
    return x - x[..., :1]


def openai_error(r: httpx.Response, status: int, says: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err) and says in err["message"], err
    return err


def assert_serves(url: str) -> None:
    r = post(url, "/v1/completions", {"prompt": "it was", "max_tokens": 1, "logprobs": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text


# ---------------------------------------------------------------------- the openai SDK as a client


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completions_string_and_list_prompts(client, face):
    one = client.completions.create(model=NAME, prompt="the movie was", max_tokens=1, logprobs=5)
    (choice,) = one.choices
    top = choice.logprobs.top_logprobs[0]
    assert len(top) == 5 and all(v <= 0 for v in top.values())
    assert choice.text.strip() == max(top, key=top.get) == choice.logprobs.tokens[0]
    many = client.completions.create(model=NAME, prompt=["the movie was", "stocks fell , this is about"],
                                     max_tokens=1, logprobs=3)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].logprobs.top_logprobs[0] == pytest.approx(dict(list(top.items())[:3]), abs=1e-5)
    counts = [post(face, "/tokenize", {"prompt": p}).json()["count"] for p in ["the movie was",
                                                                              "stocks fell , this is about"]]
    assert many.usage.prompt_tokens == sum(counts) and many.usage.completion_tokens == 2
    assert many.usage.total_tokens == sum(counts) + 2


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "the movie was"}],
                                       max_tokens=1, logprobs=True, top_logprobs=4)
    first = r.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 4 and first.token == first.top_logprobs[0].token == r.choices[0].message.content.strip()
    plain = client.completions.create(model=NAME, prompt="the movie was", max_tokens=1, logprobs=4)
    assert {t.token: t.logprob for t in first.top_logprobs} == pytest.approx(plain.choices[0].logprobs.top_logprobs[0],
                                                                              abs=1e-5)


def test_logit_bias_changes_the_answer_and_the_logprobs(client, face):
    base = client.completions.create(model=NAME, prompt="the movie was", max_tokens=1, logprobs=1)
    great = label_ids(face)[0]
    biased = client.completions.create(model=NAME, prompt="the movie was", max_tokens=1, logprobs=1,
                                       logit_bias={str(great): 100})
    assert base.choices[0].text.strip() != "great" and biased.choices[0].text.strip() == "great"
    assert biased.choices[0].logprobs.token_logprobs[0] > -1e-3  # processed mode: the bias shows in logprobs


def test_auth_errors(face):
    bad = openai.OpenAI(base_url=face + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401 and exc.value.body["type"] == "authentication_error"
    assert httpx.get(face + "/v1/health").status_code == 200  # health stays public, as in protocol v1
    openai_error(httpx.post(face + "/tokenize", json={"prompt": "x"}), 401, "API key")


def test_bad_requests_are_400_in_openai_shape(client, face):
    with pytest.raises(openai.BadRequestError, match="max_tokens=2"):
        client.completions.create(model=NAME, prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="greater than max allowed: 20"):
        client.completions.create(model=NAME, prompt="x", max_tokens=1, logprobs=21)
    with pytest.raises(openai.BadRequestError, match="max allowed"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], logprobs=True,
                                       top_logprobs=21)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="model", prompt="x", max_tokens=1)  # the folder's name is not served
    for body, says in [
        (b'{"prompt": ', "not valid JSON"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "'abc' is not a token id"),
        ({"prompt": "x", "logit_bias": {"99999999": 1}}, "not a token id"),
        ({"prompt": "x", "logit_bias": {"5": 500}}, "between -100 and 100"),
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": [1, 2, 99999999]}, "out-of-vocab token ids"),
        ({"prompt": [[1, 2], []]}, "empty"),
        ({"prompt": []}, "empty"),
        ({"prompt": ""}, "must be provided and non-empty"),
        ({"prompt": "x", "allowed_token_ids": [-1]}, "out-of-vocab"),
        ({"prompt": "x", "logprobs": -1}, "greater than max allowed: 20 (parameter=logprobs, value=30522)"),
        ({"prompt": "x", "logprobs": -2}, "must be a positive value or -1"),
        ({"prompt": "x", "prompt_logprobs": 21}, "Requested prompt logprobs of 21"),
        ({"prompt": "x", "logprob_token_ids": [5]}, "`logprobs` must be set"),
        ({"prompt": "x", "echo": True, "prompt_embeds": _save(torch.zeros(2, 384))}, "Echo is unsupported"),
    ]:
        err = openai_error(post(face, "/v1/completions", body), 400, says)
        assert err["type"] == "invalid_request_error"
    openai_error(post(face, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "top_logprobs": 2}), 400, "logprobs=true")
    openai_error(post(face, "/v1/completions", {"prompt": "word " * 600}), 400, "maximum context length is 512")
    openai_error(post(face, "/v1/completions", {"prompt": "x" * 2_100_000}), 413, "--max-body-bytes")
    assert_serves(face)


def test_minus_inf_is_clamped_to_minus_9999(face):
    ids = label_ids(face)[:2]
    r = post(face, "/v1/completions", {"prompt": "the movie was", "logprobs": 5, "allowed_token_ids": ids,
                                       "return_tokens_as_token_ids": True})
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) == 5 and sorted(top.values()).count(-9999.0) == 3
    assert {f"token_id:{i}" for i in ids} <= set(top)
    allowed = [top[f"token_id:{i}"] for i in ids]
    assert np.logaddexp(*allowed) == pytest.approx(0.0, abs=1e-6)  # log-softmax over the allowed set


def test_usage_is_metered(face):
    before = httpx.get(face + "/v1/usage", headers=AUTH).json()
    post(face, "/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 1})
    after = httpx.get(face + "/v1/usage", headers=AUTH).json()
    assert after["requests"] == before["requests"] + 1 and after["sequences"] == before["sequences"] + 3


# ---------------------------------------------------------------------- agreement with protocol v1


def test_text_completions_agree_with_v1_score(face):
    ids = label_ids(face)
    prompts = [prefix_before_mask(TEMPLATE, t) for t in TEXTS]
    r = post(face, "/v1/completions", {"model": NAME, "prompt": prompts, "max_tokens": 1, "logprobs": 4,
                                       "logit_bias": {str(i): 100 for i in ids}, "return_tokens_as_token_ids": True})
    got = np.array([[c["logprobs"]["top_logprobs"][0][f"token_id:{i}"] for i in ids] for c in r.json()["choices"]])
    np.testing.assert_allclose(centred(got), centred(v1_logits(face, TEXTS)[0]), atol=2e-4)


def test_prompt_embeds_give_the_text_paths_logits(face, emb):
    prompt = "the movie was"
    rows = emb.embed(emb.tokenizer.encode(prompt))
    body = {"max_tokens": 1, "logprobs": 10, "return_tokens_as_token_ids": True}
    text = post(face, "/v1/completions", {**body, "prompt": prompt}).json()["choices"][0]["logprobs"]
    for dtype, tol in [("float32", 1e-4), ("bfloat16", 0.15)]:
        embeds = post(face, "/v1/completions", {**body, "prompt": "", "prompt_embeds": encode_prompt_embeds(rows, dtype)})
        assert embeds.status_code == 200, embeds.text
        got = embeds.json()["choices"][0]["logprobs"]
        if dtype == "float32":
            assert list(got["top_logprobs"][0]) == list(text["top_logprobs"][0])
        for tid, lp in text["top_logprobs"][0].items():
            assert got["top_logprobs"][0].get(tid, -99) == pytest.approx(lp, abs=tol)
    assert embeds.json()["usage"]["prompt_tokens"] == len(rows)  # the rows sent, as vLLM counts


def _save(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("blob, says", [
    (lambda: _save(torch.zeros(3, 383)), "hidden size 383; this model has D = 384"),
    (lambda: _save(torch.full((3, 384), float("nan"))), "NaN or infinite"),
    (lambda: _save(torch.zeros(3, 384, dtype=torch.float64)), "dtype float64"),
    (lambda: _save(torch.zeros(3, 384, dtype=torch.int64)), "dtype int64"),
    (lambda: _save(torch.zeros(2, 3, 384)), "shape (2, 3, 384)"),
    (lambda: _save(torch.zeros(0, 384)), "empty"),
    (lambda: _save({"rows": torch.zeros(3, 384)}), "holds a dict, not a tensor"),
    (lambda: base64.b64encode(pickle.dumps(_Evil())).decode(), "not a torch.save file"),
    (lambda: "!!not base64!!", "not valid base64"),
], ids=["wrong-D", "nan", "float64", "int64", "rank-3", "empty", "dict", "evil-pickle", "bad-base64"])
def test_malformed_prompt_embeds_are_400(face, blob, says):
    r = post(face, "/v1/completions", {"prompt_embeds": [_save(torch.zeros(2, 384)), blob()], "max_tokens": 1})
    assert "prompt_embeds[1]" in openai_error(r, 400, says)["message"]
    assert_serves(face)


def test_prompt_embeds_need_the_flag_and_no_text_prompt(face, plain_face):
    r = httpx.post(plain_face + "/v1/completions", json={"prompt_embeds": _save(torch.zeros(2, 32)), "max_tokens": 1})
    openai_error(r, 400, "--enable-prompt-embeds")
    openai_error(post(face, "/v1/completions", {"prompt": "x", "prompt_embeds": _save(torch.zeros(2, 384))}), 400,
                 "either prompt or prompt_embeds")


def test_raw_logprobs_mode_and_a_lower_cap(plain_face):
    body = {"prompt": "it was", "max_tokens": 1, "logprobs": 5, "return_tokens_as_token_ids": True}
    raw = httpx.post(plain_face + "/v1/completions", json=body).json()["choices"][0]
    last = list(raw["logprobs"]["top_logprobs"][0])[-1]
    biased = httpx.post(plain_face + "/v1/completions",
                        json={**body, "logit_bias": {last.split(":")[1]: 100}}).json()["choices"][0]
    assert biased["logprobs"]["top_logprobs"][0] == raw["logprobs"]["top_logprobs"][0]  # raw: bias not shown
    assert biased["logprobs"]["tokens"] == [last]  # ... but it picks the answer
    openai_error(httpx.post(plain_face + "/v1/completions", json={**body, "logprobs": 6}), 400, "max allowed: 5")


# ---------------------------------------------------------------------- the backends, end to end


async def test_vllm_backend_scores_like_v1(face, default_model_dir):
    b = make_backend("vllm", face, api_key=KEY, embeddings_from=str(default_model_dir), embeds_dtype="float32")
    assert b.model is None  # (a): learnt from GET /v1/models, not the folder's name ("model")
    zero = await b.score(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot()))
    assert b.model == NAME and zero.extra["missing_label_logprobs"] == 0
    np.testing.assert_allclose(centred(zero.logits), centred(v1_logits(face, TEXTS)), atol=2e-4)
    cands = np.random.default_rng(0).normal(0, 0.05, (2, 3, 384)).astype(np.float32)
    shallow = await b.score(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch(kind="shallow", candidates=cands)))
    # the backend sends prompt rows ++ E[text]; the face adds [CLS] ... [MASK] [SEP]: v1's "replace" layout
    want = v1_logits(face, TEXTS, ShallowPrompt(candidates=Tensor.from_array(cands)))
    np.testing.assert_allclose(centred(shallow.logits), centred(want), atol=2e-4)
    assert shallow.tokens == b.estimate_tokens(ScoreJob(TEMPLATE, TEXTS, WORDS,
                                                        PromptBatch(kind="shallow", candidates=cands)))


async def test_vllm_backend_refuses_the_folder_name_and_too_many_labels(face, default_model_dir):
    wrong = make_backend("vllm", face, api_key=KEY, embeddings_from=str(default_model_dir), model="model")
    with pytest.raises(RequestRejected, match="404"):
        await wrong.score(ScoreJob(TEMPLATE, TEXTS[:1], WORDS, PromptBatch.zero_shot()))
    capped = make_backend("vllm", face, api_key=KEY, embeddings_from=str(default_model_dir), max_logprobs=3,
                          top_logprobs=3)
    with pytest.raises(ConfigError, match="max_logprobs=3"):
        await capped.score(ScoreJob(TEMPLATE, TEXTS[:1], WORDS, PromptBatch.zero_shot()))


async def test_openai_backend_zero_shot_scores_like_v1(face):
    b = make_backend("openai", face, api_key=KEY, model=NAME)
    res = await b.score(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot()))
    assert res.extra["logit_bias"] and res.extra["missing_label_logprobs"] == 0
    np.testing.assert_allclose(centred(res.logits), centred(v1_logits(face, TEXTS)), atol=2e-4)
    assert res.tokens > 0


async def test_openai_backend_scores_more_labels_than_the_logprob_cap_in_aligned_rounds(face):
    """4 label words, 3 log-probs per request: rounds [0,1,2] and [0,3], aligned on word 0, must give the
    differences /v1/score gives; both rounds' tokens are metered and the estimate covers them."""
    b = make_backend("openai", face, api_key=KEY, model=NAME, top_logprobs=3, max_logprobs=3)
    assert b.label_rounds(4) == [[0, 1, 2], [0, 3]]
    job = ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot())
    res = await b.score(job)
    assert res.extra["label_rounds"] == 2 and res.extra["missing_label_logprobs"] == 0
    np.testing.assert_allclose(centred(res.logits), centred(v1_logits(face, TEXTS)), atol=2e-4)
    one_round = await make_backend("openai", face, api_key=KEY, model=NAME).score(job)
    assert res.tokens == 2 * one_round.tokens
    counts = (await b.tokenize(texts=TEXTS)).text_token_counts
    assert b.estimate_tokens(job, counts) >= res.tokens
