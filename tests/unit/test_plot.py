"""bbt_client.cli.plot: a PNG of the tuning curve from a run directory (synthetic history, no model)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from bbt_client.run.checkpoint import atomic_write_json  # noqa: E402
from bbt_client.errors import CheckpointError  # noqa: E402
from bbt_client.cli.plot import _phase_spans, plot_run  # noqa: E402
from bbt_client.run.results import RESULT_FILE, GenerationRecord, RunResult, write_history  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir, phases: list[str], with_result: bool = True) -> None:
    history = [
        GenerationRecord(generation=g + 1, calls=20 * (g + 1), tokens=0, phase=ph, best_loss=1.0 / (g + 1),
                         mean_loss=1.5 / (g + 1), best_train_accuracy=min(1.0, 0.5 + 0.05 * g),
                         wall_seconds=float(g), dev_accuracy=(0.5 + 0.02 * g) if g % 2 else None)
        for g, ph in enumerate(phases)
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_history(run_dir, history)
    if with_result:
        result = RunResult(method="bbtv2", task="agnews", seed=42, shots=16, model="toy", prompt_kind="deep",
                           budget_calls=400, api_calls_used=20 * len(phases), tokens_used=0,
                           generations=len(phases), stop_reason="calls", best_dev_accuracy=0.6, best_generation=4,
                           test_accuracy=0.55, zero_shot_test_accuracy=0.25, test_examples=100, wall_seconds=9.0,
                           prompt_shape=[3, 5, 8], config={})
        atomic_write_json(run_dir / RESULT_FILE, result.model_dump(mode="json"))


def test_phase_spans_follow_the_bbtv2_schedule():
    phases = ["layer 1/3", "layer 2/3", "layer 2/3", "layer 3/3", "layer 1/3"]
    calls = [20, 40, 60, 80, 100]
    assert _phase_spans(phases, calls) == [
        ("layer 1/3", 0, 20), ("layer 2/3", 20, 60), ("layer 3/3", 60, 80), ("layer 1/3", 80, 100)]
    assert _phase_spans(["", ""], [20, 40]) == [("", 0, 40)]  # BBT: a single span, nothing shaded


@pytest.mark.parametrize("phases", [[""] * 8, [f"layer {i % 3 + 1}/3, round {i // 3 + 1}" for i in range(9)]])
def test_writes_a_png_for_bbt_and_bbtv2(tmp_path, phases):
    run = tmp_path / "run"
    make_run(run, phases)
    path = plot_run(run)
    assert path == run / "curve.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_custom_output_path_and_run_without_result(tmp_path):
    run = tmp_path / "unfinished"
    make_run(run, ["layer 1/2", "layer 2/2", "layer 1/2"], with_result=False)  # e.g. a run still going
    out = tmp_path / "elsewhere.png"
    assert plot_run(run, out) == out and out.read_bytes()[:8] == PNG_MAGIC


def test_empty_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no history.jsonl"):
        plot_run(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        plot_run(tmp_path / "typo")


def test_bbtv2_phases_are_drawn(tmp_path):
    """Same curve, with and without a layer schedule: the schedule's shading must change the image."""
    plain, phased = tmp_path / "plain", tmp_path / "phased"
    make_run(plain, [""] * 6)
    make_run(phased, ["layer 1/2", "layer 2/2"] * 3)
    assert plot_run(plain).read_bytes() != plot_run(phased).read_bytes()


def _overlaps(fig, texts) -> list[tuple[str, str]]:
    fig.canvas.draw()  # lay out legends as they are saved
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


@pytest.mark.parametrize("layers, rounds", [(6, 4), (6, 40), (3, 2)])
def test_phase_labels_never_overlap_each_other_or_the_title(tmp_path, layers, rounds):
    """BBTv2's schedule (L layers x R rounds, one generation each) used to be written as one label per span
    above the curve, which overlapped into unreadable text. Now: coloured spans with a legend, and round marks
    thinned until no two boxes overlap."""
    import matplotlib.pyplot as plt

    from bbt_client.cli.plot import build_run_figure

    run = tmp_path / "run"
    make_run(run, [f"layer {i % layers + 1}/{layers}, round {i // layers + 1}" for i in range(layers * rounds)])
    fig, labels = build_run_figure(run)
    try:
        assert labels and all(t.get_text().startswith("round ") for t in labels)
        assert _overlaps(fig, labels + [fig._suptitle]) == []
        legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend_texts == [f"layer {i}/{layers}" for i in range(1, layers + 1)]  # one entry per layer
        assert _overlaps(fig, fig.legends[0].get_texts()) == []
        # no schedule text sits inside the plotting area of the curves
        renderer = fig.canvas.get_renderer()
        top = fig.axes[0].get_window_extent(renderer)
        assert all(t.get_window_extent(renderer).y0 >= top.y1 - 1 for t in labels)
    finally:
        plt.close(fig)


def test_gdfo_stages_get_a_legend_and_bbt_generations_none(tmp_path):
    import matplotlib.pyplot as plt

    from bbt_client.cli.plot import build_run_figure

    make_run(tmp_path / "gdfo", ["dfo"] * 3 + ["gd+dfo"] * 5)
    make_run(tmp_path / "bbt", [f"generation {g + 2}" for g in range(8)])
    fig_g, labels_g = build_run_figure(tmp_path / "gdfo")
    fig_b, labels_b = build_run_figure(tmp_path / "bbt")
    try:
        assert [t.get_text() for t in fig_g.legends[0].get_texts()] == ["dfo", "gd+dfo"] and labels_g == []
        assert fig_b.legends == [] and labels_b == []  # BBT's generation counter is not a schedule
    finally:
        plt.close(fig_g)
        plt.close(fig_b)
