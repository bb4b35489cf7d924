"""The real Thorlabs CLD driver against the SCPI simulator, through pyvisa-py (TCPIP SOCKET): the lab code path."""

from __future__ import annotations

import time

import pytest

from drivers.base import DeviceError, Laser, exposed_methods
from drivers.params import check_value
from drivers.registry import load
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.cld1015 import SimCLD1015
from drivers.thorlabs_cld import ThorlabsCLD
from tests.hil.fake_scpi import Reply, answering, fake_factory  # noqa: F401 (fake_factory: a fixture)

TIMEOUT_S = 0.5


@pytest.fixture
def state() -> BenchState:
    return BenchState()


@pytest.fixture
def sim(state):
    inst = SimCLD1015("pump", state, {"port": 0})
    inst.start()
    yield inst
    inst.stop()


def make_driver(resource: str, **options) -> ThorlabsCLD:
    opts = {"resource": resource, "timeout_s": TIMEOUT_S, "require_tec": True, "backend": "@py"}
    opts.update(options)
    return ThorlabsCLD("pump", opts)


@pytest.fixture
def drv(sim):
    d = make_driver(sim.address)
    d.connect()
    yield d
    d.close()


def test_registered_under_its_entry_point():
    assert load("thorlabs.cld") is ThorlabsCLD


def test_identify(drv, sim):
    assert drv.describe() == {"vendor": "Thorlabs", "model": "CLD1015", "serial": "M00000001",
                              "firmware": "1.3.5/1.0.6/1.1.2", "resource": sim.address}
    # connect read the IDN, the temperature unit, drained the queue and cleared status (*CLS has no reply:
    # wait until the simulator's thread has read it)
    deadline = time.monotonic() + 2
    while len(sim.history) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(sim.history)[:4] == ["*IDN?", "UNIT:TEMP?", "SYST:ERR?", "*CLS"]


def test_connect_clears_stale_errors(sim):
    sim.handle_line("BOGUS")
    d = make_driver(sim.address)
    d.connect()
    try:
        assert sim.errors == []
        assert d.status()["errors"] == []
    finally:
        d.close()


def test_set_current_writes_amperes(drv, sim, state):
    drv.set_current(42.5)
    assert "SOUR:CURR 0.0425" in sim.history
    assert state.laser.current_setpoint_ma == pytest.approx(42.5)
    st = drv.status()
    assert st["current_setpoint_ma"] == pytest.approx(42.5)
    assert st["current_ma"] == 0.0  # output off
    assert st["power_mw"] == 0.0


def test_output_on_off_and_status(drv, state):
    drv.set_current(60.0)
    drv.set_output(True)
    assert state.laser.output_on and state.laser.tec_on
    st = drv.status()
    assert st["output"] is True and st["tec"] is True
    assert st["current_ma"] == pytest.approx(60.0)
    assert st["power_mw"] == pytest.approx(state.laser.power_mw) == pytest.approx(0.5 * (60.0 - 20.0))
    assert st["temperature_c"] == pytest.approx(25.0)
    assert st["trips"] == [] and st["conditions"] == [] and st["errors"] == []
    drv.set_output(False)
    assert not state.laser.output_on
    st = drv.status()
    assert st["output"] is False and st["current_ma"] == 0.0 and st["power_mw"] == 0.0


def test_limit_refusal_by_the_driver_leaves_current_unchanged(drv, sim, state):
    drv.set_current(50.0)
    n = len(sim.history)
    with pytest.raises(DeviceError) as e:
        drv.set_current(150.0)  # the bench controller's own limit is 100 mA
    assert e.value.command == "SOUR:CURR 0.15"
    assert "current limit 100 mA" in str(e.value)
    assert "SOUR:CURR 0.15" not in list(sim.history)[n:]  # nothing was sent
    assert state.laser.current_setpoint_ma == pytest.approx(50.0)


def test_instrument_error_minus_222_surfaces_as_device_error(drv, sim, state, monkeypatch):
    """If the instrument itself refuses (its limit changed since the driver read it), the SCPI error
    -222 comes back through SYST:ERR? as a DeviceError naming the command; the setpoint is unchanged."""
    drv.set_current(50.0)
    monkeypatch.setattr(drv, "_current_limit_a", lambda: 1.0)  # a stale reading of the limit
    with pytest.raises(DeviceError) as e:
        drv.set_current(150.0)
    assert e.value.command == "SOUR:CURR 0.15"
    assert "-222" in str(e.value) and "Data out of range" in str(e.value)
    assert state.laser.current_setpoint_ma == pytest.approx(50.0)
    assert sim.errors == []  # the driver drained the queue
    assert drv.status()["current_setpoint_ma"] == pytest.approx(50.0)  # still usable


def test_lowered_instrument_limit_is_respected(drv, sim, state):
    sim.handle_line("SOUR:CURR:LIM 0.03")
    with pytest.raises(DeviceError, match="current limit 30 mA"):
        drv.set_current(35.0)
    drv.set_current(30.0)
    assert drv.status()["current_limit_ma"] == pytest.approx(30.0)


