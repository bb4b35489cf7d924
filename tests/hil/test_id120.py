"""The real ID Quantique ID120 driver against its simulator, through pyvisa-py (TCPIP SOCKET)."""

from __future__ import annotations

import time

import pytest

from drivers.base import DeviceError, PhotonDetector, exposed_methods
from drivers.idq_id120 import IDQuantiqueID120
from drivers.registry import load
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.id120 import SimID120
from tests.hil.fake_scpi import Reply, answering, fake_factory  # noqa: F401 (fake_factory: a fixture)

TIMEOUT_S = 0.5
DETECTOR = 5


@pytest.fixture
def state() -> BenchState:
    return BenchState()


@pytest.fixture
def sim(state):
    inst = SimID120("spad", state, {"port": 0, "detector": DETECTOR})
    inst.start()
    yield inst
    inst.stop()


def make_driver(resource: str, **options) -> IDQuantiqueID120:
    opts = {"resource": resource, "timeout_s": TIMEOUT_S, "backend": "@py", "error_queue": False,
            "dead_time_unit": "ns"}
    opts.update(options)
    return IDQuantiqueID120("spad", opts)


@pytest.fixture
def drv(sim):
    d = make_driver(sim.address)
    d.connect()
    yield d
    d.close()


def test_registered_under_its_entry_point():
    assert load("idq.id120") is IDQuantiqueID120


def test_identify(drv, sim):
    assert drv.describe() == {"vendor": "ID Quantique", "model": "ID120", "serial": "002001", "firmware": "2.1.0",
                              "resource": sim.address}


def test_default_timeout_is_the_slow_modules_20_s():
    assert IDQuantiqueID120.options["timeout_s"].default == 20.0


def test_enable_disable_reflects_the_bench_detector(drv, sim, state):
    drv.set_enabled(False)
    assert not state.detector(DETECTOR).enabled
    assert "REG:RUN FALSE" in sim.history
    st = drv.status()
    assert st["enabled"] is False and st["state"] == "STOPPED"
    assert st["temperature_c"] == pytest.approx(25.0)  # regulation off: ambient
    drv.set_enabled(True)
    assert state.detector(DETECTOR).enabled
    st = drv.status()
    assert st["enabled"] is True and st["state"] == "RUNNING"
    assert st["temperature_c"] == pytest.approx(-30.0)
    # other detectors untouched
    assert all(state.detector(i).enabled for i in range(state.detector_count) if i != DETECTOR)


def test_bias_voltage_in_microvolts_rounded_to_the_80_mV_step(drv, sim):
    drv.set_bias_voltage(120.03)
    assert "BIAS:VOLTAGE 120000000" in sim.history
    assert sim.settings["bias_uv"] == 120_000_000
    assert drv.status()["bias_v"] == pytest.approx(120.0)
    drv.set_bias_voltage(0.0)
    drv.set_bias_voltage(250.0)
    assert drv.status()["bias_v"] == pytest.approx(250.0)


@pytest.mark.parametrize("error_queue", [False, True])
def test_bias_voltage_out_of_range_is_refused_and_unchanged(sim, error_queue):
    d = make_driver(sim.address, error_queue=error_queue)
    d.connect()
    try:
        d.set_bias_voltage(100.0)
        with pytest.raises(DeviceError) as e:
            d.set_bias_voltage(260.0)
        assert e.value.command == "BIAS:VOLTAGE 260000000"
        assert "kept 100000000" in str(e.value)
        if error_queue:
            assert "-222" in str(e.value)
            assert sim.errors == []  # drained
        assert sim.settings["bias_uv"] == 100_000_000
        assert d.status()["bias_v"] == pytest.approx(100.0)
    finally:
        d.close()


def test_simulator_bias_range_on_the_wire(sim):
    assert sim.handle_line("BIAS:VOLTAGE -1") is None
    assert sim.handle_line("BIAS:VOLTAGE 250000001") is None
    assert sim.handle_line("BIAS:VOLTAGE 12V") is None
    assert [e.split(",")[0] for e in sim.errors] == ["-222", "-222", "-131"]
    assert sim.handle_line("BIAS:VOLTAGE?") == "0"


