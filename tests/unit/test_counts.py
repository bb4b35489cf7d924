"""daemon.analysis.counts.IntervalCounter against a brute-force oracle, whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.analysis.counts import CountsInterval, IntervalCounter
from drivers.base import TagBatch, TagFlags


def make_batches(ts: np.ndarray, ch: np.ndarray, bounds: list[int], overflow: list[bool] | None = None,
                 missed: list[int] | None = None) -> list[TagBatch]:
    """Split a sorted stream at ``bounds`` (t_begin of the first batch, cut points, t_end of the last)."""
    out = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        lo, hi = np.searchsorted(ts, a, side="left"), np.searchsorted(ts, b, side="left")
        flags = TagFlags.OVERFLOW if overflow and overflow[i] else TagFlags.NONE
        m = missed[i] if missed else 0
        out.append(TagBatch(ts[lo:hi].copy(), ch[lo:hi].copy(), a, b, flags, m))
    return out


def feed(counter: IntervalCounter, batches: list[TagBatch]) -> list[CountsInterval]:
    out = []
    for b in batches:
        out.extend(counter.add(b))
    return out


def oracle_counts(ts, ch, channels, t0, interval, t_end) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Complete intervals [t0 + kI, t0 + (k+1)I) up to t_end, and the per-channel counts of each (np.histogram)."""
    n = (t_end - t0) // interval
    edges = t0 + interval * np.arange(n + 2)  # one extra bin so that the last real bin is half-open
    counts = np.zeros((n, channels), np.int64)
    for c in range(channels):
        h, _ = np.histogram(ts[ch == c], bins=edges)
        counts[:, c] = h[:n]
    spans = [(int(edges[k]), int(edges[k + 1])) for k in range(n)]
    return spans, counts


def oracle_overflow(spans, batches) -> list[bool]:
    return [any(b.overflow and b.t_begin < hi and b.t_end > lo for b in batches) for lo, hi in spans]


@st.composite
def streams(draw):
    channels = draw(st.integers(1, 5))
    interval = draw(st.integers(1, 60))
    t0 = draw(st.integers(0, 10**6))
    length = draw(st.integers(1, 500))
    n = draw(st.integers(0, 150))
    ts = np.sort(np.array(draw(st.lists(st.integers(t0, t0 + length - 1), min_size=n, max_size=n)), np.int64))
    ch = np.array(draw(st.lists(st.integers(0, channels - 1), min_size=n, max_size=n)), np.uint8)
    return channels, interval, t0, length, ts, ch


def chunking(draw, t0: int, length: int) -> list[int]:
    cuts = draw(st.sets(st.integers(t0 + 1, t0 + length - 1), max_size=30)) if length > 1 else set()
    return [t0, *sorted(cuts), t0 + length]


@settings(max_examples=50, deadline=None)
@given(stream=streams(), data=st.data())
def test_matches_oracle_for_any_chunking(stream, data):
    channels, interval, t0, length, ts, ch = stream
    spans, counts = oracle_counts(ts, ch, channels, t0, interval, t0 + length)
    results = []
    for _ in range(2):
        bounds = chunking(data.draw, t0, length)
        got = feed(IntervalCounter(channels, interval), make_batches(ts, ch, bounds))
        assert [(g.t_begin, g.t_end) for g in got] == spans
        assert len(got) == len(counts)
        for g, c in zip(got, counts):
            np.testing.assert_array_equal(g.counts, c)
            assert g.counts.dtype == np.int64
            assert not g.overflow and g.missed_events == 0
        results.append(got)
    a, b = results
    assert [(x.t_begin, x.t_end, x.counts.tolist()) for x in a] == [(x.t_begin, x.t_end, x.counts.tolist()) for x in b]


@settings(max_examples=50, deadline=None)
@given(stream=streams(), data=st.data())
def test_overflow_marks_exactly_the_overlapped_intervals(stream, data):
    channels, interval, t0, length, ts, ch = stream
    bounds = chunking(data.draw, t0, length)
    flags = data.draw(st.lists(st.booleans(), min_size=len(bounds) - 1, max_size=len(bounds) - 1))
    batches = make_batches(ts, ch, bounds, overflow=flags)
    spans, counts = oracle_counts(ts, ch, channels, t0, interval, t0 + length)
    got = feed(IntervalCounter(channels, interval), batches)
    assert [(g.t_begin, g.t_end) for g in got] == spans
    assert [g.overflow for g in got] == oracle_overflow(spans, batches)
    for g, c in zip(got, counts):  # counts are still what was seen
        np.testing.assert_array_equal(g.counts, c)


