"""Where int8's logit noise enters: fp32 against two int8 forms of the same model, candidate by candidate.

Why: the stock dynamic int8 linear (one weight scale per matrix, one activation scale per batch; the
``stock`` variant below) keeps labels mostly equal to fp32's but cost BBTv2 19 points of AG News accuracy
(docs/server.md, "int8"). What CMA-ES needs is the *ranking* of close candidates, so besides
label agreement this measures, for C deep candidates drawn close together (a CMA-ES population late in a run:
a shared base plus a small spread, per layer scaled by the model's hidden-state std), the correlation across
candidates of their training loss under int8 with their loss under fp32. No timing, so a busy machine does
not bias the figures. In-process, on the bundled model (or ``--model``), AG News training texts.

Variants: ``stock`` (``torch.ao`` dynamic int8 on every linear), ``per-token`` (:class:`server_stub.engine.int8.Int8Linear`
without outlier channels: a scale per output channel and a range per token: ``--quantize int8 --int8-outliers 0``)
and ``int8`` (``--quantize int8`` as the server loads it: the same with each linear's 16 largest input
channels on the server's reference text kept in float32).

Last line: one JSON object ``{"variants": {name: {"linears", "label_agreement", "max_abs_logit_diff",
"loss_corr": [per draw]}}, ...}``; draws alternate spread 0.1 (close) and 0.5 (wide).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server_stub.engine.int8 import quantize_linear_int8  # noqa: E402  (after the path insert)

TEMPLATE, WORDS = "{mask} News: {text}", ["World", "Sports", "Business", "Tech"]
CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


def quantize_stock(module) -> int:
    """torch's own dynamic int8 on every linear layer (per-tensor weights, per-batch activations)."""
    import torch
    from torch import nn

    spec = {m: torch.ao.quantization.default_dynamic_qconfig for m, mod in module.named_modules()
            if isinstance(mod, nn.Linear)}
    torch.ao.quantization.quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)
    return len(spec)


#: name -> (the server's ``--quantize``, what quantizes the loaded model afterwards)
VARIANTS = {"stock": (None, quantize_stock), "per-token": (None, quantize_linear_int8), "int8": ("int8", None)}


def _int8_linears(model) -> int:
    """Linear layers the server quantized: each sibling counts, not the product its group shares."""
    mods = list(model.modules())
    shared = {id(m.shared) for m in mods if type(m).__name__ == "Int8Sibling"}
    return sum(type(m).__name__ == "Int8Sibling" or (type(m).__name__ == "Int8Linear" and id(m) not in shared)
               for m in mods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=5)
    ap.add_argument("--draws", type=int, default=3, help="draws of each spread (0.1 and 0.5)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from bbt_client.protocol import PromptBatch
    from server_stub.app import ServerOptions, load_model

    warnings.simplefilter("ignore")  # torch.ao's deprecation notices
    torch.manual_seed(0)
    with gzip.open(REPO / "bbt_client/data/agnews/train.tsv.gz", "rt", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    pick = np.random.default_rng(0).choice(len(rows), args.texts, replace=False)
    texts, labels = [rows[i][0] for i in pick], np.array([CLASSES.index(rows[i][1]) for i in pick])

    fp32 = load_model(ServerOptions(model=args.model, device="cpu"))
    L, D, n, C = fp32.num_layers, fp32.hidden_size, args.prompt_tokens, args.candidates
    std = np.asarray(fp32.hidden_std)[:, None, None]  # what ModelInfo reports: BBTv2 scales by it
    draws = []
    for k in range(args.draws):
        for spread in (0.1, 0.5):
            r = np.random.default_rng(1000 * k + int(spread * 10))
            base = r.normal(0, 1, (1, L, n, D)) * std
            draws.append((base + spread * r.normal(0, 1, (C, L, n, D)) * std).astype(np.float32))

    def score(lm, prompts):
        return lm.score(TEMPLATE, texts, WORDS, PromptBatch(kind="deep", candidates=prompts)).logits

    def loss(logits):
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -logp[:, np.arange(len(labels)), labels].mean(-1)

    ref = [score(fp32, p) for p in draws]
    out = {}
    for name, (option, quantize) in VARIANTS.items():
        lm = load_model(ServerOptions(model=args.model, device="cpu", quantize=option))
        linears = quantize(lm.base_model) if quantize else _int8_linears(lm.base_model)
        got = [score(lm, p) for p in draws]
        agree = np.mean([(g.argmax(-1) == r.argmax(-1)).mean() for g, r in zip(got, ref)])
        out[name] = {
            "linears": linears,
            "label_agreement": round(float(agree), 4),
            "max_abs_logit_diff": round(float(max(abs(g - r).max() for g, r in zip(got, ref))), 3),
            "loss_corr": [round(float(np.corrcoef(loss(g), loss(r))[0, 1]), 3) for g, r in zip(got, ref)],
        }
        print(f"{name:20s} {out[name]}", flush=True)
    print(json.dumps({"texts": args.texts, "candidates": C, "prompt_tokens": n, "spreads": [0.1, 0.5],
                      "variants": out}))


if __name__ == "__main__":
    main()
