"""Presets: what ``reference`` sets per method and task, that it validates against every method's config,
that explicit settings win over it, and that ``bbt tune --preset`` applies it."""

from __future__ import annotations

import argparse

import pytest

from bbt_client.cli import commands as cli
from bbt_client.config import TaskConfig
from bbt_client.errors import ConfigError
from bbt_client.methods.registry import make_config
from bbt_client.methods.presets import apply_to_config, preset_names, resolve_preset, split_overrides
from bbt_client.tasks.datasets import get_task, load_task_data


def test_default_preset_changes_nothing():
    s = resolve_preset("default", "bbtv2", "agnews")
    assert s.method_options == {} and s.task == {} and s.job == {}
    data = {"method": "bbt", "task": {"name": "sst2"}, "method_options": {"popsize": 8}}
    assert apply_to_config(data, s) == data


@pytest.mark.parametrize("method", ["bbt", "bbtv2", "gdfo"])
@pytest.mark.parametrize("task", ["sst2", "agnews"])
def test_reference_preset_is_a_valid_config_for_every_method_and_task(method, task):
    s = resolve_preset("reference", method, task)
    cfg = make_config(method, {**s.method_options, "prompt_tokens": 5})
    assert cfg.sigma0 == (0.2 if (method, task) == ("bbtv2", "agnews") else 1.0)  # the README's AG News command
    assert cfg.popsize == 20 and cfg.intrinsic_dim == 500 and cfg.alpha == cfg.sigma0
    assert cfg.prompt_mode == "add" and cfg.slot_token_ids is None
    if method in ("bbt", "bbtv2"):
        assert cfg.bound == 0.0
    if method == "bbtv2":
        assert cfg.hidden_std_source == "train" and cfg.sigma0_deep is None
    if method == "gdfo":
        assert s.skipped == () and cfg.bounds is None
    assert s.job == {"loss": "ce"}
    # the reference loaders' templates: " ." right after the prompt, then the built-in template's words
    template = s.task["template"]
    assert template.startswith(". ") and template[2:].replace(" .", "") == get_task(task).template.replace(" .", "")
    data = load_task_data(TaskConfig(name=task, shots=2, test_limit=5, template=template), 1)
    assert data.task.template == template and data.task.label_words == get_task(task).label_words


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="known presets: default, reference"):
        resolve_preset("fast", "bbt", "sst2")
    assert preset_names() == ["default", "reference"]


def test_explicit_settings_win_over_the_preset_and_custom_tasks_keep_their_template():
    s = resolve_preset("reference", "bbt", "sst2")
    data = {"method": "bbt", "loss": "hinge", "method_options": {"sigma0": 0.5},
            "task": {"name": "sst2", "template": "{text} ! {mask}"}}
    out = apply_to_config(data, s)
    assert out["method_options"]["sigma0"] == 0.5 and out["method_options"]["prompt_mode"] == "add"
    assert out["task"]["template"] == "{text} ! {mask}" and out["loss"] == "hinge"
    custom = apply_to_config({"method": "bbt", "task": {"name": "custom", "file": "x.tsv"}}, s)
    assert "template" not in custom["task"]


def test_split_overrides_routes_by_key_and_prefix():
    method, task, job = split_overrides({"sigma0": 0.2, "template": "{text} {mask}", "search_label_words": 4,
                                         "loss": "hinge", "task.shots": 8, "method.loss": "x"})
    assert method == {"sigma0": 0.2, "loss": "x"}
    assert task == {"template": "{text} {mask}", "search_label_words": 4, "shots": 8}
    assert job == {"loss": "hinge"}


def _tune_args(*argv) -> argparse.Namespace:
    return cli._build_parser().parse_args(["tune", "--endpoint", "http://127.0.0.1:1", *argv])


def test_bbt_tune_preset_fills_what_the_flags_leave():
    cfg = cli._config_from_args(_tune_args("--task", "agnews", "--method", "bbtv2", "--preset", "reference",
                                           "--opt", "prompt_tokens=5", "--opt", "alpha=0.5"))
    opts = cfg.method_options
    assert opts["prompt_mode"] == "add" and opts["hidden_std_source"] == "train" and opts["sigma0"] == 0.2
    assert opts["alpha"] == 0.5 and opts["prompt_tokens"] == 5
    assert cfg.task.template == ". {mask} News: {text}" and cfg.loss == "ce"


def test_bbt_tune_preset_is_refused_on_resume(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"endpoint": {"url": "http://127.0.0.1:1"}}')
    assert cli.main(["tune", "--resume", str(tmp_path), "--preset", "reference"]) == 2
    assert "--preset" in capsys.readouterr().err
