"""The real Toptica DLC pro driver against the DeCoP simulator over TCP (the lab code path), exact protocol
tests of the simulator's framing, and malformed replies from a tiny fake controller."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import pytest

from drivers.base import DeviceError, Laser, all_limits, exposed_methods
from drivers.params import check_value
from drivers.registry import load
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments import load_model
from drivers.sim.instruments.dlcpro import PROMPT, ST_OUT_OF_RANGE, SimDLCPro
from drivers.sim.instruments.tcp import TcpServer, read_lines
from drivers.toptica_dlc import DEFAULT_PORT, TopticaDLCPro, parse_address

TIMEOUT_S = 0.4
CC = "laser1:dl:cc"


@pytest.fixture
def state() -> BenchState:
    return BenchState()


@pytest.fixture
def make_sim(state):
    sims: list[SimDLCPro] = []

    def make(**options: Any) -> SimDLCPro:
        for key, value in options.items():  # what the daemon does with a [simulation.instruments.X] table
            check_value(value, SimDLCPro.options[key], key)
        sim = SimDLCPro("pump", state, options)
        sim.start()
        sims.append(sim)
        return sim

    yield make
    for s in sims:
        s.stop()


@pytest.fixture
def sim(make_sim) -> SimDLCPro:
    return make_sim()


@pytest.fixture
def make_driver():
    drivers: list[TopticaDLCPro] = []

    def make(address: str, connect: bool = True, **options: Any) -> TopticaDLCPro:
        opts = {k: f.default for k, f in TopticaDLCPro.options.items() if k != "address"}
        opts.update(address=address, timeout_s=TIMEOUT_S, emission_wait_s=0.2)
        opts.update(options)
        for k, f in TopticaDLCPro.options.items():
            check_value(opts[k], f, f"options.{k}")
        drv = TopticaDLCPro("pump", opts)
        drivers.append(drv)
        if connect:
            drv.connect()
        return drv

    yield make
    for d in drivers:
        d.close()


@pytest.fixture
def drv(sim, make_driver) -> TopticaDLCPro:
    return make_driver(sim.address)


def raw_connect(address: str) -> socket.socket:
    host, port = parse_address(address)
    s = socket.create_connection((host, port), timeout=2)
    return s


def read_until_prompt(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(PROMPT.encode()):
        chunk = s.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


# -- registration, options, limits ---------------------------------------------------------------------------


def test_registered_and_simulator_model():
    assert load("toptica.dlcpro") is TopticaDLCPro
    assert load_model("toptica_dlcpro") is SimDLCPro
    assert SimDLCPro.model == "toptica_dlcpro"


def test_exposed_methods_and_limits_are_the_interface_ones():
    methods = exposed_methods(TopticaDLCPro)
    assert set(methods) == set(exposed_methods(Laser))
    (p,) = methods["set_current"].params
    assert p.field.limit == "current_ma" and p.field.unit == "mA"
    assert set(all_limits(TopticaDLCPro)) == {"current_ma"}
    assert TopticaDLCPro.required_limits == ("current_ma",)


def test_options_and_address_parsing():
    assert TopticaDLCPro.options["laser"].default == "laser1"
    assert TopticaDLCPro.options["timeout_s"].default == 2.0
    assert parse_address("192.168.1.50") == ("192.168.1.50", DEFAULT_PORT) == ("192.168.1.50", 1998)
    assert parse_address("dlcpro.lab:2000") == ("dlcpro.lab", 2000)
    assert parse_address("tcp://[::1]:1998") == ("::1", 1998)
    for bad in ("", "host:", "host:port", "host:70000", "a/b"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_bad_address_is_refused_at_config_time_and_at_connect(make_driver):
    assert TopticaDLCPro.check_options({"address": "sim://pump"}) == []
    assert TopticaDLCPro.check_options({"address": "10.0.0.2:1998"}) == []
    (err,) = TopticaDLCPro.check_options({"address": "10.0.0.2:notaport"})
    assert err.path == "address"
    d = make_driver("10.0.0.2:notaport", connect=False)
    with pytest.raises(DeviceError):
        d.connect()


# -- exact protocol: framing of the simulator ---------------------------------------------------------------


def test_banner_then_prompt_and_one_reply_per_command(sim):
    with raw_connect(sim.address) as s:
        banner = read_until_prompt(s)
        assert banner.startswith(b"DeCoP RealTime CommandLine\n")
        assert banner.endswith(b"\n> ") and banner.count(b"> ") == 1
        s.sendall(b"(param-ref 'serial-number)\n")
        assert read_until_prompt(s) == b'"DLCPRO-SIM-0001"\n> '
        s.sendall(b"(param-ref 'laser1:dl:cc:enabled)\r\n")  # a CR before the LF is ignored
        assert read_until_prompt(s) == b"#f\n> "
        # two commands in one packet: two framed replies, in order
        s.sendall(b"(param-set! 'laser1:dl:cc:current-set 12.5)\n(param-ref 'laser1:dl:cc:current-set)\n")
        data = b""
        while data.count(b"\n> ") < 2:
            data += s.recv(4096)
        assert data == b"0\n> 12.5\n> "
        # a command split over two packets
        s.sendall(b"(param-ref 'laser1:dl:")
        time.sleep(0.05)
        s.sendall(b"cc:current-clip)\n")
        assert read_until_prompt(s) == b"100.0\n> "


def test_crlf_and_echo_framing(make_sim):
    sim = make_sim(crlf=True, echo=True)
    with raw_connect(sim.address) as s:
        assert read_until_prompt(s).endswith(b"\r\n> ")
        s.sendall(b"(param-ref 'emission)\n")
        assert read_until_prompt(s) == b"(param-ref 'emission)\r\n#f\r\n> "


@pytest.mark.parametrize("line, reply", [
    ("(param-ref 'no-such-param)", "Error: -2 unknown parameter 'no-such-param'"),
    ("(param-set! 'emission #t)", "Error: -4 parameter 'emission' is read-only"),
    ("(param-set! 'laser1:dl:cc:enabled 1)", "Error: -3 'laser1:dl:cc:enabled' expects #t or #f"),
    ("(param-set! 'laser1:dl:cc:current-set \"ten\")", "Error: -3 'laser1:dl:cc:current-set' expects a number"),
    ("(param-ref laser1:dl:cc:enabled)", "Error: -1 param-ref: expected a quoted name ('name)"),
    ("hello", "Error: -1 expected (command 'name ...)"),
    ("(param-ref 'emission", "Error: -1 expected (command 'name ...)"),
    ("(exec 'no-such-command)", "Error: -2 unknown command 'no-such-command'"),
    ("(frobnicate 'emission)", "Error: -2 unknown command 'frobnicate'"),
    ("(param-set! 'laser1:dl:cc:current-set 150)", str(ST_OUT_OF_RANGE)),  # above current-clip (100 mA)
    ("(param-set! 'laser1:dl:cc:current-set -1)", str(ST_OUT_OF_RANGE)),
    ("(param-set! 'laser1:dl:tc:temp-set 80.0)", str(ST_OUT_OF_RANGE)),
    ("(param-set! 'laser1:dl:cc:current-set 99.5)", "0"),
    ('(exec \'change-ul 1 "wrong")', "-6"),
    ('(exec \'change-ul 4 "")', "0"),
])
def test_command_language(sim, line, reply):
    assert sim.handle_line(line) == reply


def test_refused_setpoint_is_unchanged_and_clip_pulls_setpoint_down(sim, state):
    assert sim.handle_line(f"(param-set! '{CC}:current-set 60.0)") == "0"
    assert sim.handle_line(f"(param-set! '{CC}:current-set 100.5)") == str(ST_OUT_OF_RANGE)
    assert sim.handle_line(f"(param-ref '{CC}:current-set)") == "60.0"
    assert sim.handle_line(f"(param-set! '{CC}:current-clip 50)") == "0"
    assert state.laser.current_setpoint_ma == 50.0 and state.laser.current_limit_ma == 50.0
    assert sim.handle_line(f"(param-set! '{CC}:current-clip 600)") == str(ST_OUT_OF_RANGE)  # max_clip_ma 500


def test_change_ul_and_password(make_sim):
    sim = make_sim(password="secret")
    assert sim.handle_line("(param-ref 'ul)") == "3"
    assert sim.handle_line('(exec \'change-ul 1 "secret")') == "0"
    assert sim.user_level == 1


# -- the driver against the simulator ------------------------------------------------------------------------


def test_identify(drv, sim):
    d = drv.describe()
    assert d == {"vendor": "Toptica", "model": "DLCpro", "serial": "DLCPRO-SIM-0001",
                 "firmware": "2.5.0 (qnetd simulator)", "laser": "laser1", "address": sim.address}
    assert list(sim.history)[:4] == ["(param-ref 'system-type)", "(param-ref 'serial-number)",
                                      "(param-ref 'fw-ver)", f"(param-ref '{CC}:current-clip)"]


def test_other_system_type_is_refused(make_sim, make_driver):
    sim = make_sim(system_type="iBeam smart")
    with pytest.raises(DeviceError) as e:
        make_driver(sim.address)
    assert e.value.command == "(param-ref 'system-type)" and "not a DLC pro" in str(e.value)


def test_missing_laser_is_refused(sim, make_driver):
    with pytest.raises(DeviceError) as e:
        make_driver(sim.address, laser="laser2")
    assert e.value.command == "(param-ref 'laser2:dl:cc:current-clip)"
    assert "unknown parameter" in str(e.value)


def test_set_current_and_read_back(drv, sim, state):
    drv.set_current(42.5)
    assert f"(param-set! '{CC}:current-set 42.500000)" in sim.history
    assert state.laser.current_setpoint_ma == pytest.approx(42.5)
    st = drv.status()
    assert st["current_setpoint_ma"] == pytest.approx(42.5)
    assert st["current_ma"] == 0.0 and st["output"] is False and st["emission"] is False
    assert st["current_clip_ma"] == 100.0


def test_current_above_clip_is_refused_before_sending(drv, sim, state):
    drv.set_current(50.0)
    n = len(sim.history)
    with pytest.raises(DeviceError) as e:
        drv.set_current(150.0)
    assert e.value.command == f"(param-set! '{CC}:current-set 150.000000)"
    assert "current-clip 100 mA" in str(e.value) and "nothing was sent" in str(e.value)
    assert not any(line.startswith("(param-set!") for line in list(sim.history)[n:])
    assert state.laser.current_setpoint_ma == pytest.approx(50.0)


def test_negative_status_is_a_device_error_and_the_value_is_unchanged(drv, sim, state, monkeypatch):
    """The controller itself refuses (its clip changed since the driver read it): the negative status comes
    back as a DeviceError naming the command and saying what the controller kept."""
    drv.set_current(50.0)
    real = drv._ref_float
    monkeypatch.setattr(drv, "_ref_float", lambda p: 1000.0 if p.endswith("current-clip") else real(p))
    with pytest.raises(DeviceError) as e:
        drv.set_current(150.0)
    assert e.value.command == f"(param-set! '{CC}:current-set 150.000000)"
    assert f"status {ST_OUT_OF_RANGE}" in str(e.value) and "still 50 mA" in str(e.value)
    assert f"(param-set! '{CC}:current-set 150.000000)" in sim.history  # it did reach the controller
    assert state.laser.current_setpoint_ma == pytest.approx(50.0)
    assert drv.status()["current_setpoint_ma"] == pytest.approx(50.0)  # the device stays usable


def test_invalid_current_is_refused_before_sending(drv, sim):
    n = len(sim.history)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(DeviceError):
            drv.set_current(bad)
    assert len(sim.history) == n


def test_output_on_emission_and_off(drv, sim, state):
    drv.set_current(60.0)
    drv.set_output(True)
    assert state.laser.output_on and state.laser.power_mw == pytest.approx(0.5 * (60.0 - 20.0))
    st = drv.status()
    assert st["output"] is True and st["emission"] is True and st["emission_global"] is True
    assert st["current_ma"] == pytest.approx(60.0) and st["voltage_v"] > 1.0
    assert st["interlock_open"] is False and st["frontkey_locked"] is False
    assert st["system_health"] == 0 and st["system_health_txt"] == "OK" and st["trips"] == []
    drv.set_output(False)
    assert not state.laser.output_on
    st = drv.status()
    assert st["output"] is False and st["emission"] is False and st["current_ma"] == 0.0


def test_interlock_open_switches_emission_off_and_the_driver_says_why(drv, sim, state):
    drv.set_current(40.0)
    drv.set_output(True)
    sim.open_interlock()
    assert not state.laser.output_on
    st = drv.status()
    assert st["emission"] is False and st["output"] is False
    assert st["interlock_open"] is True and st["trips"] == ["interlock"]
    assert st["system_health"] != 0 and "interlock" in st["system_health_txt"]
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        drv.set_output(True)
    assert time.monotonic() - t0 < 0.15  # a reported cause ends the wait for emission at once
    assert e.value.command == f"(param-set! '{CC}:enabled #t)"
    assert "interlock is open" in str(e.value) and "front key" not in str(e.value)
    assert list(sim.history)[-1] == f"(param-set! '{CC}:enabled #f)"  # not left armed
    assert not state.laser.output_on
    sim.open_interlock(False)
    assert drv.status()["emission"] is False  # latched: no automatic re-enable
    drv.set_output(True)
    assert state.laser.output_on


def test_front_key_locked(drv, sim, state):
    drv.set_output(True)
    sim.lock_frontkey()
    st = drv.status()
    assert st["emission"] is False and st["frontkey_locked"] is True and st["trips"] == ["frontkey"]
    with pytest.raises(DeviceError, match="front key is locked"):
        drv.set_output(True)


def test_interlock_tripped_on_the_bench_directly(drv, state):
    """The daemon's sim.trip_interlock changes BenchState; the simulator reflects it."""
    drv.set_output(True)
    state.update_laser(interlock_tripped=True)
    assert drv.status()["interlock_open"] is True and drv.status()["emission"] is False


