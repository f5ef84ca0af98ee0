"""BBTv2 (Sun et al., EMNLP 2022): deep prompts (L, n, D), one z_l ∈ R^d and one CMA-ES per layer,
optimised by divide and conquer.

Schedule (as the reference ``deepbbt.py``): layers are visited in order 0, 1, ..., L-1, then again,
round after round; each visit runs ``generations_per_layer`` CMA-ES generations (1 in the code) of
layer l's optimiser while every other layer is held at its current prompt. The tuner does not own a
budget: the job's single call budget is shared by all layers simply by running this round-robin until
it is spent (the code runs ``budget // (popsize · L)`` rounds, e.g. 8000 // (20 · 24) = 16 for
RoBERTa-large).

``schedule="joint"`` (not the paper's; docs/methods.md) replaces the round-robin with one CMA-ES over
one z that sets every layer's prompt at once, ``A_l z + p0_l`` for every l, each A_l scaled as below: a call
moves all layers, the whole deep prompt lives in one d-dimensional subspace, and every candidate is sent whole
(C, L, n, D), so the server cannot reuse lower layers.

"Current best" of a layer: after each generation of layer l, its held prompt becomes
``A_l · x_best + p0_l`` where ``x_best`` is the best z that layer's CMA-ES has ever been told (pycma's
``result.xbest``, as in the code; note its loss was measured with the other layers as they were
then). ``keep="mean"`` holds the CMA-ES mean instead. Before a layer is first optimised it holds p0_l.
``best_prompt()`` is different: the full (L, n, D) prompt with the lowest training loss ever told.

Projections (designed normal): layer 0 replaces word embeddings, so σ̂ = ``embedding_std`` (the code
uses the embedding matrix's std); layer l ≥ 1 replaces layer l's input, σ̂ = ``hidden_std[l]``: by default
the server's unclipped std on one reference sentence (``ModelInfo``); with ``hidden_std_source="train"`` the
server measures it as the code does, on the job's training texts, clipped at 3σ five times (/v1/layer_stats).
σ_A,l = α·σ̂_l / (√d·σ0).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from bbt_client.backends.base import PromptBatch
from bbt_client.methods.base import Tuner, check_losses, check_state
from bbt_client.methods.bbt import (
    STREAM_CMA,
    STREAM_INIT_PROMPT,
    STREAM_LOCAL,
    STREAM_PROJECTION,
    PromptSearchConfig,
    _make_cmaes,
    _resolve_config,
    init_prompt,
)
from bbt_client.search.compass import CompassSearch, load_optimiser
from bbt_client.search.cmaes import CMAES
from bbt_client.search.projection import Projection, derive_seed, designed_std
from bbt_client.protocol import ModelInfo

STATE_VERSION = 1


class BBTv2Config(PromptSearchConfig):
    """BBTv2 settings (see :class:`PromptSearchConfig` for the shared ones and how to scale n down).

    The reference README suggests ``sigma0=0.2, alpha=0.2`` for some tasks (AG News); the code's
    defaults, used here, are 1.0 and 1.0.
    """

    #: CMA-ES step size for layers >= 1 (None: ``sigma0``). The reference code starts layer 0 at σ0 = 1 and
    #: deeper layers at 0.2 while every projection keeps σ_A = σ̂/(√d·1): deeper prompts start smaller.
    sigma0_deep: float | None = Field(None, gt=0)
    #: CMA-ES generations per layer visit before moving to the next layer (1 in the code).
    generations_per_layer: int = Field(1, ge=1)
    #: What a layer holds while others are optimised: "best" (its best-ever z, the code) or "mean".
    keep: Literal["best", "mean"] = "best"
    #: "alternate": one z_l and one CMA-ES per layer, visited in turn (the paper's divide and conquer).
    #: "joint": one CMA-ES over one z that sets every layer's prompt at once (A_l z + p0_l for every l): each
    #: call moves all layers, at the price of one d-dimensional subspace for the whole deep prompt (and no
    #: lower-layer reuse on the server: every candidate runs all layers).
    schedule: Literal["alternate", "joint"] = "alternate"
    #: Keep every layer's projection matrix in memory up to this many MiB; beyond it only the layer
    #: being optimised is kept (others are regenerated from their seeds when visited: ~0.3 s each).
    projection_cache_mib: int = Field(1024, ge=0)


class BBTv2Tuner(Tuner):
    """BBTv2: asks ``PromptBatch(kind="deep", base=(L,n,D) current prompts, layer=l, candidates=(C,n,D))``."""

    method = "bbtv2"
    prompt_kind = "deep"

    def __init__(self, model_info: ModelInfo, config: BBTv2Config | dict | None = None, seed: int = 42):
        config = _resolve_config(BBTv2Config, config, model_info, seed)
        self.config = config
        self.model_info = model_info
        self.seed = int(seed)
        d, n, D, L = config.intrinsic_dim, config.prompt_tokens, model_info.hidden_size, model_info.num_layers
        self.num_layers = L
        #: σ̂ per layer: what each layer's prompt replaces.
        self.target_std = [float(model_info.embedding_std)] + [float(s) for s in model_info.hidden_std[1:]]
        self.projections = [
            Projection(
                seed=derive_seed(self.seed, STREAM_PROJECTION, layer),
                intrinsic_dim=d,
                prompt_tokens=n,
                hidden_size=D,
                distribution="normal",
                std=designed_std(self.target_std[layer], d, config.sigma0, config.alpha),
            )
            for layer in range(L)
        ]
        self._cache_all = sum(p.nbytes for p in self.projections) <= config.projection_cache_mib * 2**20
        init = config.init_prompt if config.prompt_mode == "replace" else "zeros"  # add: z = 0 is the plain model
        self.p0 = np.stack(
            [
                init_prompt(init, derive_seed(self.seed, STREAM_INIT_PROMPT, layer), (n, D), self.target_std[layer])
                for layer in range(L)
            ]
        )
        self._optimisers = [
            _make_cmaes(config, derive_seed(self.seed, STREAM_CMA, layer),
                        sigma0=config.sigma0 if layer == 0 or config.sigma0_deep is None else config.sigma0_deep)
            for layer in range(1 if self.joint else L)
        ]
        self._base = self.p0.copy()  # (L, n, D): each layer's held prompt
        self._layer = 0
        self._visit_generations = 0  # generations done in the current layer visit
        self._round = 0
        self._generation = 0
        self._pending: tuple[np.ndarray, np.ndarray] | None = None  # (z (C,d), candidates (C,n,D))
        #: (base, layer, candidates) of the last told generation; ``joint``: (None, None, (C, L, n, D) candidates)
        self._last: tuple[np.ndarray | None, int | None, np.ndarray] | None = None
        self._best_prompt: np.ndarray | None = None
        self._best_loss = float("inf")

    # ------------------------------------------------------------------ info

    @property
    def popsize(self) -> int:
        return self.config.popsize

    @property
    def joint(self) -> bool:
        """One optimiser for all layers (``schedule="joint"``); the layer index then stays 0."""
        return self.config.schedule == "joint"

    @property
    def layer(self) -> int:
        """The layer the next (or pending) generation optimises."""
        return self._layer

    @property
    def round(self) -> int:
        """Completed passes over all layers."""
        return self._round

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def best_loss(self) -> float:
        return self._best_loss

    @property
    def phase(self) -> str:
        stage = ", compass search" if isinstance(self._optimisers[0], CompassSearch) else ""
        if self.joint:
            return f"all {self.num_layers} layers{stage}"
        return f"layer {self._layer + 1}/{self.num_layers}, round {self._round + 1}{stage}"

    def current_prompt(self) -> np.ndarray:
        """(L, n, D) the prompts every layer currently holds (the ``base`` of the next ask)."""
        return self._base.copy()

    def _held_z(self, es: Any) -> np.ndarray:
        """The z a layer holds while others move: its optimiser's best point (``keep="best"``, once it has one)
        or its mean."""
        best = es.best_x if self.config.keep == "best" else None
        return es.mean if best is None else best

    def _project(self, layer: int, z: np.ndarray) -> np.ndarray:
        return self.projections[layer](z) + self.p0[layer]

    def _project_all(self, z: np.ndarray) -> np.ndarray:
        """z (C, d) -> (C, L, n, D), or (d,) -> (L, n, D): every layer's prompt from one z (``joint``)."""
        return np.stack([self._project(layer, z) for layer in range(self.num_layers)], axis=z.ndim - 1)

    def _batch(self, candidates: np.ndarray) -> PromptBatch:
        if self.joint:
            return self.config.wrap("deep", candidates=candidates.copy())
        return self.config.wrap("deep", base=self._base.copy(), layer=self._layer, candidates=candidates.copy())

    # ------------------------------------------------------------------ ask / tell

    def ask(self) -> PromptBatch:
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell(): report the pending generation's losses first")
        z = self._optimisers[self._layer].ask()
        candidates = self._project_all(z) if self.joint else self._project(self._layer, z)
        self._pending = (z, candidates)
        return self._batch(candidates)

    def pending_batch(self) -> PromptBatch | None:
        return None if self._pending is None else self._batch(self._pending[1])

    def tell(self, losses: np.ndarray, logits: np.ndarray | None = None) -> None:
        if self._pending is None:
            raise ValueError("tell() without a pending ask(): call ask() first")
        z, candidates = self._pending
        f = check_losses(losses, z.shape[0])
        layer = self._layer
        es = self._optimisers[layer]
        es.tell(f)
        i = int(np.argmin(f))
        if self.joint:  # every layer moved: the candidates are whole prompts
            best = candidates[i].copy()
            self._last = (None, None, candidates)
            self._base = self._project_all(self._held_z(es))
        else:  # one layer moved: the others are the base it was asked with
            best = self._base.copy()
            best[layer] = candidates[i]
            self._last = (self._base.copy(), layer, candidates)
            self._base[layer] = self._project(layer, self._held_z(es))
        if f[i] < self._best_loss:
            self._best_loss, self._best_prompt = float(f[i]), best
        self._pending = None
        self._generation += 1
        if isinstance(es, CMAES) and self.config.local_due(self._generation * self.popsize):
            self._start_local_stage()
        if not self.joint:
            self._next_visit(layer)

    def _next_visit(self, layer: int) -> None:
        """Round-robin bookkeeping after a generation of ``layer``: move on once its visit has had its generations."""
        self._visit_generations += 1
        if self._visit_generations >= self.config.generations_per_layer:
            self._visit_generations = 0
            if not self._cache_all:
                self.projections[layer].release()
            self._layer = (layer + 1) % self.num_layers
            if self._layer == 0:
                self._round += 1

    def _start_local_stage(self) -> None:
        """Every layer's CMA-ES hands over to a compass search from the point the layer holds. The other layers
        move between two visits of a layer, so its centre is re-measured in each generation (row 0)."""
        self._optimisers = [
            CompassSearch(self._held_z(es), popsize=self.popsize, step=self.config.local_step,
                          seed=derive_seed(self.seed, STREAM_LOCAL, layer), remeasure_centre=not self.joint)
            for layer, es in enumerate(self._optimisers)
        ]

    # ------------------------------------------------------------------ results

    def best_prompt(self) -> np.ndarray:
        """(L, n, D) full deep prompt with the lowest training loss told so far; the initial held
        prompts before any tell."""
        return (self._base if self._best_prompt is None else self._best_prompt).copy()

    def last_candidate_prompts(self) -> np.ndarray:
        """(C, L, n, D) full prompts of the generation last told."""
        if self._last is None:
            raise RuntimeError("no generation has been told yet")
        base, layer, candidates = self._last
        return PromptBatch(kind="deep", base=base, layer=layer, candidates=candidates).full()

    def extra_metrics(self) -> dict[str, float]:
        return {"layer": float(self._layer), "cma_sigma": self._optimisers[self._layer].sigma}

    # ------------------------------------------------------------------ persistence

    def _identity(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "config": self.config.identity(exclude={"projection_cache_mib"}),
            "hidden_size": self.model_info.hidden_size,
            "num_layers": self.model_info.num_layers,
            "target_std": self.target_std,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "identity": self._identity(),
            "optimisers": [es.state_bytes() for es in self._optimisers],
            "base": self._base.copy(),
            "layer": self._layer,
            "visit_generations": self._visit_generations,
            "round": self._round,
            "generation": self._generation,
            "pending": self._pending,
            "last": self._last,
            "best_prompt": self._best_prompt,
            "best_loss": self._best_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, STATE_VERSION, self._identity())
        self._optimisers = [load_optimiser(b) for b in state["optimisers"]]
        self._base = np.array(state["base"], dtype=np.float32)
        self._layer = int(state["layer"])
        self._visit_generations = int(state["visit_generations"])
        self._round = int(state["round"])
        self._generation = int(state["generation"])
        self._pending = state["pending"]
        self._last = state["last"]
        self._best_prompt = state["best_prompt"]
        self._best_loss = float(state["best_loss"])
