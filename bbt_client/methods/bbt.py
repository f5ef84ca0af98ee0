"""BBT (Sun et al., ICML 2022): CMA-ES on z ∈ R^d, shallow prompt p = A z + p0 (n, D).

Pure ask/tell: every :meth:`BBTTuner.ask` is one generation of ``popsize`` candidate prompts, scored
by the caller in one batched request; :meth:`BBTTuner.tell` gets their losses back (lower is better).
Deterministic for a given (model info, config, seed), and resumable bit-identically through
:meth:`state_dict` / :meth:`load_state_dict`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bbt_client.backends.base import PromptBatch
from bbt_client.search.compass import CompassSearch, load_optimiser
from bbt_client.errors import ConfigError
from bbt_client.methods.base import Tuner, check_losses, check_state
from bbt_client.search.cmaes import CMAES
from bbt_client.search.projection import Projection, derive_seed, designed_std
from bbt_client.protocol import ModelInfo

# Sub-stream indices for derive_seed: one independent RNG stream per purpose.
STREAM_PROJECTION = 0
STREAM_CMA = 1
STREAM_INIT_PROMPT = 2
STREAM_LOCAL = 3

STATE_VERSION = 1


class PromptSearchConfig(BaseModel):
    """Settings shared by BBT and BBTv2. Defaults follow the papers' reference code.

    Scaling down for CPU: the papers use ``prompt_tokens=50`` with RoBERTa-large (D=1024); each prompt
    token lengthens every sequence scored, so on the small CPU default model (MiniLM, D=384, ~70
    sequences/s) pass e.g. ``prompt_tokens=10`` (and/or a smaller ``intrinsic_dim``) in the job config:
    cost per call scales with (n + text length), CMA-ES cost with d².
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: d: dimension CMA-ES searches (500 in both papers).
    intrinsic_dim: int = Field(500, ge=2, le=10_000)
    #: n: prompt tokens (50 in the papers; see class docstring to scale down).
    prompt_tokens: int = Field(50, ge=1, le=1024)
    #: Candidates per generation = API calls per generation (20 in the papers).
    popsize: int = Field(20, ge=2, le=1000)
    #: CMA-ES initial step size σ0 (1.0 in the later code; BBT's first code used 0.5 with bound 5).
    sigma0: float = Field(1.0, gt=0)
    #: α in σ_A = α·σ̂/(√d·σ0) for the "normal" projection (1.0 in the code).
    alpha: float = Field(1.0, gt=0)
    #: Box constraint |z_i| <= bound for CMA-ES; 0 = unbounded (the later code's default).
    bound: float = Field(0.0, ge=0)
    #: p0: the prompt at z = 0 in ``replace`` mode. "normal": seeded N(0, σ̂²) per entry; "zeros": p0 = 0.
    #: (In ``add`` mode there is no p0: the slot tokens' own states are the starting point.)
    init_prompt: Literal["normal", "zeros"] = "normal"
    #: How prompts act on the slots (:data:`bbt_client.protocol.PromptMode`): "replace" their states, or "add"
    #: to the states of real tokens at every layer (the reference code's default; z = 0 is the plain model).
    prompt_mode: Literal["replace", "add"] = "replace"
    #: ``add`` mode: the token ids the n slots hold; None = the server's defaults.
    slot_token_ids: tuple[int, ...] | None = None
    #: Where BBTv2's per-layer σ̂ comes from: "model" = the endpoint's figures on its reference text
    #: (``ModelInfo.hidden_std``); "train" = measured on this job's training texts in its template, clipped
    #: at μ ± 3σ five times (the reference code's way; needs a server with ``/v1/layer_stats``).
    hidden_std_source: Literal["model", "train"] = "model"
    #: Two-stage search (BBT-RGB): after this many calls of CMA-ES, every layer's search goes on as a compass
    #: search from its CMA-ES best point (:mod:`bbt_client.search.compass`, the stand-in for their COBYLA stage).
    #: None: CMA-ES throughout. ``bound`` confines the CMA-ES stage only.
    local_after_calls: int | None = Field(None, ge=1)
    #: The compass search's first step in z (BBT-RGB's COBYLA starts at rhobeg = 1, in the same units as σ0).
    local_step: float = Field(1.0, gt=0)
    #: Content-free calibration (Zhao et al. 2021; :mod:`bbt_client.tasks.calibration`): every candidate is also scored
    #: on "N/A" and "" in the same call, and loss, accuracy and the result read the calibrated label scores.
    #: "auto" (default): the bare template is scored on dev both ways (one call, before generation 1) and the run
    #: keeps whichever reads dev better. Fixed-on helped AG News (BBTv2 at 400 calls 0.440 -> 0.494) but cut
    #: zero-shot on other tasks; which one helps depends on the task and words. ``True``/``False`` force it. The
    #: tuning job applies it; an ask/tell loop of your own scores as you choose (:mod:`bbt_client.tasks.calibration`).
    calibrate: bool | Literal["auto"] = "auto"
    #: Score the bare template (no prompt) on dev first and keep it unless a tuned prompt beats it there: a
    #: default must not end below doing nothing (on dev). Needed by ``calibrate="auto"``.
    empty_prompt_baseline: bool = True

    def identity(self, exclude: set[str] = frozenset()) -> dict[str, Any]:
        """The config as a checkpoint's identity. The two-stage and calibration fields are left out while
        off, so checkpoints written before they existed resume with them off (``--opt calibrate=false``)."""
        unused = {"local_after_calls", "local_step"} if self.local_after_calls is None else set()
        unused |= {"empty_prompt_baseline"}  # the job's baseline check: the search is the same either way
        unused |= set() if self.calibrate else {"calibrate"}
        return self.model_dump(exclude=set(exclude) | unused)

    def local_due(self, calls_told: int) -> bool:
        """Whether the second (compass) stage starts now."""
        return self.local_after_calls is not None and calls_told >= self.local_after_calls

    @model_validator(mode="after")
    def _check_slots(self) -> "PromptSearchConfig":
        check_slot_settings(self)
        check_auto_calibration(self)
        return self

    def wrap(self, kind: str, **arrays) -> PromptBatch:
        """A :class:`PromptBatch` of ``kind`` carrying this config's prompt mode and slot tokens."""
        return PromptBatch(kind=kind, mode=self.prompt_mode, slot_token_ids=self.slot_token_ids, **arrays)