def test_emission_that_stays_off_without_a_reported_cause(drv, sim, state):
    sim.override("laser1:emission", "#f")
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        drv.set_output(True)
    assert 0.2 <= time.monotonic() - t0 < 0.2 + 3 * TIMEOUT_S  # waited emission_wait_s for it
    assert "no cause reported within 0.2 s" in str(e.value)
    assert not state.laser.output_on  # switched back off


def test_safe_state(drv, sim, state):
    drv.set_current(40.0)
    drv.set_output(True)
    drv.safe_state()
    assert not state.laser.output_on
    assert f"(param-set! '{CC}:enabled #f)" in sim.history
    drv.safe_state()  # idempotent
    assert not state.laser.output_on
    assert state.laser.current_setpoint_ma == pytest.approx(40.0)  # the setpoint is kept


def test_temperature_controller_in_status(drv, sim, state):
    assert sim.handle_line("(param-set! 'laser1:dl:tc:temp-set 21.5)") == "0"
    assert sim.handle_line("(param-set! 'laser1:dl:tc:enabled #t)") == "0"
    st = drv.status()
    assert st["tec_enabled"] is True and st["tec_ready"] is True
    assert st["temperature_c"] == pytest.approx(21.5) and st["temperature_setpoint_c"] == pytest.approx(21.5)


