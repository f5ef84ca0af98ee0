import math

import numpy as np
import pytest

from bbt_client.search.projection import Projection, derive_seed, designed_std


def test_shapes_single_and_batch():
    p = Projection(seed=1, intrinsic_dim=8, prompt_tokens=3, hidden_size=5, distribution="normal", std=0.1)
    z = np.random.default_rng(0).normal(size=(4, 8))
    out = p(z)
    assert out.shape == (4, 3, 5) and out.dtype == np.float32
    assert p(z[2]).shape == (3, 5)
    np.testing.assert_allclose(p(z[2]), out[2], rtol=1e-6)
    with pytest.raises(ValueError):
        p(np.zeros(7))


def test_deterministic_per_seed_and_independent_of_global_rng():
    a = Projection(seed=7, intrinsic_dim=10, prompt_tokens=4, hidden_size=6, std=0.2).matrix
    np.random.seed(123)
    b = Projection(seed=7, intrinsic_dim=10, prompt_tokens=4, hidden_size=6, std=0.2).matrix
    c = Projection(seed=8, intrinsic_dim=10, prompt_tokens=4, hidden_size=6, std=0.2).matrix
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_release_regenerates_identically():
    p = Projection(seed=3, intrinsic_dim=40, prompt_tokens=2, hidden_size=8, std=1.0)  # > one generation chunk
    first = p.matrix.copy()
    p.release()
    assert np.array_equal(first, p.matrix)


def test_normal_std_and_designed_prompt_scale():
    d, target, sigma0 = 200, 0.05, 1.0
    std = designed_std(target, d, sigma0)
    assert std == pytest.approx(target / math.sqrt(d))
    p = Projection(seed=0, intrinsic_dim=d, prompt_tokens=10, hidden_size=64, distribution="normal", std=std)
    assert p.matrix.std() == pytest.approx(std, rel=0.02)
    assert abs(p.matrix.mean()) < 0.02 * std
    # z ~ N(0, sigma0^2 I) gives prompt entries with std ~ the target std: the point of the design.
    z = np.random.default_rng(1).normal(scale=sigma0, size=(50, d))
    assert p(z).std() == pytest.approx(target, rel=0.05)


def test_uniform_bounds_and_std():
    d = 100
    p = Projection(seed=0, intrinsic_dim=d, prompt_tokens=10, hidden_size=64, distribution="uniform")
    a = p.matrix
    assert a.min() >= -1 / math.sqrt(d) and a.max() <= 1 / math.sqrt(d)
    assert a.std() == pytest.approx(p.entry_std, rel=0.02)


def test_invalid_parameters():
    with pytest.raises(ValueError):
        Projection(seed=0, intrinsic_dim=4, prompt_tokens=1, hidden_size=2, distribution="cauchy")
    with pytest.raises(ValueError):
        Projection(seed=0, intrinsic_dim=4, prompt_tokens=1, hidden_size=2, std=0.0)
    with pytest.raises(ValueError):
        designed_std(float("nan"), 10, 1.0)


def test_derive_seed_streams_differ_and_are_stable():
    assert derive_seed(42, 0) == derive_seed(42, 0)
    seeds = {derive_seed(s, k) for s in (13, 42, 100) for k in range(4)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
