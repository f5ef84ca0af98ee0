"""Wire protocol v1: tensor codec, size checks, digests, template and deep-prompt form validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from bbt_client.protocol import (
    DeepPrompt,
    ModelInfo,
    ScoreRequest,
    Tensor,
    TensorRef,
    tensor_digest,
)

# min_size=1: np.ascontiguousarray makes a 0-d array 1-d, so scalars travel as shape [1].
SHAPES = st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, SHAPES, elements=st.floats(-1e6, 1e6, width=32)))
def test_float32_round_trip_is_exact(arr):
    t = Tensor.from_array(arr)
    back = Tensor.model_validate_json(t.model_dump_json()).to_array()
    assert back.dtype == np.float32 and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, SHAPES, elements=st.floats(-6e4, 6e4, width=32)))
def test_float16_round_trip_widens_to_float16_precision(arr):
    back = Tensor.from_array(arr, dtype="float16").to_array()
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, arr.astype(np.float16).astype(np.float32))


def test_wire_bytes_are_little_endian_row_major():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = Tensor.from_array(arr.T)  # non-contiguous input is laid out row-major of its own shape
    assert t.shape == [3, 2]
    import base64

    raw = np.frombuffer(base64.b64decode(t.data), dtype="<f4")
    np.testing.assert_array_equal(raw, arr.T.reshape(-1))


def test_size_validation_rejects_data_not_matching_shape():
    good = Tensor.from_array(np.zeros((2, 3), np.float32))
    with pytest.raises(ValidationError, match="needs 24 bytes"):
        Tensor(dtype="float32", shape=[2, 3], data=good.data + "AAAA")
    with pytest.raises(ValidationError):
        Tensor(dtype="float16", shape=[2, 3], data=good.data)
    with pytest.raises(ValidationError):
        Tensor(dtype="float32", shape=[-1, 3], data=good.data)
    with pytest.raises(ValidationError):
        Tensor(dtype="float64", shape=[2, 3], data=good.data)


def test_bad_base64_of_right_length_fails_on_decode():
    good = Tensor.from_array(np.zeros((3,), np.float32))
    t = Tensor(dtype="float32", shape=[3], data="!" + good.data[1:])
    with pytest.raises(ValueError, match="base64"):
        t.to_array()


def test_digest_depends_on_values_and_shape_but_not_memory_layout():
    a = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    d = tensor_digest(a)
    assert d == tensor_digest(a.copy()) == tensor_digest(np.asfortranarray(a))
    assert d == tensor_digest(a.astype(np.float64))  # hashed as float32
    assert d != tensor_digest(a.reshape(6, 4))
    b = a.copy()
    b[0, 0] = np.nextafter(b[0, 0], np.float32(np.inf))
    assert d != tensor_digest(b)
    assert len(d) == 64 and TensorRef(sha256=d).sha256 == d
    with pytest.raises(ValidationError):
        TensorRef(sha256=d.upper())


@pytest.mark.parametrize(
    "template, pairs, ok",
    [
        ("{text} It was {mask} .", None, True),
        ("{text_a} ? {mask} , {text_b}", ["b"], True),
        ("{text} It was .", None, False),
        ("It was {mask} .", None, False),
        ("{text} {mask} {mask}", None, False),
        ("{text_a} {mask} {text_b}", None, False),
        ("{text} {mask}", ["b"], False),
    ],
)
def test_template_validation(template, pairs, ok):
    kw = dict(template=template, texts=["a"], label_words=["x", "y"], text_pairs=pairs)
    if ok:
        ScoreRequest(**kw)
    else:
        with pytest.raises(ValidationError):
            ScoreRequest(**kw)


def test_score_request_rejects_duplicate_label_words_and_mismatched_pairs():
    with pytest.raises(ValidationError, match="distinct"):
        ScoreRequest(template="{text} {mask}", texts=["a"], label_words=["x", "x"])
    with pytest.raises(ValidationError, match="as long as texts"):
        ScoreRequest(template="{text_a} {mask} {text_b}", texts=["a", "b"], text_pairs=["c"], label_words=["x", "y"])


def test_deep_prompt_forms():
    t4 = Tensor.from_array(np.zeros((2, 3, 4, 5), np.float32))
    t3 = Tensor.from_array(np.zeros((2, 4, 5), np.float32))
    ref = TensorRef(sha256="a" * 64)
    DeepPrompt(candidates=t4)
    DeepPrompt(base=ref, layer=1, candidates=t3)
    DeepPrompt(base=ref)
    for bad in (dict(), dict(candidates=t4, layer=1), dict(base=ref, layer=1), dict(base=ref, candidates=t3),
                dict(base=ref, layer=-1, candidates=t3)):
        with pytest.raises(ValidationError):
            DeepPrompt(**bad)


def test_model_info_needs_one_hidden_std_per_layer():
    kw = dict(name="m", kind="masked", architecture="Bert", hidden_size=8, num_layers=2, max_seq_len=16,
              vocab_size=10, embedding_std=0.1, max_prompt_tokens=4, max_candidates=4, max_texts=4,
              max_body_bytes=100, device="cpu")
    ModelInfo(hidden_std=[1.0, 2.0], **kw)
    with pytest.raises(ValidationError, match="one entry per layer"):
        ModelInfo(hidden_std=[1.0], **kw)
