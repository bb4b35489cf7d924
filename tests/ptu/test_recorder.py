"""PtuRecorder: live batches -> PTU -> replay (and ptufile) gives the same tags, span and flags back."""

from __future__ import annotations

import numpy as np
import ptufile
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import TagBatch, TagFlags
from drivers.ptu.decoder import PtuReader, read_ptu
from drivers.ptu.recorder import PtuRecorder
from drivers.ptu.replay import PtuReplayTagger


def replay_all(path, **opts):
    t = PtuReplayTagger("r", {"path": str(path), "speed": 0.0, "batch_ms": 1.0, **opts})
    t.connect()
    t.start_stream()
    out = []
    while (b := t.read(1.0)) is not None:
        out.append(b)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 3000), origin=st.integers(0, 10**15),
       nb=st.integers(1, 12), gap=st.booleans())
def test_round_trip(tmp_path_factory, seed, n, origin, nb, gap):
    rng = np.random.default_rng(seed)
    span = 5 * 10**9
    ts = np.sort(rng.integers(origin, origin + span, n)).astype(np.int64)
    ch = rng.integers(0, 8, n).astype(np.uint8)
    bounds = sorted({origin, origin + span, *rng.integers(origin, origin + span, nb - 1).tolist()})
    flags = rng.random(len(bounds) - 1) < 0.2
    path = tmp_path_factory.mktemp("rec") / "r.ptu"
    skip = 1 if gap and len(bounds) >= 4 else None  # a batch that never arrives (not the last): a gap
    expect_flag = []
    keep = np.ones(n, bool)
    with PtuRecorder(path, channel_count=8) as rec:
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            lo, hi = np.searchsorted(ts, [a, b])
            if i == skip:
                expect_flag.append((a - origin, b - origin))
                keep[lo:hi] = False
                continue
            rec.write(TagBatch(ts[lo:hi], ch[lo:hi], a, b, TagFlags.OVERFLOW if flags[i] else TagFlags.NONE,
                               3 if flags[i] else 0))
            if flags[i]:
                expect_flag.append((a - origin, b - origin))
    summary = rec.summary
    assert summary["tags"] == int(keep.sum())
    assert summary["span_ps"] == span
    batches = replay_all(path)
    got_t = np.concatenate([b.timestamps for b in batches])
    got_c = np.concatenate([b.channels for b in batches])
    np.testing.assert_array_equal(got_t + origin, ts[keep])
    np.testing.assert_array_equal(got_c, ch[keep])
    assert batches[-1].t_end == span
    # every recorded flag interval comes back as flagged batches, and nothing else is flagged
    for b in batches:
        hit = any(fb < max(b.t_end, b.t_begin + 1) and fe > b.t_begin for fb, fe in expect_flag)
        assert b.overflow == hit
    # ptufile reads the same photons
    with ptufile.PtuFile(path) as f:
        rec_ = f.decode_records()
    ph = rec_[rec_["channel"] >= 0]
    np.testing.assert_array_equal(ph["time"].astype(np.int64) + origin, ts[keep])
    np.testing.assert_array_equal(ph["channel"].astype(np.int64), ch[keep])


def test_header_and_summary(tmp_path):
    path = tmp_path / "h.ptu"
    rec = PtuRecorder(path, channel_count=4, comment="run 7")
    rec.write(TagBatch(np.array([1000, 2000], np.int64), np.array([0, 3], np.uint8), 500, 3000, TagFlags.NONE, 0))
    rec.write(TagBatch.empty(3000, 10**12 + 500))
    s = rec.close()
    assert s == rec.close()  # idempotent
    assert s["records"] >= 2 and s["tags"] == 2 and s["span_ps"] == 10**12
    with PtuReader(path) as r:
        h = r.header
        assert h.get("File_Comment") == "run 7"
        assert h.get("qnetd_TimeOrigin_ps") == 500
        assert h.get("qnetd_Span_ps") == 10**12
        assert h.get("MeasDesc_AcquisitionTime") == 1000
        assert h.get("TTResult_NumberOfRecords") == s["records"]
        assert h.get("qnetd_Channels") == 4
    with pytest.raises(ValueError, match="closed"):
        rec.write(TagBatch.empty(10**13, 10**13 + 1))


def test_unclosed_recording_is_readable(tmp_path):
    path = tmp_path / "u.ptu"
    rec = PtuRecorder(path, channel_count=2)
    rec.write(TagBatch(np.arange(0, 10_000, 10, dtype=np.int64), np.zeros(1000, np.uint8), 0, 10_000))
    rec.flush()  # a crash now: the header still says 0 records
    h, d, ps = read_ptu(path)
    assert h.declared_records == 0 and (ps[d.kind == 0] == np.arange(0, 10_000, 10)).all()
    rec.close()


def test_channels_beyond_63_are_refused(tmp_path):
    with pytest.raises(ValueError, match="0..63"):
        PtuRecorder(tmp_path / "x.ptu", channel_count=100)
    rec = PtuRecorder(tmp_path / "y.ptu")
    with pytest.raises(ValueError, match="channel 70"):
        rec.write(TagBatch(np.array([5], np.int64), np.array([70], np.uint8), 0, 10))
    rec.close()


def test_time_going_backwards_is_refused(tmp_path):
    rec = PtuRecorder(tmp_path / "b.ptu")
    rec.write(TagBatch(np.array([5], np.int64), np.array([1], np.uint8), 0, 1000))
    with pytest.raises(ValueError, match="backwards"):
        rec.write(TagBatch(np.array([500], np.int64), np.array([1], np.uint8), 400, 2000))
    rec.close()


def test_flag_slots_overflow_widen_the_last(tmp_path):
    path = tmp_path / "f.ptu"
    with PtuRecorder(path, max_flags=2) as rec:
        for k in range(6):
            rec.write(TagBatch.empty(k * 100, k * 100 + 50, TagFlags.OVERFLOW if k % 2 == 0 else TagFlags.NONE))
            rec.write(TagBatch.empty(k * 100 + 50, k * 100 + 100))
    with PtuReader(path) as r:
        h = r.header
        assert h.get("qnetd_FlagCount") == 2
        assert (h.get("qnetd_FlagBegin_ps")[1], h.get("qnetd_FlagEnd_ps")[1]) == (200, 450)


def test_long_silence_uses_few_overflow_records(tmp_path):
    path = tmp_path / "s.ptu"
    with PtuRecorder(path) as rec:
        rec.write(TagBatch(np.array([0, 3600 * 10**12], np.int64), np.array([0, 1], np.uint8), 0, 3600 * 10**12 + 1))
    # one hour at 33.55 us per wrap and 127 wraps per overflow record: ~845k records, not 1e8
    assert rec.summary["records"] < 900_000
    h, d, ps = read_ptu(path)
    assert ps[d.kind == 0].tolist() == [0, 3600 * 10**12]