def test_set_bias_current_is_refused_with_an_explanation(drv):
    with pytest.raises(DeviceError) as e:
        drv.set_bias(10.0)
    assert e.value.command == "set_bias"
    assert "set_bias_voltage" in str(e.value) and "voltage" in str(e.value)


def test_exposed_methods_units_and_limits():
    methods = exposed_methods(IDQuantiqueID120)
    assert set(exposed_methods(PhotonDetector)) <= set(methods)
    (p,) = methods["set_bias_voltage"].params
    assert (p.name, p.field.unit, p.field.min, p.field.max, p.field.limit) == ("volts", "V", 0, 250, "bias_v")
    assert methods["set_threshold"].params[0].field.unit == "V"
    assert methods["set_dead_time"].params[0].field.unit == "us"
    assert methods["set_integration_time"].params[0].field.unit == "ms"
    assert set(IDQuantiqueID120.limits) == {"bias_v"}
    assert IDQuantiqueID120.limits["bias_v"].unit == "V"
    assert IDQuantiqueID120.required_limits == ("bias_v",)


def test_count_rate_is_read_from_the_bench(drv, sim, state):
    state.rates_hz[DETECTOR] = 12345.4
    assert drv.status()["count_rate_hz"] == 12345.0
    assert sim.handle_line("COUNTERS:DETECTION_COUNT?") == "12345"  # 1 s integration
    drv.set_integration_time(500)
    assert sim.handle_line("COUNTERS:DETECTION_COUNT?") == "6173"
    state.rates_hz[DETECTOR] = 0.0
    assert drv.status()["count_rate_hz"] == 0.0
    state.rates_hz[DETECTOR] = 999.0
    drv.set_enabled(False)
    assert drv.status()["count_rate_hz"] == 0.0  # not running: no counts


def test_threshold_and_dead_time_conversions(drv, sim):
    drv.set_threshold(0.1234)
    assert sim.settings["threshold_uv"] == 123_500  # 500 uV step
    drv.set_dead_time(1.0)  # 1 us = 1000 ns
    assert sim.settings["deadtime"] == 1000
    drv.set_dead_time(0.05)  # 50 ns -> nearest 40-step: 40
    assert sim.settings["deadtime"] == 40
    st = drv.status()
    assert st["threshold_v"] == pytest.approx(0.1235)
    assert st["dead_time_us"] == pytest.approx(0.04)
    with pytest.raises(DeviceError, match="DEADTIME:TIME"):
        drv.set_dead_time(2000.0)  # 2 000 000 > 1 000 000
    assert sim.settings["deadtime"] == 40


def test_dead_time_in_microsecond_wire_units(sim):
    d = make_driver(sim.address, dead_time_unit="us")
    d.connect()
    try:
        d.set_dead_time(80.0)
        assert sim.settings["deadtime"] == 80
        assert d.status()["dead_time_us"] == 80.0
    finally:
        d.close()


def test_bias_error_is_reported(drv, sim):
    sim.set_bias_error(True)
    st = drv.status()
    assert st["bias_error"] is True and st["state"] == "BIAS_ERROR"
    sim.set_bias_error(False)
    assert drv.status()["bias_error"] is False


def test_safe_state_stops_detection(drv, sim, state):
    drv.safe_state()
    assert not state.detector(DETECTOR).enabled
    assert "REG:RUN FALSE" in sim.history


