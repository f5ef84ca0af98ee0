"""bbt-client: tune a prompt for a language model you can only query.

The public API is what this module exports (``__all__``); every submodule is internal and may change between
versions. Quick start::

    import bbt_client as bbt

    result = bbt.tune(bbt.TuneConfig(
        endpoint=bbt.EndpointConfig(url="http://127.0.0.1:8080"),
        task=bbt.TaskConfig(name="agnews"),
        method="bbtv2", budget={"calls": 400}, out="runs/agnews"))
    print(result.test_accuracy)

Nothing here imports torch: the methods and backends that need it load it when used.
"""

from __future__ import annotations

import asyncio

from bbt_client.backends import make_backend
from bbt_client.backends.base import Backend
from bbt_client.config import EndpointConfig, TaskConfig, TuneConfig
from bbt_client.errors import (
    AuthenticationError,
    BBTError,
    BudgetExhausted,
    CheckpointError,
    ConfigError,
    EndpointError,
    ProtocolError,
    RateLimitError,
    RequestRejected,
    UnsupportedError,
)
from bbt_client.methods.base import Tuner
from bbt_client.methods.registry import config_class, known_methods, make_config, make_tuner
from bbt_client.run.budget import BudgetLimits
from bbt_client.run.job import Progress, ProgressCallback
from bbt_client.run.job import tune as tune_async
from bbt_client.run.rescore import evaluate_run
from bbt_client.run.results import RunResult, load_result

__version__ = "0.2.0"


def tune(config: TuneConfig, *, resume: bool = False, backend: Backend | None = None,
         progress: ProgressCallback | None = None) -> RunResult:
    """Run (or, with ``resume=True``, continue) one tuning job and return its result: ``bbt tune`` from Python.

    Blocking; inside a running event loop use :func:`tune_async`. With ``config.out`` set, the run directory is
    the CLI's own format, so ``bbt tune --resume``, ``bbt report`` and ``bbt plot`` work on it too.
    """
    return asyncio.run(tune_async(config, resume=resume, backend=backend, progress=progress))


__all__ = [
    "tune", "tune_async", "evaluate_run", "load_result",
    "TuneConfig", "TaskConfig", "EndpointConfig", "BudgetLimits", "RunResult", "Progress",
    "make_tuner", "make_config", "config_class", "known_methods", "Tuner", "make_backend", "Backend",
    "BBTError", "ConfigError", "UnsupportedError", "EndpointError", "AuthenticationError", "RateLimitError",
    "RequestRejected", "ProtocolError", "BudgetExhausted", "CheckpointError",
    "__version__",
]