@pytest.mark.parametrize("options", [{"crlf": True}, {"echo": True}, {"crlf": True, "echo": True}])
def test_driver_copes_with_crlf_and_echo(make_sim, make_driver, state, options):
    sim = make_sim(**options)
    d = make_driver(sim.address)
    d.set_current(33.0)
    d.set_output(True)
    assert d.status()["current_ma"] == pytest.approx(33.0)
    assert d.describe()["serial"] == "DLCPRO-SIM-0001"


def test_replies_split_into_one_byte_packets(make_sim, make_driver, state):
    sim = make_sim()
    sim.fragment_writes(1, 0.0005)
    d = make_driver(sim.address)
    d.set_current(12.0)
    assert d.status()["current_setpoint_ma"] == pytest.approx(12.0)


def test_bytes_between_exchanges_are_discarded(drv, sim):
    sim.inject(b"stray text\n> ")
    time.sleep(0.05)
    assert drv.status()["current_clip_ma"] == 100.0


def test_malformed_reply_from_the_simulator(drv, sim):
    sim.override(f"{CC}:current-act", "12.5 mA")
    with pytest.raises(DeviceError) as e:
        drv.status()
    assert e.value.command == f"(param-ref '{CC}:current-act)"
    sim.override(f"{CC}:current-act", None)
    drv.status()


