"""``import bbt_client as bbt``: the curated public surface, importable without torch."""

from __future__ import annotations

import subprocess
import sys

import bbt_client as bbt
from bbt_client.tasks.datasets import load_task_data
from tests.unit.toy_backend import ToyBackend


def test_every_exported_name_exists():
    missing = [name for name in bbt.__all__ if not hasattr(bbt, name)]
    assert missing == []
    assert issubclass(bbt.BudgetExhausted, bbt.BBTError) and issubclass(bbt.RateLimitError, bbt.EndpointError)


def test_importing_the_package_loads_neither_torch_nor_cma():
    code = "import sys, bbt_client; print(sorted(m for m in ('torch', 'cma', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tune_is_synchronous_and_returns_the_result_it_writes(tmp_path):
    task = bbt.TaskConfig(name="sst2", shots=4, test_limit=40)
    data = load_task_data(task, 7)
    labels = {t: int(y) for s in (data.train, data.dev, data.test) for t, y in zip(s.texts, s.labels)}
    cfg = bbt.TuneConfig(endpoint=bbt.EndpointConfig(url="http://toy.invalid"), task=task, method="bbt", seed=7,
                         budget={"calls": 40}, method_options={"prompt_tokens": 2, "intrinsic_dim": 10, "popsize": 6},
                         out=tmp_path / "run")
    result = bbt.tune(cfg, backend=ToyBackend(labels))
    assert isinstance(result, bbt.RunResult) and result.api_calls_used <= 40
    assert bbt.load_result(tmp_path / "run") == result
