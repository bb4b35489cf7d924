"""The real OZ Optics EPC-04 driver against its ASCII simulator on a pseudo-terminal (the lab code path), exact
protocol tests of the simulator's dialect, and malformed replies from a tiny fake device on a pty."""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from typing import Any, Callable

import pytest
import serial

from drivers.base import DeviceError, PolarizationController, all_limits, exposed_methods
from drivers.params import ParamError, check_value
from drivers.registry import load
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments import load_model
from drivers.sim.instruments.epc04 import SimEPC04
from drivers.ozoptics_epc import OZOpticsEPC, parse_channels

TIMEOUT_S = 0.3


@pytest.fixture
def bench() -> BenchState:
    return BenchState()


@pytest.fixture
def make_sim(bench):
    sims: list[SimEPC04] = []

    def make(name: str = "epc", **options: Any) -> SimEPC04:
        for key, value in options.items():  # what the daemon does with a [simulation.instruments.X] table
            check_value(value, SimEPC04.options[key], key)
        sim = SimEPC04(name, bench, options)
        sim.start()
        sims.append(sim)
        return sim

    yield make
    for s in sims:
        s.stop()


@pytest.fixture
def sim(make_sim) -> SimEPC04:
    return make_sim()


@pytest.fixture
def make_driver():
    drivers: list[OZOpticsEPC] = []

    def make(resource: str, connect: bool = True, **options: Any) -> OZOpticsEPC:
        opts = {k: f.default for k, f in OZOpticsEPC.options.items() if k != "resource"}
        opts.update(resource=resource, timeout_s=TIMEOUT_S)
        opts.update(options)
        for k, f in OZOpticsEPC.options.items():
            check_value(opts[k], f, f"options.{k}")
        drv = OZOpticsEPC("epc", opts)
        drivers.append(drv)
        if connect:
            drv.connect()
        return drv

    yield make
    for d in drivers:
        d.close()


@pytest.fixture
def drv(sim, make_driver) -> OZOpticsEPC:
    return make_driver(sim.address)


def exchange(port: serial.Serial, data: bytes, wait_for: tuple[bytes, ...] = (b"Done\r\n", b"Error!\r\n"),
             timeout: float = 2.0) -> bytes:
    port.write(data)
    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(wait_for) and time.monotonic() < deadline:
        out += port.read(max(1, port.in_waiting))
    return out


# -- registration, options, limits ---------------------------------------------------------------------------


def test_registered_and_simulator_model():
    assert load("ozoptics.epc") is OZOpticsEPC
    assert load_model("ozoptics_epc04") is SimEPC04
    assert SimEPC04.model == "ozoptics_epc04"


def test_exposed_methods_and_limits():
    methods = exposed_methods(OZOpticsEPC)
    assert set(exposed_methods(PolarizationController)) <= set(methods)
    assert {"set_voltage", "voltages", "set_mode", "set_frequency"} <= set(methods)
    ch, mv = methods["set_voltage"].params
    assert (ch.name, ch.field.min, ch.field.max) == ("channel", 0, 3)
    assert (mv.name, mv.field.unit, mv.field.limit, mv.field.min, mv.field.max) == \
        ("millivolts", "mV", "voltage_mv", -5000, 5000)
    assert methods["voltages"].returns == "array of number"
    assert set(all_limits(OZOpticsEPC)) == {"angle_deg", "voltage_mv"}  # the interface's limit is kept
    with pytest.raises(ParamError):
        check_value(5001.0, mv.field, "millivolts")  # the daemon refuses it before the driver is called
    assert OZOpticsEPC.options["timeout_s"].default == 2.0


# -- exact protocol of the simulator --------------------------------------------------------------------------


@pytest.mark.parametrize("line, reply", [
    ("V?", b"CH1 0 CH2 0 CH3 0 CH4 0\r\nDone\r\n"),
    ("V1,0500", b"Done\r\n"),
    ("V4,-5000", b"Done\r\n"),
    ("v2,+250", b"Done\r\n"),  # case and sign accepted
    ("V1,5001", b"Error!\r\n"),  # out of range: error mode
    ("V5,0", b"Error!\r\n"),
    ("V0,0", b"Error!\r\n"),
    ("V1,1.5", b"Error!\r\n"),
    ("V1", b"Error!\r\n"),
    ("M?", b"Mode: DC\r\nDone\r\n"),
    ("MAC", b"Done\r\n"),
    ("MXX", b"Error!\r\n"),
    ("F?", b"CH1 10 CH2 10 CH3 10 CH4 10\r\nDone\r\n"),
    ("F2,100", b"Done\r\n"),
    ("F2,101", b"Error!\r\n"),
    ("F3,-1", b"Error!\r\n"),
    ("hello", b"Error!\r\n"),
])
def test_dialect(sim, line, reply):
    assert sim.handle_line(line) == reply


