"""Does what VLLMBackend sends mean what the text means? A fake vLLM runs a real (tiny, random) GPT-2 on the
decoded ``prompt_embeds`` and emulates ``allowed_token_ids`` + ``--logprobs-mode processed_logprobs``; the
zero-shot scores must equal the model's own next-token scores for the plain text prompt."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import respx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bbt_client.backends.base import PromptBatch, ScoreJob  # noqa: E402
from bbt_client.backends.vllm import VLLMBackend  # noqa: E402

URL = "http://vllm.test"
TEMPLATE = "{text} It was {mask}"
WORDS = ["great", "bad"]
TEXTS = ["I loved it and the actors were great .", "the plot was slow", "a good film"]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    torch.set_num_threads(1)
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir, local_files_only=True)
    return model, tok


def fake_vllm(model):
    def handle(request):
        body = json.loads(request.content)
        allowed = body.get("allowed_token_ids")
        choices = []
        for i, e in enumerate(body["prompt_embeds"]):
            emb = torch.load(io.BytesIO(base64.b64decode(e)), weights_only=True)
            with torch.no_grad():
                logits = model(inputs_embeds=emb[None].float()).logits[0, -1]
            if allowed:  # processed_logprobs: everything outside allowed_token_ids is -inf
                mask = torch.full_like(logits, float("-inf"))
                mask[allowed] = 0
                logits = logits + mask
            lp = torch.log_softmax(logits, -1)
            top = torch.topk(lp, body["logprobs"])
            choices.append({"index": i, "text": "", "logprobs": {
                "tokens": [f"token_id:{int(top.indices[0])}"], "token_logprobs": [float(top.values[0])],
                "top_logprobs": [{f"token_id:{int(j)}": float(v) for v, j in zip(top.values, top.indices)}]}})
        n = sum(torch.load(io.BytesIO(base64.b64decode(e)), weights_only=True).shape[0] for e in body["prompt_embeds"])
        return httpx.Response(200, json={"choices": choices, "usage": {"prompt_tokens": n,
                                                                      "completion_tokens": len(choices)}})

    return handle


@respx.mock
async def test_zero_shot_embeds_match_text_prompt(gpt2, tiny_gpt2_dir):
    model, tok = gpt2
    respx.post(f"{URL}/v1/completions").mock(side_effect=fake_vllm(model))
    b = VLLMBackend(URL, embeddings_from=str(tiny_gpt2_dir), model="tiny", embeds_dtype="float32")
    res = await b.score(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot()))
    label_ids = [tok.encode(" " + w) for w in WORDS]
    assert all(len(i) == 1 for i in label_ids)
    for t, text in enumerate(TEXTS):
        ids = tok.encode(text + " It was", return_tensors="pt")
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        want = torch.log_softmax(logits[[i[0] for i in label_ids]], -1).numpy()
        np.testing.assert_allclose(res.logits[0, t], want, rtol=1e-4, atol=1e-5)
    assert res.tokens == b.estimate_tokens(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch.zero_shot()))


@respx.mock
async def test_shallow_prompt_changes_scores_and_zero_prompt_keeps_order(gpt2, tiny_gpt2_dir):
    model, _ = gpt2
    respx.post(f"{URL}/v1/completions").mock(side_effect=fake_vllm(model))
    b = VLLMBackend(URL, embeddings_from=str(tiny_gpt2_dir), model="tiny", embeds_dtype="float32")
    info = await b.model_info()
    rng = np.random.default_rng(0)
    cands = (rng.normal(size=(2, 3, info.hidden_size)) * info.embedding_std * 5).astype(np.float32)
    res = await b.score(ScoreJob(TEMPLATE, TEXTS, WORDS, PromptBatch(kind="shallow", candidates=cands)))
    assert res.logits.shape == (2, 3, 2) and np.isfinite(res.logits).all()
    assert not np.allclose(res.logits[0], res.logits[1])  # the prompt reaches the model
    # restricted logprobs are a log-softmax over the labels: each row's probabilities sum to 1
    np.testing.assert_allclose(np.exp(res.logits).sum(-1), 1.0, rtol=1e-5)