def test_tec_is_switched_on_before_the_ld(drv, sim, state):
    assert not state.laser.tec_on
    drv.set_output(True)
    hist = list(sim.history)
    assert hist.index("OUTP2:STAT ON") < hist.index("OUTP1:STAT ON")
    assert state.laser.tec_on and state.laser.output_on


def test_tec_already_on_is_not_switched_again(drv, sim, state):
    state.update_laser(tec_on=True)
    drv.set_output(True)
    assert "OUTP2:STAT ON" not in sim.history
    assert state.laser.output_on


def test_without_require_tec_the_tec_is_left_alone(sim, state):
    d = make_driver(sim.address, require_tec=False)
    d.connect()
    try:
        d.set_output(True)
        assert state.laser.output_on and not state.laser.tec_on
        assert not any(line.startswith("OUTP2:STAT ") for line in sim.history)
        assert d.status()["tec"] is False
    finally:
        d.close()


def test_interlock_trip_turns_output_off_and_status_shows_it(drv, sim, state):
    drv.set_current(40.0)
    drv.set_output(True)
    sim.trip_interlock()
    assert not state.laser.output_on
    st = drv.status()
    assert st["output"] is False
    assert st["trips"] == ["interlock"]
    assert "ld_interlock" in st["conditions"]
    assert st["current_ma"] == 0.0 and st["power_mw"] == 0.0
    # switching on while tripped: refused, says which protection, output stays off
    with pytest.raises(DeviceError) as e:
        drv.set_output(True)
    assert e.value.command == "OUTP1:STAT ON"
    assert "interlock" in str(e.value)
    assert not state.laser.output_on
    assert sim.errors == []  # the -221 the instrument queued was drained into the message
    # clear the cause, then switch on explicitly
    sim.trip_interlock(False)
    assert drv.status()["output"] is False  # no automatic re-enable
    drv.set_output(True)
    assert state.laser.output_on


@pytest.mark.parametrize("trip, name, condition", [
    ("trip_keylock", "keylock", "ld_output_inhibit"),
    ("trip_overtemp", "overtemperature", "overtemperature"),
])
def test_other_protection_trips(drv, sim, state, trip, name, condition):
    drv.set_output(True)
    getattr(sim, trip)()
    st = drv.status()
    assert st["output"] is False and st["trips"] == [name] and condition in st["conditions"]
    with pytest.raises(DeviceError, match=name):
        drv.set_output(True)


def test_trip_set_on_the_bench_directly(drv, state):
    """The daemon's sim.trip_interlock changes BenchState directly; the simulator reflects it."""
    drv.set_output(True)
    state.update_laser(interlock_tripped=True)
    assert drv.status()["trips"] == ["interlock"]


def test_safe_state_switches_ld_off_and_leaves_tec_on(drv, sim, state):
    drv.set_current(40.0)
    drv.set_output(True)
    drv.safe_state()
    assert not state.laser.output_on
    assert state.laser.tec_on
    assert list(sim.history)[-3:].count("OUTP1:STAT OFF") == 1
    drv.safe_state()  # idempotent
    assert not state.laser.output_on


def test_temperature_in_celsius_whatever_the_unit(sim, state):
    sim.handle_line("UNIT:TEMP K")
    sim.handle_line("SOUR2:TEMP 293.15")
    state.update_laser(tec_on=True, temperature_c=20.0)
    d = make_driver(sim.address)
    d.connect()
    try:
        st = d.status()
        assert st["temperature_c"] == pytest.approx(20.0)
        assert st["tec_setpoint_c"] == pytest.approx(20.0)
    finally:
        d.close()


def test_exposed_methods_keep_the_interface_limit():
    methods = exposed_methods(ThorlabsCLD)
    assert set(methods) == set(exposed_methods(Laser))
    (p,) = methods["set_current"].params
    assert p.name == "milliamps" and p.field.limit == "current_ma" and p.field.unit == "mA"
    assert ThorlabsCLD.required_limits == ("current_ma",)


def test_options_schema():
    assert check_value(2.0, ThorlabsCLD.options["timeout_s"], "timeout_s") == 2.0
    assert ThorlabsCLD.options["require_tec"].default is True
    assert ThorlabsCLD.options["backend"].default == "@py"


# -- unplug and reconnect ------------------------------------------------------------------------------------


def test_unplug_raises_link_error_and_a_new_instance_reconnects(sim, state):
    d = make_driver(sim.address)
    d.connect()
    d.set_current(45.0)
    sim.stop()  # unplug
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        d.status()
    assert not isinstance(e.value, DeviceError)  # the daemon faults the device and reconnects
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0
    d.close()
    # while unplugged, connecting fails (with a non-DeviceError too)
    d2 = make_driver(sim.address)
    with pytest.raises(Exception) as e2:
        d2.connect()
    assert not isinstance(e2.value, DeviceError)
    d2.close()
    # plugged back in: a fresh instance connects and works; the instrument kept its state
    sim.start()
    d3 = make_driver(sim.address)
    d3.connect()
    try:
        assert d3.status()["current_setpoint_ma"] == pytest.approx(45.0)
        d3.set_output(True)
        assert state.laser.output_on
    finally:
        d3.close()


