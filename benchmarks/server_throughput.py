"""Scoring throughput (sequences/s): the HTTP server vs a bare ``model(**batch)`` loop on the same batches.

Setup: the server runs as a SUBPROCESS (``python -m server_stub``) with the same torch thread count as
the bare loop, which runs in this process; the two are timed in alternating rounds (never both at once). Workload is BBT-shaped:
C candidate shallow prompts (C, n, D) scored on the same N texts per request.

- server: wall time of POST /v1/score requests (JSON + base64 encode/decode, HTTP, queueing, hooks,
  micro-batching, head, response) with the request body built before timing.
- bare: the identical micro-batches (same padding, same prompt-filled ``inputs_embeds``) built before
  timing; only ``base_model(inputs_embeds=..., attention_mask=...)`` + the head at the answer slot is timed.

Prints a table, then as the LAST line one JSON object:
``{"server_seq_per_s", "bare_seq_per_s", "ratio", "device", ...}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = "{text} It was {mask} ."
WORDS = ["bad", "great"]


def load_texts(n: int) -> list[str]:
    for p in (REPO / "bbt_client/data/sst2/test.tsv", Path("/work/shared/data/sst2/test.tsv")):
        if p.exists():
            with p.open(newline="") as f:
                rows = [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
            if len(rows) >= n:
                return rows[:n]
    words = "the film was a quiet , moving and often funny portrait of a family under pressure".split()
    return [" ".join(words[(i % 7):]) for i in range(n)]


class ServerPath:
    """One POST /v1/score per round, on a keep-alive connection; the body is built once, before timing."""

    def __init__(self, url: str, body: bytes):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=600, headers={"content-type": "application/json"})
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

        lm = load_model(ServerOptions(model=args.model, device=args.device))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--candidates", type=int, default=10, help="C prompts per request (BBT popsize is 20)")
    p.add_argument("--texts", type=int, default=16, help="N texts per request (BBT few-shot SST-2: 32)")
    p.add_argument("--prompt-tokens", type=int, default=50, help="n (BBT default 50)")
    p.add_argument("--requests", type=int, default=3, help="timed requests (after one warm-up)")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    args = p.parse_args()

    import httpx
    import numpy as np

    from bbt_client.protocol import ScoreRequest, ShallowPrompt, Tensor
    from server_stub.testing import spawn_server

    texts = load_texts(args.texts)
    rng = np.random.default_rng(0)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cli = ["--device", args.device, "--max-batch-tokens", str(args.max_batch_tokens), "--log-level", "WARNING"]
    cli += ["--threads", str(args.threads)] if args.threads else []
    with spawn_server(args.model, *cli) as url:
        D = httpx.get(url + "/v1/model").json()["hidden_size"]
        prompts = rng.normal(0, 0.05, (args.candidates, args.prompt_tokens, D)).astype(np.float32)
        body = ScoreRequest(template=TEMPLATE, texts=texts, label_words=WORDS,
                            prompt=ShallowPrompt(candidates=Tensor.from_array(prompts))).model_dump_json().encode()
        server, bare = ServerPath(url, body), BarePath(args, texts, prompts)
        server.round(), bare.round()  # warm-up both
        s_time = b_time = 0.0
        # Alternate the two paths round by round so drifting background load hits both alike.
        for _ in range(args.requests):
            dt, (s_logits, usage) = timed(server)
            s_time += dt
            dt, (b_logits, _) = timed(bare)
            b_time += dt
    device, n_batches = str(bare.lm.device), len(bare.batches)

    seqs = args.candidates * args.texts * args.requests
    server_rate, bare_rate = seqs / s_time, seqs / b_time
    max_diff = float(np.abs(s_logits - b_logits).max())
    print(f"model={args.model} device={device} C={args.candidates} N={args.texts} n={args.prompt_tokens} "
          f"requests={args.requests} micro-batches/request={n_batches} threads={args.threads or 'torch default'}")
    print(f"{'path':<8}{'seconds':>10}{'seq/s':>10}")
    print(f"{'server':<8}{s_time:>10.2f}{server_rate:>10.1f}")
    print(f"{'bare':<8}{b_time:>10.2f}{bare_rate:>10.1f}")
    print(f"ratio server/bare = {server_rate / bare_rate:.3f}; max |logit diff| = {max_diff:.2e}; usage {usage}")
    print(json.dumps({
        "server_seq_per_s": round(server_rate, 2), "bare_seq_per_s": round(bare_rate, 2),
        "ratio": round(server_rate / bare_rate, 4), "device": device, "candidates": args.candidates,
        "texts": args.texts, "prompt_tokens": args.prompt_tokens, "requests": args.requests,
        "server": "subprocess", "max_abs_logit_diff": max_diff,
    }))


if __name__ == "__main__":
    main()
