"""``bbt sweep`` against an in-memory toy endpoint: the grid, skipping finished work, nested budgets, the summary,
and the concurrency limits (synchronised on events, never on time).

The toy endpoint (tests/unit/toy_backend.py) learns something and makes every figure deterministic.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bbt_client.cli import commands as cli
from bbt_client.run.budget import BudgetLimits
from bbt_client.config import TaskConfig
from bbt_client.errors import ConfigError, EndpointError
from bbt_client.run.job import tune
from bbt_client.run.results import load_result, read_history
from bbt_client.cli.sweep import (
    SUMMARY_JSON,
    SUMMARY_MD,
    Sweep,
    SweepSpec,
    Variant,
    build_jobs,
    parse_variant,
    result_file,
)
from bbt_client.tasks.datasets import load_task_data
from tests.unit.toy_backend import ToyBackend

OPTS = {"prompt_tokens": 2, "intrinsic_dim": 10, "popsize": 6}


@pytest.fixture(scope="module")
def labels_by_text():
    out = {}
    for seed in (7, 8):
        data = load_task_data(TaskConfig(name="sst2", shots=4, test_limit=40), seed)
        for split in (data.train, data.dev, data.test):
            out.update(zip(split.texts, split.labels.tolist()))
    return out


def _spec(tmp_path, **kw) -> SweepSpec:
    base = dict(out=tmp_path / "sweep", tasks=["sst2"], methods=["bbt", "bbtv2"], seeds=[7, 8], budgets=[40, 80],
                endpoints=["http://toy.invalid"], shots=4, test_limit=40, method_options=OPTS, eval_every=2)
    return SweepSpec(**{**base, **kw})


class CountingRunner:
    """Runs each stage against the toy and records (job dir, budget, resume) per call."""

    def __init__(self, labels):
        self.labels, self.calls = labels, []

    async def __call__(self, cfg, resume):
        self.calls.append((cfg.out, cfg.budget.calls, resume))
        return await tune(cfg, resume=resume, backend=ToyBackend(self.labels))


def test_grid_is_every_task_method_variant_seed_with_one_zero_shot_per_task_and_seed(tmp_path):
    variants = [Variant(name="default"), Variant(name="big", overrides={"popsize": 8})]
    jobs = build_jobs(_spec(tmp_path, variants=variants))
    assert len(jobs) == 2 * 2 * 2  # methods x variants x seeds
    assert len({j.run_dir for j in jobs}) == len(jobs)
    assert {(j.method, j.variant, j.seed) for j in jobs} == {
        (m, v, s) for m in ("bbt", "bbtv2") for v in ("default", "big") for s in (7, 8)}
    assert [j.seed for j in jobs] == sorted(j.seed for j in jobs)  # whole seeds first
    assert all(j.config.method_options["popsize"] == (8 if j.variant == "big" else 6) for j in jobs)
    measuring = [(j.seed, j.method, j.variant) for j in jobs if j.config.evaluate_zero_shot]
    assert measuring == [(7, "bbt", "default"), (8, "bbt", "default")]  # same task settings: once per seed


def test_a_variant_changing_the_template_measures_its_own_zero_shot(tmp_path):
    variants = [Variant(name="default"), Variant(name="dot", overrides={"template": ". {text} . It was {mask} ."})]
    jobs = build_jobs(_spec(tmp_path, variants=variants, seeds=[7]))
    assert [(j.method, j.variant) for j in jobs if j.config.evaluate_zero_shot] == [("bbt", "default"), ("bbt", "dot")]


def test_bad_variant_option_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="no_such_option"):
        build_jobs(_spec(tmp_path, variants=[Variant(name="x", overrides={"no_such_option": 1})]))
    assert not (tmp_path / "sweep").exists()


def test_parse_variant():
    v = parse_variant("slow:sigma0=0.2,alpha=0.2,template={text} , so {mask} .,preset=reference")
    assert v == Variant(name="slow", preset="reference",
                        overrides={"sigma0": 0.2, "alpha": 0.2, "template": "{text} , so {mask} ."})
    assert parse_variant("reference") == Variant(name="reference", preset="reference")
    for bad in ("nonsense", "x:novalue"):
        with pytest.raises(ConfigError):
            parse_variant(bad)
    with pytest.raises(ConfigError) as bad_name:
        parse_variant("bad name:popsize=3")
    assert str(bad_name.value) == ("--variant 'bad name:popsize=3': variant name 'bad name' must be letters, digits "
                                   "and _.+- (it names directories)")  # the reason alone, not pydantic's dump


def test_unknown_task_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="nosuch"):
        build_jobs(_spec(tmp_path, tasks=["nosuch"]))
    with pytest.raises(ConfigError, match="template"):
        build_jobs(_spec(tmp_path, variants=[Variant(name="nomask", overrides={"template": "{text} ."})]))
    assert not (tmp_path / "sweep").exists()


async def test_nested_budgets_continue_one_run_and_rerun_skips_finished_stages(tmp_path, labels_by_text):
    runner = CountingRunner(labels_by_text)
    spec = _spec(tmp_path, methods=["bbt"], seeds=[7], budgets=[80, 40, 40])  # sorted and deduplicated
    await Sweep(spec, runner=runner).run()
    run_dir = tmp_path / "sweep" / "runs" / "sst2" / "bbt-default-seed7"
    assert [(b, r) for _, b, r in runner.calls] == [(40, False), (80, True)]
    at40, at80 = (load_result_file(run_dir, b) for b in (40, 80))
    assert at40["budget_calls"] == 40 and at80["budget_calls"] == 80 and at80["api_calls_used"] <= 80

    # The first stage is a plain run with the small budget; the continued run follows the same trajectory
    # as one run with the large budget (generation by generation).
    straight40 = await tune(_plain(tmp_path / "a", spec, 40), backend=ToyBackend(labels_by_text))
    straight80 = await tune(_plain(tmp_path / "b", spec, 80), backend=ToyBackend(labels_by_text))
    assert at40["test_accuracy"] == straight40.test_accuracy and at40["generations"] == straight40.generations
    nested = [(h.best_loss, h.mean_loss) for h in read_history(run_dir)]
    longer = [(h.best_loss, h.mean_loss) for h in read_history(tmp_path / "b")]
    assert at80["generations"] > at40["generations"] and nested == longer[: len(nested)]
    assert straight80.generations - at80["generations"] in (0, 1)  # the stop at 40 spent <= 2 calls

    runner.calls.clear()
    await Sweep(spec, runner=runner).run()
    assert runner.calls == []  # everything finished: nothing runs again


def _plain(out, spec, budget):
    jobs = build_jobs(spec)
    return jobs[0].config.model_copy(update={"out": out, "budget": BudgetLimits(calls=budget)})


def load_result_file(run_dir, budget):
    return json.loads((run_dir / result_file(budget)).read_text())


async def test_an_interrupted_job_is_resumed_and_a_lost_copy_is_recovered(tmp_path, labels_by_text):
    runner = CountingRunner(labels_by_text)
    spec = _spec(tmp_path, methods=["bbt"], seeds=[7], budgets=[40, 80])
    run_dir = tmp_path / "sweep" / "runs" / "sst2" / "bbt-default-seed7"

    class Interrupting(ToyBackend):
        async def score(self, job):
            if self.calls >= 30:
                raise EndpointError("the server went away mid-run")
            return await super().score(job)

    async def dying(cfg, resume):
        return await tune(cfg, resume=resume, backend=Interrupting(labels_by_text))

    summary = await Sweep(spec, runner=dying).run()
    assert [(f["budget"], f["status"]) for f in summary["failed"]] == [(40, "failed")]  # later stages not tried
    assert not (run_dir / result_file(40)).exists() and len(summary["missing"]) == 2
    await Sweep(spec, runner=runner).run()
    assert [(b, r) for _, b, r in runner.calls] == [(40, True), (80, True)]
    assert load_result(run_dir).budget_calls == 80

    # A crash between a stage's result.json and its copy: the re-run copies instead of running again.
    (run_dir / result_file(80)).unlink()
    runner.calls.clear()
    await Sweep(spec, runner=runner).run()
    assert runner.calls == [] and load_result_file(run_dir, 80)["budget_calls"] == 80


async def test_a_smaller_budget_added_later_is_reported_not_run(tmp_path, labels_by_text):
    runner = CountingRunner(labels_by_text)
    await Sweep(_spec(tmp_path, methods=["bbt"], seeds=[7], budgets=[80]), runner=runner).run()
    summary = await Sweep(_spec(tmp_path, methods=["bbt"], seeds=[7], budgets=[40, 80]), runner=runner).run()
    assert len(runner.calls) == 1
    assert [(f["budget"], f["status"]) for f in summary["failed"]] == [(40, "unreachable")]


async def test_summary_is_computed_from_the_per_job_results(tmp_path, labels_by_text):
    spec = _spec(tmp_path)
    summary = await Sweep(spec, runner=CountingRunner(labels_by_text)).run()
    assert json.loads((tmp_path / "sweep" / SUMMARY_JSON).read_text()) == summary
    for g in summary["groups"]:
        for b in spec.budgets:
            files = [tmp_path / "sweep" / "runs" / "sst2" / f"{g['method']}-default-seed{s}" / result_file(b)
                     for s in spec.seeds]
            accs = [json.loads(f.read_text())["test_accuracy"] for f in files]
            calls = [json.loads(f.read_text())["api_calls_used"] for f in files]
            s = g["budgets"][str(b)]
            assert s["runs"] == 2 and s["seeds"] == [7, 8]
            assert s["mean"] == pytest.approx(sum(accs) / 2)
            assert s["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)  # population std of two values
            assert s["api_calls_used"] == pytest.approx(sum(calls) / 2)
    zs = {s: json.loads((tmp_path / "sweep" / "runs" / "sst2" / f"bbt-default-seed{s}" / result_file(40))
                        .read_text())["zero_shot_test_accuracy"] for s in spec.seeds}
    assert summary["zero_shot"] == [{"task": "sst2", "variant": "default", "seeds": [7, 8],
                                     "mean": pytest.approx(sum(zs.values()) / 2),
                                     "std": pytest.approx(abs(zs[7] - zs[8]) / 2), "runs": 2}]
    bbtv2 = json.loads((tmp_path / "sweep" / "runs" / "sst2" / "bbtv2-default-seed7" / result_file(40)).read_text())
    assert bbtv2["zero_shot_test_accuracy"] is None  # measured once, by the bbt job
    md = (tmp_path / "sweep" / SUMMARY_MD).read_text()
    g = summary["groups"][0]
    assert f"{g['budgets']['40']['mean']:.3f} ± {g['budgets']['40']['std']:.3f} (2;" in md
    assert summary["missing"] == [] and summary["failed"] == []


@pytest.mark.parametrize("jobs, per_endpoint, expected", [(3, 2, 3), (6, 1, 2)])
async def test_concurrency_stays_within_jobs_and_per_endpoint_limits(tmp_path, jobs, per_endpoint, expected):
    """6 jobs on 2 endpoints: at most min(--jobs, slots) at once and at most per_endpoint per URL; the first
    jobs block until ``expected`` are running together, which proves the limit is also reached."""
    urls = ["http://a.invalid", "http://b.invalid"]
    spec = _spec(tmp_path, methods=["bbt", "bbtv2", "gdfo"], seeds=[7, 8], budgets=[40], jobs=jobs,
                 per_endpoint=per_endpoint, endpoints=urls)
    active = dict.fromkeys(urls, 0)
    peak = dict.fromkeys(["total", *urls], 0)
    saturated = asyncio.Event()

    async def runner(cfg, resume):
        url = cfg.endpoint.url
        active[url] += 1
        peak[url] = max(peak[url], active[url])
        peak["total"] = max(peak["total"], sum(active.values()))
        if sum(active.values()) == expected:
            saturated.set()
        await saturated.wait()
        active[url] -= 1
        raise RuntimeError("toy stage")  # recorded as failed; the sweep goes on

    summary = await asyncio.wait_for(Sweep(spec, runner=runner).run(), timeout=60)
    assert peak["total"] == expected
    assert max(peak[u] for u in urls) <= per_endpoint and min(peak[u] for u in urls) >= 1  # both endpoints used
    assert len(summary["failed"]) == 6 and all(f["error"] == "RuntimeError: toy stage" for f in summary["failed"])


def test_cli_sweep_parses_the_grid(tmp_path, monkeypatch):
    seen = {}

    async def fake_run(self):
        seen["spec"] = self.spec
        seen["jobs"] = self.jobs
        return {"budgets": self.spec.budgets, "groups": [], "zero_shot": [], "missing": [], "failed": []}

    monkeypatch.setattr(Sweep, "run", fake_run)
    argv = ["sweep", "--out", str(tmp_path / "s"), "--endpoint", "http://127.0.0.1:1", "--endpoint",
            "http://127.0.0.1:2", "--tasks", "sst2,agnews", "--methods", "bbt,bbtv2", "--seeds", "13,42",
            "--budgets", "200,100", "--variant", "default", "--variant", "small:sigma0=0.2,alpha=0.2",
            "--opt", "prompt_tokens=5", "--jobs", "2", "--per-endpoint", "1", "--test-limit", "100"]
    assert cli.main(argv) == 0
    spec = seen["spec"]
    assert spec.budgets == [100, 200] and spec.seeds == [13, 42] and spec.tasks == ["sst2", "agnews"]
    assert [v.name for v in spec.variants] == ["default", "small"] and spec.per_endpoint == 1
    assert len(seen["jobs"]) == 2 * 2 * 2 * 2
    small = [j for j in seen["jobs"] if j.variant == "small"][0]
    assert small.config.method_options == {"prompt_tokens": 5, "sigma0": 0.2, "alpha": 0.2}
    assert not any(j.config.allow_floored_scores for j in seen["jobs"])
    assert cli.main([*argv, "--allow-floored-scores"]) == 0
    assert all(j.config.allow_floored_scores for j in seen["jobs"])  # as bbt tune's flag, for every job
    assert all(j.config.endpoint.options == {} for j in seen["jobs"])
    assert cli.main([*argv, "--backend", "openai", "--backend-opt", "model=served-name"]) == 0
    assert all(j.config.endpoint.backend == "openai" and j.config.endpoint.options == {"model": "served-name"}
               for j in seen["jobs"])  # an OpenAI endpoint is asked for the model it serves, in every job


def test_cli_sweep_bad_variant_exits_2(tmp_path, capsys):
    argv = ["sweep", "--out", str(tmp_path / "s"), "--endpoint", "http://127.0.0.1:1", "--methods", "bbt",
            "--variant", "x:popsize=-3"]
    assert cli.main(argv) == 2
    assert "popsize" in capsys.readouterr().err


def test_benchmark_json_line_has_the_issue_shape(tmp_path):
    from tests.conftest import REPO, load_script

    bench = load_script(REPO / "benchmarks" / "sweep.py")
    stats = {"mean": 0.5, "std": 0.1, "runs": 3, "api_calls_used": 98.0, "seeds": [13, 42, 100]}
    summary = {"budgets": [100], "missing": [], "failed": [],
               "groups": [{"task": "agnews", "method": "bbt", "variant": "default", "budgets": {"100": stats}},
                          {"task": "agnews", "method": "bbt", "variant": "reference", "budgets": {"100": stats}}],
               "zero_shot": [{"task": "agnews", "variant": "default", "mean": 0.24, "std": 0.0, "runs": 3}]}
    out = bench.report(summary, ["agnews"], [13, 42, 100])
    assert out["task"] == "agnews" and out["seeds"] == [13, 42, 100] and out["whitebox_ceiling"] == 0.745
    assert set(out["methods"]) == {"bbt", "bbt+reference"}
    assert {k: out["methods"]["bbt"]["100"][k] for k in ("mean", "std", "runs")} == {"mean": 0.5, "std": 0.1, "runs": 3}
    json.dumps(out)
