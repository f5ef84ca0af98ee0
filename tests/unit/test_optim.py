import pickle

import numpy as np
import pytest

from bbt_client.search.cmaes import CMAES


def sphere(x):
    return np.sum((x - 0.5) ** 2, axis=1)


def run(es, generations):
    asked = []
    for _ in range(generations):
        x = es.ask()
        asked.append(x)
        es.tell(sphere(x))
    return asked


def test_same_seed_same_samples_regardless_of_global_rng():
    a = CMAES(10, popsize=6, seed=5)
    np.random.seed(999)
    np.random.rand(17)
    b = CMAES(10, popsize=6, seed=5)
    for xa, xb in zip(run(a, 4), run(b, 4)):
        assert np.array_equal(xa, xb)
    assert not np.array_equal(CMAES(10, popsize=6, seed=6).ask(), CMAES(10, popsize=6, seed=5).ask())


def test_caller_global_rng_untouched():
    np.random.seed(3)
    expected = np.random.RandomState(3).rand(3)
    es = CMAES(5, popsize=4, seed=1)
    run(es, 2)
    assert np.array_equal(np.random.rand(3), expected)


def test_interleaved_optimisers_do_not_interfere():
    solo = CMAES(6, popsize=4, seed=11)
    solo_runs = run(solo, 3)
    a, b = CMAES(6, popsize=4, seed=11), CMAES(6, popsize=4, seed=12)
    interleaved = []
    for _ in range(3):
        interleaved += run(a, 1)
        run(b, 1)
    for x, y in zip(solo_runs, interleaved):
        assert np.array_equal(x, y)


def test_resume_is_bit_identical_through_pickle():
    straight = CMAES(12, popsize=8, seed=21)
    full = run(straight, 6)
    first = CMAES(12, popsize=8, seed=21)
    head = run(first, 3)
    blob = pickle.dumps({"es": first.state_bytes()})
    np.random.seed(0)  # a resumed process has some other global state
    resumed = CMAES.from_bytes(pickle.loads(blob)["es"])
    tail = run(resumed, 3)
    for x, y in zip(full, head + tail):
        assert np.array_equal(x, y)


def test_pending_ask_survives_state_round_trip():
    es = CMAES(4, popsize=4, seed=2)
    x = es.ask()
    restored = CMAES.from_bytes(es.state_bytes())
    assert restored.pending
    restored.tell(sphere(x))
    assert restored.generations == 1


def test_refuses_bad_tells_and_double_ask():
    es = CMAES(4, popsize=4, seed=2)
    with pytest.raises(ValueError, match="without a pending"):
        es.tell([1, 2, 3, 4])
    x = es.ask()
    with pytest.raises(RuntimeError):
        es.ask()
    with pytest.raises(ValueError, match="expected 4"):
        es.tell([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        es.tell([1.0, float("nan"), 2.0, 3.0])
    es.tell(sphere(x))  # still pending after refused tells


def test_optimises_and_respects_bounds():
    es = CMAES(5, popsize=10, seed=4, sigma0=0.5)
    run(es, 60)
    assert es.best_f < 1e-3
    assert np.allclose(es.best_x, 0.5, atol=0.05)
    bounded = CMAES(5, popsize=10, seed=4, sigma0=2.0, bounds=(-0.2, 0.2))
    for x in run(bounded, 5):
        assert x.min() >= -0.2 - 1e-12 and x.max() <= 0.2 + 1e-12


def test_cma_is_imported_without_its_eager_optional_imports():
    """``import cma`` pulls matplotlib and scipy (1.4 s) when installed; import_cma must not, must
    leave them importable afterwards, and CMA-ES must sample exactly as with them loaded."""
    import importlib.util
    import subprocess
    import sys

    if any(importlib.util.find_spec(m) is None for m in ("matplotlib", "scipy")):
        pytest.skip("needs matplotlib and scipy installed: what cma would import eagerly")
    probe = (
        "import sys, numpy as np\n"
        "{pre}from bbt_client.search.cmaes import CMAES, import_cma\n"
        "import_cma()\n"
        "print(sorted(m for m in ('matplotlib', 'scipy') if m in sys.modules))\n"
        "es = CMAES(20, popsize=6, seed=3)\n"
        "for _ in range(5):\n"
        "    x = es.ask(); es.tell(np.sum(x ** 2, axis=1))\n"
        "print(float(es.ask().sum()).hex())\n"
        "import matplotlib.pyplot, scipy.stats\n"
    )
    out = {}
    for label, pre in (("lean", ""), ("loaded", "import cma, matplotlib.pyplot, scipy.stats\n")):
        run = subprocess.run([sys.executable, "-c", probe.format(pre=pre)], capture_output=True, text=True, check=True)
        out[label] = run.stdout.splitlines()
    assert out["lean"][0] == "[]"
    assert out["loaded"][0] == "['matplotlib', 'scipy']"
    assert out["lean"][1] == out["loaded"][1]
