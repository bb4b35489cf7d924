"""The streaming coincidence engine against the whole-stream numpy oracle and a brute-force double loop.

Random small streams, delays (small: kernels on the raw buffer; large: corrected sorted copies, merged from
delay groups), windows, accidental offsets (fused into the lookback, or the separate probe), histograms,
interval lengths and chunkings: the results must be *exactly* equal, and equal across chunkings.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.analysis import coincidences as C
from daemon.analysis.coincidences import CoincidenceEngine, EngineSpec, HistogramSpec
from daemon.analysis.reference import ReferenceAnalysis, window
from drivers.base import TagBatch

from .helpers import brute_hist, brute_pairs, make_batches

NCH = 5


@st.composite
def scenarios(draw):
    t0 = draw(st.integers(-10**6, 10**12))
    length = draw(st.integers(1, 6000))
    n = draw(st.integers(0, 120))
    ts = np.sort(np.array(draw(st.lists(st.integers(t0, t0 + length - 1), min_size=n, max_size=n)), np.int64))
    # bunch some tags to make real coincidences: copy some times to another channel with a small shift
    ch = np.array(draw(st.lists(st.integers(0, NCH - 1), min_size=n, max_size=n)), np.uint8)
    if n and draw(st.booleans()):
        k = draw(st.integers(1, n))
        extra = ts[:k] + np.array(draw(st.lists(st.integers(-40, 40), min_size=k, max_size=k)), np.int64)
        extra = np.clip(extra, t0, t0 + length - 1)
        ts = np.concatenate((ts, extra))
        ch = np.concatenate((ch, np.array(draw(st.lists(st.integers(0, NCH - 1), min_size=k, max_size=k)), np.uint8)))
        o = np.argsort(ts, kind="stable")
        ts, ch = ts[o], ch[o]
    big = draw(st.sampled_from([300, 300, 6000]))
    delays = {c: draw(st.integers(-big, big)) for c in range(NCH) if draw(st.booleans())}
    pairs = draw(st.lists(st.tuples(st.integers(0, NCH - 1), st.integers(0, NCH - 1)).filter(lambda p: p[0] != p[1]),
                          min_size=0, max_size=6))
    win = draw(st.integers(1, 700))
    off = draw(st.sampled_from([0, 0, draw(st.integers(-3000, 3000)), draw(st.integers(-20, 20))]))
    interval = draw(st.sampled_from([draw(st.integers(1, 60)), draw(st.integers(60, 3000)), 10**9]))
    hists = []
    for i in range(draw(st.integers(0, 2))):
        a, b = draw(st.tuples(st.integers(0, NCH - 1), st.integers(0, NCH - 1)).filter(lambda p: p[0] != p[1]))
        binw = draw(st.integers(1, 300))
        nb = draw(st.integers(1, 12))
        lo = draw(st.integers(-2000, 2000))
        hists.append(HistogramSpec(f"h{i}", a, b, binw, lo, nb))
    end = t0 + length + draw(st.integers(0, 3000))
    cuts = sorted(draw(st.lists(st.integers(t0, end), max_size=12)))
    bounds = [t0, *cuts, end]
    flags = [draw(st.sampled_from([0, 0, 0, 0, 1, 2])) for _ in range(len(bounds) - 1)]
    missed = [draw(st.sampled_from([0, 0, 0, 3])) for _ in range(len(bounds) - 1)]
    spec = EngineSpec(tuple(pairs), win, off, delays, interval, tuple(hists))
    return spec, ts, ch, bounds, flags, missed


def run_engine(spec, batches):
    eng = CoincidenceEngine(spec)
    out = []
    for b in batches:
        out.extend(eng.feed(b))
    return out


def reference(spec, batches):
    hs = [(h.a, h.b, h.lo_ps, h.bin_ps, h.n_bins) for h in spec.histograms]
    return ReferenceAnalysis(spec.pairs, spec.window_ps, spec.accidental_offset_ps, spec.delays_ps, spec.interval_ps,
                             hs).run(batches)


def assert_same(got, ref):
    assert [(g.t_begin, g.t_end) for g in got] == [(r.t_begin, r.t_end) for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g.counts, r.counts)
        assert (g.accidentals is None) == (r.accidentals is None)
        if g.accidentals is not None:
            np.testing.assert_array_equal(g.accidentals, r.accidentals)
        assert len(g.histograms) == len(r.histograms)
        for x, y in zip(g.histograms, r.histograms):
            np.testing.assert_array_equal(x, y)
        assert g.overflow == r.overflow
        assert g.missed_events == r.missed_events


MODES = {
    "raw": {},  # small delay spread: kernels on the raw buffer
    "built": {"RAW_SPREAD_MAX_PS": -1},  # corrected sorted copy, insertion fix-up
    "groups": {"RAW_SPREAD_MAX_PS": -1, "GROUP_GAP_PS": 50, "SORT_BUDGET_SLACK": -10**9},  # merge of delay groups
}


@pytest.mark.parametrize("mode", list(MODES))
@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sc=scenarios(), data=st.data())
def test_engine_equals_oracle_for_any_chunking(mode, sc, data):
    spec, ts, ch, bounds, flags, missed = sc
    with pytest.MonkeyPatch.context() as mp:
        for k, v in MODES[mode].items():
            mp.setattr(C, k, v)
        batches = make_batches(ts, ch, bounds, flags, missed)
        ref = reference(spec, batches)
        assert_same(run_engine(spec, batches), ref)
        # a different chunking of the same stream (no flags): the same counts
        t0, end = bounds[0], bounds[-1]
        cuts2 = sorted(data.draw(st.lists(st.integers(t0, end), max_size=8)))
        b2 = make_batches(ts, ch, [t0, *cuts2, end])
        got2 = run_engine(spec, b2)
        ref2 = reference(spec, b2)
        assert_same(got2, ref2)
        assert [g.counts.tolist() for g in got2] == [r.counts.tolist() for r in ref]  # same end: same intervals


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_oracle_equals_brute_force(sc):
    spec, ts, ch, bounds, _, _ = sc
    batches = make_batches(ts, ch, bounds)
    ref = reference(spec, batches)
    n = len(ref)
    t0, iv = bounds[0], spec.interval_ps
    lo, hi = window(spec.window_ps)
    d = spec.delays_ps
    for i, (a, b) in enumerate(spec.pairs):
        want = brute_pairs(ts, ch, a, b, d.get(a, 0), d.get(b, 0), lo, hi, t0, iv, n)
        assert [r.counts[i] for r in ref] == want.tolist()
        if spec.accidental_offset_ps:
            off = spec.accidental_offset_ps
            want = brute_pairs(ts, ch, a, b, d.get(a, 0), d.get(b, 0), lo + off, hi + off, t0, iv, n)
            assert [r.accidentals[i] for r in ref] == want.tolist()
    for j, h in enumerate(spec.histograms):
        want = brute_hist(ts, ch, h.a, h.b, d.get(h.a, 0), d.get(h.b, 0), h.lo_ps, h.bin_ps, h.n_bins, t0, iv, n)
        for k, r in enumerate(ref):
            assert r.histograms[j].tolist() == want[k].tolist()


def test_counts_do_not_depend_on_chunking():
    rng = np.random.default_rng(7)
    ts = np.sort(rng.integers(0, 2_000_000, 30_000)).astype(np.int64)
    ch = rng.integers(0, 8, ts.size).astype(np.uint8)
    spec = EngineSpec(tuple((a, b) for a in range(4) for b in range(4, 8)), 800, 50_000,
                      {0: 10, 1: -130, 2: 70, 3: 0, 4: 220, 5: 300, 6: -40, 7: 5}, 100_000,
                      (HistogramSpec("g2", 0, 4, 50, -10_000, 400),))
    results = []
    for nb in (1, 7, 300):
        bounds = np.linspace(0, 2_000_000, nb + 1).astype(np.int64).tolist()
        got = run_engine(spec, make_batches(ts, ch, bounds))
        results.append([(g.t_begin, g.counts.tolist(), g.accidentals.tolist(), g.histograms[0].tolist()) for g in got])
        assert_same(got, reference(spec, make_batches(ts, ch, bounds)))
    assert results[0] == results[1] == results[2]
    assert sum(sum(r[1]) for r in results[0]) > 0


def test_idle_channel_does_not_stall():
    """Channel 1 never fires: intervals are still emitted as the batches' t_end advances."""
    eng = CoincidenceEngine(EngineSpec(((0, 1),), 100, 0, {}, 1000))
    out = []
    t = 0
    for k in range(10):
        ts = np.array([t + 10, t + 500], np.int64)
        out += eng.feed(TagBatch(ts, np.zeros(2, np.uint8), t, t + 1000))
        t += 1000
    assert len(out) >= 9
    assert all(o.counts.tolist() == [0] for o in out)


