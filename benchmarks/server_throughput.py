"""Scoring throughput (sequences/s) of the black box against the machine's limit, in one run.

Setup: servers run as SUBPROCESSES (``python -m server_stub``) with the same torch thread count as the bare
loop, which runs in this process; the paths are timed in alternating rounds (never two at once), so drifting
background load hits all alike. Workload is BBT-shaped: C candidate shallow prompts (C, n, D) on N texts.

- ``gemm_gflops``: torch GEMM rate on three reference shapes (1024x1024·1024x1536, 2048x384·384x1536,
  4096x1536·1536x384), fp32 on the CPU with the run's thread count (fp16 on CUDA), measured in every round
  beside the paths (:class:`GemmRate`); ``model_gemm_gflops`` the same on the model's own linear shapes at
  ``--max-batch-tokens`` rows, and ``model_gemm_utilization`` the server's rate against that.
- ``baseline`` (also ``bare``, its older name): the reference code's way -- a plain Hugging Face eager fp32
  ``base_model(inputs_embeds=..., attention_mask=...)`` loop over the server's own micro-batches (built
  before timing) plus the head at the answer slot.
- ``server``: POST /v1/score to a default server (fp32 on the CPU, fp16 with ``--device cuda``), body built
  before timing; everything else (JSON, base64, HTTP, queue, hooks, micro-batching, head) is timed.
- ``int8``: the same against ``--quantize int8`` (CPU only; :mod:`server_stub.engine.int8`).
- ``flops_per_token`` = 2 x parameters of the linear layers + attention (4 x S x D per layer, S = tokens per
  sequence); ``flops_utilization`` = server seq/s x tokens/seq x flops/token / ``gemm_gflops``.
- concurrent: 8 jobs (own prompts each) send one request at once, against the same 8 requests sent one after
  another; ``concurrent_ratio`` = aggregate seq/s / one job's (cross-request batching shares passes).
- ``client_share_of_wall``: one short BBT tuning run against the fp32 server: wall time minus the time a
  request was on the wire or in the server (an httpx transport that times each exchange), over wall time.
  The run's first import of pycma counts: :func:`bbt_client.search.cmaes.import_cma` keeps pycma from importing
  matplotlib and scipy (0.13 s instead of 1.4 s of a ~35 s run).

Profile of the server's /v1/score (MiniLM-L6, C=20, N=32, n=50, 78 tokens/seq, 2 threads; torch.profiler
self-CPU share; machine shared, so shares, not rates):

    aten::addmm (linear layers)           76 %   bias broadcast into the output (copy_) another 5.5 %
    flash attention (SDPA, CPU)            8 %
    gelu                                   5 %
    layer_norm + residual add              4 %
    attention-mask where/and, embeddings   2 %
    Python (hooks, HF module calls)       <1 %   tokenisation: memoised per text, 0 % after the first call

On a quiet 2-core AMD EPYC (fp32 GEMM 150 GFLOP/s), one BERT layer at 104 x 78 tokens: addmm 76 %, flash
attention 10 %, gelu 6 %, bias copy 4.6 %, layer norm 2.4 % -- the same picture; the model's own GEMM shapes
run at the reference shapes' rate there, and a hand-fused layer (one QKV GEMM, in-place residuals) was 4 % slower
than HF's. So the fp32 path is GEMM-bound; what is not GEMM is elementwise work HF runs unfused. What was
cheap to fix: the last layer now runs at the answer slot only (:mod:`server_stub.engine.answer_layer`: ~14 % of the
FLOPs skipped, 1.13x measured on the same model, fp32 and int8 alike; logits equal up to 1e-6). Int8 cuts the
GEMM cost; cross-request batching lets concurrent jobs share micro-batches. ``torch._int_mm``, the obvious
route to per-token activation scales, ran 40x slower than fp32 here. Through the whole scoring path (2,048-token
micro-batches): addmm 77 %, the CPU flash-attention kernel 13 % (head size 32: ~35 GFLOP/s), GELU 4 %,
copies, layer norm and adds 4 %. ``torch.compile`` of each layer gave 1.006x there (inductor keeps addmm and
the flash kernel and fuses only the GELU and layer-norm passes; with its weight freezing, 0.83x), and Hugging
Face's eager attention is 1.09x SDPA at 20 tokens per sequence but 0.94x at 78: neither kept.

Int8 on MiniLM with torch's stock dynamic linear (one weight scale per matrix, one activation scale per
batch): labels mostly agree with fp32 but its logit noise is as large as what one candidate prompt changes
against another, and BBTv2 lost 19 points of AG News accuracy tuning against it. :mod:`server_stub.engine.int8`
gives each weight row and each token its own range (batch-mates no longer move a
candidate's score) and keeps each layer's 16 loudest input channels in float32. Its price is elementwise work
around torch's int8 kernel (a per-token min/max, a rescale of the input, a low-rank correction of the output),
so its speed over fp32 depends on how much faster the CPU's int8 GEMM is (``benchmarks/int8_fidelity.py``
measures its fidelity, docs/server.md what it costs in tuning). On this AVX2 host the kernel alone
ran 1.6-1.8x fp32's addmm at the model's shapes (2,048 rows), yet per 384 x 384 linear the work around it took
~1.8 ms beside its ~2.2 ms; so the outlier channels are zeroed and put back in place instead of copying
the input, the kernel is told the rescaled rows' known range instead of finding it, and linears that read one
tensor (query, key, value) share that work and one wider product (:class:`server_stub.engine.int8.SiblingGroup`).

Micro-batch size: ``server@N`` times an fp32 server at ``--compare-max-batch-tokens`` N (8192: the GPU
default) beside the default's. Past ~4k tokens MiniLM's feed-forward activations pass glibc's 32 MiB
mmap threshold and every allocation faults in fresh pages; smaller ones stay in cache
(:data:`server_stub.engine.micro_batches.MAX_BATCH_TOKENS`).

Prints a table, then as the LAST line one JSON object with the fields above (and the older ``bare_seq_per_s``,
``ratio`` = server / bare, ``max_abs_logit_diff`` of the server against the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = "{text} It was {mask} ."
WORDS = ["bad", "great"]
GEMM_SHAPES = [(1024, 1024, 1536), (2048, 384, 1536), (4096, 1536, 384)]  # (M, K, N): (M×K)·(K×N)
CONCURRENT_JOBS = 8


def load_texts(n: int) -> list[str]:
    for p in (REPO / "bbt_client/data/sst2/test.tsv", Path("/work/shared/data/sst2/test.tsv")):
        if p.exists():
            with p.open(newline="") as f:
                rows = [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
            if len(rows) >= n:
                return rows[:n]
    words = "the film was a quiet , moving and often funny portrait of a family under pressure".split()
    return [" ".join(words[(i % 7):]) for i in range(n)]


class GemmRate:
    """GEMM rate (GFLOP/s) on fixed shapes with torch's current thread count, timed as one more path of the
    alternating rounds: a rate taken once before the paths drifts with background load and host, and the
    utilisation is a ratio of the two. ``shapes`` are (M, K, N): (M×K)·(K×N)."""

    def __init__(self, shapes, device: str, dtype, seconds: float):
        import torch

        self.shapes, self.seconds = shapes, seconds
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.mats = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
                     for m, k, n in shapes]
        for a, b in self.mats:  # warm-up, not counted
            a @ b
        self.sync()
        self.flops = self.secs = 0.0

    def round(self) -> None:
        flops, t0 = 0.0, time.perf_counter()
        self.sync()
        while time.perf_counter() - t0 < self.seconds:
            for (a, b), (m, k, n) in zip(self.mats, self.shapes):
                a @ b
                flops += 2.0 * m * k * n
        self.sync()
        self.flops += flops
        self.secs += time.perf_counter() - t0

    @property
    def gflops(self) -> float:
        return self.flops / self.secs / 1e9


def model_gemm_shapes(lm, rows: int) -> list[tuple[int, int, int]]:
    """The (M, K, N) of the model's own linear layers at ``rows`` tokens per micro-batch, one per distinct
    shape: the rate its GEMMs can reach, below the reference shapes' larger-K rate on some CPUs."""
    from torch import nn

    return sorted({(rows, m.in_features, m.out_features) for m in lm.base_model.modules()
                   if isinstance(m, nn.Linear)})