class BBTConfig(PromptSearchConfig):
    """BBT settings. ``projection``: "normal" = designed N(0, (α·σ̂_emb/(√d·σ0))²) (later code, default);
    "uniform" = U(-1/√d, 1/√d) (torch Linear init, BBT's first code)."""

    #: Random projection A: "normal" = designed N(0, (α·σ̂_emb/(√d·σ0))²) (the later code's); "uniform" =
    #: U(-1/√d, 1/√d) (torch Linear init, BBT's first code).
    projection: Literal["normal", "uniform"] = "normal"


ConfigT = TypeVar("ConfigT", bound=PromptSearchConfig)


def check_slot_settings(config: Any) -> None:
    """A config's ``slot_token_ids`` fit its ``prompt_mode`` and ``prompt_tokens`` (BBT, BBTv2 and GDFO)."""
    if config.slot_token_ids is not None:
        if config.prompt_mode != "add":
            raise ValueError("slot_token_ids need prompt_mode='add'")
        if len(config.slot_token_ids) != config.prompt_tokens:
            raise ValueError(f"slot_token_ids has {len(config.slot_token_ids)} ids for "
                             f"prompt_tokens={config.prompt_tokens}")


def check_auto_calibration(config: Any) -> None:
    """``calibrate="auto"`` chooses on the bare template's dev score, so it needs ``empty_prompt_baseline``."""
    if config.calibrate == "auto" and not config.empty_prompt_baseline:
        raise ValueError("calibrate='auto' chooses on the bare template's dev score, which "
                         "empty_prompt_baseline=false skips; set calibrate to true or false")


