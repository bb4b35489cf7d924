"""PicoQuant MultiHarp / HydraHarp: the real driver (ctypes conventions, PTU decoder) against the stand-in of the
vendor library (drivers/sim/vendor/picoquant.py). The real MHLib/HHLib cannot run here."""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np
import pytest

from drivers.base import DeviceError, TagBatch, TagFlags
from drivers.picoquant import (HardwareFault, LibraryNotFound, PicoQuantHarp, fifo_decoder, is_shared_library,
                               load_library)
from drivers.ptu.decoder import RecordType
from drivers.ptu.encoder import RecordEncoder
from drivers.sim.vendor import picoquant as pq

STANDIN = "drivers.sim.vendor.picoquant"


@pytest.fixture(autouse=True)
def bus():
    pq.BUS.reset(auto_default=False)
    yield pq.BUS
    pq.BUS.reset(auto_default=True)


def plug(family: str = "multiharp", index: int = 0, **kw: Any) -> pq.SimHarp:
    kw.setdefault("source", "poisson")
    kw.setdefault("seed", 3)
    dev = pq.BUS.plug(pq.SimHarp(family, **kw), index)
    dev.record_sent = True
    return dev


@pytest.fixture
def make_driver():
    made: list[PicoQuantHarp] = []

    def make(**options: Any) -> PicoQuantHarp:
        opts = {"library": STANDIN, "min_batch_ms": 2.0}
        opts.update(options)
        d = PicoQuantHarp("harp", opts)
        made.append(d)
        d.connect()
        return d

    yield make
    for d in made:
        d.close()


def collect(drv: PicoQuantHarp, seconds: float, timeout: float = 0.05) -> list[TagBatch]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        b = drv.read(timeout)
        if b is None:
            break
        out.append(b)
    return out


def check_stream(batches: list[TagBatch], t0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    assert batches and batches[0].t_begin == t0
    for a, b in zip(batches, batches[1:]):
        assert a.t_end == b.t_begin
    for b in batches:
        b.check_order()
    return np.concatenate([b.timestamps for b in batches]), np.concatenate([b.channels for b in batches])


def assert_exact(dev: pq.SimHarp, ts: np.ndarray, ch: np.ndarray, sync_channel: int = -1) -> None:
    """The driver's tags are exactly what the stand-in put into the FIFO (a prefix of it)."""
    st, sc = dev.sent()
    if sync_channel < 0:
        keep = sc != 255
        st, sc = st[keep], sc[keep]
    else:
        sc = np.where(sc == 255, sync_channel, sc).astype(np.uint8)
    n = ts.shape[0]
    assert n > 0 and st.shape[0] >= n
    np.testing.assert_array_equal(ts, st[:n])
    np.testing.assert_array_equal(ch, sc[:n])


# ------------------------------------------------------------------------------------------------------------
# library loading


def test_shared_library_or_module() -> None:
    assert is_shared_library("libmhlib.so") and is_shared_library("/opt/picoquant/mhlib/libmhlib.so")
    assert is_shared_library("libhhlib.so.3") and is_shared_library("mhlib64.dll")
    assert not is_shared_library(STANDIN)


def test_missing_library_is_a_clear_error_at_connect() -> None:
    drv = PicoQuantHarp("harp", {"library": "/nonexistent/libmhlib.so"})  # constructing loads nothing
    with pytest.raises(LibraryNotFound, match="could not be loaded.*Install MHLib"):
        drv.connect()
    with pytest.raises(LibraryNotFound, match="could not be imported"):
        PicoQuantHarp("harp", {"library": "no_such_vendor.module"}).connect()
    with pytest.raises(LibraryNotFound, match="libhhlib.so"):  # the default name (not installed here)
        PicoQuantHarp("harp", {"family": "hydraharp"}).connect()
    with pytest.raises(LibraryNotFound, match="no load_library"):
        PicoQuantHarp("harp", {"library": "drivers.params"}).connect()
    assert not isinstance(LibraryNotFound("x"), DeviceError)


def test_a_real_shared_library_gets_c_signatures() -> None:
    """The CDLL path: libc loads but is not MHLib, which is reported as such."""
    with pytest.raises(LibraryNotFound, match="not the MHLib library"):
        load_library("libc.so.6", "multiharp")


def test_standin_follows_the_ctypes_conventions(bus) -> None:
    plug()
    lib = pq.load_library("multiharp")
    assert lib.TTREADMAX == 1048576 and pq.load_library("hydraharp").TTREADMAX == 131072
    serial = ctypes.create_string_buffer(16)
    assert lib.MH_OpenDevice(0, serial) == 0 and serial.value == b"10450003"
    assert lib.MH_OpenDevice(0, serial) == -2  # busy
    n = ctypes.c_int()
    assert lib.MH_GetNumOfInputChannels(0, ctypes.byref(n)) == -22  # not initialized
    assert lib.MH_Initialize(0, 2, 0) == 0
    assert lib.MH_GetNumOfInputChannels(0, ctypes.byref(n)) == 0 and n.value == 8
    res = ctypes.c_double()
    assert lib.MH_GetResolution(0, ctypes.pointer(res)) == 0 and res.value == 5.0
    assert lib.MH_SetInputChannelOffset(0, 0, 100000) == -17
    text = ctypes.create_string_buffer(40)
    assert lib.MH_GetErrorString(text, -17) == 0 and text.value == b"MH_ERROR_INVALID_ARGUMENT"
    assert lib.MH_StartMeas(0, 1000) == 0
    time.sleep(0.01)
    buf = np.zeros(lib.TTREADMAX, np.uint32)
    assert lib.MH_ReadFiFo(0, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint)), ctypes.byref(n)) == 0
    assert n.value > 0 and np.any(buf[: n.value] >> 31 == 1)  # overflow records among them
    flags = ctypes.c_int()
    assert lib.MH_GetFlags(0, ctypes.byref(flags)) == 0 and flags.value & pq.FLAG_ACTIVE
    assert lib.MH_StopMeas(0) == 0 and lib.MH_CloseDevice(0) == 0
    assert lib.MH_GetFlags(0, ctypes.byref(flags)) == -10  # not open
    assert lib.MH_OpenDevice(1, serial) == -1  # nothing plugged at index 1


