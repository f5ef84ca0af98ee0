"""N >= 8 concurrent tuning jobs against one server: all finish, each within its budget, each correct.

"Correct" without an oracle: two jobs with the same seed must end identically (the server serialises
model work, so concurrency must not change any answer), and every job's recorded call count must equal
the calls its backend actually sent.
"""

from __future__ import annotations

from tests.reliability.helpers import run_concurrent_jobs

SEEDS = [0, 1, 2, 3, 0, 1, 2, 3]  # N = 8, each seed twice
CALLS = 40


async def test_eight_concurrent_jobs_finish_within_budget_with_identical_results_per_seed(server_process, tmp_path):
    sp = server_process("--max-queue", "8")  # small queue: some requests meet 503 overloaded and are retried
    runs = await run_concurrent_jobs(sp.url, tmp_path, SEEDS, calls=CALLS)
    assert len(runs) == 8
    for run in runs:
        r = run["result"]
        assert r.stop_reason == "calls" and r.test_accuracy is not None
        assert r.api_calls_used == run["calls_sent"] <= CALLS
    keys = ("api_calls_used", "generations", "best_dev_accuracy", "test_accuracy", "prompt_sha256")
    for a, b in zip(runs[:4], runs[4:]):
        assert {k: getattr(a["result"], k) for k in keys} == {k: getattr(b["result"], k) for k in keys}
    tuned = [runs[i]["result"] for i in range(4) if not runs[i]["result"].bare_template]  # else: the template
    assert len({r.prompt_sha256 for r in tuned}) == len(tuned)  # different seeds, different prompts
    assert sp.alive()
