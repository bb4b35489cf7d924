"""Toeplitz privacy amplification: bit-exact against the dense O(n m) product and an independent FFT method,
for every kernel this CPU can run (the portable one always), and the packed-word entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from daemon.qkd import amplification as pa


KERNELS = pa.available_kernels()


@pytest.fixture(params=KERNELS)
def kernel(request):
    prev = pa.set_kernel(request.param)
    yield request.param
    pa.set_kernel(prev)


def test_portable_kernel_always_available():
    assert "portable" in KERNELS and set(KERNELS) <= set(pa.KERNELS)
    assert pa.KERNEL in KERNELS
    with pytest.raises(pa.AmplificationError, match="not available"):
        pa.set_kernel("quantum-annealer")


def test_small_sizes_match_dense_reference_bit_for_bit(kernel):
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (2, 1), (2, 2), (63, 5), (64, 64), (65, 1), (65, 65), (127, 64), (200, 37), (1000, 999),
             (2048, 2048), (2049, 1), (3000, 1500), (4100, 2100), (5000, 100)]
    for n, m in sizes:
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        ref = pa.toeplitz_reference(x, s, m)
        assert np.array_equal(pa.toeplitz_hash(x, s, m), ref), (n, m)
        assert np.array_equal(pa.toeplitz_hash_fft(x, s, m), ref), (n, m)


@pytest.mark.parametrize("k", KERNELS)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), data=st.data())
def test_property_against_reference(k, n, data):
    m = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dens = data.draw(st.sampled_from([0.5, 0.02, 0.98]))
    x = (rng.random(n) < dens).astype(np.uint8)
    s = (rng.random(n + m - 1) < dens).astype(np.uint8)
    assert np.array_equal(pa.toeplitz_hash_words(pa.pack_bits(x), n, pa.pack_bits(s), m, kernel=k),
                          pa.pack_bits(pa.toeplitz_reference(x, s, m)))


@pytest.mark.parametrize("base", [1, 2, 3, 5])
def test_deep_recursion_and_odd_base_sizes(kernel, base, monkeypatch):
    # tiny base thresholds: many Karatsuba levels, base cases of 1..5 words (odd sizes stop the split early)
    monkeypatch.setitem(pa.BASE_WORDS, kernel, base)
    rng = np.random.default_rng(base)
    for n, m in [(64 * 12, 64 * 12), (3000, 1500), (4100, 2100), (64 * 40 + 1, 64 * 20 - 1)]:
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        assert np.array_equal(pa.toeplitz_hash(x, s, m), pa.toeplitz_reference(x, s, m)), (n, m)


def test_word_entry_point_ignores_bits_past_the_ends_and_clears_the_tail(kernel):
    rng = np.random.default_rng(4)
    for n, m in [(1, 1), (64, 1), (100, 64), (130, 65), (1000, 333), (4096, 4096)]:
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        want = pa.toeplitz_reference(x, s, m)
        xw, sw = pa.pack_bits(x), pa.pack_bits(s)
        if n % 64:
            xw[-1] |= ~np.uint64(0) << np.uint64(n % 64)  # garbage past the key
        if (n + m - 1) % 64:
            sw[-1] |= ~np.uint64(0) << np.uint64((n + m - 1) % 64)
        sw = np.concatenate([sw, np.full(3, ~np.uint64(0))])  # extra words: ignored
        xw.setflags(write=False)  # read-only input (e.g. np.frombuffer) is fine
        y = pa.toeplitz_hash_words(xw, n, sw, m)
        assert y.dtype == np.uint64 and y.size == (m + 63) // 64
        tail = np.zeros(64 * y.size - m, np.uint8)
        assert np.array_equal(pa.unpack_bits(y, 64 * y.size), np.concatenate([want, tail]))
        assert np.array_equal(pa.toeplitz_hash(x, s, m), want)


def test_word_entry_point_takes_words_by_value():
    rng = np.random.default_rng(8)
    n, m = 700, 300
    xw = pa.pack_bits(rng.integers(0, 2, n, dtype=np.uint8))
    sw = pa.pack_bits(rng.integers(0, 2, n + m - 1, dtype=np.uint8))
    want = pa.toeplitz_hash_words(xw, n, sw, m)
    for conv in (lambda a: a.astype(">u8"), lambda a: a.view(np.int64), lambda a: np.repeat(a, 2)[::2]):
        assert np.array_equal(pa.toeplitz_hash_words(conv(xw), n, conv(sw), m), want)


def test_word_entry_point_errors():
    w = np.zeros(4, np.uint64)
    with pytest.raises(pa.AmplificationError, match="words"):
        pa.toeplitz_hash_words(w, 300, w, 10)
    with pytest.raises(pa.AmplificationError, match="64-bit"):
        pa.toeplitz_hash_words(np.zeros(4, np.uint8), 10, w, 10)
    with pytest.raises(pa.AmplificationError, match="exceeds"):
        pa.toeplitz_hash_words(w, 10, w, 11)
    with pytest.raises(pa.AmplificationError, match="not available"):
        pa.toeplitz_hash_words(w, 10, w, 5, kernel="nope")


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


@pytest.mark.parametrize("n,m", [(1 << 20, 1 << 19), (1_000_003, 312_345), (600_000, 599_999), (300_001, 7),
                                 (2_000_000, 1_000_000)])
def test_large_random_cases_match_fft(n, m):
    rng = np.random.default_rng(n ^ m)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = pa.new_seed(n, m)
    assert np.array_equal(pa.toeplitz_hash(x, s, m), pa.toeplitz_hash_fft(x, s, m))


@pytest.mark.parametrize("k", [k for k in KERNELS if k != "portable"])
def test_random_medium_sizes_against_fft(k):
    # block sizes N = U * 2**j with odd and even U, 1..many column blocks, m from tiny to n
    rng = np.random.default_rng(23)
    for _ in range(12):
        n = int(rng.integers(1_000, 200_000))
        m = int(rng.choice([rng.integers(1, 200), rng.integers(1, n + 1), n]))
        x = (rng.random(n) < rng.choice([0.5, 0.01])).astype(np.uint8)
        s = pa.new_seed(n, m)
        got = pa.toeplitz_hash_words(pa.pack_bits(x), n, pa.pack_bits(s), m, kernel=k)
        assert np.array_equal(got, pa.pack_bits(pa.toeplitz_hash_fft(x, s, m))), (n, m)


@pytest.mark.parametrize("k", KERNELS)
def test_every_kernel_on_a_large_case(k):
    n, m = (300_001, 150_000) if k != "portable" else (40_000, 20_001)
    rng = np.random.default_rng(17)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = pa.new_seed(n, m)
    want = pa.pack_bits(pa.toeplitz_hash_fft(x, s, m))
    assert np.array_equal(pa.toeplitz_hash_words(pa.pack_bits(x), n, pa.pack_bits(s), m, kernel=k), want)


_HASWELL = "+64bit,+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+fma,+bmi,+bmi2,+pclmul,+cx16"


@pytest.mark.parametrize("env,want", [
    ({"QNETD_PA_KERNEL": "portable"}, "portable"),
    ({"QNETD_NO_PCLMUL": "1"}, "portable"),
    ({"QNETD_PA_KERNEL": "no-such"}, None),  # warning, then the best available
    # numba compiling for an older CPU: the kernels it lacks are never compiled (a fatal LLVM error otherwise)
    ({"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": _HASWELL}, "pclmul"),
    ({"NUMBA_CPU_NAME": "generic"}, "portable"),
])
def test_environment_forces_the_kernel(env, want, tmp_path):
    # a fresh interpreter: the kernel is chosen at import; the forced one must also be exact
    if env.get("NUMBA_CPU_NAME") == "haswell" and not {"avx2", "pclmul", "bmi2", "fma"} <= pa._FEATURES:
        pytest.skip("host cannot run Haswell code")  # pragma: no cover
    code = ("import numpy as np; from daemon.qkd import amplification as pa; r = np.random.default_rng(2); "
            "x = r.integers(0, 2, 3001, dtype=np.uint8); s = r.integers(0, 2, 3001 + 700 - 1, dtype=np.uint8); "
            "assert np.array_equal(pa.toeplitz_hash(x, s, 700), pa.toeplitz_reference(x, s, 700)); "
            "x = r.integers(0, 2, 70001, dtype=np.uint8); s = r.integers(0, 2, 70001 + 30000 - 1, dtype=np.uint8); "
            "assert np.array_equal(pa.toeplitz_hash(x, s, 30000), pa.toeplitz_hash_fft(x, s, 30000)); print(pa.KERNEL)")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("QNETD_", "NUMBA_CPU"))}
    e.update(env)
    if "NUMBA_CPU_NAME" in env:
        e["NUMBA_CACHE_DIR"] = str(tmp_path)  # keep foreign-target code out of the project's cache
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], env=e, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (want or KERNELS[0])


def test_cpu_feature_detection_follows_numba_target(monkeypatch):
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", "generic", raising=False)
    monkeypatch.setattr(config, "CPU_FEATURES", "", raising=False)
    assert pa._cpu_features() == set()
    monkeypatch.setattr(config, "CPU_FEATURES", "+sse2,+pclmul,-avx512f", raising=False)
    assert pa._cpu_features() == {"sse2", "pclmul"}


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
