"""What the text-only methods share: n prompt slots, each holding one entry of a candidate vocabulary.

A discrete prompt is an index per slot into the vocabulary mined from the training texts
(:mod:`bbt_client.methods.text.vocabulary`); it travels as text (:class:`~bbt_client.protocol.PromptBatch` kind ``text``),
so any OpenAI-compatible text endpoint can score it. ``best_prompt()`` returns the indices (n,) as an int64
array (what checkpoints and the job keep); :meth:`DiscretePromptTuner.prompt_text` turns them into the string a
user pastes before the template. Subclasses only say how a generation is proposed (``_propose``) and how its
losses update the search (``_update``); asking, telling, the best-so-far and persistence live here.
"""

from __future__ import annotations

import abc
import hashlib
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bbt_client.backends.base import PromptBatch
from bbt_client.errors import ConfigError
from bbt_client.methods.base import Tuner, check_losses, check_state
from bbt_client.methods.text.vocabulary import EMPTY_SLOT, build_vocabulary, render_prompt

STATE_VERSION = 1
#: Generations in a row told wholly from the cache before ask() re-sends scored prompts (a collapsed search).
MAX_FREE_GENERATIONS = 100


class DiscretePromptConfig(BaseModel):
    """Settings shared by ``bdpl`` and ``cmaes-tokens``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: n: prompt slots, each one vocabulary entry (a word or a short phrase).
    prompt_tokens: int = Field(5, ge=1, le=64)
    #: Candidates per generation = API calls per generation.
    popsize: int = Field(10, ge=2, le=1000)
    #: Entries of the candidate vocabulary (the most frequent PMI n-grams of the training texts).
    vocab_size: int = Field(50, ge=2, le=10_000)
    #: Longest phrase a vocabulary entry may be, in words.
    max_ngram: int = Field(3, ge=1, le=10)
    #: Content-free calibration of the label scores (Zhao et al. 2021), for training, dev, test and zero-shot.
    #: "auto": the bare template is scored on dev both ways (one call, before generation 1) and the run keeps
    #: whichever reads dev better. Calibration lifts AG News's one-word-per-class verbalizer (0.245 -> 0.304 on
    #: test) but hurts searched label words (0.415 -> 0.351): which one helps depends on the words.
    calibrate: bool | Literal["auto"] = "auto"
    #: Score the bare template (every slot empty) on dev first and keep it unless a tuned prompt beats it there:
    #: on a model where calibrated zero-shot is strong, a search can end below it; this makes that impossible on dev.
    empty_prompt_baseline: bool = True

    @model_validator(mode="after")
    def _auto_needs_the_baseline(self) -> "DiscretePromptConfig":
        if self.calibrate == "auto" and not self.empty_prompt_baseline:
            raise ValueError("calibrate='auto' chooses on the bare template's dev score, which "
                             "empty_prompt_baseline=false skips; set calibrate to true or false")
        return self


def _vocab_digest(vocabulary: list[str]) -> str:
    return hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()


class DiscretePromptTuner(Tuner):
    """Base of the discrete (text) prompt tuners. Built with the task and its training split (the vocabulary)."""

    prompt_kind = "text"
    config_class: type[DiscretePromptConfig] = DiscretePromptConfig

    def __init__(self, model_info: Any, config: DiscretePromptConfig | dict | None = None, seed: int = 42, *,
                 task: Any = None, train: Any = None, vocabulary: list[str] | None = None):
        if config is None:
            config = self.config_class()
        elif isinstance(config, dict):
            config = self.config_class(**config)
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.config, self.seed, self.model_info = config, int(seed), model_info
        if vocabulary is None:
            if train is None:
                raise ConfigError(f"method {self.method!r} builds its vocabulary from the training texts: pass train=")
            # the task's own label words stay out even when a searched or fitted verbalizer replaced them for scoring
            words = list(task.scored_words) if task is not None else []
            words += list(task.label_words) if task is not None else []
            try:
                vocabulary = build_vocabulary(train.texts, config.vocab_size, max_ngram=config.max_ngram,
                                              exclude=words)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if len(vocabulary) < 2:
            raise ConfigError(f"the candidate vocabulary has {len(vocabulary)} entries; at least 2 are needed")
        self.vocabulary = list(vocabulary)
        self._pending: np.ndarray | None = None  # (M, n) int64 indices asked (not scored before), not yet told
        self._pending_full: np.ndarray | None = None  # (C, n) the generation they belong to
        #: Training loss of every prompt scored in this run, by its indices' bytes: a prompt is paid for once.
        self._scored: dict[bytes, float] = {}
        self._last: np.ndarray | None = None
        self._last_losses: np.ndarray | None = None
        self._best: np.ndarray | None = None
        self._best_loss = float("inf")
        self._generation = 0

    # ------------------------------------------------------------------ what subclasses provide

    @abc.abstractmethod
    def _propose(self) -> np.ndarray:
        """The next generation's (C, n) vocabulary indices."""

    @abc.abstractmethod
    def _update(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Learn from the told generation's indices (C, n) and finite losses (C,)."""

    @abc.abstractmethod
    def _search_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _load_search_state(self, state: dict[str, Any]) -> None: ...

    def mode_prompt(self) -> np.ndarray:
        """The search distribution's own pick (n,): where it stands now, beside the best prompt seen."""
        return self.best_prompt()

    # ------------------------------------------------------------------ text

    @property
    def num_slots(self) -> int:
        return self.config.prompt_tokens

    def prompt_text(self, prompt: np.ndarray) -> str:
        """The prompt string of indices (n,): the string sent before every rendered text."""
        idx = np.asarray(prompt).reshape(-1)
        if idx.shape[0] != self.num_slots or np.any(idx < EMPTY_SLOT) or np.any(idx >= len(self.vocabulary)):
            raise ValueError(f"a prompt is {self.num_slots} indices into a vocabulary of {len(self.vocabulary)} "
                             f"({EMPTY_SLOT}: an empty slot)")
        return render_prompt(self.vocabulary, idx.astype(np.int64))

    def empty_prompt(self) -> np.ndarray | None:
        """The prompt with every slot empty, i.e. the bare (calibrated) template: the baseline a tuned prompt must
        beat on dev to be kept (the job scores it first); None when ``empty_prompt_baseline`` is off."""
        return np.full(self.num_slots, EMPTY_SLOT, dtype=np.int64) if self.config.empty_prompt_baseline else None

    def text_batch(self, prompts: np.ndarray) -> PromptBatch:
        """(C, n) or (n,) indices as a ``text`` batch."""
        rows = np.asarray(prompts).reshape(-1, self.num_slots)
        return PromptBatch.from_texts([self.prompt_text(r) for r in rows])

    # ------------------------------------------------------------------ ask / tell

    @property
    def popsize(self) -> int:
        return self.config.popsize

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def best_loss(self) -> float:
        return self._best_loss

    @property
    def phase(self) -> str:
        return f"generation {self._generation + 1}"

    def ask(self) -> PromptBatch:
        """The generation's prompts not scored before in this run (each once); a generation whose prompts were all
        scored is told from the cache at no cost and the next one proposed."""
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell(): report the pending generation's losses first")
        for free in range(MAX_FREE_GENERATIONS + 1):
            full = np.asarray(self._propose(), dtype=np.int64)
            new = self._unscored(full)
            if len(new):
                break
            if free == MAX_FREE_GENERATIONS:  # the search proposes only scored prompts: score again, not stall
                new = np.unique(full, axis=0)
                break
            self._finish(full, np.array([self._scored[r.tobytes()] for r in full]))
        self._pending_full, self._pending = full, new
        return self.text_batch(new)

    def extra_metrics(self) -> dict[str, float]:
        """``from_cache``: proposals answered by an earlier score of the same prompt, i.e. calls not paid."""
        return {"from_cache": float(max(0, self.popsize * self._generation - len(self._scored)))}

    def _unscored(self, rows: np.ndarray) -> np.ndarray:
        seen, out = set(self._scored), []
        for r in rows:
            if r.tobytes() not in seen:
                seen.add(r.tobytes())
                out.append(r)
        return np.array(out, dtype=np.int64).reshape(-1, self.num_slots)

    def pending_batch(self) -> PromptBatch | None:
        return None if self._pending is None else self.text_batch(self._pending)

    def tell(self, losses: np.ndarray, logits: np.ndarray | None = None) -> None:
        if self._pending is None:
            raise ValueError("tell() without a pending ask(): call ask() first")
        f = check_losses(losses, self._pending.shape[0])
        self._scored.update((r.tobytes(), float(x)) for r, x in zip(self._pending, f))
        full = self._pending_full if self._pending_full is not None else self._pending
        self._pending = self._pending_full = None
        self._finish(full, np.array([self._scored[r.tobytes()] for r in full]))

    def _finish(self, full: np.ndarray, f: np.ndarray) -> None:
        self._update(full, f)
        i = int(np.argmin(f))
        if f[i] < self._best_loss:
            self._best_loss, self._best = float(f[i]), full[i].copy()
        self._last, self._last_losses = full, f
        self._generation += 1

    def best_prompt(self) -> np.ndarray:
        """Indices (n,) of the lowest-training-loss prompt told so far; before any tell, the first n entries."""
        if self._best is None:
            return np.arange(self.num_slots, dtype=np.int64) % len(self.vocabulary)
        return self._best.copy()

    def last_candidate_prompts(self) -> np.ndarray:
        if self._last is None:
            raise RuntimeError("no generation has been told yet")
        return self._last.copy()

    # ------------------------------------------------------------------ persistence

    def _identity(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "config": self.config.model_dump(),
                "vocabulary": _vocab_digest(self.vocabulary)}

    def state_dict(self) -> dict[str, Any]:
        keys = np.array([np.frombuffer(k, np.int64) for k in self._scored], np.int64).reshape(-1, self.num_slots)
        return {"version": STATE_VERSION, "identity": self._identity(), "pending": self._pending,
                "pending_full": self._pending_full, "scored": (keys, np.array(list(self._scored.values()))),
                "last": self._last, "last_losses": self._last_losses, "best": self._best,
                "best_loss": self._best_loss, "generation": self._generation, "search": self._search_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, STATE_VERSION, self._identity())
        self._pending, self._last, self._last_losses = state["pending"], state["last"], state["last_losses"]
        self._pending_full = state.get("pending_full")  # states from before the cache: none, nothing cached
        keys, values = state.get("scored", (np.zeros((0, self.num_slots), np.int64), np.zeros(0)))
        self._scored = {np.asarray(k, np.int64).tobytes(): float(v) for k, v in zip(keys, values)}
        self._best, self._best_loss = state["best"], float(state["best_loss"])
        self._generation = int(state["generation"])
        self._load_search_state(state["search"])
