"""drivers.sim.tagstream (BlockStream, PoissonPairSource) and drivers.sim.tagger.SimTimeTagger at speed 0."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DeviceError, TagBatch, TagFlags
from drivers.params import REQUIRED
from drivers.sim.tagger import PS_PER_S, SimTimeTagger
from drivers.sim.tagstream import BlockStream, PoissonPairSource, block_rng

# A dense, small-block source: many blocks, delays longer than a block, jitter, a coarse resolution.
DENSE = dict(
    channel_count=4,
    singles_hz=[2e9, 1e9, 0.0, 3e9],
    pair_rate_hz=5e9,
    pair_channels=[[0, 2], [1, 3]],
    jitter_ps=40.0,
    delays_ps=[0, 25_000, 300, 7],
    resolution_ps=3,
    seed=11,
    block_ps=10_000,
)
DENSE_T = 200_000  # 20 blocks


def dense(**kw) -> PoissonPairSource:
    return PoissonPairSource(**{**DENSE, **kw})


def take_all(source, cuts: list[int], t_end: int) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Read [0, t_end) from a fresh BlockStream in ranges ending at ``cuts`` then ``t_end``.

    Returns the concatenated timestamps and channels, and per range (timestamps, begin, end, overflow, dropped).
    """
    stream = BlockStream(source)
    parts_t, parts_c, pieces = [], [], []
    begin = 0
    for t in [*cuts, t_end]:
        ts, ch, overflow, dropped = stream.take(t)
        pieces.append((ts, begin, t, overflow, dropped))
        parts_t.append(ts)
        parts_c.append(ch)
        begin = t
    return np.concatenate(parts_t), np.concatenate(parts_c), pieces


# -- BlockStream determinism -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(0, DENSE_T), max_size=25).map(sorted))
def test_any_chunking_gives_the_same_stream(cuts):
    ref_t, ref_c, _ = take_all(dense(), [], DENSE_T)
    ts, ch, pieces = take_all(dense(), cuts, DENSE_T)
    np.testing.assert_array_equal(ts, ref_t)
    np.testing.assert_array_equal(ch, ref_c)
    for piece, begin, end, overflow, dropped in pieces:
        if len(piece):
            assert piece[0] >= begin and piece[-1] < end
        assert not overflow and dropped == 0  # no max_rate_hz: nothing dropped


def test_reference_stream_is_sorted_typed_and_in_range():
    ts, ch, _ = take_all(dense(), [], DENSE_T)
    assert ts.dtype == np.int64 and ch.dtype == np.uint8
    assert len(ts) > 1000  # the test means something
    assert np.all(np.diff(ts) >= 0)
    assert ts[0] >= 0 and ts[-1] < DENSE_T
    assert np.all(ts % DENSE["resolution_ps"] == 0)
    assert set(np.unique(ch).tolist()) <= set(range(DENSE["channel_count"]))
    # the channel with no background and no pair role has no tags; the others have some
    used = {c for p in DENSE["pair_channels"] for c in p} | {c for c, r in enumerate(DENSE["singles_hz"]) if r}
    assert set(np.unique(ch).tolist()) == used


def test_long_delays_cross_blocks_without_loss():
    # a tag delayed past the end of later blocks must still come out, in order
    delay = DENSE["delays_ps"][1]
    assert delay > 2 * DENSE["block_ps"]
    ts, ch, _ = take_all(dense(), list(range(0, DENSE_T, 3_333)), DENSE_T)
    ch1 = ts[ch == 1]
    assert len(ch1) and ch1.min() >= delay - dense().lead_ps


def test_same_seed_same_stream_different_seed_different_stream():
    a = take_all(dense(seed=5), [], DENSE_T)
    b = take_all(dense(seed=5), [12_345, 50_000], DENSE_T)
    c = take_all(dense(seed=6), [], DENSE_T)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(a[0]) != len(c[0]) or not np.array_equal(a[0], c[0])


def test_block_rng_is_per_seed_and_block():
    x = block_rng(1, 3).integers(0, 2**62, 4)
    assert np.array_equal(x, block_rng(1, 3).integers(0, 2**62, 4))
    assert not np.array_equal(x, block_rng(1, 4).integers(0, 2**62, 4))
    assert not np.array_equal(x, block_rng(2, 3).integers(0, 2**62, 4))


def test_take_backwards_refused_and_empty_take():
    s = BlockStream(dense())
    s.take(50_000)
    ts, ch, _, _ = s.take(50_000)
    assert len(ts) == 0 and len(ch) == 0
    with pytest.raises(ValueError, match="backwards"):
        s.take(49_999)


