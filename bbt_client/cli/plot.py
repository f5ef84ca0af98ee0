"""Accuracy-versus-calls pictures: what a user looks at to judge whether a budget was enough.

- :func:`plot_run`   one run: train loss and accuracy curves, its schedule (BBTv2 layers, GDFO stages) shaded.
- :func:`plot_runs`  several runs: one colour per method (and sweep variant), mean line and a band over seeds.
- :func:`plot_sweep` a ``bbt sweep`` directory: test accuracy at each budget, mean and band over seeds.

Reads only run and sweep directories; matplotlib is the optional ``plot`` extra, imported here and nowhere
else so the client stays light.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bbt_client.errors import CheckpointError, ConfigError
from bbt_client.run.results import RESULT_FILE, GenerationRecord, load_result, read_history

_ROUND = re.compile(r",?\s*round (\d+)$")
_COUNTER = re.compile(r"^generation \d+$")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('plotting needs matplotlib: pip install "bbt-client[plot]"') from None
    return plt


def _phase_spans(phases: list[str], calls: list[int]) -> list[tuple[str, int, int]]:
    """Contiguous runs of the same phase as (phase, first call, last call): BBTv2's layer-by-layer schedule."""
    spans: list[tuple[str, int, int]] = []
    for phase, c in zip(phases, calls):
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], c)
        else:
            spans.append((phase, spans[-1][2] if spans else 0, c))
    return spans


def _phase_group(phase: str) -> str:
    """What a phase *is*, without its counter: "layer 2/6, round 3" -> "layer 2/6"; BBT's "generation 7" -> ""."""
    if _COUNTER.match(phase):
        return ""
    return _ROUND.sub("", phase)


def _round_starts(phases: list[str], calls: list[int]) -> list[tuple[int, int]]:
    """(round number, call where it starts) for each BBTv2 round after the first."""
    out: list[tuple[int, int]] = []
    prev_round, prev_call = None, 0
    for phase, c in zip(phases, calls):
        m = _ROUND.search(phase)
        r = m.group(1) if m else prev_round
        if prev_round is not None and r != prev_round:
            out.append((int(r), prev_call))
        prev_round, prev_call = r, c
    return out


def _drop_overlapping(fig, texts: list) -> list:
    """Hide every text whose box overlaps one already kept (in order): labels stay readable at any density."""
    renderer = fig.canvas.get_renderer()
    kept: list = []
    for t in texts:
        box = t.get_window_extent(renderer).expanded(1.1, 1.0)
        if any(box.overlaps(k.get_window_extent(renderer)) for k in kept):
            t.set_visible(False)
        else:
            kept.append(t)
    return kept


