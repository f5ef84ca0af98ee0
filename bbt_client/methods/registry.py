"""Method name -> (tuner class, config class), imported on demand.

Tuner modules are imported only when a method is used, so ``gdfo`` (which needs torch) costs
nothing, and fails with a clear :class:`ConfigError`, unless it is asked for.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from bbt_client.errors import ConfigError
from bbt_client.methods.base import Tuner
from bbt_client.protocol import ModelInfo

#: method -> (module, tuner class, config class, install hint)
_METHODS: dict[str, tuple[str, str, str, str]] = {
    "bbt": ("bbt_client.methods.bbt", "BBTTuner", "BBTConfig", ""),
    "bbtv2": ("bbt_client.methods.bbtv2", "BBTv2Tuner", "BBTv2Config", ""),
    "gdfo": ("bbt_client.methods.gdfo.tuner", "GDFOTuner", "GDFOConfig", "pip install 'bbt-client[gdfo]'"),
    "bdpl": ("bbt_client.methods.text.bdpl", "BDPLTuner", "BDPLConfig", ""),
    "cmaes-tokens": ("bbt_client.methods.text.token_cma", "TokenCMATuner", "TokenCMAConfig", ""),
}

#: Methods whose tuner needs the task and the training split at construction (GDFO's student learns on the texts;
#: the discrete methods mine their candidate vocabulary from them).
_NEEDS_DATA = frozenset({"gdfo", "bdpl", "cmaes-tokens"})


def known_methods() -> list[str]:
    return list(_METHODS)


def _entry(method: str) -> tuple[str, str, str, str]:
    try:
        return _METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; known methods: {', '.join(_METHODS)}") from None


def _load(method: str, attr: str) -> Any:
    module_name, _, _, hint = _entry(method)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(f"method {method!r} is not available in this installation ({module_name} is missing)") from None
        extra = f"; install it with {hint}" if hint else ""
        raise ConfigError(f"method {method!r} needs the optional package {exc.name!r}{extra}") from None
    except ImportError as exc:
        raise ConfigError(f"method {method!r} could not be loaded: {exc}") from None
    return getattr(module, attr)


def config_class(method: str) -> type[BaseModel]:
    """The pydantic config model of ``method`` (``BBTConfig``, ``BBTv2Config``, ``GDFOConfig``)."""
    return _load(method, _entry(method)[2])


def tuner_class(method: str) -> type[Tuner]:
    """The tuner class of ``method`` (its ``prompt_kind`` says which prompts it sends, before any endpoint is asked)."""
    return _load(method, _entry(method)[1])


def make_config(method: str, config: BaseModel | Mapping[str, Any] | None = None) -> BaseModel:
    """Validate ``config`` (a dict, the config model, or None for defaults) for ``method``."""
    cls = config_class(method)
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, BaseModel):
        config = config.model_dump()
    if not isinstance(config, Mapping):
        raise ConfigError(f"config for method {method!r} must be a mapping, got {type(config).__name__}")
    try:
        return cls(**dict(config))
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(config)'}: "
            + ("unknown option" if err["type"] == "extra_forbidden" else err["msg"]) for err in exc.errors()
        )
        if any(err["type"] == "extra_forbidden" for err in exc.errors()):
            details += f" (options of {method}: {', '.join(sorted(cls.model_fields))}; see bbt methods {method})"
        raise ConfigError(f"invalid config for method {method!r}: {details}") from None


def make_tuner(
    method: str,
    model_info: ModelInfo,
    config: BaseModel | Mapping[str, Any] | None = None,
    seed: int = 42,
    *,
    task: Any = None,
    train: Any = None,
) -> Tuner:
    """Build the tuner for ``method``. ``task``/``train`` are passed to methods that learn from data (GDFO)."""
    cfg = make_config(method, config)
    cls = tuner_class(method)
    if method in _NEEDS_DATA:
        if task is None or train is None:
            raise ConfigError(f"method {method!r} needs the task and the training split (task=..., train=...)")
        return cls(model_info, cfg, seed, task=task, train=train)
    return cls(model_info, cfg, seed)


def _field_comments(cls: type) -> dict[str, str]:
    """``#:`` comments above each field of ``cls`` and its bases (the comments the API docs render), joined."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        block: list[str] = []
        for line in lines:
            s = line.strip()
            if s.startswith("#:"):
                block.append(s[2:].strip())
                continue
            m = re.match(r"([A-Za-z_]\w*)\s*:", s)
            if m and block:
                out[m.group(1)] = " ".join(block)
            block = []
    return out


def describe_options(method: str) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, first sentence of its doc)`` for each option of ``method``, from the very
    pydantic model that validates ``--opt`` (so ``bbt methods`` cannot drift from the code)."""
    cls = config_class(method)
    docs = _field_comments(cls)
    rows = []
    for name, field in cls.model_fields.items():
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", docs.get(name, field.description or "")).replace("``", "")
        first = re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])", doc, maxsplit=1)[0].rstrip(".")
        rows.append((name, _type_name(field.annotation), field.get_default(call_default_factory=True), first))
    return rows


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
