"""The client-side half of a prompt-embeddings endpoint: the model's tokenizer and input-embedding matrix.

vLLM takes ``prompt_embeds`` instead of token ids, so the client must itself turn text into embeddings
(look up rows of the input-embedding matrix) and splice the tuned prompt in front. Only that one matrix
(V, D) is read from the model folder -- never the rest of the weights -- and the tokenizer comes from
``tokenizer.json`` via the light ``tokenizers`` package when present (else transformers, local files only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from bbt_client.errors import ConfigError

log = logging.getLogger("bbt_client.embeddings")

#: Names the input-embedding matrix has in common architectures (Llama/Mistral/Qwen, GPT-2, BERT, OPT, ...).
EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "model.decoder.embed_tokens.weight",
    "embeddings.word_embeddings.weight",
    "bert.embeddings.word_embeddings.weight",
    "roberta.embeddings.word_embeddings.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
)


def _find_embedding_tensor(files: Sequence[Path], key: str | None) -> np.ndarray:
    from safetensors import safe_open

    wanted = (key,) if key else EMBEDDING_KEYS
    for f in files:
        with safe_open(str(f), framework="np") as st:
            keys = set(st.keys())
            for k in wanted:
                if k in keys:
                    return np.asarray(st.get_tensor(k), dtype=np.float32)
            if key is None and len(files) == 1 and len(keys) == 1:  # a file holding just the matrix
                (only,) = keys
                arr = st.get_tensor(only)
                if arr.ndim == 2:
                    return np.asarray(arr, dtype=np.float32)
    raise ConfigError(
        f"no input-embedding matrix found in {', '.join(str(f) for f in files)} "
        f"(looked for {', '.join(wanted)}); pass embedding_key=<tensor name>")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for k in EMBEDDING_KEYS:
            if k in weight_map:
                return [folder / weight_map[k]]
        return sorted({folder / v for v in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} holds no .safetensors file; point embeddings_from at a Hugging Face model "
                          "folder (safetensors weights) or a .safetensors file with the embedding matrix")
    return files


class _Tokenizer:
    """Encode text to ids without special tokens; knows the BOS id if the model uses one."""

    def __init__(self, folder: Path):
        tj = folder / "tokenizer.json"
        self._hf = None
        self._tok = None
        if tj.exists():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(tj))
            self._tok.no_padding()  # tokenizer.json may pin padding/truncation meant for training batches
            self._tok.no_truncation()
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:  # pragma: no cover - depends on install
                raise ConfigError(f"{folder} has no tokenizer.json and transformers is not installed") from exc
            self._hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        bos = cfg.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        self.bos_id: int | None = self.token_to_id(bos) if isinstance(bos, str) else None
        #: Llama-style tokenizers prepend BOS; GPT-2 style do not.
        self.adds_bos = bool(cfg.get("add_bos_token", False)) and self.bos_id is not None

    def token_to_id(self, token: str) -> int | None:
        if self._tok is not None:
            return self._tok.token_to_id(token)
        return self._hf.convert_tokens_to_ids(token)

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._hf.encode(text, add_special_tokens=False))


class LocalEmbeddings:
    """Tokenizer + input-embedding matrix (V, D) float32 of the model an endpoint serves."""

    def __init__(self, path: str | Path, *, embedding_key: str | None = None, tokenizer_from: str | Path | None = None):
        path = Path(path).expanduser()
        if not path.exists():
            raise ConfigError(f"embeddings_from {path} does not exist")
        folder = path if path.is_dir() else path.parent
        files = _safetensors_files(path) if path.is_dir() else [path]
        self.matrix = _find_embedding_tensor(files, embedding_key)
        tok_folder = Path(tokenizer_from).expanduser() if tokenizer_from else folder
        self.tokenizer = _Tokenizer(tok_folder)
        cfg_path = folder / "config.json"
        self.config: dict = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.folder = folder

    @property
    def vocab_size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.matrix.shape[1])

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), D) float32 rows of the matrix."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ConfigError("token id outside the embedding matrix: tokenizer and weights do not match")
        return self.matrix[ids]
