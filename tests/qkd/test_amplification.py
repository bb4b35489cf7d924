"""Toeplitz privacy amplification: bit-exact against the dense O(n m) product and an independent FFT method."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from daemon.qkd import amplification as pa


def test_small_sizes_match_dense_reference_bit_for_bit():
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (2, 1), (2, 2), (63, 5), (64, 64), (65, 1), (65, 65), (127, 64), (200, 37), (1000, 999),
             (2048, 2048), (2049, 1), (3000, 1500), (4100, 2100), (5000, 100)]
    for n, m in sizes:
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        ref = pa.toeplitz_reference(x, s, m)
        assert np.array_equal(pa.toeplitz_hash(x, s, m), ref), (n, m)
        assert np.array_equal(pa.toeplitz_hash_fft(x, s, m), ref), (n, m)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 700), st.data())
def test_property_against_reference(n, data):
    m = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dens = data.draw(st.sampled_from([0.5, 0.02, 0.98]))
    x = (rng.random(n) < dens).astype(np.uint8)
    s = (rng.random(n + m - 1) < dens).astype(np.uint8)
    assert np.array_equal(pa.toeplitz_hash(x, s, m), pa.toeplitz_reference(x, s, m))


def test_matrix_convention_and_linearity():
    # T[i, j] = s[i - j + n - 1]: a unit vector picks a column, i.e. a seed window
    n, m = 300, 120
    rng = np.random.default_rng(5)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    for j in (0, 1, 63, 64, 150, n - 1):
        e = np.zeros(n, np.uint8)
        e[j] = 1
        assert np.array_equal(pa.toeplitz_hash(e, s, m), s[n - 1 - j: n - 1 - j + m])
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = rng.integers(0, 2, n, dtype=np.uint8)
    assert np.array_equal(pa.toeplitz_hash(a ^ b, s, m), pa.toeplitz_hash(a, s, m) ^ pa.toeplitz_hash(b, s, m))
    assert not pa.toeplitz_hash(np.zeros(n, np.uint8), s, m).any()


@pytest.mark.parametrize("n,m", [(1 << 20, 1 << 19), (1_000_003, 312_345), (600_000, 599_999), (300_001, 7)])
def test_large_random_cases_match_fft(n, m):
    rng = np.random.default_rng(n ^ m)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = pa.new_seed(n, m)
    assert np.array_equal(pa.toeplitz_hash(x, s, m), pa.toeplitz_hash_fft(x, s, m))


@njit
def _hw(a, b):
    return pa._clmul_hw(a, b)


def test_portable_clmul_equals_hardware():
    rng = np.random.default_rng(9)
    for _ in range(200):
        a, b = (int(v) for v in rng.integers(0, 2**63, 2, dtype=np.uint64))
        a |= int(rng.integers(0, 2)) << 63
        want = 0
        for i in range(64):
            if (b >> i) & 1:
                want ^= a << i
        lo, hi = pa._clmul_sw(np.uint64(a), np.uint64(b))
        assert int(lo) | (int(hi) << 64) == want
        if pa.HAVE_PCLMUL:
            lo, hi = _hw(np.uint64(a), np.uint64(b))
            assert int(lo) | (int(hi) << 64) == want


def test_seed_is_fresh_and_sized():
    s1, s2 = pa.new_seed(1000, 300), pa.new_seed(1000, 300)
    assert s1.size == 1299 and s1.dtype == np.uint8 and set(np.unique(s1)) <= {0, 1}
    assert not np.array_equal(s1, s2)
    assert 500 < int(s1.sum()) < 800


def test_argument_errors():
    x = np.ones(10, np.uint8)
    with pytest.raises(pa.AmplificationError, match="n \\+ m - 1"):
        pa.toeplitz_hash(x, np.ones(10, np.uint8), 4)
    with pytest.raises(pa.AmplificationError, match="exceeds"):
        pa.toeplitz_hash(x, np.ones(30, np.uint8), 11)
    with pytest.raises(pa.AmplificationError, match="bits"):
        pa.toeplitz_hash(x * 2, np.ones(13, np.uint8), 4)
    with pytest.raises(pa.AmplificationError, match="method"):
        pa.toeplitz_hash(x, np.ones(13, np.uint8), 4, method="magic")
    with pytest.raises(pa.AmplificationError):
        pa.new_seed(0, 1)