def test_simulator_other_settings(sim, state):
    assert sim.handle_line("OUTPUT1:POLARITY NEGATIVE;:OUTPUT1:POLARITY?;:OUTPUT2:POLARITY?") == "NEGATIVE;POSITIVE"
    assert sim.handle_line("REG:TEMP_SET_POINT -40000;:REG:TEMP_SET_POINT?") == "-40000"
    assert sim.handle_line("REG:MEASURED_TEMP?") == "-40000"
    sim.handle_line("REG:TEMP_SET_POINT -5000")  # warmer than allowed
    sim.handle_line("COUNTERS:INTEGRATION_TIME 100")  # below 200 ms
    sim.handle_line("THRESHOLD:VOLTAGE 2000000")
    sim.handle_line("DEADTIME:TIME 20")
    sim.handle_line("REG:RUN MAYBE")
    sim.handle_line("OUTPUT3:POLARITY POSITIVE")
    assert [e.split(",")[0] for e in sim.errors] == ["-222", "-222", "-222", "-222", "-224", "-114"]
    assert sim.handle_line("REG:TEMP_SET_POINT?") == "-40000"
    assert state.detector(DETECTOR).enabled


def test_simulator_rejects_a_missing_detector():
    with pytest.raises(ValueError):
        SimID120("x", BenchState(detectors=2), {"detector": 2})


# -- unplug and reconnect ------------------------------------------------------------------------------------


def test_unplug_raises_link_error_and_a_new_instance_reconnects(sim, state):
    d = make_driver(sim.address)
    d.connect()
    d.set_bias_voltage(100.0)
    sim.stop()
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        d.set_enabled(True)
    assert not isinstance(e.value, DeviceError)
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0
    d.close()
    sim.start()
    d2 = make_driver(sim.address)
    d2.connect()
    try:
        st = d2.status()
        assert st["bias_v"] == pytest.approx(100.0)  # the module kept its settings
        d2.set_enabled(False)
        assert not state.detector(DETECTOR).enabled
    finally:
        d2.close()


# -- malformed replies ---------------------------------------------------------------------------------------


def id120_like(overrides: dict[str, object]) -> Reply:
    return answering({"*IDN?": "IDQuantique,ID120,1,1.0", "REG:RUN?": "TRUE", "REG:STATE?": "RUNNING",
                      "BIAS:ERROR_STATUS?": "FALSE", "SYST:ERR?": '+0,"No error"'}, overrides)


@pytest.mark.parametrize("query, garbage", [
    ("REG:RUN?", "YES"),
    ("BIAS:VOLTAGE?", "lots"),
    ("BIAS:ERROR_STATUS?", "perhaps"),
    ("COUNTERS:DETECTION_FREQ?", "12kHz"),
    ("REG:MEASURED_TEMP?", ""),
    ("DEADTIME:TIME?", b"\x80\x81\n"),
])
def test_garbage_in_status_is_a_device_error_naming_the_query(fake_factory, query, garbage):
    fake = fake_factory(id120_like({query: garbage}))
    d = make_driver(fake.address)
    d.connect()
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as e:
            d.status()
        assert e.value.command == query
        assert time.monotonic() - t0 < TIMEOUT_S
    finally:
        d.close()


def test_garbage_readback_after_a_setting(fake_factory):
    fake = fake_factory(id120_like({"BIAS:VOLTAGE?": "12 volts"}))
    d = make_driver(fake.address)
    d.connect()
    try:
        with pytest.raises(DeviceError) as e:
            d.set_bias_voltage(10.0)
        assert e.value.command == "BIAS:VOLTAGE?"
    finally:
        d.close()


@pytest.mark.parametrize("idn", ["THORLABS,CLD1015,1,1", "IDQuantique,ID100,1,1", "nonsense"])
def test_connect_refuses_other_instruments(fake_factory, idn):
    fake = fake_factory(id120_like({"*IDN?": idn}))
    d = make_driver(fake.address)
    with pytest.raises(DeviceError) as e:
        d.connect()
    assert e.value.command == "*IDN?"


def test_silent_module_times_out_as_a_link_error_within_timeout(fake_factory):
    fake = fake_factory(id120_like({"COUNTERS:DETECTION_FREQ?": None}))
    d = make_driver(fake.address)
    d.connect()
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            d.status()
        assert not isinstance(e.value, DeviceError)
        assert time.monotonic() - t0 < TIMEOUT_S + 0.5
    finally:
        d.close()