def test_hung_controller_is_a_timeout_not_a_device_error(drv, sim):
    sim.stall = True
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        drv.status()
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3


# -- malformed replies from a tiny fake controller ------------------------------------------------------------


class FakeDLC:
    """A TCP server that sends ``banner`` on connect and answers each line with ``reply(line)``: None = stay
    silent, bytes = sent verbatim, str = framed with the prompt."""

    def __init__(self, reply: Callable[[str], object], banner: bytes = b"fake DeCoP\n> ") -> None:
        self.reply = reply
        self.banner = banner
        self.server = TcpServer(self._serve, name="fake-dlc")
        self.server.start()
        self.address = f"127.0.0.1:{self.server.port}"

    def _serve(self, conn) -> None:
        conn.sendall(self.banner)
        for raw in read_lines(conn):
            out = self.reply(raw.decode(errors="replace").strip())
            if out is None:
                continue
            conn.sendall(out if isinstance(out, bytes) else (str(out) + "\n> ").encode())

    def stop(self) -> None:
        self.server.stop()


NORMAL = {
    "(param-ref 'system-type)": '"DLCpro"',
    "(param-ref 'serial-number)": '"F1"',
    "(param-ref 'fw-ver)": '"2.0"',
    f"(param-ref '{CC}:current-clip)": "100.0",
}