def test_state_after_commands(sim):
    for line in ("V1,0500", "V4,-5000", "v2,+250", "MAC", "F2,100"):
        assert sim.handle_line(line) == b"Done\r\n"
    assert sim.voltages_mv == [500, 250, 0, -5000] and sim.mode == "AC"
    assert sim.handle_line("V?") == b"CH1 500 CH2 250 CH3 0 CH4 -5000\r\nDone\r\n"
    assert sim.handle_line("M?") == b"Mode: AC\r\nDone\r\n"
    assert sim.frequencies_hz == [10, 100, 10, 10]


def test_clamp_mode(make_sim):
    sim = make_sim(max_mv=3000, out_of_range="clamp")
    assert sim.handle_line("V1,4000") == b"Done\r\n"
    assert sim.handle_line("V2,-4000") == b"Done\r\n"
    assert sim.voltages_mv[:2] == [3000, -3000]


def test_framing_on_the_pty(sim):
    with serial.Serial(sim.address, 9600, timeout=0.05) as port:
        assert exchange(port, b"V1,0123\r\n") == b"Done\r\n"
        assert exchange(port, b"V?\r\n") == b"CH1 123 CH2 0 CH3 0 CH4 0\r\nDone\r\n"
        assert exchange(port, b"bogus\r\n") == b"Error!\r\n"
        assert exchange(port, b"M?\n") == b"Mode: DC\r\nDone\r\n"  # LF alone also ends a command
        assert exchange(port, b"M?\r") == b"Mode: DC\r\nDone\r\n"  # CR alone too
        # a command split across writes, and two commands in one write
        port.write(b"V2,")
        time.sleep(0.05)
        assert exchange(port, b"0007\r\n") == b"Done\r\n"
        out = exchange(port, b"MAC\r\nM?\r\n", wait_for=(b"Mode: AC\r\nDone\r\n",))
        assert out == b"Done\r\nMode: AC\r\nDone\r\n"
    assert list(sim.history) == ["V1,0123", "V?", "bogus", "M?", "M?", "V2,0007", "MAC", "M?"]


def test_echo_option(make_sim):
    sim = make_sim(echo=True)
    with serial.Serial(sim.address, 9600, timeout=0.05) as port:
        assert exchange(port, b"V?\r\n") == b"V?\r\nCH1 0 CH2 0 CH3 0 CH4 0\r\nDone\r\n"


def test_restart_is_silent_then_done_and_resets(make_sim):
    sim = make_sim(restart_s=0.3)
    sim.handle_line("V1,1000")
    sim.handle_line("MAC")
    with serial.Serial(sim.address, 9600, timeout=0.05) as port:
        t0 = time.monotonic()
        port.write(b"RST\r\n")
        port.write(b"V?\r\n")  # lost: the unit is restarting
        out = exchange(port, b"", timeout=2.0)
        assert out == b"Done\r\n"
        assert 0.25 <= time.monotonic() - t0 < 1.5
        assert exchange(port, b"V?\r\n") == b"CH1 0 CH2 0 CH3 0 CH4 0\r\nDone\r\n"
    assert sim.mode == "DC" and not sim.restarting


def test_configuration_dump(sim):
    lines = sim.handle_line("CD").decode().split("\r\n")
    assert lines[-2:] == ["Done", ""]
    assert "Serial: EPC04-SIM-0001" in lines and "Channels: 4" in lines


def test_the_bench_is_not_touched(sim, bench):
    before = bench.snapshot()
    sim.handle_line("V1,2500")
    sim.handle_line("MAC")
    after = bench.snapshot()
    assert after.generation == before.generation and after.paddles_deg == before.paddles_deg


def test_parse_channels():
    assert parse_channels("CH1 0 CH2 -5000 CH3 +12 CH4 7") == [0, -5000, 12, 7]
    assert parse_channels("ch1 1 ch2 2 ch3 3 ch4 4") == [1, 2, 3, 4]
    assert parse_channels("CH1 1 CH2 2 CH3 3") is None
    assert parse_channels("CH1 1.5 CH2 2 CH3 3 CH4 4") is None
    assert parse_channels("CH2 1 CH1 2 CH3 3 CH4 4") is None
    assert parse_channels("CH1 1 CH2 2 CH3 3 CH4 4 CH5 5") is None


