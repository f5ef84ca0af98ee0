"""The tuning curve of a run as a PNG: what a user looks at to judge whether the budget was enough.

Reads only the run directory (``history.jsonl``, ``result.json``); matplotlib is the optional ``plot`` extra,
imported here and nowhere else so the client stays light.
"""

from __future__ import annotations

from pathlib import Path

from bbt_client.errors import CheckpointError, ConfigError
from bbt_client.results import RESULT_FILE, load_result, read_history


def _phase_spans(phases: list[str], calls: list[int]) -> list[tuple[str, int, int]]:
    """Contiguous runs of the same phase as (phase, first call, last call): BBTv2's layer-by-layer schedule."""
    spans: list[tuple[str, int, int]] = []
    for phase, c in zip(phases, calls):
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], c)
        else:
            spans.append((phase, spans[-1][2] if spans else 0, c))
    return spans


def plot_run(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write best/mean train loss and dev accuracy against API calls; returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('plotting needs matplotlib: pip install "bbt-client[plot]"') from None
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    if not history:
        raise CheckpointError(f"{run_dir} has no history.jsonl with finished generations to plot")
    title = run_dir.name
    if (run_dir / RESULT_FILE).exists():
        r = load_result(run_dir)
        title = f"{r.method} on {r.task} (seed {r.seed}, {r.shots}-shot) — test acc " + (
            f"{r.test_accuracy:.3f}" if r.test_accuracy is not None else "-")

    calls = [h.calls for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax_loss.plot(calls, [h.best_loss for h in history], label="best loss in generation")
    ax_loss.plot(calls, [h.mean_loss for h in history], label="mean loss in generation", alpha=0.6)
    ax_loss.set_ylabel("train loss")
    ax_loss.legend(loc="upper right")
    dev = [(h.calls, h.dev_accuracy) for h in history if h.dev_accuracy is not None]
    if dev:
        ax_acc.plot([c for c, _ in dev], [a for _, a in dev], marker="o", label="dev accuracy")
    ax_acc.plot(calls, [h.best_train_accuracy for h in history], alpha=0.6, label="best train accuracy")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_xlabel("API calls")
    ax_acc.legend(loc="lower right")
    spans = _phase_spans([h.phase for h in history], calls)
    if len(spans) > 1:  # shade alternate phases (BBTv2 layers, GDFO stages) so the schedule is visible
        for i, (phase, lo, hi) in enumerate(spans):
            if i % 2:
                for ax in (ax_loss, ax_acc):
                    ax.axvspan(lo, hi, color="grey", alpha=0.12, lw=0)
            if len(spans) <= 24:
                ax_loss.annotate(phase, ((lo + hi) / 2, 1.0), xycoords=("data", "axes fraction"),
                                 ha="center", va="bottom", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