def test_closing_one_driver_leaves_other_visa_sessions_open(sim, state):
    """pyvisa shares one ResourceManager per backend: closing a driver must not close the others' sessions
    (the daemon runs several VISA devices and reconnects them one at a time)."""
    a = make_driver(sim.address)
    b = make_driver(sim.address)
    a.connect()
    b.connect()
    try:
        a.close()
        b.set_current(12.0)
        assert b.status()["current_setpoint_ma"] == pytest.approx(12.0)
        a2 = make_driver(sim.address)
        a2.connect()
        a2.close()
        assert b.status()["output"] is False
    finally:
        b.close()


def test_close_is_safe_twice_and_after_unplug(sim):
    d = make_driver(sim.address)
    d.connect()
    sim.stop()
    d.close()
    d.close()
    with pytest.raises(ConnectionError):
        d.status()


# -- malformed replies from a fake instrument ---------------------------------------------------------------


GOOD_IDN = "THORLABS,CLD1015,M0001,1.0"


def cld_like(overrides: dict[str, object]) -> Reply:
    """A plausible CLD that answers everything sensibly except ``overrides``."""
    return answering({"*IDN?": GOOD_IDN, "UNIT:TEMP?": "C", "SYST:ERR?": '+0,"No error"', "SOUR:CURR:LIM?": "1.0E-01"},
                     overrides)


@pytest.mark.parametrize("query, garbage", [
    ("SOUR:CURR:LIM?", "banana"),
    ("SOUR:CURR:LIM?", "1.0E-01 A extra"),
    ("SOUR:CURR:LIM?", "nan"),
    ("SYST:ERR?", "everything is fine"),
])
def test_garbage_reply_to_set_current_is_a_device_error_naming_the_command(fake_factory, query, garbage):
    fake = fake_factory(cld_like({query: garbage}))
    d = make_driver(fake.address)
    if query == "SYST:ERR?":
        with pytest.raises(DeviceError) as e:
            d.connect()  # connect already drains the queue
        assert e.value.command == "SYST:ERR?"
        return
    d.connect()
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as e:
            d.set_current(10.0)
        assert e.value.command == query
        assert time.monotonic() - t0 < TIMEOUT_S
    finally:
        d.close()


@pytest.mark.parametrize("query, garbage", [
    ("OUTP1:STAT?", "maybe"),
    ("MEAS:CURR?", ""),
    ("MEAS:POW2?", b"\xff\xfe\n"),
    ("STAT:MEAS:COND?", "lots"),
    ("OUTP:PROT:INTL:TRIP?", "2"),
])
def test_garbage_in_status_is_a_device_error_naming_the_query(fake_factory, query, garbage):
    fake = fake_factory(cld_like({query: garbage}))
    d = make_driver(fake.address)
    d.connect()
    try:
        with pytest.raises(DeviceError) as e:
            d.status()
        assert e.value.command == query
    finally:
        d.close()


@pytest.mark.parametrize("idn", ["ACME,LASER9000,1,1", "THORLABS,PM100D,P0001,1.0", "", "garbage"])
def test_connect_refuses_other_instruments(fake_factory, idn):
    fake = fake_factory(cld_like({"*IDN?": idn}))
    d = make_driver(fake.address)
    with pytest.raises(DeviceError) as e:
        d.connect()
    assert e.value.command == "*IDN?"
    d.close()


def test_ldc_without_tec_needs_require_tec_false(fake_factory):
    fake = fake_factory(cld_like({"*IDN?": "THORLABS,LDC4005,M1,1.0"}))
    d = make_driver(fake.address)
    with pytest.raises(DeviceError, match="require_tec"):
        d.connect()
    d2 = make_driver(fake.address, require_tec=False)
    d2.connect()
    assert d2.describe()["model"] == "LDC4005"
    assert d2.status()["tec"] is None
    d2.close()


def test_silent_instrument_times_out_within_timeout_as_link_error(fake_factory):
    fake = fake_factory(cld_like({"MEAS:CURR?": None}))
    d = make_driver(fake.address)
    d.connect()
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            d.status()
        elapsed = time.monotonic() - t0
        assert not isinstance(e.value, DeviceError)  # no reply at all: the link is in doubt
        assert elapsed < TIMEOUT_S + 0.5
    finally:
        d.close()


def test_endless_reply_without_terminator_cannot_hang(fake_factory):
    def flood(conn_line: str) -> object:
        if conn_line == "*IDN?":
            return GOOD_IDN
        return b"x" * 200_000  # no terminator, far more than any reply

    fake = fake_factory(flood)
    d = make_driver(fake.address)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        d.connect()
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0
    assert isinstance(e.value, (DeviceError, TimeoutError))
    d.close()


def test_unresolved_sim_address_is_explained():
    d = make_driver("sim://pump")
    with pytest.raises(DeviceError, match=r"\[simulation\]"):
        d.connect()

