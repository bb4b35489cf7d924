"""Streaming sifter: the same clusters as the whole-stream oracle, whatever the batch cuts and delays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.qkd.sifting import TaggerMap, coincidence_events
from daemon.qkd.stream import StreamSifter

ALICE = (0, 1, 2, 3)
BOB = (4, 5, 6, 7)


def make_stream(rng: np.random.Generator, pairs: int, span_ps: int, delay_b: int, noise: int):
    """Pairs (Alice click, Bob click delay_b later, with jitter) plus noise tags on every channel, raw times."""
    ta = rng.integers(0, span_ps, pairs)
    ca = rng.integers(0, 4, pairs)
    tb = ta + delay_b + rng.integers(-200, 200, pairs)
    cb = rng.integers(4, 8, pairs)
    tn = rng.integers(0, span_ps, noise)
    cn = rng.integers(0, 10, noise)  # channels 8, 9: not the link's
    t = np.concatenate([ta, tb, tn])
    c = np.concatenate([ca, cb, cn]).astype(np.uint8)
    keep = (t >= 0) & (t < span_ps)
    t, c = t[keep], c[keep]
    order = np.argsort(t, kind="stable")
    return t[order].astype(np.int64), c[order]


def oracle_masks(t, c, delays: dict[int, int], window: int):
    s = t + np.array([delays.get(int(x), 0) for x in c], np.int64)
    order = np.argsort(s, kind="stable")
    ma, mb, _ = coincidence_events(s[order], c[order], TaggerMap(ALICE, BOB, window_ps=window))
    return ma, mb


def stream_masks(t, c, cuts, delays, window, span):
    """Feed batches [cuts[i], cuts[i+1]) and collect the sifter's events (masks captured from its kernel)."""
    import daemon.qkd.stream as S

    sifter = StreamSifter(ALICE, BOB, window, "phi+", delays)
    got_a, got_b = [], []
    real = S.sift_events

    def capture(a, b, bell):
        got_a.append(a.copy())
        got_b.append(b.copy())
        return real(a, b, bell)

    S.sift_events = capture
    try:
        edges = [0, *cuts, span, span + 100_000]  # the last, empty batch closes every cluster
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (t >= lo) & (t < hi)
            sifter.feed(t[m], c[m], lo, hi, delays_ps=delays)
    finally:
        S.sift_events = real
    return np.concatenate(got_a), np.concatenate(got_b), sifter


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), ncuts=st.integers(0, 12), delay_a=st.integers(-30_000, 30_000),
       window=st.integers(200, 3000), per_channel=st.booleans())
def test_stream_equals_whole_stream(seed, ncuts, delay_a, window, per_channel):
    rng = np.random.default_rng(seed)
    span = 2_000_000
    t, c = make_stream(rng, 400, span, delay_b=-delay_a, noise=300)
    delays = {ch: delay_a for ch in ALICE}
    if per_channel:  # calibrated per-detector skews: up to eight delay groups (the general merge)
        delays = {ch: int(delays.get(ch, 0) + rng.integers(-300, 300)) for ch in ALICE + BOB}
    cuts = sorted(set(rng.integers(1, span, ncuts).tolist()))
    ea, eb = oracle_masks(t, c, delays, window)
    ga, gb, sifter = stream_masks(t, c, cuts, delays, window, span)
    assert np.array_equal(ga, ea) and np.array_equal(gb, eb)
    assert sifter.carried == 0 and sifter.counters.coincidences == ea.size


def test_delay_change_and_gap_drop_the_carry():
    sifter = StreamSifter(ALICE, BOB, 1000, "phi+", {})
    t = np.array([900_000], np.int64)  # an Alice tag right before the batch end: carried
    sifter.feed(t, np.array([0], np.uint8), 0, 900_500)
    assert sifter.carried == 1
    sifter.feed(np.empty(0, np.int64), np.empty(0, np.uint8), 900_500, 1_000_000, delays_ps={0: 5})
    assert sifter.carried == 0 and sifter.counters.dropped_carries == 1
    sifter.feed(np.array([1_999_900], np.int64), np.array([0], np.uint8), 1_000_000, 2_000_000, delays_ps={0: 5})
    assert sifter.carried == 1
    sifter.feed(np.empty(0, np.int64), np.empty(0, np.uint8), 3_000_000, 4_000_000, delays_ps={0: 5})  # a gap
    assert sifter.carried == 0 and sifter.counters.dropped_carries == 2


def test_broken_batch_gives_no_events():
    sifter = StreamSifter(ALICE, BOB, 1000, "phi+", {})
    t = np.array([100, 150, 10_000, 10_100], np.int64)
    c = np.array([0, 4, 2, 6], np.uint8)
    r = sifter.feed(t, c, 0, 1_000_000, broken=True)
    assert r.coincidences == 0 and sifter.counters.broken_batches == 1
    r = sifter.feed(t + 1_000_000, c, 1_000_000, 2_000_000)
    assert r.coincidences == 2 and r.sifted == 2  # H-H (Z) and D-D (X) agree for phi+
    assert r.alice_z.tolist() == r.bob_z.tolist() == [0] and r.alice_x.tolist() == r.bob_x.tolist() == [0]


def test_bad_channels_rejected():
    with pytest.raises(ValueError):
        StreamSifter((0, 1, 2, 3), (3, 5, 6, 7), 1000)