def flops_per_token(lm, tokens_per_seq: float) -> float:
    """2 x parameters of the linear layers (weights and biases) + attention scores and mixing (4·S·D per layer)."""
    from torch import nn

    linear = sum(p.numel() for m in lm.base_model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return 2.0 * linear + 4.0 * tokens_per_seq * lm.hidden_size * lm.num_layers


class ServerPath:
    """One POST /v1/score per round, on a keep-alive connection; the body is built once, before timing."""

    def __init__(self, url: str, body: bytes):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=3600, headers={"content-type": "application/json"})
        self.body = body

    def round(self):
        from bbt_client.protocol import ScoreResponse

        r = self.client.post("/v1/score", content=self.body)
        r.raise_for_status()
        resp = ScoreResponse.model_validate_json(r.content)
        return resp.logits.to_array(), resp.usage.model_dump()


class BarePath:
    """``base_model(**batch)`` + head over the server's own micro-batches, prepared before timing."""

    def __init__(self, args, texts: list[str], prompts):
        import torch

        from server_stub.app import ServerOptions, load_model

        lm = load_model(ServerOptions(model=args.model, device=args.device))  # fp32: the reference
        self.lm, self.C, self.N = lm, prompts.shape[0], len(texts)
        enc = lm.encode(TEMPLATE, texts, None, prompts.shape[1])
        self.label_ids = torch.tensor(lm.label_word_ids(WORDS), device=lm.device)
        cand = torch.from_numpy(prompts).to(lm.device)
        self.batches = []
        with torch.inference_mode():
            for rows in lm._micro_batches(enc.lengths, self.C, args.max_batch_tokens):
                t_idx, c_idx = rows // self.C, rows % self.C
                ids, mask, _ = lm._batch_inputs(enc, t_idx)
                emb = lm.word_embeddings(ids)
                emb[:, enc.slot_start : enc.slot_start + enc.n] = cand[torch.from_numpy(c_idx).to(lm.device)]
                answer = torch.from_numpy(enc.answer[t_idx]).to(lm.device)
                self.batches.append((rows, {"inputs_embeds": emb, "attention_mask": mask}, answer))

    def round(self):
        import numpy as np
        import torch

        lm = self.lm
        out = np.empty((self.N * self.C, len(WORDS)), np.float32)
        with torch.inference_mode():
            for rows, batch, answer in self.batches:
                h = lm.base_model(**batch)[0]
                h = h[torch.arange(h.shape[0], device=h.device), answer]
                logits = (h @ lm.word_embeddings.weight.T) if lm.tied_head else lm.head(h)
                out[rows] = logits.index_select(-1, self.label_ids).float().cpu().numpy()  # syncs a GPU too
        return out.reshape(self.N, self.C, -1).transpose(1, 0, 2), None


