"""Cross-request batching: queued /v1/score requests share forward passes, get what each would alone, and fail
alone. Requests are held behind the test gate and queued before the model is freed, so sharing is a fact the
test arranges, not a race it hopes to win."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from bbt_client.protocol import (
    DeepPrompt,
    NoPrompt,
    ScoreRequest,
    ScoreResponse,
    ShallowPrompt,
    Tensor,
    TensorRef,
    tensor_digest,
)
from server_stub.engine.model import PromptedLM
from server_stub.engine.worker import ModelWorker
from server_stub.gate import RequestGate
from server_stub.testing import run_server

TEXTS_A = ["a great movie , loved it", "the plot was slow", "terrible"]
TEXTS_B = ["good actors but a bad film overall , sadly", "fine", "it was great fun", "bad"]


class CountingLM(PromptedLM):
    """Counts model forward passes (one per micro-batch), to see whether requests shared them."""

    passes = 0

    def forward_layers(self, *args, **kwargs):
        type(self).passes += 1
        return super().forward_layers(*args, **kwargs)


def _shallow(rng, c: int, n: int, d: int, scale: float = 0.5) -> ShallowPrompt:
    return ShallowPrompt(candidates=Tensor.from_array(rng.normal(0, scale, (c, n, d)).astype(np.float32)))


def _requests(d: int, layers: int) -> list[ScoreRequest]:
    rng = np.random.default_rng(7)
    base = rng.normal(0, 0.5, (layers, 3, d)).astype(np.float32)
    return [
        ScoreRequest(template="{text} It was {mask} .", texts=TEXTS_A, label_words=["great", "bad"],
                     prompt=_shallow(rng, 4, 3, d)),
        ScoreRequest(template="Review : {text} . {mask} !", texts=TEXTS_B, label_words=["good", "bad", "great"],
                     prompt=_shallow(rng, 2, 3, d)),
        ScoreRequest(template="{text} It was {mask} .", texts=TEXTS_B, label_words=["great", "terrible"],
                     prompt=ShallowPrompt(candidates=Tensor.from_array(rng.normal(0, 0.5, (3, 3, d)).astype(
                         np.float32)), mode="add")),
        ScoreRequest(template="{text} It was {mask} .", texts=TEXTS_A, label_words=["great", "bad"],
                     prompt=DeepPrompt(candidates=Tensor.from_array(rng.normal(0, 0.5, (2, layers, 3, d)).astype(
                         np.float32)))),
        ScoreRequest(template="{text} It was {mask} .", texts=TEXTS_A, label_words=["great", "bad"],
                     prompt=DeepPrompt(base=TensorRef(sha256=tensor_digest(base), tensor=Tensor.from_array(base)),
                                       layer=1, candidates=Tensor.from_array(
                                           rng.normal(0, 0.5, (3, 3, d)).astype(np.float32)))),
        ScoreRequest(template="{mask} : {text}", texts=TEXTS_B, label_words=["good", "bad"], prompt=NoPrompt()),
        ScoreRequest(template="{text} It was {mask} .", texts=TEXTS_A, label_words=["great", "bad"],
                     prompt=_shallow(rng, 5, 3, d)),
    ]


def _post(url: str, req: ScoreRequest) -> httpx.Response:
    return httpx.post(url + "/v1/score", content=req.model_dump_json(), timeout=120,
                      headers={"content-type": "application/json"})


def _wait_queued(url: str, depth: int) -> None:
    """Block until ``depth`` requests wait for the model (an observed state; the bound only catches a hang)."""
    for _ in range(100_000):
        if httpx.get(url + "/v1/usage").json()["queue_depth"] >= depth:
            return
    raise TimeoutError(f"{depth} requests never queued")


@pytest.fixture(scope="module")
def counting_lm(tiny_bert_dir):
    torch.manual_seed(0)
    return CountingLM(tiny_bert_dir, device="cpu")


def test_queued_requests_share_passes_and_match_serving_alone(counting_lm):
    lm = counting_lm
    reqs = _requests(lm.hidden_size, lm.num_layers)
    bad = ScoreRequest(template="{text} It was {mask} .", texts=TEXTS_A, label_words=["great", "supercalifragilistic"],
                       prompt=_shallow(np.random.default_rng(1), 2, 3, lm.hidden_size))
    alone: list[np.ndarray] = []
    gate = RequestGate()
    CountingLM.passes = 0  # loading ran the model too (the answer-layer self-check)
    with run_server(lm=lm, before_job=gate, threads=1, coalesce_requests=16) as url, \
            ThreadPoolExecutor(len(reqs) + 2) as pool:
        for r in reqs:  # each alone: the reference
            fut = pool.submit(_post, url, r)
            gate.release()
            resp = fut.result()
            assert resp.status_code == 200, resp.text
            alone.append(ScoreResponse.model_validate_json(resp.content).logits.to_array())
        passes_alone = CountingLM.passes
        holder = pool.submit(_post, url, reqs[0])
        gate.wait_entered(len(reqs) + 1)  # the holder occupies the model thread
        queued = [pool.submit(_post, url, r) for r in [*reqs[:3], bad, *reqs[3:]]]
        _wait_queued(url, len(queued))
        CountingLM.passes = 0
        gate.release(1)  # the holder
        assert holder.result().status_code == 200
        holder_passes = CountingLM.passes
        gate.open()
        responses = [f.result() for f in queued]
    shared_passes = CountingLM.passes - holder_passes
    bad_resp = responses.pop(3)
    assert bad_resp.status_code == 422 and "supercalifragilistic" in bad_resp.text  # it failed alone
    for req, ref, resp in zip(reqs, alone, responses):
        assert resp.status_code == 200, resp.text
        got = ScoreResponse.model_validate_json(resp.content)
        logits = got.logits.to_array()
        assert logits.shape == ref.shape == (req.prompt.candidates.shape[0] if req.prompt.kind != "none" else 1,
                                             len(req.texts), len(req.label_words))
        np.testing.assert_allclose(logits, ref, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))
        assert got.usage.sequences == logits.shape[0] * logits.shape[1]
    # Alone: one pass per request (tiny texts), two for the split deep request. Shared: one pass per
    # compatible kind (shallow-replace, shallow-add, deep full, zero-shot) plus the split request's two.
    assert passes_alone == len(reqs) + 1
    assert shared_passes == 6 < passes_alone


async def test_worker_groups_only_jobs_of_the_same_runner_and_isolates_failures():
    gate = RequestGate()
    worker = ModelWorker(before_job=gate, max_group=3)
    groups: list[list] = []

    def runner(args):
        groups.append(list(args))
        return [ValueError(f"bad {a}") if a < 0 else a * 10 for a in args]

    def other_runner(args):
        groups.append(list(args))
        raise RuntimeError("broken runner")

    try:
        held = asyncio.ensure_future(worker.submit(lambda: "held"))
        await asyncio.get_running_loop().run_in_executor(None, gate.wait_entered, 1)
        jobs = [asyncio.ensure_future(worker.submit_group(runner, a)) for a in (1, -2, 3)]
        lone = asyncio.ensure_future(worker.submit(lambda: "lone"))
        more = [asyncio.ensure_future(worker.submit_group(runner, 4)),
                asyncio.ensure_future(worker.submit_group(other_runner, 5))]
        await asyncio.sleep(0)  # one loop turn: every task ran up to its await, so all are queued
        assert worker.pending == 6
        gate.open()
        assert await held == "held"
        assert [await jobs[0], await jobs[2]] == [10, 30]
        with pytest.raises(ValueError, match="bad -2"):
            await jobs[1]
        assert await lone == "lone" and await more[0] == 40
        with pytest.raises(RuntimeError, match="broken runner"):
            await more[1]
        # max_group=3: 1, -2, 3 together; 4 after the lone job; other_runner's job never joins runner's.
        assert groups == [[1, -2, 3], [4], [5]]
        assert gate.entered == 7  # the gate saw every job, grouped or not
        assert (worker.groups_run, worker.grouped_jobs) == (3, 5)
    finally:
        gate.open()
        worker.close()
