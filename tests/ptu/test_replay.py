"""PtuReplayTagger: batches that keep the TagBatch contract, every tag replayed once, loop, markers, pacing,
recorded overflow flags, and clean errors on corrupt files."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import registry
from drivers.base import TagBatch, TagFlags
from drivers.params import check_value
from drivers.ptu.decoder import KIND_MARKER, KIND_PHOTON, KIND_SYNC, PtuError, RecordType, parse_header, read_ptu
from drivers.ptu.encoder import write_ptu
from drivers.ptu.recorder import PtuRecorder
from drivers.ptu.replay import PtuReplayTagger


def tagger(path, **opts) -> PtuReplayTagger:
    opts = {"path": str(path), "speed": 0.0, **opts}
    for k, f in PtuReplayTagger.options.items():  # as the daemon validates options
        if k in opts:
            opts[k] = check_value(opts[k], f, k)
    t = PtuReplayTagger("replay", opts)
    t.connect()
    return t


def drain(t: PtuReplayTagger, limit: int = 100_000) -> list[TagBatch]:
    t.start_stream()
    out = []
    for _ in range(limit):
        b = t.read(1.0)
        if b is None:
            break
        out.append(b)
    return out


def check_contract(batches: list[TagBatch]) -> None:
    prev = batches[0].t_begin
    for b in batches:
        b.check_order()
        assert b.t_begin == prev
        prev = b.t_end


def test_entry_point_is_registered():
    assert "ptu.replay" in registry.available()
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="qnetd.drivers") if e.name == "ptu.replay"]
    assert ep.load() is PtuReplayTagger


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 400), span=st.integers(1, 10**9), batch_ms=st.sampled_from([0.001, 0.01, 0.3, 5.0]),
       rt=st.sampled_from([RecordType.GENERIC_T2, RecordType.PICOHARP_T2, RecordType.HYDRAHARP_T2]),
       seed=st.integers(0, 2**32 - 1))
def test_t2_replay_reproduces_every_tag(tmp_path_factory, n, span, batch_ms, rt, seed):
    rng = np.random.default_rng(seed)
    res_ps = 4 if rt == RecordType.PICOHARP_T2 else 1
    t = np.sort(rng.integers(0, span, n)) // res_ps
    ch = rng.integers(0, 4, n).astype(np.int16)
    path = tmp_path_factory.mktemp("r") / "t2.ptu"
    write_ptu(path, rt, t, None, ch, global_resolution_s=res_ps * 1e-12, input_channels=5)
    batches = drain(tagger(path, batch_ms=batch_ms))
    check_contract(batches)
    got_t = np.concatenate([b.timestamps for b in batches])
    got_c = np.concatenate([b.channels for b in batches])
    np.testing.assert_array_equal(got_t, t * res_ps)
    np.testing.assert_array_equal(got_c, ch)
    assert batches[-1].t_end == (int(t[-1]) * res_ps + 1 if n else batches[-1].t_end)
    assert not any(b.flags for b in batches)


def test_t3_tags_sorted_across_sync_periods(tmp_path):
    """T3 records come ordered by sync, not by dtime: the replay sorts them and promises only what is final."""
    rng = np.random.default_rng(2)
    n = 20_000
    nsync = np.sort(rng.integers(0, 50_000, n))
    dtime = rng.integers(0, 32767, n)  # up to 32767 * 4 ps = 131 ns > the 12.5 ns period: spills over periods
    ch = rng.integers(0, 4, n).astype(np.int16)
    path = tmp_path / "t3.ptu"
    write_ptu(path, RecordType.GENERIC_T3, nsync, None, ch, dtime, global_resolution_s=12.5e-9, resolution_s=4e-12)
    h, d, ps = read_ptu(path)
    want = np.sort(ps[d.kind == KIND_PHOTON])
    batches = drain(tagger(path, batch_ms=0.002))
    check_contract(batches)
    got = np.concatenate([b.timestamps for b in batches])
    # tags whose dtime spills more than a sync period past a later record are dropped and flagged, never misordered
    dropped = sum(b.missed_events for b in batches)
    assert len(got) + dropped == len(want)
    assert all(bool(b.flags & TagFlags.MISSED_EVENTS) == (b.missed_events > 0) for b in batches)
    assert np.all(np.isin(got, want))


def test_t3_in_order_file_loses_nothing(tmp_path):
    rng = np.random.default_rng(3)
    n = 10_000
    nsync = np.sort(rng.integers(0, 10**6, n))
    dtime = rng.integers(0, 3000, n)  # 3000 * 4 ps = 12 ns < 12.5 ns period
    path = tmp_path / "t3.ptu"
    write_ptu(path, RecordType.PICOHARP_T3, nsync, None, rng.integers(0, 4, n).astype(np.int16), dtime,
              global_resolution_s=12.5e-9, resolution_s=4e-12)
    h, d, ps = read_ptu(path)
    batches = drain(tagger(path, batch_ms=0.05))
    check_contract(batches)
    got = np.concatenate([b.timestamps for b in batches])
    np.testing.assert_array_equal(got, np.sort(ps[d.kind == KIND_PHOTON]))
    assert sum(b.missed_events for b in batches) == 0


def test_loop_keeps_time_monotonic(tmp_path):
    t = np.array([10, 500, 900], np.int64)
    path = tmp_path / "l.ptu"
    write_ptu(path, RecordType.GENERIC_T2, t, None, np.array([0, 1, 2], np.int16), global_resolution_s=1e-12)
    tg = tagger(path, batch_ms=0.001, loop=True)
    tg.start_stream()
    batches = [tg.read(1.0) for _ in range(40)]
    check_contract(batches)
    got = np.concatenate([b.timestamps for b in batches])
    span = 901
    assert got[:9].tolist() == [10, 500, 900, 10 + span, 500 + span, 900 + span, 10 + 2 * span, 500 + 2 * span,
                                900 + 2 * span]
    assert tg.status()["loops"] >= 3


def test_markers_and_sync_as_channels(tmp_path):
    t = np.array([100, 200, 300, 400], np.int64)
    kind = np.array([KIND_PHOTON, KIND_SYNC, KIND_MARKER, KIND_PHOTON], np.uint8)
    ch = np.array([1, 0, 0b0101, 2], np.int16)
    path = tmp_path / "m.ptu"
    write_ptu(path, RecordType.HYDRAHARP2_T2, t, kind, ch, global_resolution_s=1e-12, input_channels=5)
    plain = drain(tagger(path))
    assert np.concatenate([b.channels for b in plain]).tolist() == [1, 2]
    rich = drain(tagger(path, sync_channel=8, marker_channel=10))
    ts = np.concatenate([b.timestamps for b in rich]).tolist()
    cs = np.concatenate([b.channels for b in rich]).tolist()
    assert list(zip(ts, cs)) == [(100, 1), (200, 8), (300, 10), (300, 12), (400, 2)]
    tg = tagger(path, sync_channel=8, marker_channel=10)
    assert tg.channel_count >= 14


def test_end_of_file_stops_the_stream(tmp_path):
    path = tmp_path / "e.ptu"
    write_ptu(path, RecordType.GENERIC_T2, np.array([5], np.int64), global_resolution_s=1e-12)
    tg = tagger(path, batch_ms=1.0)
    tg.start_stream()
    b = tg.read(1.0)
    assert (b.t_begin, b.t_end, len(b)) == (0, 6, 1)
    assert tg.read(1.0) is None
    assert tg.status()["finished"] and not tg.status()["streaming"]


def test_paced_replay_follows_the_wall_clock(tmp_path):
    span_ps = 200 * 10**9  # 200 ms of file time
    t = np.linspace(0, span_ps - 1, 1000).astype(np.int64)
    path = tmp_path / "p.ptu"
    write_ptu(path, RecordType.GENERIC_T2, t, global_resolution_s=1e-12)
    tg = tagger(path, speed=2.0, batch_ms=10.0)  # 100 ms of wall clock
    tg.start_stream()
    t0 = time.monotonic()
    batches = []
    while (b := tg.read(0.5)) is not None:
        batches.append(b)
    elapsed = time.monotonic() - t0
    check_contract([b for b in batches if b.t_end > b.t_begin] or batches)
    assert sum(len(b) for b in batches) == 1000
    assert 0.08 <= elapsed <= 1.0


def test_stop_pauses_the_file_clock(tmp_path):
    t = np.arange(0, 10**9, 10**6, dtype=np.int64)
    path = tmp_path / "s.ptu"
    write_ptu(path, RecordType.GENERIC_T2, t, global_resolution_s=1e-12)
    tg = tagger(path, speed=0.0, batch_ms=0.1)
    tg.start_stream()
    first = tg.read(1.0)
    tg.stop_stream()
    assert tg.read(1.0) is None
    tg.start_stream()
    second = tg.read(1.0)
    assert second.t_begin == first.t_end


def test_recorded_overflow_flags_come_back(tmp_path):
    rng = np.random.default_rng(4)
    ts = np.sort(rng.integers(10**9, 2 * 10**9, 5000)).astype(np.int64)
    ch = rng.integers(0, 4, ts.size).astype(np.uint8)
    bounds = [10**9, 13 * 10**8, 14 * 10**8, 2 * 10**9]
    path = tmp_path / "f.ptu"
    with PtuRecorder(path, channel_count=4) as rec:
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            lo, hi = np.searchsorted(ts, [a, b])
            rec.write(TagBatch(ts[lo:hi], ch[lo:hi], a, b, TagFlags.OVERFLOW if i == 1 else TagFlags.NONE))
    batches = drain(tagger(path, batch_ms=0.05))
    check_contract(batches)
    flagged = [(b.t_begin, b.t_end) for b in batches if b.overflow]
    assert flagged and all(b < 4 * 10**8 and e > 3 * 10**8 for b, e in flagged)
    assert all(b.overflow for b in batches if b.t_begin < 4 * 10**8 and b.t_end > 3 * 10**8)


def test_input_delay(tmp_path):
    t = np.array([100, 200, 300], np.int64)
    path = tmp_path / "d.ptu"
    write_ptu(path, RecordType.GENERIC_T2, t, None, np.array([0, 1, 0], np.int16), global_resolution_s=1e-12)
    tg = tagger(path)
    tg.set_input_delay(1, 150)
    b = drain(tg)
    assert list(zip(np.concatenate([x.timestamps for x in b]).tolist(),
                    np.concatenate([x.channels for x in b]).tolist())) == [(100, 0), (300, 0), (350, 1)]


def test_corrupt_file_fails_connect_with_offset(tmp_path):
    path = tmp_path / "bad.ptu"
    write_ptu(path, RecordType.GENERIC_T2, np.arange(100, dtype=np.int64), global_resolution_s=1e-12)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(PtuError, match="byte offset"):
        tagger(path)


def test_corrupt_record_fails_read_not_the_process(tmp_path):
    path = tmp_path / "bad.ptu"
    n = 5000
    write_ptu(path, RecordType.GENERIC_T2, np.arange(n, dtype=np.int64) * 1000, global_resolution_s=1e-12,
              input_channels=4)
    data = bytearray(path.read_bytes())
    off = parse_header(bytes(data)).data_offset + 4 * 4000
    data[off:off + 4] = struct.pack("<I", 0x8000_0000 | (30 << 25))
    path.write_bytes(bytes(data))
    tg = tagger(path, batch_ms=0.001, chunk_records=1024)
    tg.start_stream()
    with pytest.raises(PtuError) as ei:
        for _ in range(10_000):
            tg.read(1.0)
    assert ei.value.offset == off


def test_missing_file_is_a_connect_error(tmp_path):
    with pytest.raises(OSError):
        tagger(tmp_path / "nope.ptu")
