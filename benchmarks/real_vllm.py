"""This repository's server against a real vLLM (CPU) on the same tiny Llama: answers, counts and speed.

    make test-vllm                       # once: installs vLLM into .venv-vllm
    .venv/bin/python benchmarks/real_vllm.py [--quick]

Builds the tiny Llama of ``tests/vllm`` (6 layers, hidden 384, MiniLM's vocabulary), starts vLLM on it
(``--enable-prompt-embeds``, its defaults otherwise: raw log-probs, one inference thread on this machine) and
``python -m server_stub`` beside it with the same flags, and prints one JSON line (also written to
``benchmarks/results/real_vllm.json``):

- ``vllm_version``;
- ``runs``: per server × backend × method, a short tuning run on SST-2: ``calls`` and ``tokens`` as the client
  counted them, ``endpoint_usage`` as the server counted them (vLLM's /metrics deltas, our /v1/usage deltas),
  ``label_score_coverage`` and ``scoring`` (the run's own: the share of label log-probs read from the endpoint
  instead of a floor, and the strategy its probe chose), ``unprobed_label_score_coverage`` (the same share for a
  backend that never probed and assumes processed log-probs) and ``wall_s``;
- ``exact_label_score_coverage``: the same share when the requests name the labels with ``logprob_token_ids``;
- ``score_max_abs_diff``: the largest difference between the two servers' label log-probs (BBT-shaped
  ``prompt_embeds`` requests) and echoed prompt-token log-probs, on the same requests;
- ``stub_vs_vllm_seq_per_s``: BBT-shaped ``prompt_embeds`` requests sent to each server alone (the others idle),
  our sequences/s over vLLM's; ``..._equal_threads`` with our server on vLLM's single inference thread. With
  ``--repeats N`` the servers take turns N times and each ratio is the median, its range under ``..._range``.

``--speed-only`` skips the tuning runs and coverage (and does not write the results file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bbt_client.backends import make_backend  # noqa: E402
from bbt_client.backends.base import PromptBatch, ScoreJob  # noqa: E402
from bbt_client.cli.commands import main as bbt  # noqa: E402
from server_stub.testing import spawn_server, spawn_vllm, vllm_counters, vllm_python  # noqa: E402
from tests.vllm.tiny_llama import build_tiny_llama  # noqa: E402

SERVED = "tiny-llama"
TEMPLATE = "{text} it was {mask}"
WORDS = ["bad", "great"]
OUT = REPO / "benchmarks" / "results" / "real_vllm.json"


def endpoint_usage(url: str, is_vllm: bool) -> dict[str, float]:
    if is_vllm:
        return vllm_counters(url)
    return {k: v for k, v in httpx.get(url + "/v1/usage", timeout=30).json().items() if k != "queue_depth"}


def backend_opts(backend: str, model_dir: Path) -> list[str]:
    if backend == "vllm":
        return [f"embeddings_from={model_dir}", f"model={SERVED}", "embeds_dtype=float32"]
    return [f"model={SERVED}"]


def tune(url: str, is_vllm: bool, backend: str, method: str, model_dir: Path, calls: int, out: Path) -> dict:
    argv = ["tune", "--backend", backend, "--endpoint", url, "--task", "sst2", "--template", TEMPLATE,
            "--label-words", ",".join(WORDS), "--method", method, "--shots", "4", "--seed", "42",
            "--budget-calls", str(calls), "--test-limit", "16", "--out", str(out), "--quiet"]
    for opt in backend_opts(backend, model_dir):
        argv += ["--backend-opt", opt]
    if method in ("bdpl", "cmaes-tokens"):
        argv += ["--opt", "popsize=4", "--opt", "prompt_tokens=2", "--opt", "vocab_size=10"]
    elif method in ("bbt", "gdfo"):  # popsize 5: a 20-call budget pays for zero-shot, checks and 2 generations
        argv += ["--opt", "prompt_tokens=5", "--opt", "popsize=5"]
    before = endpoint_usage(url, is_vllm)
    t0 = time.perf_counter()
    rc = bbt(argv)
    wall = time.perf_counter() - t0
    after = endpoint_usage(url, is_vllm)
    row = {"rc": rc, "wall_s": round(wall, 1), "endpoint_usage": {k: after[k] - before[k] for k in after}}
    if rc == 0:
        result = json.loads((out / "result.json").read_text())
        row.update(calls=result["api_calls_used"], tokens=result["tokens_used"],
                   test_accuracy=result.get("test_accuracy"), label_score_coverage=result.get("label_score_coverage"),
                   scoring=(result.get("scoring") or {}).get("strategy"))
    return row


async def unprobed_coverage(url: str, backend: str, model_dir: Path) -> float:
    """Share of zero-shot label log-probs a backend that was never probed reads from the endpoint (1 - floors /
    all): what the request shapes that assume processed log-probs (``logit_bias``, ``allowed_token_ids``) get."""
    texts = ["a fine film with warm performances", "dull and far too long", "it was a waste of time",
             "the best movie this year"]
    opts = dict(embeddings_from=str(model_dir), embeds_dtype="float32") if backend == "vllm" else {}
    b = make_backend(backend, url, model=SERVED, **opts)
    res = await b.score(ScoreJob(TEMPLATE, texts, WORDS, PromptBatch.zero_shot()))
    missing = res.extra.get("missing_label_logprobs", 0)
    return 1.0 - missing / (len(texts) * len(WORDS))


def bbt_bodies(model_dir: Path, requests: int, popsize: int = 20, prompt_tokens: int = 5) -> list[dict]:
    """The vllm backend's own request bodies for BBT generations: ``popsize`` candidates × 32 texts each, split
    into its 64-sequence requests, the label words read with ``logprob_token_ids``."""
    b = make_backend("vllm", "http://unused", embeddings_from=str(model_dir), embeds_dtype="float32", model=SERVED)
    rng = np.random.default_rng(0)
    words = "the a film movie plot acting was is not very good bad slow fun dull great story cast".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(10, 25)))) for _ in range(32)]
    ids = b._label_ids(WORDS)
    bodies = []
    while len(bodies) < requests:
        cands = rng.normal(0, 0.02, (popsize, prompt_tokens, 384)).astype(np.float32)
        seqs = b._sequences(ScoreJob(TEMPLATE, texts, WORDS, PromptBatch(kind="shallow", candidates=cands)))
        for i in range(0, len(seqs), b.prompts_per_request):
            bodies.append({**b.request_body(seqs[i:i + b.prompts_per_request], ids), "logprob_token_ids": ids})
    return bodies[:requests]


def label_rows(resp: dict, ids: list[int]) -> np.ndarray:
    return np.array([[c["logprobs"]["top_logprobs"][0][f"token_id:{i}"] for i in ids] for c in resp["choices"]])


def seq_per_s(url: str, bodies: list[dict]) -> float:
    with httpx.Client(timeout=600) as c:
        c.post(url + "/v1/completions", json=bodies[0]).raise_for_status()  # warm-up (compile, caches)
        n, t0 = 0, time.perf_counter()
        for body in bodies:
            r = c.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            n += len(r.json()["choices"])
        return n / (time.perf_counter() - t0)


def max_abs_diff(vllm: str, stub: str, bodies: list[dict]) -> float:
    worst = 0.0
    with httpx.Client(timeout=600) as c:
        for body in bodies:
            ids = body["logprob_token_ids"]
            a, b = (label_rows(c.post(u + "/v1/completions", json=body).json(), ids) for u in (vllm, stub))
            worst = max(worst, float(np.abs(a - b).max()))
        echo = {"model": SERVED, "prompt": ["the capital of france is", "a dull film , far too long"],
                "echo": True, "logprobs": 0, "max_tokens": 0}
        a, b = ([x for ch in c.post(u + "/v1/completions", json=echo).json()["choices"]
                 for x in ch["logprobs"]["token_logprobs"][1:]] for u in (vllm, stub))
        worst = max(worst, float(np.abs(np.array(a) - np.array(b)).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller budgets and fewer timed requests")
    ap.add_argument("--speed-only", action="store_true",
                    help="only score_max_abs_diff and the throughput keys (no tuning runs, no coverage)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed rounds, the servers taking turns in each; ratios are medians, with their range")
    args = ap.parse_args()
    py = vllm_python()
    if py is None:
        sys.exit("vLLM is not installed: run `make test-vllm` first (it installs .venv-vllm)")
    version = subprocess.run([str(py), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    calls = 6 if args.quick else 20
    timed = 4 if args.quick else 20
    out: dict = {"vllm_version": version, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_llama(tmp / "tiny-llama")
        bodies = bbt_bodies(model_dir, timed)
        flags = ("--enable-prompt-embeds", "--served-model-name", SERVED)
        with spawn_vllm(model_dir, served_name=SERVED, log_path=tmp / "vllm.log") as vllm_url, \
                spawn_server(model_dir, *flags) as stub_url, \
                spawn_server(model_dir, *flags, "--threads", "1") as one_thread:
            servers = {"vllm": (vllm_url, True), "server_stub": (stub_url, False)}
            out["score_max_abs_diff"] = max_abs_diff(vllm_url, stub_url, bodies[:4])
            if not args.speed_only:
                for name, (url, is_vllm) in servers.items():
                    for backend, methods in (("vllm", ("bbt", "gdfo")), ("openai", ("bdpl",))):
                        cov = asyncio.run(unprobed_coverage(url, backend, model_dir))
                        for method in methods:
                            row = tune(url, is_vllm, backend, method, model_dir, calls, tmp / f"{name}-{method}")
                            out["runs"][f"{name}/{backend}/{method}"] = {**row, "unprobed_label_score_coverage": cov}
                exact = [label_rows(httpx.post(u + "/v1/completions", json=bodies[0], timeout=600).json(),
                                    bodies[0]["logprob_token_ids"]) for u in (vllm_url, stub_url)]
                out["exact_label_score_coverage"] = min(float((e > -9999).mean()) for e in exact)
            # throughput: each server alone (the others idle), taking turns so that load from outside falls on all
            rates: dict[str, list[float]] = {"vllm": [], "server_stub": [], "server_stub_1_thread": []}
            urls = {"vllm": vllm_url, "server_stub": stub_url, "server_stub_1_thread": one_thread}
            for r in range(args.repeats):
                names = list(urls) if r % 2 == 0 else list(reversed(urls))
                for name in names:
                    rates[name].append(seq_per_s(urls[name], bodies))
    ratio = [s / v for s, v in zip(rates["server_stub"], rates["vllm"])]
    ratio_1 = [s / v for s, v in zip(rates["server_stub_1_thread"], rates["vllm"])]
    out["seq_per_s"] = {k: round(float(np.median(v)), 1) for k, v in rates.items()}
    out["stub_vs_vllm_seq_per_s"] = round(float(np.median(ratio)), 3)
    out["stub_vs_vllm_seq_per_s_equal_threads"] = round(float(np.median(ratio_1)), 3)
    if args.repeats > 1:
        out["stub_vs_vllm_seq_per_s_range"] = [round(min(ratio), 3), round(max(ratio), 3)]
        out["stub_vs_vllm_seq_per_s_equal_threads_range"] = [round(min(ratio_1), 3), round(max(ratio_1), 3)]
    out["timed_requests"] = {"requests": len(bodies), "sequences_per_request": 64, "rows_per_sequence": "1+5+~15-30"}
    line = json.dumps(out, separators=(",", ":"))
    print(line)
    if not args.speed_only:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(line + "\n")


if __name__ == "__main__":
    main()
