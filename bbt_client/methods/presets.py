"""Named bundles of settings (``bbt tune --preset NAME``, sweep variants): one word instead of ten ``--opt``s.

A preset says, per method, which method-config fields to set and, per built-in task, which task fields
(template) to set. Explicit flags and ``--opt`` always win over a preset; a preset wins over the library's
defaults. Pure data plus one resolver: no I/O.

``default``
    Today's library defaults: nothing is overridden.

``reference``
    The choices of the papers' reference code (txsun1997/Black-Box-Tuning at its last commit, ``bbt.py`` and
    ``deepbbt.py``, with ``dataloaders/dataloader.py`` and ``metrics/metrics.py``), where our model allows:

    - prompts *added* to the states of real vocabulary tokens at the slots (``cat_or_add="add"``;
      ``prompt_mode="add"``), the slots holding the server's default slot tokens (the reference decodes ids
      1000..1000+n of RoBERTa's vocabulary; our server's defaults are the first whole-word WordPiece ids
      from 1000 on), layer 0 after the embedding LayerNorm (the server's ``add`` mode does that);
    - BBTv2's deeper-layer σ̂ measured on the job's own training texts in its template, clipped at μ ± 3σ
      five times (``hidden_std_source="train"``), one σ0 for every layer (``sigma0_deep`` unset);
    - no content-free calibration (the code scores raw label logits);
    - CMA-ES and projection as the code's argument defaults: ``--sigma 1 --alpha 1 --popsize 20 --bound 0``
      (unbounded), ``--random_proj normal`` (the designed N(0, (α·σ̂/(√d·σ0))²)), d = 500, ``--loss_type ce``;
      BBTv2 on AG News uses the README's AG News command instead: ``--sigma 0.2 --alpha 0.2``;
    - templates with the " ." that follows the prompt in the reference loaders:
      ``'%s . %s . It was %s .'`` (SST-2) and ``'%s . %s News: %s'`` (AG News); our prompt slots come right
      after [CLS], so the template starts with the " .". Custom task files keep their own template.

    What the preset leaves alone: ``prompt_tokens`` (the code's n = 50 lengthens every sequence tenfold
    on a CPU; set it yourself) and the budget. What cannot apply to a WordPiece model such as the bundled
    MiniLM: RoBERTa's BPE label ids with a leading space (``Ġgreat``; WordPiece has no such variant, and
    the uncased vocabulary lower-cases "World"); zeroing ``lm_head.bias`` (our tied head,
    logits = h · Eᵀ, has no bias: it is zero already); the reference's dev selection on strict improvement
    only (ours breaks ties by dev loss); dev checks not charged to the budget (ours are). For GDFO the preset
    sets what its config has (add mode, σ0, α, popsize, template; its student adds its prompt to slot tokens
    of its own vocabulary) and lists the rest as skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from bbt_client.errors import ConfigError

#: Fields of a task config a preset or sweep variant may set (the rest are the user's: data files, shots...).
TASK_KEYS = frozenset({"template", "label_words", "search_label_words", "fit_verbalizer", "test_limit", "shots"})
#: Top-level job fields a preset or sweep variant may set.
JOB_KEYS = frozenset({"loss", "eval_every"})

_REFERENCE_SEARCH = {"prompt_mode": "add", "sigma0": 1.0, "alpha": 1.0, "popsize": 20, "intrinsic_dim": 500}

_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"methods": {}, "tasks": {}, "job": {}},
    "reference": {
        "methods": {
            "bbt": {**_REFERENCE_SEARCH, "bound": 0.0, "projection": "normal", "calibrate": False},
            "bbtv2": {**_REFERENCE_SEARCH, "bound": 0.0, "calibrate": False, "hidden_std_source": "train",
                      "sigma0_deep": None, "generations_per_layer": 1, "keep": "best"},
            "gdfo": {**_REFERENCE_SEARCH, "bounds": None, "calibrate": False},
        },
        "method_task": {("bbtv2", "agnews"): {"sigma0": 0.2, "alpha": 0.2}},
        "tasks": {
            # the papers read one word per class: no fitted verbalizer
            "sst2": {"template": ". {text} . It was {mask} .", "fit_verbalizer": 0},
            "agnews": {"template": ". {mask} News: {text}", "fit_verbalizer": 0},
        },
        "job": {"loss": "ce"},
    },
}


@dataclasses.dataclass(frozen=True)
class PresetSettings:
    """What a preset sets for one (method, task): method options, task fields, job fields, and the
    method options it wanted but the method's config does not have (``skipped``, for the log)."""

    name: str
    method_options: dict[str, Any]
    task: dict[str, Any]
    job: dict[str, Any]
    skipped: tuple[str, ...] = ()


def preset_names() -> list[str]:
    return list(_PRESETS)


def resolve_preset(name: str, method: str, task: str) -> PresetSettings:
    """The settings of preset ``name`` for ``method`` on ``task`` (a built-in task name, or anything else for
    a custom task, which gets no template). Method options the method's config lacks are dropped into
    ``skipped`` rather than refused, so one preset serves every method."""
    try:
        preset = _PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}") from None
    wanted = dict(preset["methods"].get(method, {}))
    wanted.update(preset.get("method_task", {}).get((method, task), {}))
    fields = _config_fields(method)
    opts = {k: v for k, v in wanted.items() if k in fields}
    skipped = tuple(sorted(k for k in wanted if k not in fields))
    return PresetSettings(name=name, method_options=opts, task=dict(preset["tasks"].get(task, {})),
                          job=dict(preset["job"]), skipped=skipped)


def _config_fields(method: str) -> frozenset[str]:
    from bbt_client.methods.registry import config_class

    return frozenset(config_class(method).model_fields)


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Route ``key=value`` overrides to (method options, task fields, job fields) by key name; a
    ``task.``/``method.``/``job.`` prefix forces the route."""
    method: dict[str, Any] = {}
    task: dict[str, Any] = {}
    job: dict[str, Any] = {}
    for key, value in overrides.items():
        prefix, _, rest = key.partition(".")
        if rest and prefix in ("task", "method", "job"):
            {"task": task, "method": method, "job": job}[prefix][rest] = value
        elif key in TASK_KEYS:
            task[key] = value
        elif key in JOB_KEYS:
            job[key] = value
        else:
            method[key] = value
    return method, task, job


def apply_to_config(data: dict[str, Any], settings: PresetSettings) -> dict[str, Any]:
    """A copy of a TuneConfig dict with the preset's settings *under* what ``data`` already sets: the
    config's own (user's) values win."""
    out = dict(data)
    out["method_options"] = {**settings.method_options, **(data.get("method_options") or {})}
    task = dict(data.get("task") or {})
    if task.get("file") is None:
        out["task"] = {**settings.task, **task}
    for key, value in settings.job.items():
        out.setdefault(key, value)
    return out
