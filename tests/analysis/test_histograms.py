"""Correlation histograms equal pycorrelate.pcorrelate bin for bin (its counts are divided by the bin width)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycorrelate import pcorrelate

from daemon.analysis.coincidences import CoincidenceEngine, EngineSpec
from daemon.analysis.histograms import as_pcorrelate, correlate, edges, g2_normalization, spec_from_range
from daemon.analysis.reference import histogram as np_histogram
from drivers.base import TagBatch

sorted_times = st.lists(st.integers(0, 20_000), max_size=150).map(lambda v: np.sort(np.array(v, np.int64)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=sorted_times, u=sorted_times, lo=st.integers(-3000, 3000), binw=st.integers(1, 400),
       nbins=st.integers(1, 40))
def test_equals_pcorrelate(t, u, lo, binw, nbins):
    e = edges(lo, binw, nbins)
    ours = correlate(t, u, lo, binw, nbins)
    theirs = pcorrelate(t, u, e)
    assert np.array_equal(as_pcorrelate(ours, e), theirs)  # exact: same float64 division of the same integers
    assert np.array_equal(ours, np_histogram(t, u, lo, binw, nbins))  # and the numpy reference


def test_streaming_histogram_equals_pcorrelate_on_delayed_data():
    rng = np.random.default_rng(5)
    n = 40_000
    pair_t = np.sort(rng.integers(0, 10**10, n // 4))
    a = np.sort(np.concatenate([pair_t, rng.integers(0, 10**10, n // 4)]))
    b = np.sort(np.concatenate([pair_t + 2300 + rng.normal(0, 60, n // 4).astype(np.int64),
                                rng.integers(0, 10**10, n // 4)]))
    ts = np.concatenate([a, b])
    ch = np.concatenate([np.zeros(a.size, np.uint8), np.ones(b.size, np.uint8)])
    o = np.argsort(ts, kind="stable")
    ts, ch = ts[o], ch[o]
    h = spec_from_range("g2", 0, 1, 50, 10_000)
    delays = {0: 700, 1: -1600}
    eng = CoincidenceEngine(EngineSpec((), 1, 0, delays, 10**12, (h,)))
    bounds = np.linspace(0, 10**10 + 5000, 9).astype(np.int64)
    total = np.zeros(h.n_bins, np.int64)
    for x, y in zip(bounds[:-1], bounds[1:]):
        lo_i, hi_i = np.searchsorted(ts, [x, y])
        for iv in eng.feed(TagBatch(ts[lo_i:hi_i], ch[lo_i:hi_i], int(x), int(y))):
            total += iv.histograms[0]
    for iv in eng.feed(TagBatch.empty(int(bounds[-1]), 10**12 + 10**6)):
        total += iv.histograms[0]
    A, B = a + delays[0], b + delays[1]
    A = A[A >= 0]  # left tags before t0 = 0 are not counted
    e = h.edges()
    assert np.array_equal(as_pcorrelate(total, e), pcorrelate(A, B, e))
    assert total.max() > 1000  # the peak is there (at 2300 + 700... -1600 - 700 = 0)
    assert abs(int(e[np.argmax(total)])) <= 100


def test_spec_from_range():
    h = spec_from_range("x", 0, 4, 50, 10_000, center_ps=200)
    assert (h.lo_ps, h.n_bins, h.hi_ps) == (-9800, 400, 10_200)
    with pytest.raises(ValueError, match="multiple"):
        spec_from_range("x", 0, 4, 300, 1000)


def test_g2_normalization():
    assert g2_normalization(1000, 2000, 10**12, 50) == pytest.approx(1000 * 2000 * 50 / 10**12)
    assert g2_normalization(0, 5, 10, 1) is None
