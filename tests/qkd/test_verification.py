"""Verification: Toeplitz tag against a brute-force oracle, 2-universality, injected residual error caught."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.qkd.channel import loopback_pair, pump
from daemon.qkd.verification import VerifyAlice, VerifyBob, seed_words, tag_bits_for, toeplitz_tag


def _oracle(bits, seed_words_arr, t):
    s = np.unpackbits(seed_words_arr.view(np.uint8), bitorder="little")
    return np.array([int(np.bitwise_xor.reduce(bits & s[r:r + bits.size])) if bits.size else 0 for r in range(t)],
                    np.uint8)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), t=st.integers(1, 130), seed=st.integers(0, 2**32))
def test_toeplitz_matches_oracle(n, t, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    sw = rng.integers(0, 2**64, seed_words(n, t), dtype=np.uint64)
    assert np.array_equal(toeplitz_tag(bits, sw, t), _oracle(bits, sw, t))


def test_tag_length():
    assert tag_bits_for(1e-15) == 50
    assert tag_bits_for(2.0**-64) == 64
    with pytest.raises(ValueError):
        tag_bits_for(0)


def test_collision_rate_is_two_to_minus_t():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, 1000, dtype=np.uint8)
    y = x.copy()
    y[[5, 600]] ^= 1
    t, trials = 4, 4000
    same = sum(np.array_equal(toeplitz_tag(x, s, t), toeplitz_tag(y, s, t))
               for s in (rng.integers(0, 2**64, seed_words(1000, t), dtype=np.uint64) for _ in range(trials)))
    assert abs(same / trials - 1 / 16) < 0.02


def _verify(a, b, eps=1e-15, randbytes=None):
    ea, eb = loopback_pair()
    kw = {} if randbytes is None else {"randbytes": randbytes}
    va, vb = VerifyAlice(a, eps, **kw), VerifyBob(b, min_tag_bits=tag_bits_for(eps))
    pump(va, vb, ea, eb)
    return va, vb, ea


def test_equal_keys_pass_and_tag_counts_as_leak():
    k = np.random.default_rng(0).integers(0, 2, 10_000, dtype=np.uint8)
    va, vb, ea = _verify(k, k.copy())
    assert va.ok and vb.ok
    assert ea.sent.leak_bits == 50  # only the tag; the seed is public


def test_injected_residual_error_is_caught_on_both_sides():
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = rng.integers(0, 2, 5000, dtype=np.uint8)
        kb = k.copy()
        kb[rng.integers(0, 5000)] ^= 1
        va, vb, _ = _verify(k, kb)
        assert va.ok is False and vb.ok is False


def test_fresh_seed_per_block_from_randbytes():
    calls = []

    def rb(n):
        calls.append(n)
        return bytes(n)

    k = np.ones(100, np.uint8)
    _verify(k, k, randbytes=rb)
    _verify(k, k, randbytes=rb)
    assert calls == [8 * seed_words(100, 50)] * 2


def test_bob_rejects_short_tag():
    k = np.ones(100, np.uint8)
    ea, eb = loopback_pair()
    va, vb = VerifyAlice(k, 0.25), VerifyBob(k, min_tag_bits=50)
    pump(va, vb, ea, eb)
    assert va.ok is False