# -- the driver against the simulator -------------------------------------------------------------------------


def test_connect_and_describe(drv, sim):
    assert list(sim.history) == ["CD", "V?", "M?"]
    d = drv.describe()
    assert d["vendor"] == "OZ Optics" and d["channels"] == 4 and d["resource"] == sim.address
    assert "Serial: EPC04-SIM-0001" in d["configuration"]
    assert drv.paddle_count == 4


def test_set_and_read_voltages(drv, sim):
    drv.set_voltage(0, 1500.0)
    drv.set_voltage(1, -250.4)  # whole mV on the wire
    drv.set_voltage(3, 5000)
    assert sim.voltages_mv == [1500, -250, 0, 5000]
    assert drv.voltages() == [1500.0, -250.0, 0.0, 5000.0]
    assert "V1,1500" in sim.history and "V2,-250" in sim.history and "V4,5000" in sim.history


def test_out_of_range_is_refused_before_sending(drv, sim):
    n = len(sim.history)
    for channel, mv in ((0, 5001.0), (0, -6000.0), (0, float("nan")), (4, 0.0), (-1, 0.0)):
        with pytest.raises(DeviceError):
            drv.set_voltage(channel, mv)
    assert len(sim.history) == n


def test_device_error_on_refused_voltage(make_sim, make_driver):
    sim = make_sim(max_mv=3000)  # a unit with a narrower range than the driver knows
    d = make_driver(sim.address)
    d.set_voltage(0, 1000)
    with pytest.raises(DeviceError) as e:
        d.set_voltage(0, 4000)
    assert e.value.command == "V1,4000" and "Error!" in str(e.value)
    assert sim.voltages_mv[0] == 1000 and d.voltages()[0] == 1000.0  # unchanged, device still usable


def test_device_error_on_clamped_voltage(make_sim, make_driver):
    sim = make_sim(max_mv=3000, out_of_range="clamp")
    d = make_driver(sim.address)
    with pytest.raises(DeviceError) as e:
        d.set_voltage(2, -4000)
    assert e.value.command == "V3,-4000" and "holds -3000 mV" in str(e.value)


def test_mode_and_frequency(drv, sim):
    assert drv.status()["mode"] == "dc"
    drv.set_mode("ac")
    assert sim.mode == "AC"
    drv.set_frequency(2, 42)
    assert "F3,0042" in sim.history
    st = drv.status()
    assert st["mode"] == "ac" and st["frequencies_hz"] == [10.0, 10.0, 42.0, 10.0]
    drv.set_mode("dc")
    assert sim.mode == "DC"
    with pytest.raises(DeviceError):
        drv.set_frequency(0, 101)
    with pytest.raises(DeviceError):
        drv.set_mode("rf")


def test_status(drv, sim):
    drv.set_voltage(1, 700)
    assert drv.status() == {"voltages_mv": [0.0, 700.0, 0.0, 0.0], "mode": "dc",
                            "frequencies_hz": [10.0] * 4, "channels": 4, "positions_deg": [], "homed": True}


def test_safe_state(drv, sim):
    drv.set_voltage(0, 1200)
    drv.set_voltage(3, -3300)
    drv.set_mode("ac")
    n = len(sim.history)
    drv.safe_state()
    assert sim.mode == "DC" and sim.voltages_mv == [0, 0, 0, 0]
    assert list(sim.history)[n:n + 5] == ["MDC", "V1,0000", "V2,0000", "V3,0000", "V4,0000"]
    drv.safe_state()  # idempotent


def test_home_sets_zero_volts_and_paddle_methods_explain(drv, sim):
    drv.set_voltage(2, 900)
    drv.home()
    assert sim.voltages_mv == [0, 0, 0, 0]
    n = len(sim.history)
    with pytest.raises(DeviceError, match="set_voltage") as e:
        drv.move(0, 45.0)
    assert e.value.command == "move"
    with pytest.raises(DeviceError, match="voltages"):
        drv.positions()
    assert len(sim.history) == n  # nothing was sent


@pytest.mark.parametrize("options", [{"echo": True}, {}])
def test_fragmented_replies_and_echo(make_sim, make_driver, options):
    sim = make_sim(**options)
    sim.fragment_writes(1, 0.0005)  # "Done\r" and "\n" arrive in separate reads
    d = make_driver(sim.address)
    d.set_voltage(1, -1234)
    assert d.voltages() == [0.0, -1234.0, 0.0, 0.0]


