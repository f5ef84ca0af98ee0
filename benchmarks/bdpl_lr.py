"""BDPL's learning rate, measured on synthetic objectives (no model, no data): which rate learns a signal
within a 400-call budget without collapsing the distributions on noise?

    python benchmarks/bdpl_lr.py [--rates 0.03,0.01,0.003,0.001] [--seeds 20]

Per rate, with the default n = 5 slots, V = 50 entries, C = 10 samples per generation (40 generations = 400
calls): (1) pure noise, losses i.i.d. N(0, 1): entries per slot at probability zero after 5 and 40 generations
(an entry at zero is never sampled again); (2) a weak signal, loss = N(0, 1) - 2 * (slots holding their one
good entry) / n: the good entries' mean probability after 40 generations (uniform: 1/V = 0.02). Prints one JSON
line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bbt_client.methods.text.bdpl import BDPLConfig, BDPLTuner


def _tuner(lr: float, seed: int) -> BDPLTuner:
    vocab = [f"w{i}" for i in range(50)]
    return BDPLTuner(None, BDPLConfig(lr=lr), seed=seed, vocabulary=vocab)


def run(lr: float, seed: int, signal: float, generations: int = 40) -> tuple[BDPLTuner, list[np.ndarray]]:
    t = _tuner(lr, seed)
    rng = np.random.default_rng(1000 + seed)
    good = rng.integers(0, 50, t.num_slots)
    snaps = []
    for _ in range(generations):
        idx = t._propose()
        losses = rng.standard_normal(len(idx)) - signal * (idx == good).mean(axis=1)
        t._update(idx, losses)
        snaps.append(t.probs.copy())
    return t, [s[np.arange(t.num_slots), good] for s in snaps], snaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0.03,0.01,0.003,0.001")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    out = {}
    for lr in (float(r) for r in args.rates.split(",")):
        zero5, zero40, good40 = [], [], []
        for s in range(args.seeds):
            _, _, snaps = run(lr, s, 0.0)
            zero5.append((snaps[4] == 0).sum(axis=1).mean())
            zero40.append((snaps[-1] == 0).sum(axis=1).mean())
            _, good, _ = run(lr, s, 2.0)
            good40.append(good[-1].mean())
        out[str(lr)] = {"noise_zero_entries_per_slot_gen5": round(float(np.mean(zero5)), 2),
                        "noise_zero_entries_per_slot_gen40": round(float(np.mean(zero40)), 2),
                        "signal_good_entry_prob_gen40": round(float(np.mean(good40)), 4),
                        "signal_good_entry_prob_gen40_std": round(float(np.std(good40)), 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
