"""Could a surrogate model save calls for BBTv2's defaults? Ranks measured on the candidates CMA-ES really asks.

    python benchmarks/surrogate_rank.py --out DIR [--tasks agnews,cr,sst5] [--calls 1000] [--seeds 13,42,100]

A surrogate saves calls only where it ranks a generation's candidates as the endpoint would: lq-CMA-ES
(pycma's ``SurrogatePopulation``) scores candidates for real until the model's Kendall τ against those true
losses reaches 0.85, and only then lets the model stand in for the rest. This script runs BBTv2 at its defaults
(n = 5 prompt tokens, as every benchmark here) with every CMA-ES ``tell`` recorded (``DIR/<task>-<seed>/
trace.npz``: each told generation's z and losses), then, for every generation of every layer's CMA-ES, fits
each model on that CMA-ES's earlier points only and measures τ between its predictions and the true losses:

- ``lq``: pycma's linear-quadratic model (``cma.fitness_models.LQModel``), lq-CMA-ES's surrogate;
- ``gp``: a Gaussian process over z (RBF kernel, length scale and noise by marginal likelihood on a grid),
  the usual Bayesian-optimisation surrogate.

No call is spent on the models: the traces are what the runs paid for anyway. ``ellipsoid``: the same
measurement on a noiseless ellipsoid searched the same way (d = 500, six CMA-ES, popsize 20), a surrogate's
best case at these archive sizes. Runs are resumable (a task/seed
with a trace is not run again). Prints one JSON line: per task and model the mean τ, the share of generations
with τ >= 0.85 (where lq-CMA-ES would skip calls), and the archive sizes the fits had.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

import bbt_client as bbt
from bbt_client.search.cmaes import CMAES, import_cma

TRUST_TAU = 0.85  # pycma SurrogatePopulation's tau_truth_threshold
_TRACE: contextvars.ContextVar[list] = contextvars.ContextVar("trace")


def _record_tells() -> None:
    """Wrap ``CMAES.tell`` so that each run (its own context) collects (optimiser, z, losses) per generation."""
    tell = CMAES.tell

    def recording_tell(self: CMAES, losses) -> None:
        xs = None if self._pending is None else self._pending.copy()
        tell(self, losses)
        trace = _TRACE.get(None)
        if trace is not None and xs is not None:
            trace.append((id(self), xs, np.asarray(losses, dtype=np.float64).copy()))

    CMAES.tell = recording_tell


async def _one(url: str, task: str, seed: int, calls: int, run_dir: Path) -> None:
    trace_file = run_dir / "trace.npz"
    if trace_file.exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run left no trace: run it again from scratch
    trace: list = []
    _TRACE.set(trace)  # this coroutine's context, copied into the job's tell threads
    config = bbt.TuneConfig(endpoint=bbt.EndpointConfig(url=url), task=bbt.TaskConfig(name=task, shots=16),
                            method="bbtv2", seed=seed, budget={"calls": calls},
                            method_options={"prompt_tokens": 5}, evaluate_test=False, out=run_dir)
    await bbt.tune_async(config)
    ids = {k: i for i, k in enumerate(dict.fromkeys(t[0] for t in trace))}  # optimiser index: order of first use
    np.savez(trace_file, optimiser=np.array([ids[t[0]] for t in trace]),
             z=np.stack([t[1] for t in trace]), loss=np.stack([t[2] for t in trace]))
    print(f"{task} seed {seed}: {len(trace)} generations traced", file=sys.stderr, flush=True)


async def _collect(url: str, out: Path, tasks: list[str], seeds: list[int], calls: int, jobs: int) -> None:
    pending = [(t, s) for t in tasks for s in seeds]
    gate = asyncio.Semaphore(jobs)

    async def gated(t: str, s: int) -> None:
        async with gate:
            await _one(url, t, s, calls, out / f"{t}-{s}")

    await asyncio.gather(*(gated(t, s) for t, s in pending))


def lq_predict(X: np.ndarray, y: np.ndarray, Xq: np.ndarray) -> np.ndarray:
    model = import_cma().fitness_models.LQModel()
    model.add_data(list(X), list(y))
    return np.array([model.eval(x) for x in Xq])


def gp_predict(X: np.ndarray, y: np.ndarray, Xq: np.ndarray) -> np.ndarray:
    """GP posterior mean, RBF kernel; length scale (× the median distance) and noise chosen by marginal likelihood."""
    mu, sd = y.mean(), y.std() or 1.0
    t = (y - mu) / sd
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    med = float(np.sqrt(np.median(d2[np.triu_indices(len(X), 1)]))) or 1.0
    best = None
    for scale in (0.25, 0.5, 1.0, 2.0, 4.0):
        K0 = np.exp(-d2 / (2 * (scale * med) ** 2))
        for noise in (1e-3, 1e-2, 1e-1, 1.0):
            L = np.linalg.cholesky(K0 + noise * np.eye(len(X)))
            a = np.linalg.solve(L.T, np.linalg.solve(L, t))
            nll = 0.5 * t @ a + np.log(np.diag(L)).sum()
            if best is None or nll < best[0]:
                best = (nll, scale, a)
    _, scale, a = best
    dq = ((Xq[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-dq / (2 * (scale * med) ** 2)) @ a * sd + mu


MODELS = {"lq": lq_predict, "gp": gp_predict}


def rank_scores(trace: dict) -> dict[str, list[tuple[int, float]]]:
    """Per model: (archive size, τ) for every generation that has an earlier generation of the same CMA-ES."""
    out: dict[str, list[tuple[int, float]]] = {m: [] for m in MODELS}
    opt, Z, F = trace["optimiser"], trace["z"], trace["loss"]
    for g in range(len(opt)):
        earlier = [h for h in range(g) if opt[h] == opt[g]]
        if not earlier:
            continue
        X, y = np.concatenate([Z[h] for h in earlier]), np.concatenate([F[h] for h in earlier])
        for name, predict in MODELS.items():
            tau = kendalltau(predict(X, y, Z[g]), F[g]).statistic
            out[name].append((len(y), 0.0 if np.isnan(tau) else float(tau)))
    return out


def ellipsoid_trace(calls: int, dim: int = 500, layers: int = 6, popsize: int = 20, seed: int = 1) -> dict:
    """A noiseless ellipsoid searched as BBTv2 searches (one CMA-ES per layer, visited in turn): the best case
    for a surrogate at the same dimension and archive sizes."""
    es = [CMAES(dim, popsize=popsize, seed=seed + i) for i in range(layers)]
    w, opt, Z, F = np.logspace(0, 1, dim), [], [], []
    for g in range(calls // popsize):
        X = es[g % layers].ask()
        f = (w * (X - 1.0) ** 2).sum(1)
        es[g % layers].tell(f)
        opt.append(g % layers), Z.append(X), F.append(f)
    return {"optimiser": np.array(opt), "z": np.stack(Z), "loss": np.stack(F)}


def summarise(out: Path, tasks: list[str], seeds: list[int], calls: int) -> dict:
    res: dict = {"trust_tau": TRUST_TAU, "calls": calls, "tasks": {}}
    pooled: dict[str, list[tuple[int, float]]] = {m: [] for m in MODELS}
    for task in tasks:
        per: dict[str, list[tuple[int, float]]] = {m: [] for m in MODELS}
        for s in seeds:
            f = out / f"{task}-{s}" / "trace.npz"
            if f.exists():
                for m, rows in rank_scores(dict(np.load(f))).items():
                    per[m] += rows
        res["tasks"][task] = {m: _stats(rows) for m, rows in per.items()}
        for m in MODELS:
            pooled[m] += per[m]
    res["all"] = {m: _stats(rows) for m, rows in pooled.items()}
    res["ellipsoid"] = {m: _stats(rows) for m, rows in rank_scores(ellipsoid_trace(calls)).items()}
    return res


def _stats(rows: list[tuple[int, float]]) -> dict:
    if not rows:
        return {"generations": 0}
    n, tau = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    big = tau[n >= np.median(n)]
    return {"generations": len(rows), "mean_tau": round(float(tau.mean()), 4),
            "mean_tau_larger_archives": round(float(big.mean()), 4),
            "share_trusted": round(float((tau >= TRUST_TAU).mean()), 4),
            "max_tau": round(float(tau.max()), 4), "archive_median": int(np.median(n)), "archive_max": int(n.max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", default="agnews,cr,sst5")
    ap.add_argument("--seeds", default="13,42,100")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--endpoint", help="use this running server instead of starting one")
    ap.add_argument("--report", action="store_true", help="only analyse the traces --out holds")
    args = ap.parse_args(argv)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    if not args.report:
        _record_tells()
        if args.endpoint:
            asyncio.run(_collect(args.endpoint, args.out, tasks, seeds, args.calls, args.jobs))
        else:
            from server_stub.testing import spawn_server

            with spawn_server("default") as url:
                asyncio.run(_collect(url, args.out, tasks, seeds, args.calls, args.jobs))
    print(json.dumps(summarise(args.out, tasks, seeds, args.calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