def dlc_like(overrides: dict[str, object]) -> Callable[[str], object]:
    def reply(line: str) -> object:
        if line in overrides:
            return overrides[line]
        if line in NORMAL:
            return NORMAL[line]
        if line.startswith("(param-set!"):
            return "0"
        if line.endswith("enabled)") or "emission" in line or "open" in line or "locked" in line \
                or line.endswith("ready)"):
            return "#f"
        if "txt" in line:
            return '"OK"'
        if line.endswith("status)") or line.endswith("health)"):
            return "0"
        return "1.5"

    return reply


@pytest.fixture
def fake_factory():
    fakes: list[FakeDLC] = []

    def make(reply, **kw) -> FakeDLC:
        f = FakeDLC(reply, **kw)
        fakes.append(f)
        return f

    yield make
    for f in fakes:
        f.stop()


def test_the_fake_is_a_plausible_controller(fake_factory, make_driver):
    d = make_driver(fake_factory(dlc_like({})).address)
    d.set_current(1.5)
    assert d.status()["current_ma"] == 1.5


@pytest.mark.parametrize("query, garbage", [
    (f"(param-ref '{CC}:current-act)", "banana"),
    (f"(param-ref '{CC}:current-act)", "1.5 1.6"),
    (f"(param-ref '{CC}:current-act)", "nan"),
    (f"(param-ref '{CC}:current-act)", ""),
    (f"(param-ref '{CC}:enabled)", "maybe"),
    (f"(param-ref '{CC}:enabled)", "#t\n#f"),
    ("(param-ref 'interlock-open)", "1"),
    ("(param-ref 'system-health)", "0.5"),
    ("(param-ref 'system-health-txt)", "OK"),  # unquoted
    ("(param-ref 'system-health-txt)", "Error: -2 unknown parameter"),
    (f"(param-ref '{CC}:voltage-act)", b"\xff\xfe\n> "),
])
def test_malformed_status_reply_is_a_device_error_naming_the_command(fake_factory, make_driver, query, garbage):
    d = make_driver(fake_factory(dlc_like({query: garbage})).address)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        d.status()
    assert e.value.command == query
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3


@pytest.mark.parametrize("reply", ["OK", "0.0", "", "#t", "Error: -3 wrong type"])
def test_malformed_set_status_is_a_device_error(fake_factory, make_driver, reply):
    command = f"(param-set! '{CC}:current-set 10.000000)"
    d = make_driver(fake_factory(dlc_like({command: reply})).address)
    with pytest.raises(DeviceError) as e:
        d.set_current(10.0)
    assert e.value.command == command


def test_silent_setpoint_clipping_is_detected(fake_factory, make_driver):
    d = make_driver(fake_factory(dlc_like({f"(param-ref '{CC}:current-set)": "80.0"})).address)
    with pytest.raises(DeviceError, match="holds 80 mA after setting 90 mA"):
        d.set_current(90.0)


def test_reply_without_prompt_is_a_device_error_within_the_timeout(fake_factory, make_driver):
    query = f"(param-ref '{CC}:current-act)"
    d = make_driver(fake_factory(dlc_like({query: b"12.5\n"})).address)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        d.status()
    assert e.value.command == query and "no prompt" in str(e.value)
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 0.3
    assert d.describe()["serial"] == "F1"


def test_no_reply_at_all_is_a_timeout(fake_factory, make_driver):
    query = f"(param-ref '{CC}:current-act)"
    d = make_driver(fake_factory(dlc_like({query: None})).address)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        d.status()
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3


def test_banner_without_prompt(fake_factory, make_driver):
    fake = fake_factory(dlc_like({}), banner=b"SSH-2.0-OpenSSH_9.6\r\n")
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        make_driver(fake.address)
    assert e.value.command == "(banner)"
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    silent = fake_factory(dlc_like({}), banner=b"")
    with pytest.raises(TimeoutError):
        make_driver(silent.address)