def test_bytes_between_exchanges_are_discarded(drv, sim):
    sim.inject(b"Done\r\nCH1 9 CH2 9 CH3 9 CH4 9\r\n")
    time.sleep(0.05)
    assert drv.voltages() == [0.0] * 4


def test_restart_during_a_call_is_a_link_fault_then_recovers(make_sim, make_driver):
    sim = make_sim(restart_s=0.5)
    d = make_driver(sim.address)
    d.set_voltage(0, 100)
    with serial.Serial(sim.address, 9600, timeout=0.05) as port:
        port.write(b"RST\r\n")  # someone restarts the unit
        time.sleep(0.05)
    with pytest.raises(TimeoutError):
        d.voltages()  # silent while restarting: the daemon would reconnect
    time.sleep(0.6)
    assert d.voltages() == [0.0] * 4  # the late "Done" was discarded as stale


def test_hung_device_is_a_timeout_not_a_device_error(drv, sim):
    sim.stall = True
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        drv.voltages()
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3


@pytest.mark.parametrize("command, raw", [
    ("V?", b"CH1 0 CH2 0 CH3 0\r\nDone\r\n"),
    ("V?", b"CH1 zero CH2 0 CH3 0 CH4 0\r\nDone\r\n"),
    ("V?", b"Done\r\n"),
    ("V?", b"CH1 0 CH2 0\r\nCH3 0 CH4 0\r\nDone\r\n"),
    ("M?", b"Mode: AC/DC\r\nDone\r\n"),
    ("M?", b"Mode: RF\r\nDone\r\n"),
    ("F?", b"\xff\xfe\r\nDone\r\n"),
    ("V?", b"Invalid Command Error!\r\n"),
])
def test_malformed_reply_from_the_simulator_names_the_command(drv, sim, command, raw):
    sim.override(command, raw)
    with pytest.raises(DeviceError) as e:
        drv.status()
    assert e.value.command == command
    sim.override(command, None)
    drv.status()  # still usable


# -- a tiny fake device on a pty -------------------------------------------------------------------------------


class FakePty:
    """A pty whose far end answers each received line with ``reply(line)`` (bytes verbatim; None: silence)."""

    def __init__(self, reply: Callable[[str], bytes | None]) -> None:
        self.reply = reply
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.address = os.ttyname(self.slave)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        while not self._stop:
            r, _, _ = select.select([self.master], [], [], 0.05)
            if not r:
                continue
            try:
                buf += os.read(self.master, 4096)
            except OSError:
                time.sleep(0.01)
                continue
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                out = self.reply(line.decode("ascii", "replace"))
                if out:
                    os.write(self.master, out)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=1)
        os.close(self.master)
        os.close(self.slave)


NORMAL = {"CD": b"EPC-04\r\nDone\r\n", "V?": b"CH1 0 CH2 0 CH3 0 CH4 0\r\nDone\r\n", "M?": b"DC\r\nDone\r\n",
          "F?": b"CH1 1 CH2 1 CH3 1 CH4 1\r\nDone\r\n"}


def epc_like(overrides: dict[str, bytes | None]) -> Callable[[str], bytes | None]:
    def reply(line: str) -> bytes | None:
        if line in overrides:
            return overrides[line]
        return NORMAL.get(line, b"Done\r\n")

    return reply


@pytest.fixture
def fake_factory():
    fakes: list[FakePty] = []

    def make(reply) -> FakePty:
        f = FakePty(reply)
        fakes.append(f)
        return f

    yield make
    for f in fakes:
        f.close()


def test_the_fake_is_a_plausible_device(fake_factory, make_driver):
    d = make_driver(fake_factory(epc_like({})).address)
    assert d.status()["mode"] == "dc"


@pytest.mark.parametrize("command, raw", [
    ("V?", b"CH1 0 CH2 0 CH3 0 CH4\r\nDone\r\n"),
    ("V?", b"voltages are fine\r\nDone\r\n"),
    ("M?", b"\r\nDone\r\n"),
    ("F?", b"CH1 1 CH2 1 CH3 1 CH4 1 CH5 1\r\nDone\r\n"),
])
def test_malformed_reply_from_a_fake_pty(fake_factory, make_driver, command, raw):
    d = make_driver(fake_factory(epc_like({command: raw})).address, connect=False)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        d.connect()  # reads CD, V? and M?
        d.status()  # and F?
    assert e.value.command == command
    assert time.monotonic() - t0 < TIMEOUT_S