def test_skip_to_then_read_matches_fresh_stream_after_skip_point():
    # after skip_to(t) the stream is the reference stream from t on, except for tags of skipped blocks
    src = dense(delays_ps=[0, 0, 0, 0])  # no delays: only jitter moves tags across block edges
    ref_t, ref_c, _ = take_all(src, [], DENSE_T)
    t = 10 * DENSE["block_ps"] + 5 * src.lead_ps
    s = BlockStream(dense(delays_ps=[0, 0, 0, 0]))
    s.skip_to(t)
    ts, ch, _, _ = s.take(DENSE_T)
    assert len(ts) and ts[0] >= t
    keep = ref_t >= t
    np.testing.assert_array_equal(ts, ref_t[keep])
    np.testing.assert_array_equal(ch, ref_c[keep])


def test_negative_delay_refused():
    with pytest.raises(ValueError):
        dense(delays_ps=[0, -1, 0, 0])


# -- statistics ------------------------------------------------------------------------------------------


def test_mean_rates_match_config_within_poisson_error():
    background_hz, pair_rate_hz = 5_000.0, 50_000.0
    pairs = [[0, 4], [1, 5], [2, 6], [3, 7], [0, 5]]  # channel 0 and 5 take part in two pairs
    n_ch = 8
    src = PoissonPairSource(channel_count=n_ch, singles_hz=[background_hz] * n_ch, pair_rate_hz=pair_rate_hz,
                            pair_channels=pairs, jitter_ps=30.0, delays_ps=[0] * n_ch, resolution_ps=1, seed=3)
    seconds = 1.0
    t_end = int(seconds * PS_PER_S)
    ts, ch, _ = take_all(src, [t_end // 3], t_end)
    counts = np.bincount(ch, minlength=n_ch)
    for c in range(n_ch):
        roles = sum(p.count(c) for p in pairs)
        expected = (background_hz + pair_rate_hz * roles / len(pairs)) * seconds
        sigma = math.sqrt(expected)
        assert abs(counts[c] - expected) < 5 * sigma, (c, counts[c], expected, sigma)
    # total pairs: every pair gives two tags; background is known per channel
    expected_total = (n_ch * background_hz + 2 * pair_rate_hz) * seconds
    # background and pairs are independent Poisson counts; pair tags come two at a time
    sigma_total = math.sqrt(n_ch * background_hz * seconds + 4 * pair_rate_hz * seconds)
    assert abs(len(ts) - expected_total) < 5 * sigma_total


def test_pair_time_differences_have_sqrt2_jitter():
    jitter, delay, rate = 50.0, 1_000, 20_000.0
    src = PoissonPairSource(channel_count=2, singles_hz=[0.0, 0.0], pair_rate_hz=rate, pair_channels=[[0, 1]],
                            jitter_ps=jitter, delays_ps=[0, delay], resolution_ps=1, seed=9)
    seconds = 1.0
    ts, ch, _ = take_all(src, [], int(seconds * PS_PER_S))
    a, b = ts[ch == 0], ts[ch == 1]
    # pairs are ~1/rate apart, far more than the jitter: the i-th tags of both channels belong together
    n = min(len(a), len(b))
    assert abs(len(a) - len(b)) <= 1
    assert abs(n - rate * seconds) < 5 * math.sqrt(rate * seconds)
    d = (b[:n] - a[:n]).astype(float)
    # rounding each side to whole ps adds 1/12 ps^2 of variance per side
    expected_std = math.sqrt(2 * (jitter**2 + 1 / 12))
    std = d.std(ddof=1)
    se_std = expected_std / math.sqrt(2 * (n - 1))
    assert abs(std - expected_std) < 5 * se_std, (std, expected_std, se_std)
    assert abs(d.mean() - delay) < 5 * expected_std / math.sqrt(n)
    # jitter is clipped at 8 sigma per side
    clip = 2 * math.ceil(8 * jitter)
    assert np.all(np.abs(d - delay) <= clip)


def test_zero_jitter_pairs_coincide():
    src = PoissonPairSource(channel_count=2, singles_hz=[0.0, 0.0], pair_rate_hz=1e6, pair_channels=[[0, 1]],
                            jitter_ps=0.0, delays_ps=[0, 0], resolution_ps=1, seed=1)
    ts, ch, _ = take_all(src, [], 10**9)
    assert len(ts) % 2 == 0 and len(ts)
    assert np.array_equal(ts[ch == 0], ts[ch == 1])


# -- SimTimeTagger at speed 0 ----------------------------------------------------------------------------


def tagger_options(**kw) -> dict:
    opts = {k: f.default for k, f in SimTimeTagger.options.items()}
    assert REQUIRED not in opts.values()
    opts.update(speed=0.0, batch_ms=0.5, seed=4)
    opts.update(kw)
    return opts


def started_tagger(**kw) -> SimTimeTagger:
    t = SimTimeTagger("tagger", tagger_options(**kw))
    t.connect()
    t.start_stream()
    return t


def read_n(t: SimTimeTagger, n: int) -> list[TagBatch]:
    return [t.read(0.1) for _ in range(n)]


def test_speed0_batches_are_contiguous_and_deterministic():
    opts = tagger_options()
    t = started_tagger()
    batches = read_n(t, 40)
    batch_ps = int(opts["batch_ms"] * 1e9)
    assert batches[0].t_begin == 0
    for b in batches:
        assert isinstance(b, TagBatch)
        assert b.t_end - b.t_begin == batch_ps
        b.check_order()
        assert b.flags == TagFlags.NONE and b.missed_events == 0
    for prev, nxt in zip(batches, batches[1:]):
        assert prev.t_end == nxt.t_begin
    # the same tags as the source read in one go
    n = opts["channels"]
    src = PoissonPairSource(channel_count=n, singles_hz=[opts["background_hz"]] * n, pair_rate_hz=opts["pair_rate_hz"],
                            pair_channels=opts["pair_channels"], jitter_ps=opts["jitter_ps"],
                            delays_ps=[0] * n, resolution_ps=opts["resolution_ps"], seed=opts["seed"])
    ref_t, ref_c, _ = take_all(src, [], batches[-1].t_end)
    np.testing.assert_array_equal(np.concatenate([b.timestamps for b in batches]), ref_t)
    np.testing.assert_array_equal(np.concatenate([b.channels for b in batches]), ref_c)
    assert len(ref_t) > 0
    st = t.status()
    assert st["time_ps"] == batches[-1].t_end
    assert st["batches"] == len(batches)
    assert st["tags"] == len(ref_t)


def test_speed0_batch_size_does_not_change_the_stream():
    a = started_tagger(batch_ms=0.5)
    b = started_tagger(batch_ms=2.0)
    ba, bb = read_n(a, 40), read_n(b, 10)
    assert ba[-1].t_end == bb[-1].t_end
    np.testing.assert_array_equal(np.concatenate([x.timestamps for x in ba]),
                                  np.concatenate([x.timestamps for x in bb]))


def limited_tagger_options() -> dict:
    # a few batches per source block, ~28 tags per block against a budget of 10
    opts = tagger_options(background_hz=100.0, pair_rate_hz=1000.0, max_rate_hz=1000.0)
    block_ps = inspect.signature(PoissonPairSource).parameters["block_ps"].default
    opts["batch_ms"] = block_ps / 1e9 / 4  # a quarter of a source block
    return opts


def test_max_rate_drops_tags_and_flags_overflow():
    opts = limited_tagger_options()
    t = started_tagger(**{k: opts[k] for k in ("background_hz", "pair_rate_hz", "batch_ms", "max_rate_hz")})
    B = t.source.block_ps
    n_blocks = 3
    per_block = B // int(opts["batch_ms"] * 1e9)
    assert per_block >= 2
    batches = read_n(t, per_block * n_blocks)
    assert batches[-1].t_end == n_blocks * B
    blocks = [t.source.block(k) for k in range(n_blocks)]
    drops = [int(b[2]) for b in blocks]
    allowed = int(opts["max_rate_hz"] * B / PS_PER_S)
    for k, (ts, ch, dropped) in enumerate(blocks):
        assert dropped > 0  # the config overflows every block
        assert len(ts) == allowed
    # the tags kept are the source's, whatever the batch size
    ref = np.sort(np.concatenate([b[0] for b in blocks]), kind="stable")
    got = np.concatenate([b.timestamps for b in batches])
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_array_equal(got[got < n_blocks * B], ref[ref < n_blocks * B])
    # every batch inside a block that dropped tags is flagged; drops are reported in the block's first batch
    for b in batches:
        b.check_order()
        assert b.overflow and b.flags & TagFlags.OVERFLOW
    assert batches[0].missed_events == drops[0]
    assert all(b.missed_events == 0 for b in batches[1:per_block])
    assert t.status()["dropped"] == sum(b.missed_events for b in batches)


def test_no_max_rate_no_overflow():
    t = started_tagger()
    for b in read_n(t, 20):
        assert not b.overflow and b.missed_events == 0
    assert t.status()["dropped"] == 0


def test_max_rate_missed_events_add_up_to_all_dropped_tags():
    opts = limited_tagger_options()
    t = started_tagger(**{k: opts[k] for k in ("background_hz", "pair_rate_hz", "batch_ms", "max_rate_hz")})
    B = t.source.block_ps
    n_blocks = 3
    batches = read_n(t, n_blocks * (B // int(opts["batch_ms"] * 1e9)))
    assert batches[-1].t_end == n_blocks * B
    drops = sum(int(t.source.block(k)[2]) for k in range(n_blocks))
    assert sum(b.missed_events for b in batches) == drops


# -- BlockStream overflow reporting ----------------------------------------------------------------------


def overflowing_dense() -> PoissonPairSource:
    """DENSE with a sustained maximum at the median block size: about half the blocks drop tags."""
    sizes = [len(dense().block(k)[0]) for k in range(DENSE_T // DENSE["block_ps"])]
    seconds = DENSE["block_ps"] / PS_PER_S
    return dense(max_rate_hz=(float(np.median(sizes)) + 0.5) / seconds)


def block_drops(src: PoissonPairSource, t_end: int) -> list[int]:
    return [int(src.block(k)[2]) for k in range(-(-t_end // src.block_ps))]


def test_overflowing_source_drops_in_some_blocks_only():
    src = overflowing_dense()
    drops = block_drops(src, DENSE_T)
    assert any(d > 0 for d in drops) and any(d == 0 for d in drops)
    allowed = int(src.max_rate_hz * src.block_ps / PS_PER_S)
    for k in range(len(drops)):
        ts, ch, dropped = src.block(k)
        assert len(ts) <= allowed
        assert (dropped > 0) == (len(ts) == allowed and len(dense().block(k)[0]) > allowed)
        assert dropped == len(dense().block(k)[0]) - len(ts)


@settings(max_examples=50, deadline=None)
@given(cuts=st.sets(st.integers(1, DENSE_T - 1), max_size=25).map(sorted))
def test_overflow_flags_exactly_the_ranges_overlapping_dropping_blocks(cuts):
    src = overflowing_dense()
    B = src.block_ps
    drops = block_drops(src, DENSE_T)
    ref_t, ref_c, single = take_all(overflowing_dense(), [], DENSE_T)
    ts, ch, pieces = take_all(src, cuts, DENSE_T)
    np.testing.assert_array_equal(ts, ref_t)  # dropping does not break chunk independence of the tags
    np.testing.assert_array_equal(ch, ref_c)
    for _, begin, end, overflow, _ in pieces:
        expected = any(d > 0 and k * B < end and (k + 1) * B > begin for k, d in enumerate(drops))
        assert overflow == expected, (begin, end)
    # read in one range, every drop is reported once
    ((_, _, _, overflow, dropped),) = single
    assert overflow and dropped == sum(drops)


def test_dropped_total_does_not_depend_on_chunking():
    B = DENSE["block_ps"]
    expected = sum(block_drops(overflowing_dense(), DENSE_T))
    for cuts in (list(range(B, DENSE_T, B)), list(range(3_000, DENSE_T, 3_000))):
        _, _, pieces = take_all(overflowing_dense(), cuts, DENSE_T)
        assert sum(p[4] for p in pieces) == expected, cuts


def test_read_before_start_and_after_stop():
    t = SimTimeTagger("tagger", tagger_options())
    t.connect()
    assert t.read(0.01) is None
    t.start_stream()
    assert t.read(0.01) is not None
    t.stop_stream()
    assert t.read(0.01) is None


def test_not_connected():
    t = SimTimeTagger("tagger", tagger_options())
    with pytest.raises(ConnectionError):
        t.start_stream()
    with pytest.raises(ConnectionError):
        t.status()


def test_set_input_delay():
    t = started_tagger()
    n = t.channel_count
    with pytest.raises(DeviceError):
        t.set_input_delay(n, 0)
    with pytest.raises(DeviceError):
        t.set_input_delay(0, -1)
    t.set_input_delay(2, 1234)
    assert t.status()["input_delays_ps"] == [1234 if i == 2 else 0 for i in range(n)]
    # later reads stay sorted and contiguous
    batches = read_n(t, 5)
    for b in batches:
        b.check_order()


def test_fail_connect_option():
    t = SimTimeTagger("tagger", tagger_options(fail_connect=True))
    with pytest.raises(ConnectionRefusedError):
        t.connect()