def test_empty_batches_advance_time_and_emit():
    eng = CoincidenceEngine(EngineSpec(((0, 1),), 100, 0, {0: 50}, 1000))
    assert eng.feed(TagBatch.empty(0, 900)) == []
    out = eng.feed(TagBatch.empty(900, 5000))
    assert [(o.t_begin, o.t_end) for o in out][:3] == [(0, 1000), (1000, 2000), (2000, 3000)]


def test_overflow_interval_flagged_and_counts_kept_separately():
    ts = np.arange(0, 10_000, 100, dtype=np.int64)
    ch = (np.arange(ts.size) % 2).astype(np.uint8)
    spec = EngineSpec(((0, 1),), 300, 0, {}, 2000)
    batches = make_batches(ts, ch, [0, 4000, 4500, 12_000], flags=[0, 1, 0], missed=[0, 17, 0])
    got = run_engine(spec, batches)
    flagged = [g.overflow for g in got]
    assert True in flagged and False in flagged
    assert sum(g.missed_events for g in got) == 17
    assert_same(got, reference(spec, batches))


def test_gap_between_batches_flags_intervals():
    ts = np.arange(0, 10_000, 100, dtype=np.int64)
    ch = (np.arange(ts.size) % 2).astype(np.uint8)
    spec = EngineSpec(((0, 1),), 300, 0, {}, 2000)
    batches = make_batches(ts, ch, [0, 3000]) + make_batches(ts, ch, [5000, 12_000])
    got = run_engine(spec, batches)
    assert [g.overflow for g in got] == [o.overflow for o in reference(spec, batches)]
    assert any(g.overflow for g in got)


