"""The real Swabian Time Tagger driver against the stand-in of the vendor API (drivers/sim/vendor/swabian.py).

The stand-in reads a block source (PoissonPairSource, or the optical bench), so the expected tags are known
exactly: a second, identical source read through a plain BlockStream gives the reference.
"""

from __future__ import annotations

import contextlib
import sys
import time
import tomllib
from types import SimpleNamespace

import numpy as np
import pytest

import drivers.swabian as swabian_module
from drivers.base import DeviceError, TagFlags, TimeTagger, exposed_methods
from drivers.registry import load
from drivers.sim.bench.config import default_config
from drivers.sim.bench.model import BenchModel
from drivers.sim.tagstream import PoissonPairSource
from drivers.sim.vendor import swabian as standin
from drivers.swabian import SwabianTimeTagger
from tests.hil.taggers import assert_contiguous, canonical, joined, pair_source, read_n, source_tags, toml_blocks

API = "drivers.sim.vendor.swabian"
MS = 1_000_000_000  # ps
STEP = 10 * MS


def source(seed: int = 7, **kw) -> PoissonPairSource:
    return pair_source(seed, **kw)


def reference(until_ps: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    return source_tags(source(**kw), until_ps)


@pytest.fixture(autouse=True)
def clean_bus():
    standin.unplug_all()
    yield
    standin.unplug_all()


def hardware(src=None, **kw) -> standin.SwabianHardware:
    kw.setdefault("step_ps", STEP)
    return standin.plug(standin.SwabianHardware(src if src is not None else source(), serial="1910000ABC", **kw))


def driver(**options) -> SwabianTimeTagger:
    opts = {"api_module": API, "serial": "1910000ABC", "read_interval_ms": 0.0}
    opts.update(options)
    return SwabianTimeTagger("tagger", opts)


@pytest.fixture
def hw():
    return hardware()


@pytest.fixture
def drv(hw):
    d = driver()
    d.connect()
    yield d
    d.close()



# --------------------------------------------------------------------------------------------------------


def test_registered_and_documented_as_tested_against_a_stand_in():
    assert load("swabian.timetagger") is SwabianTimeTagger
    assert issubclass(SwabianTimeTagger, TimeTagger)
    assert "stand-in" in swabian_module.__doc__ and "not the vendor library" in swabian_module.__doc__
    spec = exposed_methods(SwabianTimeTagger)["set_input_delay"]
    assert {p.name: p.field.limit for p in spec.params}["picoseconds"] == "input_delay_ps"


def test_vendor_library_is_imported_lazily_and_a_missing_one_is_a_clear_error_at_connect():
    assert "Swabian" not in sys.modules and "TimeTagger" not in sys.modules  # importing the driver did not
    d = SwabianTimeTagger("tagger", {})  # constructing does not import either
    with pytest.raises(ImportError) as e:
        d.connect()
    assert not isinstance(e.value, DeviceError)
    msg = str(e.value)
    assert "Swabian.TimeTagger" in msg and "TimeTagger:" in msg  # the default and its fallback were both tried
    assert "pip install Swabian-TimeTagger" in msg
    with pytest.raises(ImportError, match="no_such_vendor_module"):
        SwabianTimeTagger("tagger", {"api_module": "no_such_vendor_module"}).connect()


def test_connect_identifies_and_applies_settings_in_integer_ps(hw):
    d = driver(channels=[3, 1, -2], trigger_level_v=[0.1, 0.2, 0.3], dead_time_ps=4000, input_delays_ps=[0, 700, -50])
    d.connect()
    try:
        assert d.describe() == {"vendor": "Swabian Instruments", "model": "Time Tagger Ultra", "serial": "1910000ABC",
                                "api_module": API, "api_version": standin.getVersion()}
        assert d.channel_count == 3 and d.resolution_ps == 1
        assert hw.trigger_levels_v == {3: 0.1, 1: 0.2, 2: 0.3}
        assert hw.deadtimes_ps == {3: 4000, 1: 4000, -2: 4000}
        assert hw.input_delays_ps == {3: 0, 1: 700, -2: -50}
        assert all(isinstance(args[1], int) for name, args in hw.calls if name in ("setDeadtime", "setInputDelay"))
        assert ("sync", ()) in hw.calls
        st = d.status()
        assert st["inputs"] == [3, 1, -2] and st["input_delays_ps"] == [0, 700, -50] and st["streaming"] is False
    finally:
        d.close()


def test_default_channels_are_every_rising_edge_input(hw, drv):
    assert drv.channel_count == 4 and drv.status()["inputs"] == [1, 2, 3, 4]


def test_no_tagger_or_a_missing_input_fails_connect():
    with pytest.raises(RuntimeError, match="No Time Tagger"):
        driver().connect()  # empty bus: the library's RuntimeError, not a DeviceError
    hardware()
    d = driver(channels=[1, 9])
    with pytest.raises(DeviceError, match="getChannelList"):
        d.connect()
    d.close()


def test_batches_are_sorted_contiguous_and_exactly_the_tags_with_channels_mapped_in_order(hw):
    d = driver(channels=[3, 1, 4, 2])  # TagBatch channel 0 is input 3, ...
    d.connect()
    d.start_stream()
    batches = read_n(d, 8)
    d.close()
    assert_contiguous(batches)
    assert batches[0].t_begin == 0 and batches[-1].t_end == 8 * STEP  # tGetData of each read
    assert all(b.flags == TagFlags.NONE for b in batches)
    ts, ch = joined(batches)
    assert ts.dtype == np.int64 and ch.dtype == np.uint8 and np.all(np.diff(ts) >= 0)
    ref_ts, ref_ch = reference(8 * STEP)
    input_to_index = {3: 0, 1: 1, 4: 2, 2: 3}
    mapped = np.array([input_to_index[c + 1] for c in range(4)], np.uint8)[ref_ch]
    got, want = canonical(ts, ch), canonical(ref_ts, mapped)
    assert len(ts) > 10_000
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_the_tags_of_the_optical_bench_look_physical():
    model = BenchModel(default_config())
    model.warm_up()
    hardware(model, channels=8)
    d = driver()
    d.connect()
    d.start_stream()
    batches = read_n(d, 30)  # 300 ms of tagger time
    d.close()
    assert_contiguous(batches)
    _, ch = joined(batches)
    span_s = (batches[-1].t_end - batches[0].t_begin) / 1e12
    rates = np.bincount(ch, minlength=8) / span_s
    expected = np.array(model.expected_rates()["singles_measured_hz"])
    np.testing.assert_allclose(rates, expected, rtol=0.1)


@pytest.mark.parametrize("delay_ps", [5_000, -3_000])
def test_input_delay_moves_one_channel_exactly(delay_ps):
    hardware(source(singles=0.0, pairs=50_000.0, jitter=0.0, pair_channels=((0, 1),)))
    d = driver(channels=[1, 2])
    d.connect()
    d.set_input_delay(1, delay_ps)  # before the stream: every tag of input 2 is delayed
    assert d.status()["input_delays_ps"] == [0, delay_ps]
    d.start_stream()
    ts, ch = joined(read_n(d, 5))
    d.close()
    a, b = ts[ch == 0], ts[ch == 1]
    n = min(len(a), len(b))
    assert n > 1000
    assert np.all(b[:n] - a[:n] == delay_ps)


def test_input_delay_errors_are_device_errors_naming_the_call(hw, drv):
    with pytest.raises(DeviceError, match="set_input_delay"):
        drv.set_input_delay(4, 10)
    with pytest.raises(DeviceError, match="setInputDelay"):
        drv.set_input_delay(0, -10**9)  # beyond what the tagger accepts: refused, the link is fine
    drv.set_input_delay(0, 10)  # still ready


def test_injected_overflow_flags_every_overlapping_batch_and_reports_missed_events(hw, drv):
    drv.start_stream()
    read_n(drv, 2)
    hw.inject_overflow(25 * MS)  # from 20 ms to 45 ms: three reads overlap it
    batches = read_n(drv, 6)
    assert_contiguous(batches)
    flagged = [b.overflow for b in batches]
    assert flagged == [True, True, True, False, False, False]
    assert batches[2].flags & TagFlags.MISSED_EVENTS and batches[2].missed_events == hw.overflows > 0
    assert sum(b.missed_events for b in batches) == hw.overflows
    ts, _ = joined(batches)
    assert not np.any((ts >= 20 * MS) & (ts < 45 * MS))  # the lost tags are not there...
    assert np.any(ts >= 45 * MS)  # ...the ones after are
    st = drv.status()
    assert st["tagger_overflows"] == hw.overflows and st["overflow_batches"] == 3 and not st["in_overflow"]


def test_missed_events_beyond_uint16_are_summed_and_do_not_invalidate_the_batch(hw, drv):
    drv.start_stream()
    read_n(drv, 1)
    hw.inject_missed_events(2, 70_000)  # two MissedEvents tags: 65535 + 4465
    b = read_n(drv, 1)[0]
    assert b.flags == TagFlags.MISSED_EVENTS and b.missed_events == 70_000


def test_an_error_event_flags_the_batch(hw, drv):
    drv.start_stream()
    read_n(drv, 1)
    hw.inject_error()
    b1, b2 = read_n(drv, 2)
    assert b1.overflow and not b2.overflow
    assert drv.status()["errors"] == 1


def test_a_full_stream_buffer_flags_overflow():
    hw = hardware()
    d = driver(stream_buffer_events=500)
    d.connect()
    d.start_stream()
    batches = read_n(d, 3)
    d.close()
    assert all(b.overflow and len(b) <= 500 for b in batches)
    assert hw.lost_by_truncation > 0


def test_the_107_day_int64_wrap_is_unwrapped():
    start = (1 << 63) - 35 * MS  # the tagger has been up for 106.75 days minus 35 ms
    hw = hardware(start_time_ps=start)
    d = driver()
    d.connect()
    d.start_stream()
    batches = read_n(d, 8)
    d.close()
    assert hw.device_time(80 * MS) < 0 < hw.device_time(20 * MS)  # the raw clock did wrap in this window
    assert_contiguous(batches)
    assert all(b.flags == TagFlags.NONE for b in batches)
    ts, ch = joined(batches)
    ref_ts, ref_ch = reference(8 * STEP)
    got, want = canonical(ts, ch), canonical(ref_ts, ref_ch.astype(np.uint8))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_time_origin_is_the_stream_start_even_after_a_long_uptime():
    hw = hardware(start_time_ps=(1 << 62))
    hw.advance(123 * MS)
    d = driver()
    d.connect()
    d.start_stream()
    b = read_n(d, 1)[0]
    d.close()
    assert b.t_begin == 0 and b.t_end == STEP and len(b) and b.timestamps[0] >= 0


def test_without_buffer_times_the_watermark_is_the_last_event():
    hardware(buffer_times=False)
    d = driver()
    d.connect()
    d.start_stream()
    batches = read_n(d, 5)
    assert_contiguous(batches)
    for b in batches:
        assert b.t_end == int(b.timestamps[-1]) + 1
    d.close()
    # and the option does the same with an API that has buffer times
    standin.unplug_all()
    hardware()
    d = driver(use_buffer_times=False)
    d.connect()
    d.start_stream()
    batches = read_n(d, 3)
    d.close()
    assert all(b.t_end == int(b.timestamps[-1]) + 1 for b in batches)


def test_an_idle_stream_without_buffer_times_does_not_advance_time():
    hardware(source(singles=0.0, pairs=0.0), buffer_times=False)
    d = driver()
    d.connect()
    d.start_stream()
    batches = read_n(d, 3)
    d.close()
    assert all(len(b) == 0 and b.t_begin == b.t_end == 0 for b in batches)


def test_an_idle_stream_with_buffer_times_still_advances_time():
    hardware(source(singles=0.0, pairs=0.0))
    d = driver()
    d.connect()
    d.start_stream()
    batches = read_n(d, 3)
    d.close()
    assert [b.t_end for b in batches] == [STEP, 2 * STEP, 3 * STEP] and all(len(b) == 0 for b in batches)


def test_a_frozen_tagger_clock_is_a_lost_link():
    hardware(step_ps=0)  # nothing moves the clock
    d = driver(timeout_s=0.1, read_interval_ms=20.0)
    d.connect()
    d.start_stream()
    deadline = time.monotonic() + 2.0
    with pytest.raises(TimeoutError, match="not advanced"):
        while time.monotonic() < deadline:
            d.read(0.1)
    d.close()


def test_stop_and_restart_show_the_gap(hw, drv):
    drv.start_stream()
    first = read_n(drv, 2)
    drv.stop_stream()
    assert drv.read(0.1) is None
    hw.advance(50 * MS)
    drv.start_stream()
    after = read_n(drv, 2)
    assert after[0].t_begin == 70 * MS > first[-1].t_end  # the stopped time is a visible gap
    assert_contiguous(after)
    assert after[0].timestamps[0] >= 70 * MS


def test_unplug_fails_the_read_with_a_non_device_error_and_a_new_instance_works(hw, drv):
    drv.start_stream()
    read_n(drv, 2)
    hw.unplug()
    with pytest.raises(RuntimeError) as e:
        drv.read(0.1)
    assert not isinstance(e.value, DeviceError)  # the daemon faults the device and reconnects
    with contextlib.suppress(RuntimeError):
        drv.safe_state()  # the daemon tries it after a fault (best effort): the link is gone, so it may raise
    drv.close()  # must not raise
    with pytest.raises(RuntimeError):
        driver().connect()  # still unplugged
    hw.replug()
    fresh = driver()
    fresh.connect()
    fresh.start_stream()
    batches = read_n(fresh, 3)
    fresh.close()
    assert sum(len(b) for b in batches) > 1000 and batches[0].t_begin == 0


def test_a_second_open_of_the_same_tagger_is_refused_until_freed(hw, drv):
    with pytest.raises(RuntimeError, match="in use"):
        driver().connect()
    drv.close()
    again = driver()
    again.connect()
    again.close()


def test_conversion_sorts_and_drops_late_tags_with_a_flag():
    """Protocol-level: hand-made buffers through the driver's conversion (the stand-in never produces these)."""
    d = driver(channels=[1, 2])
    d._phys = [1, 2]
    d._sorted_phys = np.array([1, 2])
    d._sorted_index = np.array([0, 1], np.uint8)

    def buf(ts, ch, t0, t1, types=None):
        n = len(ts)
        return SimpleNamespace(size=n, hasOverflows=False, tStart=t0, tGetData=t1,
                               getTimestamps=lambda: np.array(ts, np.int64), getChannels=lambda: np.array(ch, np.int32),
                               getEventTypes=lambda: np.array(types or [0] * n, np.uint8),
                               getMissedEvents=lambda: np.zeros(n, np.uint16))

    b1 = d._convert(buf([30, 10, 20], [1, 2, 1], 0, 100))
    assert b1.timestamps.tolist() == [10, 20, 30] and b1.channels.tolist() == [1, 0, 0] and not b1.overflow
    assert (b1.t_begin, b1.t_end) == (0, 100)
    d._restarted = False
    b2 = d._convert(buf([90, 150], [1, 2], 100, 200))
    assert b2.timestamps.tolist() == [150] and b2.overflow and d._stats["late_tags"] == 1
    with pytest.raises(DeviceError, match="getData"):
        d._convert(SimpleNamespace(size=2, hasOverflows=False, getTimestamps=lambda: np.zeros(1, np.int64),
                                   getChannels=lambda: np.zeros(2, np.int32),
                                   getEventTypes=lambda: np.zeros(2, np.uint8),
                                   getMissedEvents=lambda: np.zeros(2, np.uint16)))


def test_the_bench_passed_as_serial_is_one_device_across_reconnects():
    model = BenchModel(default_config())
    base = list(model.input_delays_ps)
    for _ in range(2):  # connect, close, connect again: the same hardware, latency added once
        d = driver(serial=model, read_interval_ms=20.0)
        d.connect()
        d.start_stream()
        assert sum(len(b) for b in read_n(d, 2)) > 0
        d.close()
    hw = standin.plug(model)
    assert model.input_delays_ps == [b + hw.inputs.latency_ps for b in base]


def test_check_options_catches_bad_combinations():
    opts = {k: f.default for k, f in SwabianTimeTagger.options.items()}
    assert SwabianTimeTagger.check_options(opts) == []
    bad = dict(opts, channels=[1, 0, 1], trigger_level_v=[0.1, 0.2], dead_time_ps=1.5, input_delays_ps=[1])
    paths = sorted(e.path for e in SwabianTimeTagger.check_options(bad))
    assert paths == ["channels", "channels", "dead_time_ps", "input_delays_ps", "trigger_level_v"]


def test_the_documented_configs_validate_and_the_testbed_one_streams_from_the_bench():
    from daemon import config as daemon_config
    from daemon.simulation import SimulationHost

    blocks = toml_blocks("docs/hardware/swabian.md")
    assert len(blocks) >= 2
    configs = [daemon_config.validate(tomllib.loads(text)) for text in blocks]
    lab = configs[0].devices["tagger"]
    assert lab.driver_cls is SwabianTimeTagger and lab.options["api_module"] == "Swabian.TimeTagger"
    sim_cfg = next(c for c in configs if c.simulation is not None)
    dev = sim_cfg.devices["tagger"]
    assert dev.options["api_module"] == API
    host = SimulationHost(sim_cfg.simulation)
    host.warm_up()
    d = SwabianTimeTagger("tagger", dict(host.resolve_options(dev.options)))
    d.connect()
    d.start_stream()
    deadline = time.monotonic() + 5.0
    n = 0
    while n == 0 and time.monotonic() < deadline:
        n += len(d.read(0.5))
    d.close()
    assert n > 0


def test_under_the_daemons_supervisor_limits_device_errors_and_reconnect_after_unplug(hw):
    """The daemon's DeviceSupervisor around the real driver: the semantics the brief asks of DeviceError."""
    import asyncio

    from daemon.api.errors import DeviceFailure, DeviceUnavailable, LimitExceeded
    from daemon.config import DeviceConfig, SupervisorConfig
    from daemon.supervisor import DeviceSupervisor
    from drivers.base import DeviceState

    cfg = DeviceConfig(name="tagger", driver="swabian.timetagger", driver_cls=SwabianTimeTagger,
                       options={"api_module": API, "serial": "1910000ABC", "read_interval_ms": 0.0},
                       limits={"input_delay_ps": (-1e6, 1e6)},
                       supervisor=SupervisorConfig(connect_timeout_s=2.0, call_timeout_s=1.0, backoff_initial_s=0.05,
                                                   backoff_factor=2.0, backoff_max_s=0.2))

    async def main():
        sup = DeviceSupervisor(cfg)
        sup.start()
        try:
            await asyncio.wait_for(sup.wait_ready(), 3)
            assert sup.identity["serial"] == "1910000ABC"
            calls = len(hw.calls)
            with pytest.raises(LimitExceeded):
                await sup.call("set_input_delay", {"channel": 0, "picoseconds": 2_000_000})
            assert len(hw.calls) == calls  # nothing reached the tagger
            with pytest.raises(DeviceFailure):
                await sup.call("set_input_delay", {"channel": 9, "picoseconds": 0})
            assert sup.state == DeviceState.READY
            await sup.call("start_stream")
            batch = await sup.call("read", {"timeout_s": 0.5})
            assert len(batch) > 0
            hw.unplug()
            with pytest.raises(DeviceUnavailable):
                await sup.call("read", {"timeout_s": 0.5})
            assert sup.state in (DeviceState.FAULTED, DeviceState.CONNECTING)
            await asyncio.sleep(0.3)  # reconnect attempts fail while unplugged
            assert sup.state != DeviceState.READY
            hw.replug()
            await asyncio.wait_for(sup.wait_ready(), 3)
            await sup.call("start_stream")
            batch = await sup.call("read", {"timeout_s": 0.5})
            assert len(batch) > 0 and batch.t_begin == 0  # a fresh driver instance, a fresh time origin
        finally:
            await sup.stop(2.0)

    asyncio.run(asyncio.wait_for(main(), 10))