def check_endpoint_prompt(config: Any, model_info: ModelInfo) -> None:
    """The endpoint takes this config's prompt: few enough tokens, a prompt mode it supports."""
    if config.prompt_tokens > model_info.max_prompt_tokens:
        raise ConfigError(
            f"prompt_tokens={config.prompt_tokens} exceeds the endpoint's max_prompt_tokens="
            f"{model_info.max_prompt_tokens}; lower prompt_tokens in the method config"
        )
    if config.prompt_mode not in model_info.prompt_modes:
        raise ConfigError(
            f"prompt_mode={config.prompt_mode!r} is not supported by this endpoint (it supports: "
            f"{', '.join(model_info.prompt_modes)}); use prompt_mode='replace'"
        )


def _resolve_config(
    config_cls: type[ConfigT], config: ConfigT | dict | None, model_info: ModelInfo, seed: int
) -> ConfigT:
    """The tuner's validated config: defaults for ``None``, parsed from a dict, then checked against
    the seed and the endpoint's ``max_prompt_tokens`` (shared by every prompt-search tuner)."""
    if config is None:
        config = config_cls()
    elif isinstance(config, dict):
        config = config_cls(**config)
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    check_endpoint_prompt(config, model_info)
    return config


def _make_cmaes(config: PromptSearchConfig, seed: int, sigma0: float | None = None) -> CMAES:
    """A CMA-ES over z (d,) from the shared settings (``sigma0`` overrides the config's); ``seed`` is a
    derive_seed value (any size), folded into pycma's accepted range [1, 2**31 - 2]."""
    return CMAES(
        config.intrinsic_dim,
        popsize=config.popsize,
        sigma0=config.sigma0 if sigma0 is None else sigma0,
        seed=seed % (2**31 - 2) + 1,
        bounds=(-config.bound, config.bound) if config.bound > 0 else None,
    )


def init_prompt(kind: str, seed: int, shape: tuple[int, int], std: float) -> np.ndarray:
    """p0 (n, D) float32: zeros, or seeded N(0, std²)."""
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


