"""An in-memory toy endpoint for job and sweep tests: learnable without a model.

The label-word margin is ``w · mean(prompt) × (+1 for the true class, -1 otherwise)`` plus a fixed per-text
offset, so a tuner that moves the prompt along ``w`` raises accuracy. Texts the task does not have (calibration's
content-free inputs) lean to no class; ``prior`` is a label prior every input shares.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

from bbt_client.backends.base import Backend, ScoreJob, ScoreResult
from bbt_client.protocol import ModelInfo, TokenizeResponse, WordTokens

D, L = 8, 3


class ToyBackend(Backend):
    supported_prompts = frozenset({"none", "shallow", "deep"})

    def __init__(self, labels_by_text: dict[str, int], fail_after: int | None = None):
        self.labels = labels_by_text
        self.w = np.random.default_rng(0).normal(size=D).astype(np.float32)
        self.calls = 0  # candidates scored, i.e. API calls actually spent
        self.requests = 0
        self.fail_after = fail_after
        self.prior = 0.0  # a label prior every input shares, prompted or not (what calibration divides out)
        self.jobs: list[ScoreJob] = []  # every request scored, in order

    async def model_info(self) -> ModelInfo:
        return ModelInfo(name="toy", kind="masked", architecture="Toy", hidden_size=D, num_layers=L,
                         max_seq_len=128, vocab_size=100, embedding_std=0.05, hidden_std=[0.05, 0.5, 0.5],
                         max_prompt_tokens=64, max_candidates=64, max_texts=4096, max_body_bytes=1 << 26,
                         device="cpu")

    async def tokenize(self, words=(), texts=()) -> TokenizeResponse:
        return TokenizeResponse(words=[WordTokens(word=w, ids=[zlib.crc32(w.lower().encode())]) for w in words],
                                text_token_counts=[len(t.split()) for t in texts])

    async def score(self, job: ScoreJob) -> ScoreResult:
        if self.fail_after is not None and self.requests >= self.fail_after:
            raise KeyboardInterrupt  # a crash in the middle of a paid run
        self.requests += 1
        self.jobs.append(job)
        full = job.prompts.full()
        C = job.prompts.num_candidates
        if full is None:
            strength = np.zeros(C, np.float32)
        else:
            strength = full.reshape(C, -1, D).mean(axis=1) @ self.w
        # texts the task does not have (calibration's content-free inputs) lean to no class
        sign = np.array([0.0 if t not in self.labels else 1.0 if self.labels[t] == 1 else -1.0 for t in job.texts],
                        np.float32)
        offset = np.array([int(hashlib.sha256(t.encode()).hexdigest()[:4], 16) / 65535 - 0.5 if t in self.labels
                           else 0.0 for t in job.texts], np.float32)
        margin = strength[:, None] * sign[None, :] * 10 + offset[None, :]
        # word j leans to class 1 ("great" for sst2) or 0 ("bad"), with its own small offset
        leaning = np.array([(1.0 if w == "great" else -1.0) if w in ("great", "bad") else
                            (1.0 if zlib.crc32(w.encode()) % 2 else -1.0) for w in job.label_words], np.float32)
        shift = np.array([zlib.crc32(w.encode()) % 97 / 970 for w in job.label_words], np.float32)
        logits = (margin[..., None] / 2 * leaning + shift).astype(np.float32)
        logits[..., 0] += self.prior
        self.calls += C
        return ScoreResult(logits=logits, tokens=C * len(job.texts) * 10)
