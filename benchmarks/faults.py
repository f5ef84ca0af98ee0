"""Fault and load report: run the reliability scenarios against a tiny local server, print a table, then
(as the LAST line) one JSON object of counts and load figures.

    python benchmarks/faults.py [--jobs 8] [--fuzz 300]

Scenarios mirror tests/reliability/ (which assert them in CI); this script counts them and measures load:
N concurrent tuning jobs against one server process -> throughput in API calls/s and p50/p99 latency of
one score() (one generation's batched request, retries included). Runs in ~1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bbt_client.run import checkpoint as ckpt  # noqa: E402
from bbt_client.backends.base import PromptBatch, ScoreJob  # noqa: E402
from bbt_client.backends.http import RetryPolicy  # noqa: E402
from bbt_client.backends.server import ServerBackend  # noqa: E402
from bbt_client.errors import ProtocolError  # noqa: E402
from bbt_client.run.job import TuningJob  # noqa: E402
from bbt_client.protocol import Tensor  # noqa: E402
from tests.reliability.faulty_server import faulty_proxy  # noqa: E402
from tests.reliability.helpers import (  # noqa: E402
    GatedServer, ServerProcess, build_tiny_bert, child_env, cli, crash_and_resume, default_model_dir,
    run_concurrent_jobs, tiny_config, tune_args,
)

FAST = RetryPolicy(max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05, jitter_s=0.01)
PATIENT = RetryPolicy(max_retries=40, backoff_initial_s=0.05, backoff_max_s=0.5, jitter_s=0.05)
SAME = ("api_calls_used", "generations", "best_dev_accuracy", "test_accuracy", "prompt_sha256")
KEY = "sk-faults-report-3b1d"

counts = {"requests_fuzzed": 0, "4xx_count": 0, "5xx_count": 0, "503_overloaded": 0, "closed_connections": 0,
          "crashes": 0}


def _score_job() -> ScoreJob:
    cands = np.random.default_rng(0).normal(0, 0.02, (2, 2, 32)).astype(np.float32)
    return ScoreJob(template="{text} It was {mask} .", texts=["a fine film", "a dull film", "so so"],
                    label_words=["bad", "great"], prompts=PromptBatch(kind="shallow", candidates=cands))


async def _score(url: str, retry=FAST, timeout=10.0):
    b = ServerBackend(url, retry=retry, timeout=timeout)
    try:
        return (await b.score(_score_job())).logits
    finally:
        await b.aclose()


# ---------------------------------------------------------------- scenarios (each returns a detail string)


def transient_faults(ctx) -> str:
    ref = asyncio.run(_score(ctx["url"]))
    faults = ["status:500", "status:502", "status:503", "status:429", "truncate", "drop", "drop_after"]
    for f in faults:
        with faulty_proxy(ctx["url"]) as p:
            p.faults.append(f)
            assert np.array_equal(asyncio.run(_score(p.url)), ref), f
            assert p.applied.total() == 1
    with faulty_proxy(ctx["url"]) as p:
        p.faults.append("hang")
        assert np.array_equal(asyncio.run(_score(p.url, timeout=3.0)), ref)
    return f"{len(faults) + 1} faults retried to the honest logits"


def wrong_answers(ctx) -> str:
    for f in ("nan", "shape", "garbage"):
        with faulty_proxy(ctx["url"]) as p:
            p.faults.append(f)
            try:
                asyncio.run(_score(p.url))
            except ProtocolError:
                assert p.received["/v1/score"] == 1
            else:
                raise AssertionError(f"{f}: no error")
    return "nan/shape/garbage -> ProtocolError, not retried"


async def _job(url, out, progress=None):
    b = ServerBackend(url, retry=PATIENT, timeout=30)
    try:
        return await TuningJob(tiny_config(url, out), backend=b, progress=progress).run(), b
    finally:
        await b.aclose()


def server_killed(ctx) -> str:
    sp = ServerProcess(ctx["model"], log_path=ctx["tmp"] / "killed.log").start()
    try:
        ref, _ = asyncio.run(_job(sp.url, ctx["tmp"] / "k-ref"))
        trigger = threading.Event()

        def killer():
            trigger.wait(60)
            sp.kill()
            time.sleep(0.5)
            sp.start()

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        res, b = asyncio.run(_job(sp.url, ctx["tmp"] / "k-run",
                                  lambda p: p.event == "generation" and p.generation == 3 and trigger.set()))
        t.join(60)
        assert sp.starts == 2 and b.http.attempts > b.http.requests
        assert all(getattr(res, k) == getattr(ref, k) for k in SAME)
        return f"{b.http.attempts - b.http.requests} retries, calls {res.api_calls_used} == uninterrupted run"
    finally:
        sp.kill()


def client_killed(ctx) -> str:
    url, tmp = ctx["url"], ctx["tmp"]
    proc = subprocess.Popen([sys.executable, "-m", "bbt_client.cli", *tune_args(url, tmp / "c-run", calls=60)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env(), cwd=REPO)
    for line in proc.stdout:
        if json.loads(line).get("generation", 0) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(30)
    res = cli("tune", "--resume", str(tmp / "c-run"), "--json")
    assert res.returncode == 0, res.stderr
    b = json.loads(res.stdout.splitlines()[-1])
    lost = int(b["lost_to_crashes"]["calls"])
    ref = cli(*tune_args(url, tmp / "c-ref", calls=60 - lost))  # the budget the crash left
    assert ref.returncode == 0, ref.stderr
    a = json.loads(ref.stdout.splitlines()[-1])
    assert all(a[k] == b[k] for k in SAME if k != "api_calls_used") and b["api_calls_used"] == a["api_calls_used"] + lost
    return f"SIGKILL at generation 4, --resume == uninterrupted with the {lost} lost calls counted"


def repeated_client_kills(ctx) -> str:
    """SIGKILL ``bbt tune`` six times with a request inside the server, resume each time: the server's own
    /v1/usage must never exceed the budget, and must equal what the client counted."""
    budget = 120
    server = GatedServer(ctx["model"], ctx["tmp"] / "gate")
    try:
        kill_at = set(random.Random(2026).sample(range(3, 32), 6))
        final, kills = crash_and_resume(server, ctx["tmp"] / "crashes", budget, kill_at)
        served = server.usage()["candidates"]
    finally:
        server.stop()
    lost = int(final["lost_to_crashes"]["calls"])
    ctx["crashes"] = {"kills": kills, "budget_calls": budget, "server_served_calls": served,
                      "client_counted_calls": final["api_calls_used"], "lost_to_crashes_calls": lost}
    assert kills >= 5 and served <= budget and served == final["api_calls_used"]
    return f"{kills} kills mid-request: server served {served} <= budget {budget}, {lost} lost calls counted"


def full_disk(ctx) -> str:
    with faulty_proxy(ctx["url"]) as p:
        r = subprocess.run([sys.executable, "-m", "bbt_client.cli", *tune_args(p.url, ctx["tmp"] / "full")],
                           capture_output=True, text=True, env=child_env(), cwd=REPO,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY)))
        assert r.returncode == 4 and "cannot write" in r.stderr, r.stderr
        assert sum(p.received.values()) == 0
    return "exit 4 before any request"


def atomic_checkpoint(ctx) -> str:
    code = ("import sys,numpy as np;from pathlib import Path;from bbt_client import checkpoint as c\n"
            "i=0\nwhile True:\n i+=1;c.save_checkpoint(Path(sys.argv[1]),{'gen':i,'a':np.full(2_000_000,i,'f4')});"
            "print(i,flush=True)")
    rng = random.Random(0)
    for k in range(5):
        run = ctx["tmp"] / f"atomic{k}"
        run.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                                env=child_env(), cwd=REPO)
        proc.stdout.readline()
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        st = ckpt.load_checkpoint(run)
        assert (st["a"] == st["gen"]).all()
    return "5 SIGKILLs mid-write, every checkpoint loadable and whole"


def _record(status: int | None) -> None:
    counts["requests_fuzzed"] += 1
    if status is None:
        counts["closed_connections"] += 1
    elif status == 503:
        counts["503_overloaded"] += 1
    elif 400 <= status < 500:
        counts["4xx_count"] += 1
    elif status >= 500:
        counts["5xx_count"] += 1


def _rand_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([None, True, 0, -1, 2**70, 1.5, "", "x" * rng.randint(0, 50), "{text}", "{mask}"])
    if r < 0.65:
        return [_rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["template", "texts", "label_words", "prompt", "kind", "words", "shape", "data", "dtype",
                        "candidates", "base", "layer"]): _rand_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def fuzz(ctx) -> str:
    url, n = ctx["fuzz_url"], ctx["fuzz"]
    rng = random.Random(1)
    valid = {"template": "{text} It was {mask} .", "texts": ["ok"], "label_words": ["bad", "great"],
             "prompt": {"kind": "shallow",
                        "candidates": Tensor.from_array(np.zeros((1, 2, 32), np.float32)).model_dump()}}
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(n):
            path = rng.choice(["/v1/score", "/v1/tokenize"])
            kind = i % 6
            ctype = "application/json"
            if kind == 0:
                body = json.dumps(_rand_json(rng)).encode()
            elif kind == 1:
                v = dict(valid)
                v[rng.choice(list(v))] = _rand_json(rng)
                body = json.dumps(v).encode()
            elif kind == 2:
                body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
            elif kind == 3:
                body, ctype = json.dumps(valid).encode(), rng.choice(["text/plain", "", "multipart/form-data"])
            elif kind == 4:
                d = rng.choice([100, 10_000, 200_000])
                body = b"[" * d + b"]" * d
            else:
                body = b"x" * ((1 << 20) + rng.randint(1, 1000))
            try:
                _record(c.post(path, content=body, headers={"Content-Type": ctype}).status_code)
            except httpx.HTTPError:
                _record(None)
        for _ in range(20):  # garbage request heads on raw sockets
            with socket.create_connection(("127.0.0.1", ctx["fuzz_port"]), timeout=5) as s:
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) + b"\r\n\r\n")
                s.shutdown(socket.SHUT_WR)
                data = s.recv(4096)
                _record(int(data.split(b" ", 2)[1]) if data else None)
        assert c.post("/v1/score", json=valid).status_code == 200
    if not ctx["fuzz_server"].alive():
        counts["crashes"] += 1
    assert counts["5xx_count"] == 0 and counts["crashes"] == 0
    return f"{counts['requests_fuzzed']} requests: {counts['4xx_count']} 4xx, {counts['5xx_count']} 5xx"


def slow_loris(ctx) -> str:
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", ctx["fuzz_port"]), timeout=10)
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    assert httpx.get(ctx["fuzz_url"] + "/v1/health").status_code == 200
    answers = [s.recv(4096) for s in socks]
    for s in socks:
        s.close()
    for a in answers:
        _record(int(a.split(b" ", 2)[1]) if a else None)
    assert all(a.startswith(b"HTTP/1.1 408") or a == b"" for a in answers)
    return "50 stalled connections -> 408, others served meanwhile"


def security(ctx) -> str:
    log = ctx["tmp"] / "keyed.log"
    sp = ServerProcess(ctx["model"], "--api-key-env", "FAULTS_KEY", "--log-level", "DEBUG",
                       env={"FAULTS_KEY": KEY}, log_path=log).start()
    try:
        with httpx.Client(base_url=sp.url) as c:
            assert c.get("/v1/health").status_code == 200
            for m, path in (("GET", "/v1/model"), ("POST", "/v1/tokenize"), ("POST", "/v1/score")):
                for h in ({}, {"Authorization": "Bearer wrong"}):
                    assert c.request(m, path, json={}, headers=h).status_code == 401
        r = cli("-v", *tune_args(sp.url, ctx["tmp"] / "keyed", calls=24), env={"BBT_API_KEY": KEY})
        assert r.returncode == 0, r.stderr
        leaked = [p for p in (ctx["tmp"] / "keyed").rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
        assert not leaked and KEY not in r.stdout + r.stderr
    finally:
        sp.stop()
    assert KEY not in log.read_text()
    return "401 without key on all routes but health; key in no file, log or output"


def load(ctx) -> str:
    sp = ServerProcess(ctx["model"], "--max-queue", "8", log_path=ctx["tmp"] / "load.log").start()
    try:
        seeds = [i % 4 for i in range(ctx["jobs"])]
        t0 = time.perf_counter()
        runs = asyncio.run(run_concurrent_jobs(sp.url, ctx["tmp"] / "load", seeds, calls=40))
        wall = time.perf_counter() - t0
    finally:
        sp.stop()
    lat = np.array([x for r in runs for x in r["latencies_ms"]])
    calls = sum(r["result"].api_calls_used for r in runs)
    violations = sum(1 for r in runs if r["result"].api_calls_used != r["calls_sent"] or
                     r["result"].api_calls_used > 40)
    by_seed: dict[int, set] = {}
    for s, r in zip(seeds, runs):
        by_seed.setdefault(s, set()).add(tuple(getattr(r["result"], k) for k in SAME))
    mismatches = sum(len(v) - 1 for v in by_seed.values())
    ctx["load"] = {"jobs": len(runs), "jobs_finished": sum(r["result"].test_accuracy is not None for r in runs),
                   "api_calls": calls, "wall_s": round(wall, 2), "throughput_calls_per_s": round(calls / wall, 1),
                   "score_requests": int(lat.size), "p50_ms": round(float(np.percentile(lat, 50)), 1),
                   "p99_ms": round(float(np.percentile(lat, 99)), 1),
                   "http_attempts": sum(r["attempts"] for r in runs),
                   "budget_violations": violations, "same_seed_mismatches": mismatches}
    assert violations == 0 and mismatches == 0
    return f"{len(runs)} jobs, {calls / wall:.1f} calls/s, p50 {ctx['load']['p50_ms']} ms"


SCENARIOS = [("transient faults retried", transient_faults), ("wrong answers rejected", wrong_answers),
             ("server SIGKILL mid-job", server_killed), ("client SIGKILL + resume", client_killed),
             ("client SIGKILLed 6x mid-request", repeated_client_kills),
             ("full disk before work", full_disk), ("atomic checkpoint writes", atomic_checkpoint),
             ("fuzz server inputs", fuzz), ("slow-loris", slow_loris), ("api key security", security),
             ("concurrent jobs load", load)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=8, help="concurrent tuning jobs in the load test (>= 8)")
    ap.add_argument("--fuzz", type=int, default=300, help="fuzzed HTTP requests")
    args = ap.parse_args()
    rows, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = build_tiny_bert(tmp / "tiny-bert", default_model_dir())
        main_srv = ServerProcess(model, log_path=tmp / "main.log").start()
        fuzz_srv = ServerProcess(model, log_path=tmp / "fuzz.log", options={
            "max_body_bytes": 1 << 20, "header_timeout": 0.5, "body_timeout": 0.5, "idle_timeout": 2.0}).start()
        ctx = {"model": model, "tmp": tmp, "url": main_srv.url, "fuzz_url": fuzz_srv.url, "fuzz_port": fuzz_srv.port,
               "fuzz_server": fuzz_srv, "jobs": args.jobs, "fuzz": args.fuzz, "load": {}, "crashes": {}}
        try:
            for name, fn in SCENARIOS:
                t0 = time.perf_counter()
                try:
                    detail, ok = fn(ctx), True
                except Exception as exc:  # noqa: BLE001 - a report counts failures rather than stopping
                    detail, ok = f"{type(exc).__name__}: {exc}"[:120], False
                    traceback.print_exc(file=sys.stderr)
                rows.append((name, ok, time.perf_counter() - t0, detail))
            if not fuzz_srv.alive() or not main_srv.alive():
                counts["crashes"] += 1
        finally:
            main_srv.stop()
            fuzz_srv.stop()
    width = max(len(r[0]) for r in rows)
    print(f"{'scenario'.ljust(width)}  result  seconds  detail")
    for name, ok, secs, detail in rows:
        print(f"{name.ljust(width)}  {'PASS' if ok else 'FAIL':6}  {secs:7.1f}  {detail}")
    passed = sum(1 for r in rows if r[1])
    summary = {"scenarios_run": len(rows), "scenarios_passed": passed, "scenarios_failed": len(rows) - passed,
               **counts, "load": ctx["load"], "crash_budget": ctx["crashes"], "total_seconds": round(time.perf_counter() - t_all, 1)}
    print(json.dumps(summary))
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
