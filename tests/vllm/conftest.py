"""A real vLLM (CPU) and this repository's server on the same tiny Llama folder, built at test time.

Tests marked ``vllm`` are skipped, with the reason, when vLLM is not installed (``make test-vllm`` installs it
into ``.venv-vllm`` and runs them). Both servers answer to the model name ``tiny-llama`` and run with their
defaults otherwise (vLLM's raw log-probs, 20 logprobs at most) plus ``--enable-prompt-embeds``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server_stub.testing import VLLM_VENV, run_server, spawn_vllm, vllm_python

SERVED = "tiny-llama"


def pytest_collection_modifyitems(config, items):
    if vllm_python() is not None:
        return
    skip = pytest.mark.skip(reason=f"vLLM is not installed in {VLLM_VENV}: `make test-vllm` installs it and runs "
                                   "these tests")
    for item in items:
        if item.get_closest_marker("vllm"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, default_model_dir) -> Path:
    """6 layers, hidden 384, MiniLM's vocabulary: small enough for a CPU, big enough to be a real Llama."""
    from tests.vllm.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("vllm-llama"), default_model_dir)


@pytest.fixture(scope="session")
def vllm_url(llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    with spawn_vllm(llama_dir, served_name=SERVED, log_path=log) as url:
        yield url


@pytest.fixture(scope="session")
def stub_url(llama_dir):
    with run_server(llama_dir, enable_prompt_embeds=True, served_model_name=SERVED) as url:
        yield url