def test_time_going_backwards_needs_reset():
    eng = CoincidenceEngine(EngineSpec(((0, 1),), 100, 0, {}, 1000))
    eng.feed(TagBatch.empty(0, 5000))
    with pytest.raises(ValueError, match="backwards"):
        eng.feed(TagBatch.empty(100, 200))
    eng.reset()
    out = eng.feed(TagBatch.empty(100, 2200))
    assert [(o.t_begin, o.t_end) for o in out] == [(100, 1100), (1100, 2100)]  # E = 2200 + 0 - 49


def test_spec_rejects_float_delays_and_same_channel_pairs():
    with pytest.raises(TypeError):
        EngineSpec(((0, 1),), 100, 0, {0: 1.5}, 1000)
    with pytest.raises(ValueError):
        EngineSpec(((1, 1),), 100, 0, {}, 1000)


def test_memory_stays_bounded():
    """The carried tail is about max|delay| + window (+ offset), not the stream."""
    rng = np.random.default_rng(3)
    spec = EngineSpec(((0, 1),), 1000, 100_000, {1: 3000}, 10**9)
    eng = CoincidenceEngine(spec)
    t = 0
    for _ in range(50):
        ts = np.sort(rng.integers(t, t + 10**8, 10_000)).astype(np.int64)
        eng.feed(TagBatch(ts, rng.integers(0, 2, ts.size).astype(np.uint8), t, t + 10**8))
        t += 10**8
        assert eng.buffered_tags < 100  # tail of ~104 ns at 100 tags/us
