"""Label-score coverage over a run: the strategy a probe picks is recorded, probe calls are paid from the budget,
a floor-prone strategy under 0.9 zero-shot coverage on the training texts stops the run before tuning (exit 2)
unless overridden, and result.json and ``bbt report`` carry the coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt_client.backends.base import Backend, ScoreResult, uncounted
from bbt_client.backends.scoring import describe
from bbt_client.cli.commands import main
from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
from bbt_client.errors import ConfigError
from bbt_client.protocol import ModelInfo, TokenizeResponse, WordTokens
from bbt_client.run.job import tune



class FlooringBackend(Backend):
    """A text endpoint whose probe costs ``probe_calls`` calls and picks top-k, where the last label word is
    floored in ``floored_share`` of the texts."""

    supported_prompts = frozenset({"none", "text"})
    scoring_option = "auto"

    def __init__(self, floored_share: float, probe_calls: int = 3):
        self.floored_share, self.probe_calls, self.strategy = floored_share, probe_calls, None
        self.applied: dict | None = None

    async def model_info(self) -> ModelInfo:
        return ModelInfo(name="floors", kind="causal", architecture="Toy", hidden_size=1, num_layers=1,
                         max_seq_len=128, vocab_size=1, embedding_std=0.0, hidden_std=[0.0], max_prompt_tokens=0,
                         max_candidates=1, max_texts=4096, max_body_bytes=1 << 26, device="cpu")

    async def tokenize(self, words=(), texts=()) -> TokenizeResponse:
        return TokenizeResponse(words=[WordTokens(word=w, ids=[i]) for i, w in enumerate(words)],
                                text_token_counts=[len(t.split()) for t in texts])

    def scoring(self, k: int):
        return describe(self.strategy or "top-k", k, facts={"strategy": self.strategy or "top-k", "top_logprobs": 5})

    async def probe(self, counted=uncounted, label_words=()):
        for _ in range(self.probe_calls):
            await counted(self._one)
        self.strategy = "top-k"
        return {"backend": "floors", "calls": self.probe_calls, "scoring": self.scoring(len(label_words)).as_dict()}

    async def _one(self):
        return None, 7

    def apply_scoring(self, facts: dict) -> None:
        self.applied = facts

    async def score(self, job) -> ScoreResult:
        c = job.prompts.num_candidates
        n, k = len(job.texts), len(job.label_words)
        logits = np.tile(np.arange(k, dtype=np.float32), (c, n, 1))
        floored = int(round(self.floored_share * n)) * c
        return ScoreResult(logits=logits, tokens=c * n, floored_scores=floored)


def config(tmp_path, **kw) -> TuneConfig:
    return TuneConfig(endpoint=EndpointConfig(url="http://floors.invalid", backend="openai"),
                      task=TaskConfig(name="sst2", shots=4, test_limit=20, template="{text} It was {mask}"),
                      method="bdpl", seed=1, budget={"calls": 30},
                      method_options={"popsize": 2, "prompt_tokens": 1, "vocab_size": 5},
                      out=tmp_path / "run", **kw)


async def test_mostly_floored_scores_refuse_to_tune_with_the_fixes_named(tmp_path):
    backend = FlooringBackend(floored_share=0.5)
    with pytest.raises(ConfigError, match="(?s)scoring=echo.*fewer or other label words.*lists the labels.*"
                                          "--allow-floored-scores"):
        await tune(config(tmp_path), backend=backend)


async def test_allowed_floors_tune_and_report_the_coverage(tmp_path, capsys):
    backend = FlooringBackend(floored_share=0.5)
    result = await tune(config(tmp_path, allow_floored_scores=True), backend=backend)
    # every score: 2 label words per text, half the texts with one floored: 1 - 0.5/2
    assert result.label_score_coverage == pytest.approx(0.75)
    assert result.scoring["strategy"] == "top-k" and result.scoring["exact"] is False
    assert result.scoring["probe"]["calls"] == 3
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["label_score_coverage"] == pytest.approx(0.75)
    assert main(["report", "--run", str(tmp_path / "run")]) == 0
    assert "label scores top-k, coverage 0.7500" in capsys.readouterr().out


async def test_probe_calls_are_paid_from_the_budget(tmp_path):
    result = await tune(config(tmp_path, allow_floored_scores=True), backend=FlooringBackend(0.0, probe_calls=4))
    wal = [json.loads(line) for line in (tmp_path / "run" / "budget.wal").read_text().splitlines()]
    reserved = {e["id"]: e for e in wal if e["op"] == "reserve"}
    settled = {e["id"]: e for e in wal if e["op"] == "settle"}
    probes = [i for i, e in reserved.items() if e["what"] == "probe"]
    assert len(probes) == 4 and all(settled[i]["tokens"] == 7 for i in probes)  # the endpoint's metered tokens
    assert result.api_calls_used == sum(reserved[i]["calls"] for i in settled) <= 30
    assert result.label_score_coverage == 1.0


def test_tune_flag_sets_the_override(tmp_path):
    from bbt_client.cli.commands import _build_parser, _config_from_args

    args = _build_parser().parse_args(["tune", "--endpoint", "http://x.invalid", "--allow-floored-scores",
                                       "--task", "sst2"])
    assert _config_from_args(args).allow_floored_scores is True
    assert "allow_floored_scores" not in _config_from_args(args).fingerprint()