def test_interval_emitted_only_when_t_end_reaches_its_end():
    interval = 100
    c = IntervalCounter(2, interval)
    assert c.add(TagBatch.empty(0, interval - 1)) == []
    (done,) = c.add(TagBatch.empty(interval - 1, interval))
    assert (done.t_begin, done.t_end) == (0, interval)
    got = c.add(TagBatch.empty(interval, 3 * interval + 1))
    assert [(g.t_begin, g.t_end) for g in got] == [(interval, 2 * interval), (2 * interval, 3 * interval)]


def test_intervals_start_at_first_batch():
    t0, interval = 12345, 10
    c = IntervalCounter(1, interval)
    got = c.add(TagBatch.empty(t0, t0 + 2 * interval))
    assert [(g.t_begin, g.t_end) for g in got] == [(t0, t0 + interval), (t0 + interval, t0 + 2 * interval)]


def test_tag_on_interval_boundary_goes_to_the_later_interval():
    interval = 10
    ts = np.array([0, 9, 10, 19, 20], np.int64)
    ch = np.zeros(len(ts), np.uint8)
    got = IntervalCounter(1, interval).add(TagBatch(ts, ch, 0, 30))
    expected = [int(np.sum((ts >= k * interval) & (ts < (k + 1) * interval))) for k in range(3)]
    assert [int(g.counts[0]) for g in got] == expected


def test_gap_inside_one_interval_flags_it():
    interval = 100
    c = IntervalCounter(1, interval)
    ts = np.array([5, 70], np.int64)
    ch = np.zeros(2, np.uint8)
    assert c.add(TagBatch(ts[:1], ch[:1], 0, 20)) == []
    got = c.add(TagBatch(ts[1:], ch[1:], 60, 2 * interval))  # [20, 60) was never seen
    assert [g.overflow for g in got] == [True, False]
    assert int(got[0].counts[0]) == 2


def test_gap_spanning_intervals_flags_every_interval_it_overlaps():
    interval = 10
    c = IntervalCounter(1, interval)
    gap = (5, 35)
    c.add(TagBatch.empty(0, gap[0]))
    got = c.add(TagBatch.empty(gap[1], 45))
    spans = [(g.t_begin, g.t_end) for g in got]
    assert spans == [(k * interval, (k + 1) * interval) for k in range(4)]
    expected = [lo < gap[1] and hi > gap[0] for lo, hi in spans]
    assert [g.overflow for g in got] == expected


def test_missed_events_reported_in_the_interval_where_the_batch_starts():
    interval = 10
    batches = [TagBatch.empty(0, 5), TagBatch(np.empty(0, np.int64), np.empty(0, np.uint8), 5, 25,
                                              TagFlags.MISSED_EVENTS, 7), TagBatch.empty(25, 30)]
    got = feed(IntervalCounter(1, interval), batches)
    assert [g.missed_events for g in got] == [7, 0, 0]
    assert [g.overflow for g in got] == [True, False, False]


def test_channels_beyond_counter_are_ignored_and_rates():
    interval = 10**12  # 1 s
    ts = np.array([1, 2, 3], np.int64)
    ch = np.array([0, 1, 1], np.uint8)
    (g,) = IntervalCounter(2, interval).add(TagBatch(ts, ch, 0, interval))
    assert g.counts.tolist() == [1, 2]
    np.testing.assert_allclose(g.rates_hz, g.counts / ((g.t_end - g.t_begin) * 1e-12))
    (g3,) = IntervalCounter(1, interval).add(TagBatch(ts, ch, 0, interval))
    assert g3.counts.tolist() == [1]


def test_reset_forgets_the_current_interval():
    c = IntervalCounter(1, 10)
    c.add(TagBatch(np.array([1], np.int64), np.zeros(1, np.uint8), 0, 5))
    c.reset()
    (g,) = c.add(TagBatch.empty(1000, 1010))
    assert (g.t_begin, g.t_end) == (1000, 1010)
    assert g.counts.tolist() == [0] and not g.overflow


def test_interval_must_be_positive():
    for bad in (0, -5):
        with pytest.raises(ValueError):
            IntervalCounter(1, bad)
