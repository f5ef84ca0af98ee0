"""benchmarks/report.py: docs/results.md is generated from the committed benchmark JSON, tolerant of missing keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, load_script


@pytest.fixture(scope="module")
def report():
    return load_script(REPO / "benchmarks" / "report.py")


def _write(folder: Path, name: str, obj) -> None:
    (folder / f"{name}.json").write_text(json.dumps(obj), encoding="utf-8")


TASKS = {
    "seeds": [13, 42, 100],
    "tasks": {
        "agnews": {"zero_shot_raw": 0.241, "zero_shot_calibrated": 0.322, "whitebox": 0.745, "probe": 0.735,
                   "methods": {"bbtv2": {"400": {"mean": 0.494, "std": 0.033}, "2000": {"mean": 0.696, "std": 0.013}},
                               "bbt": {"400": {"mean": 0.399, "std": 0.004}}}},
        # a task with only some of the keys: what is missing is left out, not an error
        "sst2": {"zero_shot_raw": 0.508, "methods": {"bbt": {"400": {"mean": 0.531}}}},
    },
    "gap_closed": {"400": 0.41, "2000": 0.83},
    "tasks_below_zero_shot": ["sst2"],
}
REAL_VLLM = {
    "vllm_version": "0.11.0", "score_max_abs_diff": 0.0021, "stub_vs_vllm_seq_per_s": 0.37,
    "rows": [{"backend": "vllm", "method": "bbt", "calls": 398, "tokens": 1276951,
              "endpoint_usage": {"prompt_tokens": 1276000}, "label_score_coverage": 1.0, "wall_seconds": 401.2},
             {"backend": "openai", "method": "bdpl", "calls": 392}],
}
TEXT_API = {
    "task": "agnews", "seed": 42, "budget_calls": 400, "zero_shot_test_accuracy": 0.245,
    "zero_shot_calibrated_test_accuracy": 0.304,
    "zero_shot_searched_words": {'{"search_label_words": 5}': {"test_accuracy": 0.26, "calibrated_test_accuracy": 0.388}},
    "methods": {"bdpl_lw5": {"backend": "openai", "method": "bdpl", "test_accuracy": 0.496, "api_calls_used": 392,
                             "tokens_used": 1350000, "prompt_text": "of the year | per share", "calibrated": True,
                             "task_overrides": {"search_label_words": 5}, "verbalizer": [["a", "b"]]}},
    "targets": {"best_text_method": "bdpl_lw5"},
}
THROUGHPUT = {"gemm_gflops": 168.0, "baseline_seq_per_s": 79.9, "server_seq_per_s": 88.4, "label_agreement": 1.0,
              "max_abs_logit_diff": 1.3e-6, "int8_seq_per_s": 109.3, "int8_speedup": 1.2364,
              "flops_utilization": 0.91, "device": "cpu"}


def test_tables_are_generated_from_the_json(report, tmp_path):
    for name, obj in (("tasks", TASKS), ("real_vllm", REAL_VLLM), ("text_api", TEXT_API),
                      ("server_throughput", THROUGHPUT), ("extra_bench", {"score": 0.5, "nested": {"a": {"b": 1}}})):
        _write(tmp_path, name, obj)
    page = report.render(report.load_results(tmp_path))

    assert page.splitlines()[2] == report.HEADER
    # tasks.json: baselines, every method x budget as mean ± std, budgets in numeric order, gap and tasks below
    assert "| agnews | 0.241 | 0.322 | 0.745 | 0.735 |" in page
    assert "| task | method | 400 calls | 2000 calls |" in page
    assert "| agnews | bbtv2 | 0.494 ± 0.033 | 0.696 ± 0.013 |" in page
    assert "| sst2 | bbt | 0.531 |  |" in page                          # no std, no 2000: left blank
    assert "| 0.41 | 0.83 |" in page and "ended below zero-shot: sst2" in page
    # real_vllm.json
    assert "`vllm_version` | 0.11.0" in page and "`score_max_abs_diff` | 0.002" in page
    assert "| vllm / bbt | vllm | bbt | 398 | 1,276,951 | prompt_tokens=1,276,000 | 1 | 401.2 |" in page
    assert "| openai / bdpl | openai | bdpl | 392 |" in page
    # text_api.json: zero-shot both verbalizers, the tuned row (a "|" in a prompt is escaped), the comparisons
    assert "| the task's words | 0.245 | 0.304 |" in page
    assert "0.388" in page and "of the year \\| per share" in page and "1,350,000" in page
    assert "`best_text_method` | bdpl_lw5" in page
    # server_throughput.json
    assert "| server `--quantize int8` | 109.3 | 1.236 |" in page
    assert "| plain Hugging Face fp32 loop | 79.9 |" in page and "`gemm_gflops` | 168" in page
    # an unknown file: its scalar values, nested ones skipped
    assert "## `extra_bench.json`" in page and "`score` | 0.5" in page and "nested" not in page
    # order: the known sources first, in a fixed order
    assert page.index("## Tasks") < page.index("## A real vLLM") < page.index("## Text-only") < page.index("## Server")


def test_surrogate_study_table(report, tmp_path):
    stats = {"generations": 40, "mean_tau": 0.05, "mean_tau_larger_archives": 0.07, "max_tau": 0.4,
             "share_trusted": 0.0, "archive_median": 60, "archive_max": 140}
    _write(tmp_path, "surrogate_rank", {"trust_tau": 0.85, "calls": 1000, "tasks": {"cr": {"lq": stats}},
                                        "all": {"lq": stats, "gp": {"generations": 0}}, "ellipsoid": {}})
    page = report.render(report.load_results(tmp_path))
    assert "(1,000 calls). lq-CMA-ES stands a model in for real calls only once τ reaches 0.85" in page
    assert "| cr | lq | 40 | 0.05 | 0.07 | 0.4 | 0 | 140 |" in page and "| all | lq | 40 |" in page
    assert "| all | gp | 0 |  |" in page and "| ellipsoid |" not in page


def test_missing_keys_are_skipped(report, tmp_path):
    _write(tmp_path, "tasks", {"tasks": {"agnews": {"methods": {}}}})
    _write(tmp_path, "server_throughput", {"server_seq_per_s": 50.0})
    _write(tmp_path, "real_vllm", {})
    page = report.render(report.load_results(tmp_path))
    assert "white-box ceiling" not in page and "calls |" not in page and "Gap closed" not in page
    assert "| server (fp32) | 50 |" in page and "int8" not in page


def test_check_flag(report, tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "results.md"
    results.mkdir()
    _write(results, "server_throughput", THROUGHPUT)
    args = ["--results", str(results), "--out", str(out), "--readme", str(tmp_path / "no-readme.md")]
    assert report.main(args + ["--check"]) == 1                      # no page yet
    assert report.main(args) == 0 and "88.4" in out.read_text()
    assert report.main(args + ["--check"]) == 0
    _write(results, "server_throughput", {**THROUGHPUT, "server_seq_per_s": 90.0})
    assert report.main(args + ["--check"]) == 1                      # the JSON changed: the page is stale
    assert "out of date" in capsys.readouterr().err


def test_readme_block_is_filled_from_the_same_files(report, tmp_path):
    """README.md shows a compact table between two markers; tasks.json may name each method as a key of its own."""
    results = tmp_path / "results"
    results.mkdir()
    _write(results, "tasks", {"method": "bbtv2", "tasks": {
        "cr": {"zero_shot_raw": 0.509, "zero_shot_calibrated": 0.497, "bbtv2": {"400": {"mean": 0.499, "std": 0.017}}}},
        "gap_closed": {"400": None}, "tasks_below_zero_shot": ["cr"]})
    _write(results, "real_vllm", REAL_VLLM)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_BEGIN}\nstale\n{report.README_END}\n\nafter\n", encoding="utf-8")
    args = ["--results", str(results), "--out", str(tmp_path / "results.md"), "--readme", str(readme)]
    assert report.main(args) == 0
    text = readme.read_text(encoding="utf-8")
    assert "stale" not in text and text.endswith(f"{report.README_END}\n\nafter\n")
    assert "| cr | 0.509 / 0.497 | 0.499 ± 0.017 |\n" in text and "Below the better zero-shot at 400 calls: cr" in text
    assert "0.37x vLLM's sequences per second" in text
    assert "| cr | bbtv2 | 0.499 ± 0.017 |" in (tmp_path / "results.md").read_text()
    assert report.main(args + ["--check"]) == 0
    # a text method's run of the same benchmark: its own section, one README line
    _write(results, "tasks_text", {"method": "bdpl", "tasks": {
        "cr": {"zero_shot_raw": 0.509, "zero_shot_calibrated": 0.497, "bdpl": {"400": {"mean": 0.55, "std": 0.01}}},
        "mr": {"zero_shot_raw": 0.512, "zero_shot_calibrated": 0.517, "bdpl": {"400": {"mean": 0.5, "std": 0.02}}}},
        "gap_closed": {"400": None}, "tasks_below_zero_shot": ["mr"], "templates": {"cr": "{text} It was {mask}"}})
    assert report.main(args) == 0
    page = (tmp_path / "results.md").read_text()
    assert page.index("## Tasks: every") < page.index("## Tasks through a text-only API") < page.index("## A real")
    assert "| mr | bdpl | 0.5 ± 0.02 |" in page and "ended below zero-shot: mr" in page
    assert "cr use templates that end with the answer slot (`{text} It was {mask}`)" in page
    assert "Through a text-only API (bdpl with its defaults, 400 calls; cr, mr): below the better zero-shot on mr" \
        in readme.read_text(encoding="utf-8")


def test_committed_page_is_current(report):
    """docs/results.md is what benchmarks/report.py writes from the committed benchmarks/results/*.json."""
    assert report.main(["--check"]) == 0, "run python benchmarks/report.py and commit docs/results.md"