def test_fifo_decoder_is_the_ptu_decoder() -> None:
    enc = RecordEncoder(RecordType.GENERIC_T2)
    units = np.array([5, 40_000_000, 70_000_000], np.int64)
    rec = enc.encode(units, channel=np.array([0, 3, 7]))
    dec = fifo_decoder(RecordType.GENERIC_T2, 5.0, 8)
    t, c, last, ok = dec.decode_tags(rec[:2])
    t2, c2, last2, _ = dec.decode_tags(rec[2:])  # overflow state carried across reads
    np.testing.assert_array_equal(np.concatenate((t, t2)), units * 5)
    np.testing.assert_array_equal(np.concatenate((c, c2)), [0, 3, 7])
    assert last2 == 70_000_000 and ok


# ------------------------------------------------------------------------------------------------------------
# connect and streaming


def test_connect_sequence_and_identity(make_driver) -> None:
    dev = plug(serial="10451234")
    drv = make_driver(input_levels_mv=[-80], input_offsets_ps=[0, 100, 0, 0, 0, 0, 0, 0], disabled_inputs=[7],
                      sync_divider=4)
    calls = list(dev.calls)
    assert calls[:4] == ["OpenDevice", "Initialize", "GetHardwareInfo", "GetSerialNumber"]
    assert "SetSyncEdgeTrg" in calls and calls.count("SetInputEdgeTrg") == 8 and calls[-1] == "GetResolution"
    assert dev.levels[0] == (-80, pq.EDGE_FALLING) and dev.offsets[1] == 100 and dev.enabled[7] is False
    assert dev.sync_div == 4
    d = drv.describe()
    assert d["model"] == "MultiHarp 150 8N" and d["serial"] == "10451234" and d["library_version"] == "3.1"
    assert drv.channel_count == 8 and drv.resolution_ps == 5


def test_serial_mismatch_is_a_device_error(make_driver) -> None:
    plug()
    with pytest.raises(DeviceError, match="serial"):
        make_driver(serial="99999999")
    make_driver()  # the failed connect closed the device again