def timed(path) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = path.round()
    return time.perf_counter() - t0, result


def agreement(a, b) -> tuple[float, float]:
    """(share of (candidate, text) pairs with the same argmax label, max |logit difference|)."""
    return float((a.argmax(-1) == b.argmax(-1)).mean()), float(abs(a - b).max())


def concurrent_vs_sequential(url: str, bodies: list[bytes], reps: int) -> tuple[float, float]:
    """Seconds to serve ``bodies`` one after another, and all at once from one thread each (summed over
    ``reps`` alternating repetitions)."""
    paths = [ServerPath(url, b) for b in bodies]
    seq_t = conc_t = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        for p in paths:
            p.round()
        seq_t += time.perf_counter() - t0
        start = threading.Barrier(len(paths) + 1)
        errors: list[BaseException] = []

        def run(p: ServerPath) -> None:
            start.wait()
            try:
                p.round()
            except BaseException as exc:  # reported after the join
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        conc_t += time.perf_counter() - t0
        if errors:
            raise errors[0]
    return seq_t, conc_t


def client_share(url: str, calls: int) -> tuple[float, float]:
    """(client share of wall time, wall seconds) of a short BBT run (SST-2, 16-shot, n=5) against ``url``."""
    import httpx

    from bbt_client.backends.http import HttpEndpoint
    from bbt_client.backends.server import ServerBackend
    from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
    from bbt_client.run.job import tune

    class TimedTransport(httpx.AsyncBaseTransport):
        """Wall time during which at least one request is on the wire or in the server."""

        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()
            self.busy = 0.0
            self._in_flight = 0
            self._since = 0.0

        async def handle_async_request(self, request):
            if self._in_flight == 0:
                self._since = time.perf_counter()
            self._in_flight += 1
            try:
                response = await self.inner.handle_async_request(request)
                await response.aread()
                return response
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self.busy += time.perf_counter() - self._since

        async def aclose(self) -> None:
            await self.inner.aclose()

    transport = TimedTransport()
    backend = ServerBackend(url, http=HttpEndpoint(url, timeout_s=3600, transport=transport))
    cfg = TuneConfig(endpoint=EndpointConfig(url=url, timeout_s=3600), task=TaskConfig(name="sst2", shots=16),
                     method="bbt", seed=0, budget={"calls": calls}, method_options={"prompt_tokens": 5},
                     eval_every=10_000, evaluate_zero_shot=False, evaluate_test=False)

    async def go() -> float:
        t0 = time.perf_counter()
        try:
            await tune(cfg, backend=backend)
        finally:
            await backend.aclose()
        return time.perf_counter() - t0

    wall = asyncio.run(go())
    return (wall - transport.busy) / wall, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu", help="cpu | cuda (the server then runs float16)")
    p.add_argument("--candidates", type=int, default=20, help="C prompts per request (BBT popsize 20)")
    p.add_argument("--texts", type=int, default=32, help="N texts per request (BBT few-shot SST-2: 32)")
    p.add_argument("--prompt-tokens", type=int, default=50, help="n (BBT default 50)")
    p.add_argument("--requests", type=int, default=3, help="timed rounds per path (after one warm-up)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="every path's micro-batch size (default: the server's own default)")
    p.add_argument("--compare-max-batch-tokens", type=int, default=8192,
                   help="also time an fp32 server at this micro-batch size (8192: the GPU default)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every path (GEMM rate too)")
    p.add_argument("--tune-calls", type=int, default=200, help="API calls of the client-share BBT run")
    p.add_argument("--quick", action="store_true",
                   help="small everything (C=4, N=8, 1 round, 60-call tuning run): a smoke run, not a measurement")
    args = p.parse_args()
    if args.quick:
        args.candidates, args.texts, args.requests, args.tune_calls = 4, 8, 1, 60
    cuda = args.device.startswith("cuda")
    from server_stub.engine.micro_batches import default_max_batch_tokens

    args.max_batch_tokens = args.max_batch_tokens or default_max_batch_tokens("cuda" if cuda else "cpu")

    from contextlib import ExitStack

    import httpx
    import numpy as np
    import torch

    from bbt_client.protocol import ScoreRequest, ShallowPrompt, Tensor
    from server_stub.testing import spawn_server

    torch.set_num_threads(args.threads)
    gemm_dtype, gemm_secs = torch.float16 if cuda else torch.float32, 0.5 if args.quick else 2.0
    texts = load_texts(args.texts)
    rng = np.random.default_rng(0)
    cli = ["--device", args.device, "--max-batch-tokens", str(args.max_batch_tokens), "--log-level", "WARNING",
           "--threads", str(args.threads), "--coalesce-requests", "16"] + (["--dtype", "float16"] if cuda else [])
    with ExitStack() as stack:
        url = stack.enter_context(spawn_server(args.model, *cli))
        q_urls = {} if cuda else {q: stack.enter_context(spawn_server(args.model, *cli, "--quantize", q))
                                  for q in ("int8",)}
        compare = f"server@{args.compare_max_batch_tokens}"
        if args.compare_max_batch_tokens != args.max_batch_tokens:  # the later --max-batch-tokens wins
            q_urls[compare] = stack.enter_context(spawn_server(
                args.model, *cli, "--max-batch-tokens", str(args.compare_max_batch_tokens)))
        D = httpx.get(url + "/v1/model").json()["hidden_size"]

        def body_of(prompts) -> bytes:
            return ScoreRequest(template=TEMPLATE, texts=texts, label_words=WORDS, prompt=ShallowPrompt(
                candidates=Tensor.from_array(prompts))).model_dump_json().encode()

        prompts = rng.normal(0, 0.05, (args.candidates, args.prompt_tokens, D)).astype(np.float32)
        paths = {"server": ServerPath(url, body_of(prompts)), "baseline": BarePath(args, texts, prompts)}
        for q, q_url in q_urls.items():
            paths[q] = ServerPath(q_url, body_of(prompts))
        rates = {"gemm": GemmRate(GEMM_SHAPES, args.device, gemm_dtype, gemm_secs),
                 "model_gemm": GemmRate(model_gemm_shapes(paths["baseline"].lm, args.max_batch_tokens),
                                        args.device, gemm_dtype, gemm_secs)}
        secs = {k: 0.0 for k in paths}
        out: dict[str, object] = {k: path.round() for k, path in paths.items()}  # warm-up all
        for _ in range(args.requests):  # alternate so drifting background load hits all paths alike
            for k, path in paths.items():
                dt, out[k] = timed(path)
                secs[k] += dt
            for r in rates.values():
                r.round()
        gemm, model_gemm = rates["gemm"].gflops, rates["model_gemm"].gflops
        bodies = [body_of(rng.normal(0, 0.05, prompts.shape).astype(np.float32)) for _ in range(CONCURRENT_JOBS)]
        conc_reps = max(1, args.requests - 1)
        seq_t, conc_t = concurrent_vs_sequential(url, bodies, conc_reps)
        share, tune_wall = client_share(url, args.tune_calls)

    lm = paths["baseline"].lm
    seqs = args.candidates * args.texts
    rate = {k: seqs * args.requests / s for k, s in secs.items()}
    usage = out["server"][1]
    tokens_per_seq = usage["tokens_processed"] / usage["sequences"]
    fpt = flops_per_token(lm, tokens_per_seq)
    base_logits = out["baseline"][0]
    agrees = {k: agreement(out[k][0], base_logits) for k in paths if k != "baseline"}
    (s_agree, s_diff), (q_agree, q_diff) = agrees["server"], agrees.get("int8", (None, None))
    conc_ratio = seq_t / conc_t  # equal work both ways: aggregate rate over one job's
    util = rate["server"] * tokens_per_seq * fpt / 1e9 / gemm

    print(f"model={args.model} device={lm.device} C={args.candidates} N={args.texts} n={args.prompt_tokens} "
          f"rounds={args.requests} threads={args.threads} tokens/seq={tokens_per_seq:.1f} "
          f"flops/token={fpt / 1e6:.1f}M gemm={gemm:.0f} GFLOP/s (model's own shapes {model_gemm:.0f})")
    print(f"{'path':<13}{'seconds':>10}{'seq/s':>10}{'GFLOP/s':>10}{'agree':>8}{'max|dl|':>10}")
    for k in paths:
        agree, diff = agrees.get(k, (1.0, 0.0))
        print(f"{k:<13}{secs[k]:>10.2f}{rate[k]:>10.1f}{rate[k] * tokens_per_seq * fpt / 1e9:>10.1f}"
              f"{agree:>8.3f}{diff:>10.2e}")
    print(f"{CONCURRENT_JOBS} jobs at once: {seq_t:.2f} s one after another, {conc_t:.2f} s together "
          f"(ratio {conc_ratio:.3f}); client share of a {args.tune_calls}-call BBT run: {share:.3f} "
          f"of {tune_wall:.1f} s")
    print(json.dumps({
        "gemm_gflops": round(gemm, 1), "model_gemm_gflops": round(model_gemm, 1),
        "model_gemm_utilization": round(util * gemm / model_gemm, 4), "tokens_per_seq": round(tokens_per_seq, 2),
        "flops_per_token": round(fpt), "baseline_seq_per_s": round(rate["baseline"], 2),
        "server_seq_per_s": round(rate["server"], 2), "flops_utilization": round(util, 4),
        "int8_seq_per_s": round(rate["int8"], 2) if "int8" in rate else None,
        "int8_speedup": round(rate["int8"] / rate["server"], 4) if "int8" in rate else None,
        "label_agreement": s_agree, "max_abs_logit_diff": s_diff,
        "int8_label_agreement": q_agree, "int8_max_abs_logit_diff": q_diff, "max_batch_tokens": args.max_batch_tokens,
        "compare_max_batch_tokens": args.compare_max_batch_tokens,
        "server_vs_compare": round(rate["server"] / rate[compare], 4) if compare in rate else None,
        "concurrent_jobs": CONCURRENT_JOBS, "concurrent_seq_per_s": round(CONCURRENT_JOBS * seqs * conc_reps / conc_t, 2), "concurrent_ratio": round(conc_ratio, 4),
        "client_share_of_wall": round(share, 4), "client_run_seconds": round(tune_wall, 1),
        "bare_seq_per_s": round(rate["baseline"], 2), "ratio": round(rate["server"] / rate["baseline"], 4),
        "device": str(lm.device), "server_dtype": "float16" if cuda else "float32", "threads": args.threads,
        "candidates": args.candidates, "texts": args.texts, "prompt_tokens": args.prompt_tokens,
        "requests": args.requests, "server": "subprocess", "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
