"""Weight digests: one definition for the server's ModelInfo.weight_digests and the client's student check."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bbt_client.protocol import ModelInfo
from bbt_client.lm.weight_digests import shared_digests, weight_digest, weight_digests


def test_digest_is_sha256_of_float32_bytes_shape_free():
    a = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    want = hashlib.sha256(a.astype("<f4").tobytes()).hexdigest()[:16]
    assert weight_digest(a) == want
    assert weight_digest(a.astype(np.float32).reshape(4, 3)) == want  # a reshaped copy is the same weights
    assert weight_digest(a + 1e-3) != want


def test_constant_and_empty_tensors_prove_nothing_and_are_skipped():
    assert weight_digest(np.ones(384)) is None
    assert weight_digest(np.zeros((2, 3))) is None
    assert weight_digest(np.zeros(0)) is None
    x = np.linspace(0, 1, 5)
    assert weight_digests([np.ones(3), x, x.copy(), np.zeros(4)]) == [weight_digest(x)]


def test_shared_digests():
    assert shared_digests(["a", "b"], ["b", "c"]) == ["b"]
    assert shared_digests(["a"], None) == []


def test_server_side_function_counts_tied_parameters_once():
    torch = pytest.importorskip("torch")
    from server_stub.engine.weight_digests import weight_digests as module_digests

    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=True)
    head.weight = emb.weight  # tied, as an MLM decoder
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "ln": torch.nn.LayerNorm(4)})
    got = module_digests(model)
    assert got == [weight_digest(emb.weight.detach().numpy()), weight_digest(head.bias.detach().numpy())]


def test_model_info_field_is_optional_and_validated():
    base = dict(name="x", kind="masked", architecture="B", hidden_size=4, num_layers=1, max_seq_len=8, vocab_size=9,
                embedding_std=0.1, hidden_std=[1.0], max_prompt_tokens=4, max_candidates=4, max_texts=4,
                max_body_bytes=100, device="cpu")
    assert ModelInfo(**base).weight_digests is None
    assert ModelInfo(**base, weight_digests=["0123456789abcdef"]).weight_digests == ["0123456789abcdef"]
    with pytest.raises(ValueError):
        ModelInfo(**base, weight_digests=["not-hex"])