def test_stream_is_contiguous_sorted_and_exact(make_driver) -> None:
    dev = plug()
    drv = make_driver()
    drv.start_stream()
    batches = collect(drv, 0.3)
    drv.stop_stream()
    ts, ch = check_stream(batches)
    assert batches[-1].t_end > 0.15e12
    assert all(b.flags == TagFlags.NONE for b in batches)
    assert set(np.unique(ch).tolist()) == set(range(8))  # input i is channel i
    assert_exact(dev, ts, ch)
    assert np.all(ts % 5 == 0)  # units of the 5 ps resolution
    assert drv.read(0.01) is None


def test_disabled_inputs_and_sync_channel(make_driver) -> None:
    dev = plug(sync_rate_hz=1000.0)
    drv = make_driver(disabled_inputs=[2, 5], sync_channel=8)
    assert drv.channel_count == 9
    drv.start_stream()
    batches = collect(drv, 0.2)
    drv.stop_stream()
    ts, ch = check_stream(batches)
    present = set(np.unique(ch).tolist())
    assert 2 not in present and 5 not in present and 8 in present
    sync = ts[ch == 8]
    assert np.all(np.diff(sync) == 1_000_000_000)  # the 1 kHz sync as channel 8
    assert_exact(dev, ts, ch, sync_channel=8)


def test_input_offset_moves_tags_and_order_is_kept(make_driver) -> None:
    plain, shifted = plug(index=0), plug(index=1)  # the same seeded source
    results = []
    for dev, index in ((plain, 0), (shifted, 1)):
        drv = make_driver(device_index=index)
        if index:
            drv.set_input_delay(1, 50_000)
            assert dev.offsets[1] == 50_000 and drv.status()["input_delays_ps"][1] == 50_000
        drv.start_stream()
        batches = collect(drv, 0.15)
        drv.stop_stream()
        ts, ch = check_stream(batches)
        assert_exact(dev, ts, ch)
        results.append((ts, ch))
    a = results[0][0][results[0][1] == 1]
    b = results[1][0][results[1][1] == 1]
    n = min(a.shape[0], b.shape[0]) - 5
    assert n > 100
    np.testing.assert_array_equal(b[:n], a[:n] + 50_000)
    c0 = results[0][0][results[0][1] == 0]
    c1 = results[1][0][results[1][1] == 0]
    m = min(c0.shape[0], c1.shape[0])
    np.testing.assert_array_equal(c1[:m], c0[:m])  # other inputs unchanged


def test_hydraharp_family(make_driver) -> None:
    dev = plug("hydraharp")
    drv = make_driver(family="hydraharp", input_levels_mv=[100], sync_level_mv=100)
    assert "Calibrate" in dev.calls and "SetInputCFD" in dev.calls
    assert drv.resolution_ps == 1 and drv.describe()["model"] == "HydraHarp 400"
    drv.start_stream()
    batches = collect(drv, 0.15)
    drv.stop_stream()
    ts, ch = check_stream(batches)
    assert_exact(dev, ts, ch)
    assert PicoQuantHarp.check_options({"family": "hydraharp", "input_levels_mv": [-50], "sync_level_mv": 10})


def test_fifo_full_flags_overflow_and_stops(make_driver) -> None:
    dev = plug()
    drv = make_driver()
    drv.start_stream()
    first = collect(drv, 0.05)
    dev.fill_fifo()
    rest = collect(drv, 0.3)
    batches = first + rest
    check_stream(batches)
    assert batches[-1].flags & TagFlags.OVERFLOW
    assert not any(b.flags & TagFlags.OVERFLOW for b in batches[:-1])
    assert drv.read(0.01) is None  # stopped: FIFOFULL means data were lost
    assert drv.status()["fifo_full"] == 1 and drv.status()["stream_ended_by_fifo_full"]
    drv.start_stream()  # a new measurement continues the timeline
    again = collect(drv, 0.05)
    drv.stop_stream()
    check_stream(again, t0=batches[-1].t_end)


def test_a_small_fifo_overflows_by_itself(make_driver) -> None:
    plug(fifo_records=2000)
    drv = make_driver(poll_interval_s=0.2, min_batch_ms=200.0)  # reads too slowly for the rate
    drv.start_stream()
    batches = collect(drv, 1.0, timeout=0.3)
    assert batches[-1].flags & TagFlags.OVERFLOW and drv.read(0.01) is None


