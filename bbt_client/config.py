"""The one validated description of a tuning job; the CLI and the Python API both build it.

Secrets are never part of it: the API key is read from the environment variable named by
``api_key_env`` at connect time, so configs, checkpoints and results can be shared safely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bbt_client.run.budget import BudgetLimits
from bbt_client.errors import ConfigError

Method = Literal["bbt", "bbtv2", "gdfo", "bdpl", "cmaes-tokens"]
BackendKind = Literal["server", "vllm", "openai"]


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    backend: BackendKind = "server"
    #: Name of the environment variable holding the API key (the key itself is never stored).
    api_key_env: str | None = "BBT_API_KEY"
    timeout_s: float = Field(default=120.0, gt=0)
    max_concurrency: int = Field(default=4, ge=1)
    max_retries: int = Field(default=5, ge=0)
    #: Extra backend options (e.g. ``embeddings_from`` and ``model`` for vLLM).
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_url(self) -> "EndpointConfig":
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint url must start with http:// or https://, got {self.url!r}")
        return self


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: A built-in task name (``sst2``, ``agnews``, ``mr`` ...: ``task_names()``) or ``custom`` with ``file``/``template``/``label_words``.
    name: str = "sst2"
    file: Path | None = None
    test_file: Path | None = None
    template: str | None = None
    #: One word per class in class order, or ``{label value: word}`` for a task file with named labels.
    label_words: list[str] | dict[str, str] | None = None
    shots: int = Field(default=16, ge=1, le=4096)
    #: Evaluate on at most this many test examples (None = the whole test set).
    test_limit: int | None = Field(default=None, ge=1)
    #: Words per class to choose from the training texts before tuning, with one API call
    #: (:mod:`bbt_client.tasks.verbalizer`), kept only if they read dev better than ``label_words`` (one more
    #: call); 0 = score exactly ``label_words``.
    search_label_words: int = Field(default=0, ge=0, le=50)
    #: Candidate words per class to fit a verbalizer over before tuning (:mod:`bbt_client.tasks.fitted_verbalizer`;
    #: one call on the training texts, one on dev), kept only if it reads dev better than ``label_words``;
    #: 0 = no fit; None = 30 where the endpoint scores any words in one sequence per text (our server, vLLM's
    #: ``logprob_token_ids``) and no label-word search is asked, else no fit.
    fit_verbalizer: int | None = Field(default=None, ge=0, le=100)

    @model_validator(mode="after")
    def _check_custom(self) -> "TaskConfig":
        if self.file is not None and (self.template is None or not self.label_words):
            raise ValueError("a task file needs --template and --label-words")
        if self.search_label_words and self.fit_verbalizer:
            raise ValueError("search_label_words and fit_verbalizer both replace the label words: choose one")
        return self


class TuneConfig(BaseModel):
    """Everything that determines a run. Two runs with equal configs against the same model give equal results."""

    model_config = ConfigDict(extra="forbid")

    endpoint: EndpointConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    method: Method = "bbtv2"
    seed: int = 42
    budget: BudgetLimits = Field(default_factory=lambda: BudgetLimits(calls=8000))
    #: Method hyper-parameters (see ``bbt_client.methods.registry``); unknown keys are refused there.
    method_options: dict[str, Any] = Field(default_factory=dict)
    loss: Literal["ce", "hinge"] = "ce"
    #: Evaluate the best-so-far prompt on dev every this many generations (BBT: every 100 calls = 5 generations).
    eval_every: int = Field(default=5, ge=1)
    evaluate_zero_shot: bool = True
    evaluate_test: bool = True
    #: Tune even when under 90 % of the zero-shot label scores on the training texts are exact (the rest floors).
    allow_floored_scores: bool = False
    out: Path | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the original (budgets, output and the floored-scores override
        may change)."""
        d = self.model_dump(mode="json", exclude={"out", "budget", "allow_floored_scores"})
        d["endpoint"] = {"backend": self.endpoint.backend}
        return d


def parse_config(data: dict[str, Any]) -> TuneConfig:
    """Validate a config dict, turning pydantic's errors into one readable :class:`ConfigError`."""
    try:
        return TuneConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
