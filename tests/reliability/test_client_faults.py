"""A misbehaving server never yields a silent wrong result: the client retries or raises a clear error.

Faults are injected by a proxy in front of the real tiny server, so the client's real HTTP stack runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from bbt_client.backends.base import PromptBatch, ScoreJob
from bbt_client.backends.http import RetryPolicy
from bbt_client.backends.server import ServerBackend
from bbt_client.errors import EndpointError, ProtocolError, RateLimitError
from bbt_client.run.job import TuningJob
from tests.reliability.helpers import tiny_config

FAST = RetryPolicy(max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05, jitter_s=0.01)


def _job(n_texts: int = 3, C: int = 2) -> ScoreJob:
    rng = np.random.default_rng(0)
    return ScoreJob(template="{text} It was {mask} .", texts=[f"movie number {i} was fine" for i in range(n_texts)],
                    label_words=["bad", "great"],
                    prompts=PromptBatch(kind="shallow", candidates=rng.normal(0, 0.02, (C, 2, 32)).astype(np.float32)))


async def _score(url: str, job: ScoreJob, retry: RetryPolicy = FAST, timeout: float = 10.0):
    backend = ServerBackend(url, retry=retry, timeout=timeout)
    try:
        return await backend.score(job), backend
    finally:
        await backend.aclose()


@pytest.fixture
async def reference(tiny_server):
    """The honest logits for :func:`_job`, straight from the server."""
    result, _ = await _score(tiny_server, _job())
    return result.logits


@pytest.mark.parametrize("faults", [
    ["status:500"], ["status:502", "status:503"], ["status:429"], ["truncate"], ["drop"], ["drop_after"],
    ["status:504", "truncate", "drop"],
])
async def test_transient_faults_are_retried_to_the_honest_answer(proxy, reference, faults):
    proxy.faults.extend(faults)
    result, backend = await _score(proxy.url, _job())
    np.testing.assert_array_equal(result.logits, reference)
    assert proxy.applied.total() == len(faults) and proxy.faults == []
    assert backend.http.attempts == backend.http.requests + len(faults)


async def test_persistent_500_ends_in_a_clear_endpoint_error(proxy):
    proxy.faults.extend(["status:500"] * 10)
    with pytest.raises(EndpointError, match=r"HTTP 500 through 4 attempts.*resume"):
        await _score(proxy.url, _job())
    assert proxy.received["/v1/score"] == 4


async def test_persistent_429_is_a_rate_limit_error_naming_the_remedy(proxy):
    proxy.faults.extend(["status:429"] * 10)
    with pytest.raises(RateLimitError, match="max-concurrency"):
        await _score(proxy.url, _job())


async def test_slow_server_times_out_then_the_retry_succeeds(proxy, reference):
    proxy.faults.append("hang")
    result, backend = await _score(proxy.url, _job(), timeout=3.0)
    np.testing.assert_array_equal(result.logits, reference)
    assert backend.http.attempts == backend.http.requests + 1


async def test_always_slow_server_is_an_endpoint_error_not_a_hang(proxy):
    proxy.faults.extend(["hang"] * 3)
    with pytest.raises(EndpointError, match="timed out"):
        await _score(proxy.url, _job(), retry=RetryPolicy(max_retries=1, backoff_initial_s=0.01, jitter_s=0),
                     timeout=0.5)


@pytest.mark.parametrize("fault,match", [
    ("nan", "non-finite logits"),
    ("shape", "shape"),
    ("garbage", "not JSON"),
])
async def test_wrong_answers_raise_protocol_error_without_retrying(proxy, fault, match):
    proxy.faults.append(fault)
    with pytest.raises(ProtocolError, match=match):
        await _score(proxy.url, _job())
    assert proxy.received["/v1/score"] == 1  # paying again for the same wrong answer helps nobody


async def test_a_tuning_job_stops_on_nan_logits_and_spends_nothing_for_them(proxy, tmp_path):
    """The job must not tell the tuner NaN losses nor count an unusable answer as a success."""
    cfg = tiny_config(proxy.url, tmp_path / "run", calls=40, evaluate_zero_shot=False)
    proxy.faults.extend(["ok", "ok", "nan"])  # third score request is corrupted
    with pytest.raises(ProtocolError):
        await TuningJob(cfg).run()
    assert not (tmp_path / "run" / "result.json").exists()