def test_dropped_counts_flag_missed_events(make_driver) -> None:
    dev = plug()
    drv = make_driver()
    drv.start_stream()
    collect(drv, 0.03)
    dev.drop_counts(5)
    batches = collect(drv, 0.1)
    drv.stop_stream()
    assert sum(1 for b in batches if b.flags & TagFlags.MISSED_EVENTS) == 1
    assert not any(b.flags & TagFlags.OVERFLOW for b in batches)


def test_acquisition_time_end_starts_a_new_measurement(make_driver) -> None:
    plug()
    drv = make_driver(acquisition_time_ms=60)
    drv.start_stream()
    batches = collect(drv, 0.3)
    drv.stop_stream()
    ts, _ = check_stream(batches)
    seams = [b for b in batches if b.flags & TagFlags.OVERFLOW]
    assert len(seams) >= 3
    assert batches[-1].t_end > 0.2e12 and np.all(np.diff(ts) >= 0)
    assert drv.status()["measurements"] >= 4


# ------------------------------------------------------------------------------------------------------------
# errors, timeouts, unplug


def test_error_codes_are_device_errors_naming_the_call(make_driver) -> None:
    dev = plug()
    drv = make_driver()
    with pytest.raises(DeviceError) as e:
        drv.set_input_delay(0, 150_000)
    assert e.value.command == "MH_SetInputChannelOffset" and "MH_ERROR_INVALID_ARGUMENT (-17)" in str(e.value)
    with pytest.raises(DeviceError, match="does not exist"):
        drv.set_input_delay(8, 0)
    dev.fail_next("StartMeas", -16)
    with pytest.raises(DeviceError) as e:
        drv.start_stream()
    assert e.value.command == "MH_StartMeas" and "INSTANCE_RUNNING" in str(e.value)
    drv.start_stream()
    dev.extra_flags = pq.FLAG_SYSERROR
    with pytest.raises(HardwareFault, match="MH_GetFlags.*SYSERROR") as e:  # a fault: reconnect, not a refusal
        drv.read(0.05)
    assert not isinstance(e.value, DeviceError)


def test_corrupt_fifo_records_are_a_device_error(make_driver) -> None:
    dev = plug()
    drv = make_driver()
    drv.start_stream()
    collect(drv, 0.02)
    dev.inject_records([0x80000000 | (40 << 25)])  # a special record of an unknown channel
    with pytest.raises(DeviceError) as e:
        collect(drv, 0.2)
    assert e.value.command == "MH_ReadFiFo" and "illegal special record" in str(e.value)


def test_read_returns_within_its_timeout(make_driver) -> None:
    plug(speed=0.001)  # the tagger's clock barely moves: nothing to deliver
    drv = make_driver(min_batch_ms=1000.0)
    drv.start_stream()
    t0 = time.monotonic()
    b = drv.read(0.1)
    assert time.monotonic() - t0 < 0.25
    assert b is not None and b.t_end >= b.t_begin


def test_unplug_then_a_new_driver_works(make_driver) -> None:
    dev = plug()
    drv = make_driver()
    drv.start_stream()
    collect(drv, 0.03)
    dev.unplug()
    with pytest.raises(ConnectionError) as e:
        drv.read(0.05)
    assert not isinstance(e.value, DeviceError) and "MH_ReadFiFo" in str(e.value)
    drv.close()  # must not raise with the device gone
    with pytest.raises(ConnectionError, match="MH_OpenDevice"):
        make_driver()  # still unplugged
    dev.replug()
    fresh = make_driver()
    fresh.start_stream()
    batches = collect(fresh, 0.05)
    fresh.stop_stream()
    check_stream(batches)
    assert sum(len(b) for b in batches) > 0


def test_default_device_reads_the_bench(bus) -> None:
    bus.reset(auto_default=True)
    drv = PicoQuantHarp("harp", {"library": STANDIN, "min_batch_ms": 5.0})
    try:
        drv.connect()
        drv.start_stream()
        batches = collect(drv, 0.2)
        drv.stop_stream()
        ts, ch = check_stream(batches)
        assert ts.shape[0] > 1000 and set(np.unique(ch).tolist()) <= set(range(8))
    finally:
        drv.close()