class BBTTuner(Tuner):
    """BBT: one CMA-ES over z (d,), proposing shallow prompts A z + p0, (C, n, D) float32."""

    method = "bbt"
    prompt_kind = "shallow"

    def __init__(self, model_info: ModelInfo, config: BBTConfig | dict | None = None, seed: int = 42):
        config = _resolve_config(BBTConfig, config, model_info, seed)
        self.config = config
        self.model_info = model_info
        self.seed = int(seed)
        d, n, D = config.intrinsic_dim, config.prompt_tokens, model_info.hidden_size
        std = designed_std(model_info.embedding_std, d, config.sigma0, config.alpha)
        self.projection = Projection(
            seed=derive_seed(self.seed, STREAM_PROJECTION),
            intrinsic_dim=d,
            prompt_tokens=n,
            hidden_size=D,
            distribution=config.projection,
            std=std,
        )
        self.p0 = init_prompt(config.init_prompt if config.prompt_mode == "replace" else "zeros",
                              derive_seed(self.seed, STREAM_INIT_PROMPT), (n, D), model_info.embedding_std)
        self._es = _make_cmaes(config, derive_seed(self.seed, STREAM_CMA))
        self._pending_z: np.ndarray | None = None
        self._pending_prompts: np.ndarray | None = None
        self._last_prompts: np.ndarray | None = None
        self._best_prompt: np.ndarray | None = None
        self._last_z: np.ndarray | None = None
        self._last_losses: np.ndarray | None = None
        self._best_z: np.ndarray | None = None
        self._best_loss = float("inf")
        self._generation = 0

    # ------------------------------------------------------------------ helpers

    def prompts(self, z: np.ndarray) -> np.ndarray:
        """A z + p0: (d,) -> (n, D) or (C, d) -> (C, n, D), float32."""
        return self.projection(z) + self.p0

    @property
    def popsize(self) -> int:
        return self._es.popsize

    @property
    def generation(self) -> int:
        """Generations told so far."""
        return self._generation

    @property
    def best_loss(self) -> float:
        """Lowest training loss told so far (inf before the first tell)."""
        return self._best_loss

    @property
    def phase(self) -> str:
        stage = ", compass search" if isinstance(self._es, CompassSearch) else ""
        return f"generation {self._generation + 1}{stage}"

    # ------------------------------------------------------------------ ask / tell

    def ask(self) -> PromptBatch:
        if self._pending_z is not None:
            raise RuntimeError("ask() called twice without tell(): report the pending generation's losses first")
        z = self._es.ask()
        self._pending_z = z
        self._pending_prompts = self.prompts(z)
        return self.config.wrap("shallow", candidates=self._pending_prompts.copy())

    def pending_batch(self) -> PromptBatch | None:
        if self._pending_prompts is None:
            return None
        return self.config.wrap("shallow", candidates=self._pending_prompts.copy())

    def tell(self, losses: np.ndarray, logits: np.ndarray | None = None) -> None:
        if self._pending_z is None:
            raise ValueError("tell() without a pending ask(): call ask() first")
        f = check_losses(losses, self._pending_z.shape[0])
        self._es.tell(f)
        i = int(np.argmin(f))
        if f[i] < self._best_loss:
            self._best_loss = float(f[i])
            self._best_z = self._pending_z[i].copy()
            self._best_prompt = self._pending_prompts[i].copy()
        self._last_z, self._last_losses = self._pending_z, f
        self._last_prompts = self._pending_prompts
        self._pending_z = self._pending_prompts = None
        self._generation += 1
        if isinstance(self._es, CMAES) and self.config.local_due(self._generation * self.popsize):
            # the objective does not move in BBT: the best point's loss is known, no call re-measures it
            self._es = CompassSearch(self._es.best_x, popsize=self.popsize, step=self.config.local_step,
                                     seed=derive_seed(self.seed, STREAM_LOCAL), centre_loss=self._es.best_f)

    # ------------------------------------------------------------------ results

    def best_prompt(self) -> np.ndarray:
        """(n, D) prompt with the lowest training loss told so far (exactly the array that was scored);
        p0 (z = 0) before any tell."""
        if self._best_prompt is None:
            return self.p0.copy()
        return self._best_prompt.copy()

    def last_candidate_prompts(self) -> np.ndarray:
        if self._last_prompts is None:
            raise RuntimeError("no generation has been told yet")
        return self._last_prompts.copy()

    def extra_metrics(self) -> dict[str, float]:
        return {"cma_sigma": self._es.sigma}

    # ------------------------------------------------------------------ persistence

    def _identity(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "config": self.config.identity(),
            "hidden_size": self.model_info.hidden_size,
            "embedding_std": self.model_info.embedding_std,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "identity": self._identity(),
            "es": self._es.state_bytes(),
            "pending_z": self._pending_z,
            "pending_prompts": self._pending_prompts,
            "last_prompts": self._last_prompts,
            "best_prompt": self._best_prompt,
            "last_z": self._last_z,
            "last_losses": self._last_losses,
            "best_z": self._best_z,
            "best_loss": self._best_loss,
            "generation": self._generation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, STATE_VERSION, self._identity())
        self._es = load_optimiser(state["es"])
        self._pending_z = state["pending_z"]
        self._pending_prompts = state["pending_prompts"]
        self._last_prompts = state["last_prompts"]
        self._best_prompt = state["best_prompt"]
        self._last_z = state["last_z"]
        self._last_losses = state["last_losses"]
        self._best_z = state["best_z"]
        self._best_loss = float(state["best_loss"])
        self._generation = int(state["generation"])
