"""The real quTAG driver against the stand-in of the qutools wrapper and tdcbase DLL (drivers/sim/vendor/qutag.py).

The stand-in reads a block source, so the expected tags are known exactly: a second, identical source read
through a plain BlockStream gives the reference (in ps; the stand-in floors to ticks of its timebase).
"""

from __future__ import annotations

import sys
import time
import tomllib
from fractions import Fraction

import numpy as np
import pytest

import drivers.qutag as qutag_module
from drivers.base import DeviceError, TagFlags, TimeTagger, exposed_methods
from drivers.qutag import QuTAG
from drivers.registry import load
from drivers.sim.bench.config import default_config
from drivers.sim.bench.model import BenchModel
from drivers.sim.tagstream import PoissonPairSource
from drivers.sim.vendor import qutag as standin
from tests.hil.taggers import assert_contiguous, canonical, joined, pair_source, read_n, source_tags, toml_blocks

API = "drivers.sim.vendor.qutag"
MS = 1_000_000_000  # ps
STEP = 10 * MS


def source(seed: int = 11, **kw) -> PoissonPairSource:
    return pair_source(seed, **kw)


def reference(until_ps: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    return source_tags(source(**kw), until_ps)


@pytest.fixture(autouse=True)
def clean_bus():
    standin.unplug_all()
    yield
    standin.unplug_all()


def hardware(src=None, **kw) -> standin.QuTAGHardware:
    kw.setdefault("step_ps", STEP)
    return standin.plug(standin.QuTAGHardware(src if src is not None else source(), **kw))


def driver(**options) -> QuTAG:
    opts = {"api_module": API, "read_interval_ms": 0.0}
    opts.update(options)
    return QuTAG("qutag", opts)


@pytest.fixture
def hw():
    return hardware()


@pytest.fixture
def drv(hw):
    d = driver()
    d.connect()
    yield d
    d.close()



def expected_ps(t_from: int, t_to: int, timebase_ps: Fraction = Fraction(1), **kw) -> tuple[np.ndarray, np.ndarray]:
    """What the driver must report for source tags in [t_from, t_to): the device floors ps to ticks; the
    driver takes ticks relative to the first one and converts them back to ps exactly (floor)."""
    ts, ch = reference(t_to, **kw)
    keep = ts >= t_from
    ts, ch = ts[keep], ch[keep]
    ticks = (ts * timebase_ps.denominator) // timebase_ps.numerator
    rel = ticks - ticks[0]
    return (rel * timebase_ps.numerator) // timebase_ps.denominator, ch.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------


def test_registered_and_documented_as_tested_against_a_stand_in():
    assert load("qutools.qutag") is QuTAG
    assert issubclass(QuTAG, TimeTagger)
    assert "stand-in" in qutag_module.__doc__ and "not the vendor library" in qutag_module.__doc__
    spec = exposed_methods(QuTAG)["set_input_delay"]
    assert {p.name: p.field.limit for p in spec.params}["picoseconds"] == "input_delay_ps"


def test_wrapper_is_imported_lazily_and_a_missing_one_is_a_clear_error_at_connect():
    assert not {"QuTAG_HR", "QuTAG_MC", "QuTAG"} & set(sys.modules)
    d = QuTAG("qutag", {})
    with pytest.raises(ImportError) as e:
        d.connect()
    assert not isinstance(e.value, DeviceError)
    msg = str(e.value)
    assert all(f"{name}:" in msg for name in ("QuTAG_HR", "QuTAG_MC", "QuTAG"))
    assert "tdcbase" in msg and "QuTAG_HR.py" in msg
    with pytest.raises(ImportError, match="no_such_wrapper"):
        QuTAG("qutag", {"api_module": "no_such_wrapper"}).connect()


def test_no_device_means_demo_mode_and_connect_fails_clearly(capsys):
    with pytest.raises(ConnectionError, match="demo mode"):
        driver().connect()
    assert "Error in TDC_init" in capsys.readouterr().out  # the wrapper only printed it


def test_connect_sets_the_buffer_size_enables_exactly_the_channels_and_applies_settings(monkeypatch, hw):
    monkeypatch.setattr(standin.QuTAG, "SET_BUFFER_IN_INIT", False)  # a wrapper that leaves the DLL default (0)
    d = driver(channels=[3, 1], buffer_size=250_000, threshold_v=0.2, rising_edge=False, exposure_ms=500,
               input_delays_ps=[0, 1500])
    d.connect()
    try:
        assert ("TDC_setTimestampBufferSize", (250_000,)) in hw.calls
        assert hw.enabled_inputs == {1, 3} and hw.start_enabled is False
        assert hw.conditioning == {3: (3, False, 0.2), 1: (3, False, 0.2)}
        assert hw.exposure_ms == 500 and hw.delays_ps == {3: 0, 1: 1500}
        assert d.describe()["vendor"] == "qutools" and d.channel_count == 2 and d.resolution_ps == 1
        st = d.status()
        assert st["inputs"] == [3, 1] and st["input_delays_ps"] == [0, 1500] and st["buffer_size"] == 250_000
        d.start_stream()
        assert sum(len(b) for b in read_n(d, 2)) > 500  # the buffer size the driver set makes data flow
    finally:
        d.close()


def test_the_stand_in_returns_nothing_with_the_dll_default_buffer_size(monkeypatch, hw):
    monkeypatch.setattr(standin.QuTAG, "SET_BUFFER_IN_INIT", False)
    q = standin.QuTAG()
    q.enableChannels(False, "1111")
    ts, ch, valid = q.getLastTimestamps(True)
    hw.advance(STEP)
    ts, ch, valid = q.getLastTimestamps(True)
    assert valid == 0 and len(ts) == 0  # documented: buffer size 0 returns no timestamps
    assert q.setBufferSize(1000) == 0
    hw.advance(STEP)
    ts, ch, valid = q.getLastTimestamps(True)
    assert 0 < valid <= 1000 and ts.dtype == np.int64 and ch.dtype == np.int8 and len(ts) == 1000
    q.deInitialize()


def test_batches_are_sorted_contiguous_and_exactly_the_tags_with_channels_mapped(hw):
    d = driver(channels=[3, 1, 4, 2])
    d.connect()
    d.start_stream()  # discards the first 10 ms (what the buffer held before the stream)
    batches = read_n(d, 8)
    d.close()
    assert_contiguous(batches)
    assert all(b.flags == TagFlags.NONE for b in batches)
    assert batches[0].t_begin == 0 and all(b.t_end == int(b.timestamps[-1]) + 1 for b in batches)
    ts, ch = joined(batches)
    want_ts, src_ch = expected_ps(STEP, 9 * STEP)
    index_of_input = {3: 0, 1: 1, 4: 2, 2: 3}
    want_ch = np.array([index_of_input[c + 1] for c in range(4)], np.uint8)[src_ch]
    got, want = canonical(ts, ch), canonical(want_ts, want_ch)
    assert len(ts) > 10_000
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("timebase", [Fraction(625, 8), Fraction(5, 3)])
def test_ticks_become_ps_exactly_for_a_fractional_timebase(timebase):
    hardware(timebase_ps=timebase)
    d = driver()
    d.connect()
    assert d.status()["timebase_s"] == pytest.approx(float(timebase) * 1e-12)
    assert d.resolution_ps == -(-timebase.numerator // timebase.denominator)
    d.start_stream()
    ts, ch = joined(read_n(d, 5))
    d.close()
    want_ts, want_ch = expected_ps(STEP, 6 * STEP, timebase)
    got, want = canonical(ts, ch), canonical(want_ts, want_ch)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("timebase, why", [(Fraction(12345, 1009), "rational"), (Fraction(10**7), "plausible")])
def test_a_timebase_that_cannot_be_converted_exactly_fails_connect(timebase, why):
    hardware(timebase_ps=timebase)
    d = driver()
    with pytest.raises(DeviceError, match=f"getTimebase.*{why}"):
        d.connect()
    d.close()


def test_a_32_bit_counter_wrapping_every_4_ms_is_unwrapped():
    start = (1 << 32) - 3 * MS  # wraps 3 ms into the stream, then every 4.29 ms
    hardware(counter_bits=32, start_ticks=start)
    d = driver(wrap_bits=32)
    d.connect()
    d.start_stream()
    batches = read_n(d, 6)
    d.close()
    assert_contiguous(batches)
    assert all(b.flags == TagFlags.NONE for b in batches)
    ts, ch = joined(batches)
    want_ts, want_ch = expected_ps(STEP, 7 * STEP)
    got, want = canonical(ts, ch), canonical(want_ts, want_ch)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_a_counter_wrap_the_driver_was_not_told_about_is_flagged_not_hidden():
    hardware(counter_bits=32)
    d = driver()  # wrap_bits 64
    d.connect()
    d.start_stream()
    batches = read_n(d, 3)
    d.close()
    assert any(b.overflow for b in batches) and d._stats["clock_resets"] > 0
    assert_contiguous(batches)


@pytest.mark.parametrize("delay_ps", [5_000, -3_000])
def test_channel_delay_moves_one_channel_exactly(delay_ps):
    hardware(source(singles=0.0, pairs=50_000.0, jitter=0.0, pair_channels=((0, 1),)))
    d = driver(channels=[1, 2])
    d.connect()
    d.set_input_delay(1, delay_ps)
    assert d.status()["input_delays_ps"] == [0, delay_ps]
    d.start_stream()
    ts, ch = joined(read_n(d, 5))
    d.close()
    a, b = ts[ch == 0], ts[ch == 1]
    n = min(len(a), len(b))
    assert n > 1000
    assert np.all(b[:n] - a[:n] == delay_ps)


def test_integer_error_codes_become_device_errors_naming_the_call(hw, drv):
    with pytest.raises(DeviceError, match=r"setChannelDelay: error 10 \(parameter out of range\)"):
        drv.set_input_delay(0, 200_000)  # beyond +-100 ns
    with pytest.raises(DeviceError, match="set_input_delay"):
        drv.set_input_delay(4, 0)
    drv.set_input_delay(0, 100)  # the device is still fine
    d = driver(exposure_ms=70_000)  # options bypassed validation: the DLL refuses it
    with pytest.raises(DeviceError, match="setExposureTime: error 10"):
        d.connect()
    d.close()


def test_data_loss_flags_this_batch_and_the_next(hw, drv):
    drv.start_stream()
    read_n(drv, 2)
    hw.inject_data_loss(5 * MS)
    batches = read_n(drv, 4)
    assert [b.overflow for b in batches] == [True, True, False, False]
    assert_contiguous(batches)
    assert hw.lost > 0
    hw.data_loss_active = True  # an ongoing loss: the second getDataLost call sees it
    read_n(drv, 1)
    assert drv.status()["data_loss_now"] is True
    hw.data_loss_active = False
    tail = read_n(drv, 3)  # the first still sees the latch of the loss that was on until now
    assert [b.overflow for b in tail] == [True, True, False]
    assert drv.status()["data_loss_now"] is False and drv.status()["data_lost_reads"] == 3


def test_a_full_ring_buffer_flags_overflow():
    hw = hardware()
    d = driver(buffer_size=1000)
    d.connect()
    d.start_stream()
    batches = read_n(d, 3)
    d.close()
    assert all(b.overflow and len(b) == 1000 for b in batches)
    assert hw.overwritten > 0


def test_stop_freezes_the_buffer_and_a_restart_shows_the_gap(hw, drv):
    drv.start_stream()
    first = read_n(drv, 2)
    drv.stop_stream()
    assert drv.read(0.1) is None
    hw.advance(50 * MS)
    drv.start_stream()
    after = read_n(drv, 2)
    assert after[0].t_begin > first[-1].t_end + 40 * MS
    assert_contiguous(after)


def test_unplug_fails_the_read_with_a_non_device_error_and_a_new_instance_works(hw, drv):
    drv.start_stream()
    read_n(drv, 2)
    hw.unplug()
    with pytest.raises(ConnectionError) as e:
        drv.read(0.1)
    assert not isinstance(e.value, DeviceError)
    with pytest.raises(ConnectionError):
        drv.safe_state()  # freezeBuffers answers "no connection": not a DeviceError either
    drv.close()
    with pytest.raises(ConnectionError, match="demo mode"):
        driver().connect()
    hw.replug()
    fresh = driver()
    fresh.connect()
    fresh.start_stream()
    batches = read_n(fresh, 3)
    fresh.close()
    assert sum(len(b) for b in batches) > 1000 and batches[0].t_begin == 0


def test_sim_device_needs_a_stand_in():
    with pytest.raises(ConnectionError, match="not a stand-in"):
        QuTAG("qutag", {"api_module": "json", "sim_device": object()}).connect()


def test_the_bench_as_sim_device_is_one_device_across_reconnects():
    model = BenchModel(default_config())
    model.warm_up()
    base = list(model.input_delays_ps)
    for _ in range(2):
        d = driver(sim_device=model, channels=list(range(1, 9)), read_interval_ms=20.0)
        d.connect()
        d.start_stream()
        assert sum(len(b) for b in read_n(d, 3)) > 0
        d.close()
    hw = standin.plug(model)
    assert model.input_delays_ps == [b + hw.inputs.latency_ps for b in base]


def test_check_options_catches_bad_combinations():
    opts = {k: f.default for k, f in QuTAG.options.items()}
    assert QuTAG.check_options(opts) == []
    bad = dict(opts, channels=[0, 2, 2], buffer_channels=[1], input_delays_ps=[1, 2])
    paths = sorted(e.path for e in QuTAG.check_options(bad))
    assert paths == ["buffer_channels", "channels", "channels", "input_delays_ps"]


def test_the_documented_configs_validate_and_the_testbed_one_streams_from_the_bench():
    from daemon import config as daemon_config
    from daemon.simulation import SimulationHost

    blocks = toml_blocks("docs/hardware/qutag.md")
    assert len(blocks) >= 2
    configs = [daemon_config.validate(tomllib.loads(text)) for text in blocks]
    lab = configs[0].devices["tagger"]
    assert lab.driver_cls is QuTAG and lab.options["api_module"] == "QuTAG_HR" and lab.options["sim_device"] is None
    sim_cfg = next(c for c in configs if c.simulation is not None)
    dev = sim_cfg.devices["tagger"]
    assert dev.options["api_module"] == API
    host = SimulationHost(sim_cfg.simulation)
    host.warm_up()
    d = QuTAG("tagger", dict(host.resolve_options(dev.options)))
    d.connect()
    assert d.channel_count == 8
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

    cfg = DeviceConfig(name="tagger", driver="qutools.qutag", driver_cls=QuTAG,
                       options={"api_module": API, "read_interval_ms": 0.0},
                       limits={"input_delay_ps": (-50_000, 50_000)},
                       supervisor=SupervisorConfig(connect_timeout_s=2.0, call_timeout_s=1.0, backoff_initial_s=0.05,
                                                   backoff_factor=2.0, backoff_max_s=0.2))

    async def main():
        sup = DeviceSupervisor(cfg)
        sup.start()
        try:
            await asyncio.wait_for(sup.wait_ready(), 3)
            calls = len(hw.calls)
            with pytest.raises(LimitExceeded):
                await sup.call("set_input_delay", {"channel": 0, "picoseconds": 60_000})
            assert len(hw.calls) == calls  # nothing reached the device
            with pytest.raises(DeviceFailure):
                await sup.call("set_input_delay", {"channel": 7, "picoseconds": 0})
            assert sup.state == DeviceState.READY
            await sup.call("start_stream")
            assert len(await sup.call("read", {"timeout_s": 0.5})) > 0
            hw.unplug()
            with pytest.raises(DeviceUnavailable):
                await sup.call("read", {"timeout_s": 0.5})
            await asyncio.sleep(0.3)  # reconnect attempts find demo mode while unplugged
            assert sup.state != DeviceState.READY
            hw.replug()
            await asyncio.wait_for(sup.wait_ready(), 3)
            await sup.call("start_stream")
            batch = await sup.call("read", {"timeout_s": 0.5})
            assert len(batch) > 0 and batch.t_begin == 0
        finally:
            await sup.stop(2.0)

    asyncio.run(asyncio.wait_for(main(), 10))
