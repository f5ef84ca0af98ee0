"""Count tokens *before* a call, so token and cost budgets are enforced before money is spent.

Three sources, best first:

1. tiktoken, for OpenAI models. ``cl100k_base`` ships with the package (bbt_client/data/tiktoken), so it
   works offline; other encodings (``o200k_base``) load through tiktoken, which reads
   ``TIKTOKEN_CACHE_DIR`` (files named by sha1 of the encoding URL) or downloads them.
2. The endpoint's own tokenizer, for other models: our ``/v1/tokenize``, a local HF tokenizer for the vllm
   backend, ``POST /tokenize`` of an OpenAI-compatible server (vLLM, SGLang) for the openai backend.
3. A character-based upper bound (one token per UTF-8 byte), when nothing else is available.

Cost = tokens / 1000 × price per 1k tokens from the config.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from functools import lru_cache
from importlib import resources
from typing import Sequence

log = logging.getLogger("bbt_client.backends.tokens")

#: sha256 of the decompressed cl100k_base rank file, as pinned by tiktoken itself.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
#: Tokens the Chat Completions API adds per message and per reply (OpenAI cookbook accounting).
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_PER_REPLY = 3

@lru_cache(maxsize=1)
def bundled_cl100k():
    """The cl100k_base encoding built from the bundled rank file: no network needed."""
    import base64

    import tiktoken

    raw = gzip.decompress(resources.files("bbt_client").joinpath("data/tiktoken/cl100k_base.tiktoken.gz").read_bytes())
    if hashlib.sha256(raw).hexdigest() != CL100K_SHA256:
        raise RuntimeError("bundled cl100k_base.tiktoken.gz is corrupt (sha256 mismatch); reinstall bbt-client")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="cl100k_base", pat_str=_CL100K_PAT, mergeable_ranks=ranks,
                             special_tokens=_CL100K_SPECIAL)


def encoding_name_for_model(model: str) -> str | None:
    """tiktoken's encoding for an OpenAI model name, or None for models tiktoken does not know."""
    try:
        from tiktoken.model import encoding_name_for_model as lookup

        return lookup(model)
    except (KeyError, ImportError):
        return None


def get_encoding(name: str):
    """A tiktoken encoding that works offline for cl100k_base; others need tiktoken's cache or network.

    Raises RuntimeError when the encoding cannot be loaded (offline and not cached).
    """
    if name == "cl100k_base":
        return bundled_cl100k()
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # noqa: BLE001 - tiktoken raises requests/urllib/OSError variants offline
        raise RuntimeError(
            f"tiktoken encoding {name!r} is not available offline ({type(exc).__name__}); put its rank file in "
            "TIKTOKEN_CACHE_DIR (see docs/backends.md) or let bbt-client fall back to a byte-count upper bound"
        ) from None


def byte_upper_bound(texts: Sequence[str]) -> list[int]:
    """Byte-level BPEs never emit more tokens than UTF-8 bytes: a safe (loose) upper bound."""
    return [len(t.encode("utf-8")) for t in texts]


def cost(tokens: int, price_per_1k_tokens: float | None) -> float:
    """What ``tokens`` cost at the configured price (0 when no price is set)."""
    return 0.0 if not price_per_1k_tokens else tokens / 1000.0 * float(price_per_1k_tokens)
