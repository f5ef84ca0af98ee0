"""What a run leaves in its directory, and how to read it back.

- ``result.json``   :class:`RunResult`: the figures a user reports, and the config that reproduces them.
- ``prompt.npy``    the tuned prompt, float32 (n, D) shallow or (L, n, D) deep; its sha256 is in result.json.
                    Text methods write none: their prompt is ``prompt_text`` in result.json.
- ``history.jsonl`` one :class:`GenerationRecord` per generation, for plots and reports.
- ``checkpoint.pkl`` optimiser and loop state for ``--resume`` (see :mod:`bbt_client.run.checkpoint`).
- ``config.json``   the run's TuneConfig, written when it starts (by the CLI and the Python API alike).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bbt_client.run.checkpoint import atomic_write_bytes
from bbt_client.errors import CheckpointError

RESULT_FILE = "result.json"
#: The run's TuneConfig, written by the job itself when it starts: what ``bbt tune --resume DIR`` continues.
CONFIG_FILE = "config.json"
PROMPT_FILE = "prompt.npy"
HISTORY_FILE = "history.jsonl"


@dataclasses.dataclass
class GenerationRecord:
    generation: int
    calls: int
    tokens: int
    phase: str
    best_loss: float
    mean_loss: float
    best_train_accuracy: float
    wall_seconds: float
    dev_accuracy: float | None = None
    dev_loss: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class RunResult(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: str
    task: str
    seed: int
    shots: int
    model: str
    prompt_kind: str
    budget_calls: int | None
    api_calls_used: int
    tokens_used: int
    cost_used: float | None = None
    generations: int
    #: The cap that ended tuning: ``calls``, ``tokens``, ``cost`` or ``time``.
    stop_reason: str
    best_dev_accuracy: float | None
    best_generation: int | None
    test_accuracy: float | None
    zero_shot_test_accuracy: float | None
    #: Zero-shot read with content-free calibration, from the same call (methods that calibrate).
    zero_shot_calibrated_test_accuracy: float | None = None
    test_examples: int
    wall_seconds: float
    prompt_shape: list[int] | None
    prompt_sha256: str | None = None
    #: Text methods (bdpl, cmaes-tokens): the tuned prompt as text, to put before the rendered template with one
    #: space (``bbt_client.protocol.join_text_prompt``) in any client. Such runs write no prompt.npy.
    prompt_text: str | None = None
    #: No tuned prompt beat the bare template on dev, so the result is the template alone (text methods: an empty
    #: ``prompt_text``; continuous ones: a prompt.npy of no tokens, which the scorers send as no prompt).
    bare_template: bool = False
    #: The template the run read every text through (a next-token endpoint reads a built-in task's
    #: ``causal_template``); None in results written before it was recorded: the task's own.
    template: str | None = None
    #: Scores were read with content-free calibration (``bbt_client.tasks.calibration``); ``bbt evaluate`` does the same.
    calibrated: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    #: The label words per class a ``search_label_words`` run scored: the searched ones, or the task's own when
    #: those read dev better; None: no search.
    verbalizer: list[list[str]] | None = None
    #: What ``search_label_words`` found on the training texts; the run used them (``verbalizer``) only if the
    #: bare template read dev better with them than with the task's own words.
    searched_label_words: list[list[str]] | None = None
    #: What ``fit_verbalizer`` fitted (``bbt_client.tasks.fitted_verbalizer.FittedVerbalizer.as_dict``: its words,
    #: their standardisation, class weights and biases); None: no fit.
    fitted_verbalizer: dict[str, Any] | None = None
    #: The run read every score through ``fitted_verbalizer``: it read dev better than the task's own words.
    fitted_verbalizer_used: bool = False
    #: Calls/tokens/cost spent on requests whose results a crash lost (counted in the *_used figures).
    lost_to_crashes: dict[str, float] = Field(default_factory=dict)
    #: Calls/tokens/cost spent on requests an interrupt (Ctrl-C) cut off, settled at what the endpoint reported
    #: serving where it could (counted in the *_used figures).
    lost_to_interrupts: dict[str, float] = Field(default_factory=dict)
    #: API calls one generation costs (the method's population size).
    calls_per_generation: int | None = None
    #: What the endpoint reported serving (calls, tokens) beside the client's own count (*_used).
    endpoint_reported: dict[str, int] = Field(default_factory=dict)
    #: Exact label scores / all label scores the run read (1.0: none was a floor; see docs/scoring.md).
    label_score_coverage: float | None = None
    #: How label scores were read: strategy, whether exact, cost per candidate, the facts it rests on.
    scoring: dict[str, Any] | None = None
    config: dict[str, Any]

    def verbalizer_note(self) -> str:
        """One line on which label words the run read, or "" when it read the task's own."""
        fit = self.fitted_verbalizer
        if fit is not None:
            how = "used: it read dev better than the task's own words" if self.fitted_verbalizer_used else \
                "not used: the task's own words read dev as well or better"
            return f"label words: a verbalizer fitted over {len(fit['words'])} candidate words, {how}"
        if self.verbalizer is not None:
            return f"label words: {self.verbalizer}"
        return ""


def write_prompt(run_dir: Path, prompt: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.asarray(prompt, dtype=np.float32), allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(Path(run_dir) / PROMPT_FILE, data)
    return hashlib.sha256(data).hexdigest()


def read_prompt(run_dir: Path) -> np.ndarray:
    path = Path(run_dir) / PROMPT_FILE
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the tuned prompt {path}: {exc}") from exc


def write_history(run_dir: Path, history: list[GenerationRecord]) -> None:
    lines = "".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in history)
    atomic_write_bytes(Path(run_dir) / HISTORY_FILE, lines.encode())


def read_history(run_dir: Path) -> list[GenerationRecord]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return []
    return [GenerationRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def load_result(run_dir: Path) -> RunResult:
    path = Path(run_dir) / RESULT_FILE
    try:
        return RunResult.model_validate_json(path.read_text())
    except FileNotFoundError:
        if not Path(run_dir).is_dir():
            raise CheckpointError(f"run directory {run_dir} does not exist") from None
        if not (Path(run_dir) / CONFIG_FILE).exists():
            raise CheckpointError(f"{run_dir} holds no bbt run (no {RESULT_FILE}, no {CONFIG_FILE})") from None
        raise CheckpointError(f"no {RESULT_FILE} in {run_dir}: the run has not finished; continue it with "
                              f"`bbt tune --resume {run_dir}`") from None
    except ValidationError as exc:
        raise CheckpointError(f"{path} is not a bbt-client result: {exc.errors()[0]['msg']}") from None