def test_reply_without_done_is_a_device_error_within_the_timeout(fake_factory, make_driver):
    d = make_driver(fake_factory(epc_like({"V?": b"CH1 0 CH2 0 CH3 0 CH4 0\r\n"})).address, connect=False)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        d.connect()
    assert e.value.command == "V?" and "no Done or Error!" in str(e.value)
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 0.3


def test_silent_device_is_a_timeout(fake_factory, make_driver):
    d = make_driver(fake_factory(epc_like({"CD": None})).address, connect=False)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        d.connect()
    assert time.monotonic() - t0 < TIMEOUT_S + 0.3


def test_text_before_done_of_a_setting_is_tolerated(fake_factory, make_driver):
    d = make_driver(fake_factory(epc_like({"MDC": b"DC mode set\r\nDone\r\n"})).address)
    d.set_mode("dc")


# -- unplug and reconnect -------------------------------------------------------------------------------------


def test_unplug_raises_a_link_error_and_a_new_instance_reconnects(sim, make_driver):
    d = make_driver(sim.address)
    d.set_voltage(2, 2222)
    old_tty = sim.tty_path
    sim.stop()  # unplug
    for call in (d.voltages, lambda: d.set_voltage(0, 1.0), d.safe_state, d.status):
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            call()
        assert not isinstance(e.value, DeviceError), e.value
        assert isinstance(e.value, (OSError, serial.SerialException))
        assert time.monotonic() - t0 < TIMEOUT_S + 0.3
    d.close()
    d.close()
    with pytest.raises((OSError, serial.SerialException)):
        make_driver(sim.address)  # unplugged: the port is gone
    sim.start()
    assert os.path.realpath(sim.address) == sim.tty_path and old_tty is not None
    fresh = make_driver(sim.address)
    assert fresh.voltages() == [0.0, 0.0, 2222.0, 0.0]  # the unit kept its state
    fresh.safe_state()
    assert sim.voltages_mv == [0, 0, 0, 0]


# -- under the daemon's supervisor: limits, device errors, fault and reconnect, safe state on stop -------------


def test_under_the_daemon_supervisor(sim):
    import asyncio

    from daemon import config
    from daemon.api.errors import DeviceFailure, DeviceUnavailable, LimitExceeded
    from daemon.supervisor import DeviceSupervisor
    from drivers.base import DeviceState

    text = f"""
[devices.epc]
driver = "ozoptics.epc"
connect_timeout_s = 2.0
call_timeout_s = 3.0
backoff_initial_s = 0.05
backoff_max_s = 0.2
[devices.epc.options]
resource = "{sim.address}"
timeout_s = {TIMEOUT_S}
[devices.epc.limits]
voltage_mv = [-3000.0, 3000.0]
"""
    cfg = config.validate(config.parse(text)).devices["epc"]

    async def main() -> None:
        sup = DeviceSupervisor(cfg)
        sup.start()
        await asyncio.wait_for(sup.wait_ready(), 5)
        await sup.call("set_voltage", {"channel": 1, "millivolts": 2500.0})
        n = len(sim.history)
        with pytest.raises(LimitExceeded):
            await sup.call("set_voltage", {"channel": 1, "millivolts": 4000.0})
        assert len(sim.history) == n
        with pytest.raises(DeviceFailure) as e:
            await sup.call("move", {"paddle": 0, "degrees": 10.0})
        assert e.value.data["command"] == "move" and sup.state == DeviceState.READY
        await sup.call("set_mode", {"mode": "ac"})
        sim.stop()  # unplug
        with pytest.raises(DeviceUnavailable):
            await sup.call("voltages")
        await asyncio.sleep(0.3)
        assert not sup.available
        sim.start()
        await asyncio.wait_for(sup.wait_ready(), 5)
        assert await sup.call("voltages") == [0.0, 2500.0, 0.0, 0.0]
        assert await sup.stop(3.0)  # shutdown: safe state confirmed
        assert sim.mode == "DC" and sim.voltages_mv == [0, 0, 0, 0]

    asyncio.run(main())


def test_lab_config_example_validates():
    from daemon import config

    text = """
[devices.epc_bob]
driver = "ozoptics.epc"
[devices.epc_bob.options]
resource = "/dev/serial/by-id/usb-FTDI_USB_Serial_..."
timeout_s = 2.0
[devices.epc_bob.limits]
voltage_mv = [-5000.0, 5000.0]
"""
    dev = config.validate(config.parse(text)).devices["epc_bob"]
    assert dev.driver_cls is OZOpticsEPC and dev.limits == {"voltage_mv": (-5000.0, 5000.0)}
