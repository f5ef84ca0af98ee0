"""The budget holds across crashes: a real ``bbt tune`` SIGKILLed again and again with a request in flight, resumed
each time, never makes the server serve more calls than the budget; the calls a crash lost stay counted, and the
run ends where an uninterrupted run with the budget the crashes left ends."""

from __future__ import annotations

import json
import random

from tests.reliability.helpers import GatedServer, cli, crash_and_resume, tune_args

_SAME = ("generations", "best_dev_accuracy", "test_accuracy", "zero_shot_test_accuracy", "best_generation",
         "stop_reason", "prompt_sha256")


def test_sigkilled_five_times_mid_request_the_server_never_serves_more_than_the_budget(tiny_bert_dir, tmp_path):
    budget = 120
    server = GatedServer(tiny_bert_dir, tmp_path / "gate")
    try:
        # Jobs 1-2 are start-up (tokenize, zero-shot); every later job is a scoring request of a generation or a
        # dev check. Seeded random, so the test is repeatable; at least five distinct kill points.
        kill_at = set(random.Random(2026).sample(range(3, 32), 6))
        final, kills = crash_and_resume(server, tmp_path / "run", budget, kill_at)
        served = server.usage()["candidates"]
        assert kills >= 5
        lost = int(final["lost_to_crashes"]["calls"])
        assert lost >= kills  # each kill lost at least the call in flight (a generation: 4; a dev check: 1)
        assert served <= budget, f"the server served {served} calls against a budget of {budget}"
        # Every call the server served is one the client counted (in flight at a kill = counted as spent).
        assert final["api_calls_used"] == served
        # An uninterrupted run with what the crashes left of the budget ends in exactly the same place.
        ref = cli(*tune_args(server.url, tmp_path / "ref", calls=budget - lost))
        assert ref.returncode == 0, ref.stderr
        reference = json.loads(ref.stdout.strip().splitlines()[-1])
        assert {k: final[k] for k in _SAME} == {k: reference[k] for k in _SAME}
        assert final["api_calls_used"] == reference["api_calls_used"] + lost
    finally:
        server.stop()
