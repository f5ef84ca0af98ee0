"""Scores over HTTP equal an independent, unbatched forward of the same HF model with the same prompt."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from bbt_client.protocol import (
    DeepPrompt,
    NoPrompt,
    ScoreRequest,
    ScoreResponse,
    ShallowPrompt,
    Tensor,
    TensorRef,
    tensor_digest,
)
from server_stub.engine.model import PromptedLM
from server_stub.testing import run_server

torch.set_num_threads(1)

MASKED_TEMPLATE = "{text} It was {mask} ."
CAUSAL_TEMPLATE = "{text} It was {mask}"
TEXTS = ["a great movie , loved it", "the plot was slow", "terrible", "good actors but a bad film overall , sadly"]
WORDS = ["great", "bad", "good"]
N_PROMPT = 3


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_gpt2_dir):
    """A 3-layer Llama (rotary positions, RMSNorm, untied head) sharing the tiny BPE tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir, local_files_only=True)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory):
    """A 2-layer RoBERTa MLM (byte-level BPE, <mask> token, position offset) with its own small BPE."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    from tests.conftest import _BPE_CORPUS

    out = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_BPE_CORPUS * 20, vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])  # as RoBERTa: " <mask>" is one token
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                               sep_token="</s>", cls_token="<s>", pad_token="<pad>", unk_token="<unk>",
                               mask_token="<mask>", model_max_length=62)
    torch.manual_seed(2)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           architectures=["RobertaForMaskedLM"])
    RobertaForMaskedLM(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_server(tiny_gpt2_dir):
    with run_server(tiny_gpt2_dir, threads=1) as url:
        yield url


def score(url: str, req: ScoreRequest) -> ScoreResponse:
    r = httpx.post(url + "/v1/score", content=req.model_dump_json(), headers={"content-type": "application/json"},
                   timeout=120)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content)


# ---------------------------------------------------------------------- independent reference


class Reference:
    """One sequence at a time, no padding: tokenizes the whole filled-in template string in one go."""

    def __init__(self, model_dir, kind: str, tied: bool = False):
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.kind, self.tied = kind, tied
        if kind == "causal":
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
            base = self.model.base_model
            self.layers = base.h if hasattr(base, "h") else base.layers
        elif tied:
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
            self.layers = self.model.encoder.layer
        else:
            self.model = AutoModelForMaskedLM.from_pretrained(model_dir, local_files_only=True).eval()
            self.layers = self.model.base_model.encoder.layer

    def word_id(self, w: str) -> int:
        ids = self.tok(" " + w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1
        return ids[0]

    @torch.inference_mode()
    def logits(self, text: str, words, deep: np.ndarray | None = None, shallow: np.ndarray | None = None):
        """(K,) logits; ``shallow`` (n, D) or ``deep`` (L, n, D)."""
        n = 0 if shallow is None and deep is None else (shallow if shallow is not None else deep).shape[-2]
        if self.kind == "causal":
            ids = [0] * n + self.tok(f"{text} It was", add_special_tokens=False)["input_ids"]
            answer, start = len(ids) - 1, 0
        else:
            full = self.tok(f"{text} It was {self.tok.mask_token} .")["input_ids"]
            ids = full[:1] + [0] * n + full[1:]
            answer, start = ids.index(self.tok.mask_token_id), 1
        x = torch.tensor([ids])
        emb = self.model.get_input_embeddings()(x).clone()
        layer0 = shallow if shallow is not None else (deep[0] if deep is not None else None)
        if layer0 is not None:
            emb[0, start : start + n] = torch.from_numpy(layer0)
        handles = []
        if deep is not None:
            for j in range(1, len(self.layers)):
                def hook(_m, args, kwargs, j=j):
                    h = (args[0] if args else kwargs["hidden_states"]).clone()
                    h[0, start : start + n] = torch.from_numpy(deep[j])
                    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
                handles.append(self.layers[j].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            out = self.model(inputs_embeds=emb, attention_mask=torch.ones_like(x))
        finally:
            for h in handles:
                h.remove()
        if self.tied:
            full_logits = out.last_hidden_state[0, answer] @ self.model.get_input_embeddings().weight.T
        else:
            full_logits = out.logits[0, answer]
        return full_logits[[self.word_id(w) for w in words]].numpy()


def _prompts(kind: str, C: int, L: int, D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "none":
        return NoPrompt(), None
    if kind == "shallow":
        arr = rng.normal(0, 0.5, (C, N_PROMPT, D)).astype(np.float32)
        return ShallowPrompt(candidates=Tensor.from_array(arr)), arr
    arr = rng.normal(0, 0.5, (C, L, N_PROMPT, D)).astype(np.float32)
    return DeepPrompt(candidates=Tensor.from_array(arr)), arr


def _check_against_reference(url, ref: Reference, template: str, kind: str, L: int, D: int):
    C = 1 if kind == "none" else 2
    spec, arr = _prompts(kind, C, L, D)
    resp = score(url, ScoreRequest(template=template, texts=TEXTS, label_words=WORDS, prompt=spec))
    got = resp.logits.to_array()
    assert got.shape == (C, len(TEXTS), len(WORDS))
    for c in range(C):
        for i, text in enumerate(TEXTS):
            kw = {} if arr is None else ({"shallow": arr[c]} if kind == "shallow" else {"deep": arr[c]})
            np.testing.assert_allclose(got[c, i], ref.logits(text, WORDS, **kw), rtol=1e-4, atol=1e-4)
    assert resp.usage.candidates == C and resp.usage.sequences == C * len(TEXTS)
    return got


@pytest.mark.parametrize("kind", ["none", "shallow", "deep"])
def test_masked_logits_equal_direct_forward(tiny_server, tiny_bert_dir, kind):
    _check_against_reference(tiny_server, Reference(tiny_bert_dir, "masked"), MASKED_TEMPLATE, kind, L=3, D=32)


@pytest.mark.parametrize("kind", ["none", "shallow", "deep"])
def test_causal_logits_equal_direct_forward(gpt2_server, tiny_gpt2_dir, kind):
    _check_against_reference(gpt2_server, Reference(tiny_gpt2_dir, "causal"), CAUSAL_TEMPLATE, kind, L=3, D=32)


def test_default_model_uses_tied_head_and_matches_direct_forward(live_server, default_model_dir):
    ref = Reference(default_model_dir, "masked", tied=True)
    for kind in ("none", "shallow", "deep"):
        _check_against_reference(live_server, ref, MASKED_TEMPLATE, kind, L=6, D=384)


def test_prompts_change_the_scores(tiny_server):
    a = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS))
    spec, _ = _prompts("shallow", 1, 3, 32)
    b = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=spec))
    assert np.abs(a.logits.to_array() - b.logits.to_array()).max() > 1e-3


@pytest.mark.parametrize("model, layer", [("masked", 1), ("masked", 2), ("causal", 1)])
def test_base_plus_layer_form_equals_full_form(request, model, layer):
    url = request.getfixturevalue("tiny_server" if model == "masked" else "gpt2_server")
    template = MASKED_TEMPLATE if model == "masked" else CAUSAL_TEMPLATE
    rng = np.random.default_rng(layer)
    base = rng.normal(0, 0.5, (3, N_PROMPT, 32)).astype(np.float32)
    cands = rng.normal(0, 0.5, (4, N_PROMPT, 32)).astype(np.float32)
    full = np.repeat(base[None], 4, axis=0)
    full[:, layer] = cands
    split = score(url, ScoreRequest(
        template=template, texts=TEXTS, label_words=WORDS,
        prompt=DeepPrompt(base=TensorRef(sha256=tensor_digest(base), tensor=Tensor.from_array(base)),
                          layer=layer, candidates=Tensor.from_array(cands))))
    whole = score(url, ScoreRequest(template=template, texts=TEXTS, label_words=WORDS,
                                    prompt=DeepPrompt(candidates=Tensor.from_array(full))))
    np.testing.assert_allclose(split.logits.to_array(), whole.logits.to_array(), rtol=1e-5, atol=1e-5)
    assert split.usage.sequences == whole.usage.sequences == 4 * len(TEXTS)
    # The split form runs the lower layers once per text: N extra sequences of work, not C × N.
    assert whole.usage.tokens_processed < split.usage.tokens_processed < 2 * whole.usage.tokens_processed


def test_base_alone_is_one_candidate(tiny_server):
    base = np.random.default_rng(5).normal(0, 0.5, (3, N_PROMPT, 32)).astype(np.float32)
    a = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=DeepPrompt(
        base=TensorRef(sha256=tensor_digest(base), tensor=Tensor.from_array(base)))))
    b = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS,
                                        prompt=DeepPrompt(candidates=Tensor.from_array(base[None]))))
    np.testing.assert_allclose(a.logits.to_array(), b.logits.to_array(), rtol=1e-5, atol=1e-5)


def test_unknown_tensor_then_resend_then_reference_only(tiny_server):
    base = np.random.default_rng(7).normal(0, 0.5, (3, N_PROMPT, 32)).astype(np.float32)
    digest = tensor_digest(base)
    cands = Tensor.from_array(np.zeros((2, N_PROMPT, 32), np.float32))

    def req(with_tensor: bool) -> str:
        ref = TensorRef(sha256=digest, tensor=Tensor.from_array(base) if with_tensor else None)
        return ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS,
                            prompt=DeepPrompt(base=ref, layer=1, candidates=cands)).model_dump_json()

    post = lambda body: httpx.post(tiny_server + "/v1/score", content=body,  # noqa: E731
                                   headers={"content-type": "application/json"}, timeout=60)
    first = post(req(False))
    assert first.status_code == 409 and first.json()["error"]["code"] == "unknown_tensor"
    second = post(req(True))
    assert second.status_code == 200
    third = post(req(False))
    assert third.status_code == 200
    assert third.json()["logits"] == second.json()["logits"]


def test_micro_batching_gives_same_logits_and_counts_passes(tiny_bert_dir, tiny_server):
    spec, _ = _prompts("shallow", 3, 3, 32)
    req = ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=spec)
    big = score(tiny_server, req)
    with run_server(tiny_bert_dir, threads=1, max_batch_tokens=40) as url:
        small = score(url, req)
    np.testing.assert_allclose(small.logits.to_array(), big.logits.to_array(), rtol=1e-5, atol=1e-5)
    assert big.usage.forward_passes == 1
    assert small.usage.forward_passes > 3
    assert small.usage.tokens_processed == big.usage.tokens_processed


def test_cpu_micro_batches_default_to_the_cpu_size(tiny_server, tiny_bert_dir):
    from server_stub.engine.micro_batches import GPU_MAX_BATCH_TOKENS, MAX_BATCH_TOKENS

    spec, _ = _prompts("shallow", 50, 3, 32)  # ~3,400 tokens: over the CPU size, under the GPU one
    req = ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=spec)
    default = score(tiny_server, req)
    assert MAX_BATCH_TOKENS < default.usage.tokens_processed < GPU_MAX_BATCH_TOKENS // 2
    assert default.usage.forward_passes >= 2
    with run_server(tiny_bert_dir, threads=1, max_batch_tokens=GPU_MAX_BATCH_TOKENS) as url:
        assert score(url, req).usage.forward_passes == 1


def test_tokens_processed_counts_real_tokens_and_prompt_slots(tiny_server, tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir, local_files_only=True)
    per_text = [len(tok(f"{t} It was [MASK] .")["input_ids"]) for t in TEXTS]
    spec, _ = _prompts("shallow", 2, 3, 32)
    resp = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=spec))
    assert resp.usage.tokens_processed == 2 * (sum(per_text) + N_PROMPT * len(TEXTS))


def test_long_texts_are_truncated_keeping_the_template(tiny_server):
    head = " ".join(["word"] * 300)
    a = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=[head + " good"], label_words=WORDS))
    b = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=[head + " terrible awful"],
                                        label_words=WORDS))
    short = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=["word word"], label_words=WORDS))
    # Only the text tail differs and it is cut, so the (still present) mask slot sees identical input.
    np.testing.assert_array_equal(a.logits.to_array(), b.logits.to_array())
    assert np.abs(a.logits.to_array() - short.logits.to_array()).max() > 1e-4


def test_text_pairs_fill_text_b(tiny_server):
    req = ScoreRequest(template="{text_a} ? {mask} , {text_b}", texts=["it rains", "it rains"],
                       text_pairs=["the street is wet", "the sun shines"], label_words=["yes", "no"])
    got = score(tiny_server, req).logits.to_array()
    assert got.shape == (1, 2, 2)
    assert np.abs(got[0, 0] - got[0, 1]).max() > 1e-5


# ---------------------------------------------------------------------- the model module, directly


def test_deep_prompt_at_layer_l_leaves_lower_layers_untouched(tiny_bert_dir):
    lm = PromptedLM(tiny_bert_dir, device="cpu")
    enc = lm.encode(MASKED_TEMPLATE, TEXTS[:2], None, N_PROMPT)
    ids = torch.from_numpy(enc.ids)
    mask = (ids != lm.pad_id).long()
    mask[:, enc.slot_start : enc.slot_start + N_PROMPT] = 1
    rng = np.random.default_rng(3)
    deep = torch.from_numpy(rng.normal(0, 0.5, (lm.num_layers, N_PROMPT, lm.hidden_size)).astype(np.float32))
    changed = deep.clone()
    l = 2
    changed[l] += 1.0

    def layer_inputs(prompt):
        seen: dict[int, torch.Tensor] = {}
        per_layer = {j: prompt[j].expand(2, -1, -1) for j in range(lm.num_layers)}
        with torch.inference_mode():
            out = lm.forward_layers(ids, mask, per_layer, slot_start=enc.slot_start,
                                    observe=lambda j, h: seen.__setitem__(j, h.clone()))
        return seen, out

    a, out_a = layer_inputs(deep)
    b, out_b = layer_inputs(changed)
    slots = slice(enc.slot_start, enc.slot_start + N_PROMPT)
    for j in range(l):
        torch.testing.assert_close(a[j], b[j], rtol=0, atol=0)
    # At layer l only the prompt slots differ; above it everything may.
    assert not torch.equal(a[l][:, slots], b[l][:, slots])
    keep = torch.ones(a[l].shape[1], dtype=torch.bool)
    keep[slots] = False
    torch.testing.assert_close(a[l][:, keep], b[l][:, keep], rtol=0, atol=0)
    torch.testing.assert_close(b[l][:, slots], changed[l].expand(2, -1, -1))
    assert not torch.allclose(out_a, out_b)


def test_model_reports_hidden_statistics(tiny_bert_dir):
    lm = PromptedLM(tiny_bert_dir, device="cpu")
    assert len(lm.hidden_std) == lm.num_layers == 3
    assert all(s > 0 for s in lm.hidden_std)
    w = lm.word_embeddings.weight.detach()
    assert lm.embedding_std == pytest.approx(float(w.std()), rel=1e-6)


def test_float16_prompts_score_like_their_float32_widening(tiny_server):
    arr = np.random.default_rng(11).normal(0, 0.5, (2, N_PROMPT, 32)).astype(np.float32)
    widened = arr.astype(np.float16).astype(np.float32)
    half = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS,
                                           prompt=ShallowPrompt(candidates=Tensor.from_array(arr, "float16"))))
    full = score(tiny_server, ScoreRequest(template=MASKED_TEMPLATE, texts=TEXTS, label_words=WORDS,
                                           prompt=ShallowPrompt(candidates=Tensor.from_array(widened))))
    np.testing.assert_allclose(half.logits.to_array(), full.logits.to_array(), rtol=1e-6, atol=1e-6)


def test_causal_tokenize_gives_space_prefixed_word_ids(gpt2_server, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir, local_files_only=True)
    r = httpx.post(gpt2_server + "/v1/tokenize", json={"words": WORDS})
    assert r.status_code == 200
    assert [w["ids"] for w in r.json()["words"]] == [tok(" " + w, add_special_tokens=False)["input_ids"]
                                                     for w in WORDS]


def test_llama_family_deep_prompts_match_direct_forward_in_both_forms(tiny_llama_dir):
    ref = Reference(tiny_llama_dir, "causal")
    with run_server(tiny_llama_dir, threads=1) as url:
        full = _check_against_reference(url, ref, CAUSAL_TEMPLATE, "deep", L=3, D=32)
        _, arr = _prompts("deep", 2, 3, 32)
        base = arr[0].copy()
        split = score(url, ScoreRequest(template=CAUSAL_TEMPLATE, texts=TEXTS, label_words=WORDS, prompt=DeepPrompt(
            base=TensorRef(sha256=tensor_digest(base), tensor=Tensor.from_array(base)), layer=2,
            candidates=Tensor.from_array(arr[:, 2]))))
        # Candidate 0 is exactly arr[0]; candidate 1 is arr[0] with layer 2 of arr[1].
        np.testing.assert_allclose(split.logits.to_array()[0], full[0], rtol=1e-4, atol=1e-4)
        mixed = base.copy()
        mixed[2] = arr[1, 2]
        for i, text in enumerate(TEXTS):
            np.testing.assert_allclose(split.logits.to_array()[1, i], ref.logits(text, WORDS, deep=mixed),
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["shallow", "deep"])
def test_roberta_family_matches_direct_forward(tiny_roberta_dir, kind):
    with run_server(tiny_roberta_dir, threads=1) as url:
        info = httpx.get(url + "/v1/model").json()
        assert info["max_seq_len"] == 62  # 64 positions minus RoBERTa's padding offset
        _check_against_reference(url, Reference(tiny_roberta_dir, "masked"), MASKED_TEMPLATE, kind, L=2, D=32)


def test_text_used_twice_is_truncated_to_fit(tiny_server):
    long = " ".join(["word"] * 200)
    r = score(tiny_server, ScoreRequest(template="{text} {text} It was {mask} .", texts=[long], label_words=WORDS))
    assert r.usage.tokens_processed <= 128  # the tiny model's max_seq_len
    assert np.isfinite(r.logits.to_array()).all()


def test_last_layer_runs_at_the_answer_only_where_it_reproduces_the_model(
        tiny_bert_dir, tiny_gpt2_dir, tiny_roberta_dir, monkeypatch):
    import bbt_client.lm.answer_layer as answer_layer

    bert = PromptedLM(tiny_bert_dir, device="cpu")
    assert bert.answer_layer is not None and PromptedLM(tiny_roberta_dir, device="cpu").answer_layer is not None
    assert PromptedLM(tiny_gpt2_dir, device="cpu").answer_layer is None  # causal: every position, as before
    # Padded rows of different lengths, add-mode prompts at every layer (the last one included).
    enc = bert.encode(MASKED_TEMPLATE, TEXTS, None, N_PROMPT, slot_ids=bert.default_slot_token_ids[:N_PROMPT],
                      mode="add")
    ids, mask, _ = bert._batch_inputs(enc, np.arange(len(TEXTS)))
    assert not bool(mask.all())
    gen = torch.Generator().manual_seed(0)
    per_layer = {j: torch.randn(len(TEXTS), N_PROMPT, bert.hidden_size, generator=gen) for j in range(3)}
    answer = torch.from_numpy(enc.answer)
    with torch.inference_mode():
        fast = bert.forward_answer(ids, mask, per_layer, answer, slot_start=enc.slot_start, mode="add")
        full = bert.forward_layers(ids, mask, per_layer, slot_start=enc.slot_start, mode="add")
    np.testing.assert_allclose(fast.numpy(), full[torch.arange(len(TEXTS)), answer].numpy(), rtol=0, atol=1e-5)
    # A twin that does not reproduce the layer is caught at load time and not used.
    monkeypatch.setattr(answer_layer, "bert_answer_layer", lambda layer: lambda h, m, a: h[:, 0] * 0)
    assert PromptedLM(tiny_bert_dir, device="cpu").answer_layer is None