# -- unplug and reconnect -------------------------------------------------------------------------------------


def test_unplug_raises_a_link_error_and_a_new_instance_reconnects(sim, make_driver, state):
    d = make_driver(sim.address)
    d.set_current(45.0)
    d.set_output(True)
    sim.stop()  # unplug
    for call in (d.status, lambda: d.set_current(10.0), d.safe_state):
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            call()
        assert not isinstance(e.value, DeviceError), e.value
        assert isinstance(e.value, OSError)
        assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    d.close()
    d.close()  # closing twice is fine
    with pytest.raises(OSError):
        make_driver(sim.address)  # unplugged: nothing listens
    sim.start()  # plugged back in, same address
    fresh = make_driver(sim.address)
    st = fresh.status()
    assert st["current_setpoint_ma"] == pytest.approx(45.0)  # the controller kept its state
    fresh.set_current(20.0)
    fresh.set_output(True)
    assert state.laser.output_on and state.laser.current_ma == pytest.approx(20.0)


def test_calls_after_close_are_link_errors(drv):
    drv.close()
    with pytest.raises(ConnectionError):
        drv.status()


# -- under the daemon's supervisor: limits, device errors, fault and reconnect, safe state on stop -------------


def test_under_the_daemon_supervisor(sim, state):
    import asyncio

    from daemon import config
    from daemon.api.errors import DeviceFailure, DeviceUnavailable, LimitExceeded
    from daemon.supervisor import DeviceSupervisor
    from drivers.base import DeviceState

    text = f"""
[devices.pump]
driver = "toptica.dlcpro"
connect_timeout_s = 2.0
call_timeout_s = 3.0
backoff_initial_s = 0.05
backoff_max_s = 0.2
[devices.pump.options]
address = "{sim.address}"
timeout_s = {TIMEOUT_S}
emission_wait_s = 0.2
[devices.pump.limits]
current_ma = [0.0, 80.0]
"""
    cfg = config.validate(config.parse(text)).devices["pump"]

    async def main() -> None:
        sup = DeviceSupervisor(cfg)
        sup.start()
        await asyncio.wait_for(sup.wait_ready(), 5)
        assert sup.identity["serial"] == "DLCPRO-SIM-0001"
        await sup.call("set_current", {"milliamps": 50.0})
        n = len(sim.history)
        with pytest.raises(LimitExceeded):
            await sup.call("set_current", {"milliamps": 90.0})  # below the clip, above the configured limit
        assert len(sim.history) == n  # nothing reached the controller
        sim.open_interlock()
        with pytest.raises(DeviceFailure) as e:
            await sup.call("set_output", {"on": True})
        assert e.value.data["command"] == f"(param-set! '{CC}:enabled #t)"
        assert sup.state == DeviceState.READY  # a device error leaves the device ready
        sim.open_interlock(False)
        await sup.call("set_output", {"on": True})
        assert state.laser.output_on
        sim.stop()  # unplug
        with pytest.raises(DeviceUnavailable):
            await sup.call("status")
        assert sup.state in (DeviceState.FAULTED, DeviceState.CONNECTING)
        await asyncio.sleep(0.3)  # reconnect attempts fail while unplugged
        assert not sup.available
        sim.start()
        await asyncio.wait_for(sup.wait_ready(), 5)  # a fresh driver instance, after backoff
        assert (await sup.call("status"))["current_setpoint_ma"] == pytest.approx(50.0)
        await sup.call("set_output", {"on": True})
        assert state.laser.output_on
        assert await sup.stop(3.0)  # shutdown: safe state confirmed
        assert not state.laser.output_on

    asyncio.run(main())


def test_lab_config_example_validates():
    from daemon import config

    text = """
[devices.pump]
driver = "toptica.dlcpro"
[devices.pump.options]
address = "192.168.1.60"
timeout_s = 2.0
laser = "laser1"
emission_wait_s = 1.0
[devices.pump.limits]
current_ma = [0.0, 120.0]
"""
    dev = config.validate(config.parse(text)).devices["pump"]
    assert dev.driver_cls is TopticaDLCPro and dev.limits == {"current_ma": (0.0, 120.0)}
    no_limit = text.replace("[devices.pump.limits]\ncurrent_ma = [0.0, 120.0]\n", "")
    with pytest.raises(config.ConfigError, match="current_ma"):
        config.validate(config.parse(no_limit))  # a laser without a current limit is refused
