"""The causal decoder over unpadded sequences (:mod:`server_stub.engine.packed_causal`): the same next-token and
prompt-token log-probs as the model's own padded forward, whatever the lengths, their order, the micro-batch
budget or the batch-mates; models whose layout it does not implement keep the padded path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server_stub.engine.loading import LoadedLM
from server_stub.engine.next_token import embeds_prompt, score_prompts, token_prompt

LENGTHS = [9, 3, 17, 9, 1, 12, 17, 9, 5]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return LoadedLM(tiny_llama_dir, device="cpu")


def logprobs(row: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(row.double(), -1)


def next_and_prompt(lm: LoadedLM, prompts, budget: int, packed: bool):
    keep = lm.packed_causal
    lm.packed_causal = keep if packed else None
    try:
        with torch.inference_mode():
            out = score_prompts(lm, prompts, budget, logprobs, lambda rows, _targets: logprobs(rows))
    finally:
        lm.packed_causal = keep
    return out


def embeds_prompts(lm: LoadedLM, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [embeds_prompt(lm, 0.05 * torch.randn(n, lm.hidden_size, generator=g)) for n in lengths]


def test_llama_gets_the_packed_decoder_and_gpt2_keeps_the_padded_path(llama, tiny_gpt2_dir):
    assert llama.packed_causal is not None
    assert LoadedLM(tiny_gpt2_dir, device="cpu").packed_causal is None


@pytest.mark.parametrize("budget", [4096, 24])
def test_next_token_logprobs_match_the_padded_forward(llama, budget):
    prompts = embeds_prompts(llama, LENGTHS)
    got = next_and_prompt(llama, prompts, budget, packed=True)
    want = next_and_prompt(llama, prompts, budget, packed=False)
    for a, b in zip(got.next, want.next):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)
    assert got.tokens_processed == sum(LENGTHS)
    if budget == 24:
        assert got.forward_passes > 1


def test_prompt_token_logprobs_match_the_padded_forward(llama):
    """Echo reads every position: the packed decoder runs its last layer in full then."""
    ids = [[101, 1996, 3007, 1997, 2605, 2003], [101, 2009], [101, 1037, 11113, 2143, 1010, 2521, 2205, 2146]]
    prompts = [token_prompt(llama, i) for i in ids]
    got = next_and_prompt(llama, prompts, 4096, packed=True)
    want = next_and_prompt(llama, prompts, 4096, packed=False)
    for a, b in zip(got.prompt, want.prompt):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)
    for a, b in zip(got.next, want.next):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)


def test_a_sequence_answers_the_same_alone_and_among_others(llama):
    prompts = embeds_prompts(llama, LENGTHS, seed=1)
    together = next_and_prompt(llama, prompts, 4096, packed=True).next
    for i in (0, 2, 4):
        alone = next_and_prompt(llama, [prompts[i]], 4096, packed=True).next[0]
        np.testing.assert_allclose(alone.numpy(), together[i].numpy(), rtol=0, atol=1e-5)
