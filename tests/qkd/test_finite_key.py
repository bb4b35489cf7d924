"""TLGR 2012 finite-key bound: the formula term by term, limits and monotonicity."""

from __future__ import annotations

import math

import pytest

from daemon.qkd.finite_key import binary_entropy, mu, secure_length


def test_binary_entropy():
    assert binary_entropy(0) == 0 and binary_entropy(0.5) == 1 and binary_entropy(0.7) == 1
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-3)
    assert binary_entropy(0.25) == pytest.approx(0.8112781244591328)


def test_formula_term_by_term():
    n, k, q, leak, es, ec = 1_000_000, 200_000, 0.02, 150_000, 1e-10, 1e-15
    r = secure_length(n, k, q, leak, es, ec)
    m = math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(2 / es))
    assert r.mu == pytest.approx(m, rel=1e-12)
    p = q + m
    h = -p * math.log2(p) - (1 - p) * math.log2(1 - p)
    bound = n * (1 - h) - leak - math.log2(2 / (es**2 * ec))
    assert r.bound == pytest.approx(bound, rel=1e-12)
    assert r.length == math.floor(bound) > 0
    assert r.eps_term == pytest.approx(math.log2(2) + 20 * math.log2(10) + 15 * math.log2(10))
    assert r.as_dict()["leak_ec"] == leak


def test_mu_hand_value():
    # n = k = 1e6, eps = 1e-10: sqrt(2e-6 * (1 + 1e-6) * ln(2e10))
    assert mu(10**6, 10**6, 1e-10) == pytest.approx(math.sqrt(2e-6 * 1.000001 * math.log(2e10)), rel=1e-12)
    assert mu(0, 10, 1e-10) == math.inf and mu(10, 0, 1e-10) == math.inf


def test_zero_when_negative_and_limits():
    assert secure_length(10_000, 1000, 0.05, 5000).length == 0  # too short: mu is large
    assert secure_length(10**6, 10**5, 0.12, int(10**6 * binary_entropy(0.12))).length == 0  # past the BB84 limit
    assert secure_length(10**6, 10**5, 0.49, 0).h_phase == 1.0
    r = secure_length(10**6, 0, 0.01, 0)  # no estimation bits: nothing
    assert r.length == 0 and r.mu == math.inf
    # asymptotically the rate tends to 1 - h(Q) - leak/n
    r = secure_length(10**12, 10**12, 0.03, int(10**12 * 1.05 * binary_entropy(0.03)))
    assert r.length / 1e12 == pytest.approx(1 - 2.05 * binary_entropy(0.03), abs=1e-4)


def test_monotonic():
    base = secure_length(10**6, 10**5, 0.03, 200_000).length
    assert secure_length(10**6, 10**5, 0.04, 200_000).length < base
    assert secure_length(10**6, 10**5, 0.03, 210_000).length == base - 10_000
    assert secure_length(10**6, 2 * 10**5, 0.03, 200_000).length > base
    assert secure_length(10**6, 10**5, 0.03, 200_000, eps_sec=1e-6).length > base
    assert secure_length(10**6, 10**5, 0.03, 200_000, eps_cor=1e-9).length == pytest.approx(base + 20, abs=1)


def test_validation():
    for args in [(-1, 1, 0.1, 0), (1, 1, 1.5, 0), (1, 1, 0.1, -1)]:
        with pytest.raises(ValueError):
            secure_length(*args)
    with pytest.raises(ValueError):
        secure_length(10, 10, 0.1, 0, eps_sec=0)
