"""Prompt modes pinned against independent computations on a tiny BERT (a real MLM head, 3 layers).

- ``add`` with an all-zero prompt is the unprompted model reading the slot tokens;
- ``add`` acts on layer 0 *after* the embedding LayerNorm, and on each deeper layer's input;
- ``/v1/layer_stats`` equals a NumPy recomputation of the clipped per-layer std on the same texts.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from bbt_client.protocol import (
    DeepPrompt,
    LayerStatsResponse,
    ModelInfo,
    ScoreRequest,
    ScoreResponse,
    ShallowPrompt,
    Tensor,
)
from server_stub.engine.model import PromptedLM
from server_stub.testing import run_server

torch.set_num_threads(1)

TEMPLATE = "{text} It was {mask} ."
TEXTS = ["a great movie , loved it", "the plot was slow", "good actors but a bad film overall , sadly"]
WORDS = ["great", "bad", "good"]
N = 3


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    from transformers import BertForMaskedLM

    hf = BertForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    lm = PromptedLM(tiny_bert_dir, device="cpu")
    with run_server(tiny_bert_dir, threads=1) as url:
        yield url, hf, lm


def _score(url: str, prompt) -> np.ndarray:
    req = ScoreRequest(template=TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=prompt)
    r = httpx.post(url + "/v1/score", content=req.model_dump_json(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content).logits.to_array()


def _reference(hf, lm: PromptedLM, slots: list[int], per_layer: dict[int, np.ndarray],
               before_norm: bool = False) -> np.ndarray:
    """(N, K) label logits from HF modules run by hand: slot tokens in the ids, ``per_layer[l]`` (n, D) added to
    layer l's input (l = 0: the embedding module's output, after its LayerNorm; or, ``before_norm``, the word
    embeddings — the semantics the server must *not* have)."""
    enc = lm.encode(TEMPLATE, TEXTS, None, N, slot_ids=slots, mode="add")
    label_ids = lm.label_word_ids(WORDS)
    out = []
    with torch.no_grad():
        for i in range(len(TEXTS)):
            ids = torch.tensor(enc.ids[i, : enc.lengths[i]])[None]
            words = hf.bert.embeddings.word_embeddings(ids)
            if before_norm:
                words[0, enc.slot_start : enc.slot_start + N] += torch.from_numpy(per_layer[0])
            h = hf.bert.embeddings(inputs_embeds=words)
            for l, layer in enumerate(hf.bert.encoder.layer):
                if l in per_layer and not (before_norm and l == 0):
                    h = h.clone()
                    h[0, enc.slot_start : enc.slot_start + N] += torch.from_numpy(per_layer[l])
                h = layer(h)
                h = h[0] if isinstance(h, tuple) else h
            logits = hf.cls(h)[0, enc.answer[i]]
            out.append(logits[label_ids].numpy())
    return np.stack(out)


def test_the_server_advertises_add_mode_and_real_word_slots(tiny):
    url, _, lm = tiny
    info = ModelInfo.model_validate_json(httpx.get(url + "/v1/model").content)
    assert "add" in info.prompt_modes
    pieces = lm.tokenizer.convert_ids_to_tokens(info.default_slot_token_ids[:N])
    assert all(p.isalpha() for p in pieces), pieces


def test_add_with_a_zero_prompt_is_the_unprompted_model_reading_the_slot_tokens(tiny):
    url, hf, lm = tiny
    slots = lm.default_slot_token_ids[:N]
    got = _score(url, ShallowPrompt(mode="add", candidates=Tensor.from_array(np.zeros((1, N, 32), np.float32))))[0]
    with torch.no_grad():
        enc = lm.encode(TEMPLATE, TEXTS, None, N, slot_ids=slots, mode="add")
        want = np.stack([hf(input_ids=torch.tensor(enc.ids[i, : enc.lengths[i]])[None]).logits[0, enc.answer[i]]
                         [lm.label_word_ids(WORDS)].numpy() for i in range(len(TEXTS))])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_shallow_add_acts_after_the_embedding_layernorm(tiny):
    url, hf, lm = tiny
    p = np.random.default_rng(0).normal(0, 2.0, (2, N, 32)).astype(np.float32)
    slots = [lm.default_slot_token_ids[5], lm.default_slot_token_ids[7], lm.default_slot_token_ids[9]]
    got = _score(url, ShallowPrompt(mode="add", slot_token_ids=slots, candidates=Tensor.from_array(p)))
    for c in range(2):
        np.testing.assert_allclose(got[c], _reference(hf, lm, slots, {0: p[c]}), atol=1e-5)
    # and distinguishably not the same as adding to the word embeddings, before the LayerNorm
    before_norm = _reference(hf, lm, slots, {0: p[0]}, before_norm=True)
    assert np.abs(before_norm - got[0]).max() > 100 * np.abs(_reference(hf, lm, slots, {0: p[0]}) - got[0]).max()


def test_deep_add_acts_on_every_layer_input(tiny):
    url, hf, lm = tiny
    full = np.random.default_rng(1).normal(0, 0.3, (2, 3, N, 32)).astype(np.float32)
    got = _score(url, DeepPrompt(mode="add", candidates=Tensor.from_array(full)))
    slots = lm.default_slot_token_ids[:N]
    for c in range(2):
        np.testing.assert_allclose(got[c], _reference(hf, lm, slots, {l: full[c, l] for l in range(3)}), atol=1e-5)


def test_layer_stats_equal_a_numpy_recomputation_with_clipping(tiny):
    url, hf, lm = tiny
    r = httpx.post(url + "/v1/layer_stats", json={"template": TEMPLATE, "texts": TEXTS, "prompt_tokens": N}, timeout=60)
    assert r.status_code == 200, r.text
    stats = LayerStatsResponse.model_validate_json(r.content)
    enc = lm.encode(TEMPLATE, TEXTS, None, N, slot_ids=lm.default_slot_token_ids[:N], mode="add")
    per_layer: dict[int, list[np.ndarray]] = {l: [] for l in range(1, 3)}
    with torch.no_grad():
        for i in range(len(TEXTS)):
            out = hf.bert(input_ids=torch.tensor(enc.ids[i, : enc.lengths[i]])[None], output_hidden_states=True)
            for l in range(1, 3):
                per_layer[l].append(out.hidden_states[l][0].numpy().reshape(-1))  # hidden_states[l]: input of layer l
    want = [float(hf.bert.embeddings.word_embeddings.weight.detach().std())]
    for l in range(1, 3):
        x = np.concatenate(per_layer[l]).astype(np.float64)
        for _ in range(5):
            x = np.clip(x, x.mean() - 3 * x.std(), x.mean() + 3 * x.std())
        want.append(float(x.std()))
    np.testing.assert_allclose(stats.hidden_std, want, rtol=1e-4)
    unclipped = float(np.concatenate(per_layer[2]).std())
    assert stats.hidden_std[2] != pytest.approx(unclipped, rel=1e-6)  # the clipping did something


def test_bad_slot_ids_are_a_clear_422(tiny):
    url, _, _ = tiny
    bad = ShallowPrompt(mode="add", slot_token_ids=[1, 2, 10**7], candidates=Tensor.from_array(np.zeros((1, N, 32))))
    req = ScoreRequest(template=TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=bad)
    r = httpx.post(url + "/v1/score", content=req.model_dump_json(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "outside this model's vocabulary" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="only meaningful with mode 'add'"):
        ShallowPrompt(slot_token_ids=[1, 2, 3], candidates=Tensor.from_array(np.zeros((1, N, 32))))
