"""Exact command/response tests of the SCPI simulator base (drivers/sim/instruments/scpi.py).

Most tests drive :meth:`ScpiInstrument.handle_line` directly (the parser is pure); the wire tests talk to a
served simulator over a raw TCP socket, byte for byte, as an instrument client would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from drivers.sim.bench.state import BenchState
from drivers.sim.instruments import MODELS, load_model
from drivers.sim.instruments.cld1015 import SimCLD1015
from drivers.sim.instruments.id120 import SimID120
from drivers.sim.instruments.scpi import Call, ScpiError, ScpiInstrument, boolean, choice, fmt, number

NO_ERROR = '+0,"No error"'


class Toy(ScpiInstrument):
    """A minimal instrument: a voltage with a range, a mode word, and a channel-suffixed enable."""

    def __init__(self) -> None:
        super().__init__("toy", {})
        self.volts = 0.0
        self.mode = "NORMAL"
        self.enabled = {1: False, 2: False}
        self.command("SOURce:VOLTage[:LEVel]", set=self._set_v, query=self._q_v)
        self.command("SOURce:MODE", set=self._set_mode, query=lambda c: self.mode)
        self.command("OUTPut#[:STATe]", set=self._set_out, query=self._q_out)
        self.command("MEASure:VOLTage", query=lambda c: fmt(self.volts))

    def identity(self) -> str:
        return "QNETD,TOY,1,0.1"

    def reset(self) -> None:
        self.volts = 0.0

    def _set_v(self, call: Call) -> None:
        call.nargs(1)
        v = number(call.args[0], "V", minimum=0.0, maximum=10.0, default=1.0)
        if not 0 <= v <= 10:
            raise ScpiError(-222, f"{v:g} V")
        self.volts = v

    def _q_v(self, call: Call) -> str:
        call.nargs(0, 1)
        return fmt(number(call.args[0], minimum=0.0, maximum=10.0) if call.args else self.volts)

    def _set_mode(self, call: Call) -> None:
        call.nargs(1)
        self.mode = choice(call.args[0], ("NORMal", "FAST"))

    def _set_out(self, call: Call) -> None:
        self.enabled[call.suffix(0, allowed=(1, 2))] = boolean(call.arg(0))

    def _q_out(self, call: Call) -> str:
        return "1" if self.enabled[call.suffix(0, allowed=(1, 2))] else "0"


@pytest.fixture
def toy() -> Toy:
    return Toy()


def drain(inst: ScpiInstrument) -> list[str]:
    out = []
    while True:
        e = inst.handle_line("SYST:ERR?")
        if e == NO_ERROR:
            return out
        out.append(e)
        assert len(out) < 100


def codes(inst: ScpiInstrument) -> list[int]:
    return [int(e.split(",", 1)[0]) for e in drain(inst)]


# -- headers: short/long forms, case, optional nodes, suffixes -----------------------------------------------


@pytest.mark.parametrize("header", [
    "SOUR:VOLT", "SOURCE:VOLTAGE", "source:voltage", "SoUrCe:VoLt", "SOUR:VOLT:LEV", "SOURce:VOLTage:LEVel",
    ":SOUR:VOLT", "sour:volt:level",
])
def test_short_and_long_forms_any_case(toy, header):
    assert toy.handle_line(f"{header} 2.5") is None
    assert toy.volts == 2.5
    assert toy.handle_line(f"{header}?") == "2.500000E+00"
    assert drain(toy) == []


@pytest.mark.parametrize("header", ["SOURC:VOLT", "SOU:VOLT", "SOURCES:VOLT", "SOUR:VOL", "SOUR:VOLT:LE", "VOLT"])
def test_intermediate_spellings_are_undefined_headers(toy, header):
    assert toy.handle_line(f"{header} 1") is None
    assert toy.volts == 0.0
    assert codes(toy) == [-113]


def test_numeric_suffixes(toy):
    toy.handle_line("OUTP2 ON")
    toy.handle_line("OUTP:STAT 1")  # no suffix = 1
    assert toy.enabled == {1: True, 2: True}
    assert toy.handle_line("OUTP1:STAT?") == "1"
    toy.handle_line("OUTPUT2:STATE OFF")
    assert toy.handle_line("outp2?") == "0"
    assert drain(toy) == []
    assert toy.handle_line("OUTP3 ON") is None
    assert drain(toy) == ['-114,"Header suffix out of range;OUTP3"']


def test_common_commands(toy):
    assert toy.handle_line("*IDN?") == "QNETD,TOY,1,0.1"
    assert toy.handle_line("*idn?") == "QNETD,TOY,1,0.1"
    assert toy.handle_line("*OPC?") == "1"
    toy.handle_line("SOUR:VOLT 3")
    assert toy.handle_line("*RST") is None
    assert toy.volts == 0.0
    toy.handle_line("BOGUS")
    assert toy.handle_line("*ESR?") == "32"  # command error bit
    assert toy.handle_line("*ESR?") == "0"  # read clears
    assert toy.handle_line("*STB?") == "4"  # error queue not empty
    toy.handle_line("*CLS")
    assert toy.handle_line("SYST:ERR?") == NO_ERROR
    assert toy.handle_line("*FOO?") is None
    assert drain(toy) == ['-113,"Undefined header;*FOO?"']


# -- chained commands ----------------------------------------------------------------------------------------


def test_chained_commands_and_joined_replies(toy):
    assert toy.handle_line("SOUR:VOLT 1.5;:SOUR:VOLT?;:OUTP1 ON;:OUTP1?;*IDN?") == "1.500000E+00;1;QNETD,TOY,1,0.1"
    assert toy.enabled[1]
    assert drain(toy) == []


def test_chained_relative_headers(toy):
    # after SOUR:VOLT, "MODE" is resolved relative to SOUR: -> SOUR:MODE
    assert toy.handle_line("SOUR:VOLT 2;MODE FAST;MODE?") == "FAST"
    assert toy.mode == "FAST"
    # a header that does not fit relatively is taken from the root
    assert toy.handle_line("OUTP1 ON;OUTP2 ON;MEAS:VOLT?") == "2.000000E+00"
    assert toy.enabled == {1: True, 2: True}
    assert drain(toy) == []


def test_each_chained_unit_runs_and_queues_its_own_error(toy):
    assert toy.handle_line("SOUR:VOLT 20;:FOO;:SOUR:VOLT 4;:SOUR:VOLT?") == "4.000000E+00"
    assert codes(toy) == [-222, -113]


def test_empty_units_and_whitespace_are_ignored(toy):
    assert toy.handle_line("  SOUR:VOLT   7 ;; ") is None
    assert toy.volts == 7.0
    assert toy.handle_line("") is None
    assert drain(toy) == []


# -- parameters ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, volts", [
    ("2", 2.0), ("2.5", 2.5), (".5", 0.5), ("5e-1", 0.5), ("+3.", 3.0), ("2500 mV", 2.5), ("2500MV", 2.5),
    ("2V", 2.0), ("0.003 kV", 3.0), ("MIN", 0.0), ("max", 10.0), ("DEF", 1.0), ("MAXimum", 10.0),
])
def test_numbers_units_and_keywords(toy, text, volts):
    toy.handle_line(f"SOUR:VOLT {text}")
    assert drain(toy) == []
    assert toy.volts == pytest.approx(volts)


@pytest.mark.parametrize("text, code", [
    ("abc", -104), ("1.2.3", -104), ("2 A", -131), ("2 XV", -131), ("11", -222), ("-1", -222), ("nan", -104),
])
def test_bad_numbers(toy, text, code):
    toy.handle_line("SOUR:VOLT 4")
    toy.handle_line(f"SOUR:VOLT {text}")
    assert codes(toy) == [code]
    assert toy.volts == 4.0  # unchanged


def test_parameter_count_errors(toy):
    toy.handle_line("SOUR:VOLT")
    toy.handle_line("SOUR:VOLT 1,2")
    toy.handle_line("SOUR:VOLT 1,")
    assert codes(toy) == [-109, -108, -102]


def test_query_parameters_min_max(toy):
    assert toy.handle_line("SOUR:VOLT? MAX") == "1.000000E+01"
    assert toy.handle_line("SOUR:VOLT? MIN") == "0.000000E+00"


def test_query_of_command_only_header_and_set_of_query_only_header(toy):
    assert toy.handle_line("MEAS:VOLT 3") is None
    assert toy.handle_line("*RST?") is None
    assert codes(toy) == [-113, -113]


def test_choice_and_boolean_parameters(toy):
    toy.handle_line("SOUR:MODE norm")
    assert toy.mode == "NORMAL"
    toy.handle_line("SOUR:MODE SLOW")
    toy.handle_line("OUTP1 MAYBE")
    assert codes(toy) == [-224, -224]
    assert boolean("on") and not boolean("0") and boolean("1.0")


def test_number_helper_prefixes():
    assert number("40 mA", "A") == pytest.approx(0.04)
    assert number("40MA", "A") == pytest.approx(0.04)  # SCPI: M is milli ...
    assert number("2 MAA", "A") == pytest.approx(2e6)  # ... and MA the mega prefix
    assert number("10 MHZ", "HZ") == pytest.approx(1e7)  # MHZ is mega by special rule
    assert number("5 uA", "A") == pytest.approx(5e-6)


# -- error queue ---------------------------------------------------------------------------------------------


def test_error_queue_order_and_no_error(toy):
    assert toy.handle_line("SYST:ERR?") == NO_ERROR
    toy.handle_line("FOO")
    toy.handle_line("SOUR:VOLT 99")
    toy.handle_line("SOUR:MODE X")
    assert toy.handle_line("SYST:ERR:COUN?") == "3"
    assert toy.handle_line("SYST:ERR?") == '-113,"Undefined header;FOO"'
    assert toy.handle_line("SYSTem:ERRor:NEXT?") == '-222,"Data out of range;99 V"'
    assert toy.handle_line("syst:err?").startswith('-224,"Illegal parameter value')
    assert toy.handle_line("SYST:ERR?") == NO_ERROR
    assert toy.handle_line("SYST:ERR?") == NO_ERROR


def test_error_queue_overflow(toy):
    for _ in range(toy.error_queue_size + 5):
        toy.handle_line("FOO")
    errs = drain(toy)
    assert len(errs) == toy.error_queue_size
    assert errs[-1] == '-350,"Queue overflow"'
    assert all(e.startswith("-113") for e in errs[:-1])


def test_unknown_header_minus_113_on_real_simulators():
    state = BenchState()
    for inst in (SimCLD1015("pump", state, {}), SimID120("spad", state, {"detector": 0})):
        assert inst.handle_line("FOO:BAR 1") is None
        assert inst.handle_line("FOO:BAR?") is None
        assert drain(inst) == ['-113,"Undefined header;FOO:BAR"', '-113,"Undefined header;FOO:BAR?"']


def test_invalid_characters(toy):
    assert toy.handle_line("SOUR:VOLT 1\x00") is None
    assert toy.handle_line("SOUR:VOLT \xe92") is None
    assert codes(toy) == [-101, -101]
    assert toy.volts == 0.0


# -- on the wire ---------------------------------------------------------------------------------------------


@pytest.fixture
def served():
    state = BenchState()
    inst = SimCLD1015("pump", state, {})
    inst.start()
    yield inst
    inst.stop()


def _connect(inst: ScpiInstrument) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", inst.port), timeout=2)
    s.settimeout(2)
    return s


def _ask(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        assert chunk, "connection closed"
        buf += chunk
    return buf


def test_wire_exchange_is_exact(served):
    assert served.address == f"TCPIP::127.0.0.1::{served.port}::SOCKET"
    with _connect(served) as s:
        assert _ask(s, b"*IDN?\n") == b"THORLABS,CLD1015,M00000001,1.3.5/1.0.6/1.1.2\n"
        assert _ask(s, b"SOUR:CURR 25 mA;CURR?\n") == b"2.500000E-02\n"
        assert _ask(s, b"sour:curr?\r\n") == b"2.500000E-02\n"  # CR LF tolerated
        assert _ask(s, b"OUTP2 ON;:OUTP2?;:OUTP1?\n") == b"1;0\n"
        assert _ask(s, b"SYST:ERR?\n") == b'+0,"No error"\n'
        # two messages in one segment: two replies, in order
        assert _ask(s, b"*OPC?\n") == b"1\n"
        s.sendall(b"*OPC?\nSYST:ERR?\n")
        time.sleep(0.1)
        assert s.recv(4096) == b'1\n+0,"No error"\n'


def test_failed_query_sends_nothing_and_the_next_one_works(served):
    with _connect(served) as s:
        s.settimeout(0.3)
        s.sendall(b"SOUR:CURR:BOGUS?\n")
        with pytest.raises(socket.timeout):
            s.recv(4096)
        s.settimeout(2)
        assert _ask(s, b"SYST:ERR?\n") == b'-113,"Undefined header;SOUR:CURR:BOGUS?"\n'
        assert _ask(s, b"*IDN?\n").startswith(b"THORLABS,CLD1015")


def test_overlong_line_is_dropped_and_reported(served):
    with _connect(served) as s:
        s.sendall(b"X" * (served.max_line + 10000))
        s.sendall(b"tail\n")
        assert _ask(s, b"*OPC?\n") == b"1\n"
        assert _ask(s, b"SYST:ERR?\n").startswith(b"-363,")
        assert _ask(s, b"SYST:ERR?\n") == b'+0,"No error"\n'


def test_stop_unplugs_and_start_replugs_on_the_same_port(served):
    port = served.port
    s = _connect(served)
    served.stop()
    assert not served.running
    s.settimeout(2)
    try:
        assert s.recv(10) == b""  # the link dropped
    except ConnectionResetError:
        pass
    s.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    served.start()
    assert served.port == port and served.running
    with _connect(served) as s2:
        assert _ask(s2, b"*OPC?\n") == b"1\n"


def test_several_clients_share_one_error_queue(served):
    with _connect(served) as a, _connect(served) as b:
        a.sendall(b"FOO\n")
        time.sleep(0.05)
        assert _ask(b, b"SYST:ERR?\n") == b'-113,"Undefined header;FOO"\n'


# -- the simulators are self-contained ----------------------------------------------------------------------


def test_simulators_need_no_physics_engine_beyond_bench_state():
    """Both simulators run with only BenchState: no bench model, no numba, no numpy physics imported."""
    code = textwrap.dedent("""
        import socket, sys
        from drivers.sim.bench.state import BenchState
        from drivers.sim.instruments import load_model
        state = BenchState()
        cld = load_model("thorlabs_cld1015")("pump", state, {"port": 0})
        spad = load_model("idq_id120")("spad", state, {"port": 0, "detector": 1})
        for inst in (cld, spad):
            inst.start()
        state.rates_hz[1] = 321.0
        def ask(inst, line):
            with socket.create_connection(("127.0.0.1", inst.port), timeout=2) as s:
                s.sendall(line.encode() + b"\\n")
                buf = b""
                while not buf.endswith(b"\\n"):
                    buf += s.recv(4096)
                return buf.decode().strip()
        assert ask(cld, "SOUR:CURR 0.05;:OUTP1 ON;:MEAS:POW?") == "1.500000E-02", "power"
        assert state.laser.output_on
        assert ask(spad, "COUNTERS:DETECTION_FREQ?") == "321"
        for inst in (cld, spad):
            inst.stop()
        heavy = [m for m in ("numba", "drivers.sim.bench.model", "drivers.sim.bench.physics", "daemon")
                 if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_models_are_registered():
    assert load_model("thorlabs_cld1015") is SimCLD1015
    assert load_model("idq_id120") is SimID120
    assert SimCLD1015.model in MODELS and SimID120.model in MODELS