def build_run_figure(run_dir: Path | str) -> tuple[Any, list]:
    """The single-run figure and its visible schedule labels (returned so tests can check their layout).

    The schedule is shown without text over the curves: spans shaded in one colour per phase (BBTv2 layer,
    GDFO stage) with a legend below the plot, and, for BBTv2, "round k" marks above the top axes, dropped where
    they would overlap."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    history = read_history(run_dir)
    if not history:
        raise CheckpointError(f"{run_dir} has no history.jsonl with finished generations to plot")
    title = run_dir.name
    if (run_dir / RESULT_FILE).exists():
        r = load_result(run_dir)
        title = f"{r.method} on {r.task} (seed {r.seed}, {r.shots}-shot) — test acc " + (
            f"{r.test_accuracy:.3f}" if r.test_accuracy is not None else "-")

    calls = [h.calls for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5))
    ax_loss.plot(calls, [h.best_loss for h in history], label="best loss in generation")
    ax_loss.plot(calls, [h.mean_loss for h in history], label="mean loss in generation", alpha=0.6)
    ax_loss.set_ylabel("train loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    dev = [(h.calls, h.dev_accuracy) for h in history if h.dev_accuracy is not None]
    if dev:
        ax_acc.plot([c for c, _ in dev], [a for _, a in dev], marker="o", label="dev accuracy")
    ax_acc.plot(calls, [h.best_train_accuracy for h in history], alpha=0.6, label="best train accuracy")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_xlabel("API calls")
    ax_acc.legend(loc="lower right", fontsize=8)

    phases = [h.phase for h in history]
    groups = list(dict.fromkeys(_phase_group(p) for p in phases))
    labels: list = []
    bottom = 0.0
    if len(groups) > 1:
        cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
        colour = {g: cmap(i % cmap.N) for i, g in enumerate(groups)}
        for phase, lo, hi in _phase_spans([_phase_group(p) for p in phases], calls):
            for ax in (ax_loss, ax_acc):
                ax.axvspan(lo, hi, color=colour[phase], alpha=0.15, lw=0)
        from matplotlib.patches import Patch

        handles = [Patch(color=colour[g], alpha=0.35, label=g) for g in groups]
        ncol = min(len(groups), 6)
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False, title="phase",
                   title_fontsize=7)
        bottom = 0.04 + 0.035 * (1 + (len(groups) - 1) // ncol)
        for k, x in _round_starts(phases, calls):
            for ax in (ax_loss, ax_acc):
                ax.axvline(x, color="grey", lw=0.6, ls=":")
            labels.append(ax_loss.annotate(f"round {k}", (x, 1.0), xycoords=("data", "axes fraction"),
                                           xytext=(2, 2), textcoords="offset points", ha="left", va="bottom",
                                           fontsize=7, color="dimgrey"))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    return fig, _drop_overlapping(fig, labels)


def plot_run(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write best/mean train loss and dev accuracy against API calls; returns the PNG path."""
    plt = _pyplot()
    fig, _ = build_run_figure(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- several runs


def _run_label(run_dir: Path) -> str:
    """Method, and the sweep variant when the run belongs to a sweep (``sweep-job.json``)."""
    job = run_dir / "sweep-job.json"
    if job.exists():
        ident = json.loads(job.read_text())
        return f"{ident['method']} ({ident['variant']})" if ident.get("variant") != "default" else ident["method"]
    if (run_dir / RESULT_FILE).exists():
        return load_result(run_dir).method
    cfg = run_dir / "config.json"
    return json.loads(cfg.read_text()).get("method", run_dir.name) if cfg.exists() else run_dir.name


#: ``bbt plot --run A B ... --metric`` choices and their axis labels.
RUN_METRICS = {"dev": "dev accuracy", "train": "best train accuracy", "loss": "best train loss per generation"}


def _curve(history: list[GenerationRecord], metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "dev":
        pts = [(h.calls, h.dev_accuracy) for h in history if h.dev_accuracy is not None]
    elif metric == "loss":  # this generation's best, not best-so-far: a search that drifts away shows as a rise
        pts = [(h.calls, h.best_loss) for h in history]
    else:
        pts = [(h.calls, h.best_train_accuracy) for h in history]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def _step_mean(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Curves held constant between their points, on the union of their x inside the range they all cover:
    (x, (runs, x) values)."""
    lo = max(x[0] for x, _ in curves)
    hi = min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    values = np.stack([y[np.searchsorted(x, grid, side="right") - 1] for x, y in curves])
    return grid, values


def _finish(fig, ax, out: Path, ceiling: float | None, title: str) -> Path:
    plt = _pyplot()
    if ceiling is not None:
        ax.axhline(ceiling, color="black", ls="--", lw=0.8, label=f"white-box ceiling {ceiling:.3f}")
    ax.set_xlabel("API calls")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_runs(run_dirs: Sequence[Path | str], out: Path | str | None = None, *, metric: str = "dev",
              band: str = "minmax", ceiling: float | None = None) -> Path:
    """Dev accuracy, best train accuracy or best train loss per generation against API calls of several runs:
    one colour per method/variant, its mean over the runs (seeds) and a min-max (or ±std) band."""
    plt = _pyplot()
    if metric not in RUN_METRICS or band not in ("minmax", "std"):
        raise ConfigError(f"metric must be one of {', '.join(RUN_METRICS)}; band minmax or std")
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for d in map(Path, run_dirs):
        x, y = _curve(read_history(d), metric)
        if len(x) == 0:
            raise CheckpointError(f"{d} has no {'dev checks' if metric == 'dev' else 'generations'} to plot")
        groups.setdefault(_run_label(d), []).append((x, y))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, curves) in enumerate(groups.items()):
        colour = plt.get_cmap("tab10")(i % 10)
        x, values = _step_mean(curves)
        ax.step(x, values.mean(axis=0), where="post", color=colour, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            lo = values.min(axis=0) if band == "minmax" else values.mean(axis=0) - values.std(axis=0)
            hi = values.max(axis=0) if band == "minmax" else values.mean(axis=0) + values.std(axis=0)
            ax.fill_between(x, lo, hi, step="post", color=colour, alpha=0.2, lw=0)
    ax.set_ylabel(RUN_METRICS[metric])
    path = Path(out) if out is not None else Path(run_dirs[0]).parent / "curves.png"
    band_name = "min-max" if band == "minmax" else "±std"
    return _finish(fig, ax, path, ceiling, f"{RUN_METRICS[metric]} vs API calls: mean over runs, {band_name} band")


# ---------------------------------------------------------------- a sweep


def _merged_summaries(sweep_dirs: Sequence[Path]) -> dict:
    """The groups of several sweeps in one summary; a (task, method, variant) found in several keeps the one that
    reached more budgets; one zero-shot line per task and accuracy (variants sharing the template share it)."""
    from bbt_client.cli.sweep import load_summary

    groups: dict[tuple, dict] = {}  # a group in several sweeps: the one that reached more budgets
    zero_shot, seen = [], set()
    for d in sweep_dirs:
        summary = load_summary(Path(d))
        for g in summary["groups"]:
            key = (g["task"], g["method"], g["variant"])
            if key not in groups or len(g["budgets"]) > len(groups[key]["budgets"]):
                groups[key] = g
        for z in summary["zero_shot"]:
            key = (z["task"], round(z["mean"], 6))
            if key not in seen:
                seen.add(key)
                zero_shot.append(z)
    return {"groups": list(groups.values()), "zero_shot": zero_shot}


def plot_sweep(sweep_dir: Path | str | Sequence[Path | str], out: Path | str | None = None, *,
               band: str = "minmax", ceiling: float | None = None) -> Path:
    """Test accuracy at each budget of a sweep (or of several, in one picture) against the mean API calls used:
    one panel per task, one colour per method/variant, mean over seeds with a min-max (or ±std) band, zero-shot
    as a dotted line."""
    plt = _pyplot()
    dirs = [Path(sweep_dir)] if isinstance(sweep_dir, (str, Path)) else [Path(d) for d in sweep_dir]
    summary = _merged_summaries(dirs)
    tasks = list(dict.fromkeys(g["task"] for g in summary["groups"] if g["budgets"]))
    if not tasks:
        raise CheckpointError(f"{', '.join(map(str, dirs))}: no finished results to plot yet")
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    path = Path(out) if out is not None else dirs[0] / "accuracy_vs_calls.png"
    for ax, task in zip(axes[0], tasks):
        colours = iter(plt.get_cmap("tab10")(i % 10) for i in range(1000))
        for g in (g for g in summary["groups"] if g["task"] == task and g["budgets"]):
            colour = next(colours)
            stats = [g["budgets"][b] for b in sorted(g["budgets"], key=int)]
            x = np.array([s["api_calls_used"] for s in stats])
            values = [np.array(s["test_accuracy"]) for s in stats]
            mean = np.array([v.mean() for v in values])
            label = g["method"] if g["variant"] == "default" else f"{g['method']} ({g['variant']})"
            ax.plot(x, mean, marker="o", color=colour, label=f"{label} (n={max(s['runs'] for s in stats)})")
            if max(len(v) for v in values) > 1:
                lo = [v.min() if band == "minmax" else v.mean() - v.std() for v in values]
                hi = [v.max() if band == "minmax" else v.mean() + v.std() for v in values]
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
        for z in (z for z in summary["zero_shot"] if z["task"] == task):
            name = "zero-shot" if z["variant"] == "default" else f"zero-shot ({z['variant']})"
            ax.axhline(z["mean"], color="grey", ls=":", lw=1, label=f"{name} {z['mean']:.3f}")
        ax.set_ylabel("test accuracy")
        if ax is not axes[0][-1]:
            ax.set_xlabel("API calls")
            ax.set_xlim(left=0)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_title(task)
    band_name = "min-max" if band == "minmax" else "±std"
    return _finish(fig, axes[0][-1], path, ceiling, f"{tasks[-1]}: test accuracy, mean over seeds, {band_name} band")
