"""Parameter estimation: QBER per basis, Wilson intervals, phase-error bound, abort reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daemon.qkd.estimation import count_errors, estimate, wilson_interval
from daemon.qkd.finite_key import mu


def test_count_errors():
    assert count_errors(np.array([0, 1, 1, 0]), np.array([0, 0, 1, 1])) == (4, 2)
    with pytest.raises(ValueError):
        count_errors(np.zeros(3), np.zeros(4))


def test_wilson_interval_covers_and_matches_closed_form():
    lo, hi = wilson_interval(20, 1000, 0.95)
    assert lo < 0.02 < hi
    z = 1.959963984540054
    p, n = 0.02, 1000
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    assert (lo + hi) / 2 == pytest.approx(c, rel=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 100)[0] == 0.0
    # coverage of the true rate by simulation
    rng = np.random.default_rng(3)
    cover = sum(lo <= 0.03 <= hi for lo, hi in (wilson_interval(int(rng.binomial(2000, 0.03)), 2000, 0.95)
                                                 for _ in range(2000)))
    assert 0.93 < cover / 2000 < 0.97


def test_good_block_passes():
    e = estimate(500_000, 10_000, 500_000, 12_500, threshold=0.11, eps_sec=1e-10)
    assert not e.abort and e.reason is None
    assert e.z.qber == 0.02 and e.x.qber == 0.025
    assert e.phase_error_bound == pytest.approx(0.025 + mu(500_000, 500_000, 1e-10))
    assert e.as_dict()["qber_x"] == 0.025


def test_abort_reasons():
    e = estimate(100_000, 2_000, 100_000, 25_000)  # intercept-resend on one arm: ~25 %
    assert e.abort and "QBER X 0.2500 above" in e.reason
    e = estimate(100_000, 20_000, 100_000, 1_000)
    assert e.abort and e.reason.startswith("QBER Z")
    assert "no X-basis" in estimate(1000, 0, 0, 0).reason
    assert "no Z-basis" in estimate(0, 0, 1000, 0).reason
    e = estimate(100, 0, 30, 3, threshold=0.11)  # few bits: mu large
    assert e.abort and "phase-error bound" in e.reason
    assert math.isinf(estimate(1000, 0, 0, 0).phase_error_bound)
    with pytest.raises(ValueError):
        estimate(10, 11, 10, 0)
    with pytest.raises(ValueError):
        estimate(10, 1, 10, 0, threshold=0.7)
