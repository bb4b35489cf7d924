"""Protocol-level simulator of a Toptica DLC pro laser controller: the DeCoP command line over TCP.

It serves the command-line port (1998 on the real unit; here ``port``, 0 = a free port chosen at the first
:meth:`SimDLCPro.start` and kept across stop/start), so :class:`drivers.toptica_dlc.TopticaDLCPro` talks to it
exactly as to the real controller. Facts from protocols.md section 1.2; what is the simulator's own choice
is marked *assumed* here and in docs/hardware/toptica-dlcpro.md.

Framing:

* On connect the controller sends a banner (text assumed: ``DeCoP RealTime CommandLine`` and a line naming
  the simulator), then the prompt ``"\\n> "``.
* Commands are lines ending in ``\\n`` (a ``\\r`` before it is ignored). Empty lines are ignored (assumed).
* Every reply is its text followed by the prompt ``"\\n> "``. With option ``crlf`` the text ends in ``\\r\\n``
  before the ``"> "`` (protocols.md: a client strips an optional trailing ``\\r\\n``). With option ``echo``
  the command line is repeated first, as a device with echo enabled does (assumed format: the command,
  newline, then the reply).

Commands (an s-expression per line):

* ``(param-ref 'NAME)`` -> the value: a number (``42.5``), a quoted string, ``#t``/``#f``.
* ``(param-set! 'NAME VALUE)`` -> an integer status: ``0`` accepted; negative = refused and the value is
  unchanged (:data:`ST_OUT_OF_RANGE` for a value outside the parameter's range, e.g. ``current-set`` above
  ``current-clip``). Status values are assumed.
* ``(exec 'change-ul LEVEL "PASSWORD")`` -> ``0`` and ``ul`` becomes LEVEL; levels below 3 need the
  ``password`` option (negative status otherwise). Other ``exec`` names are unknown commands.
* An unknown parameter or command, a syntax error, a value of the wrong type, or a write to a read-only
  parameter -> ``Error: <code> <text>`` (the shape the lantz DLC driver parses; codes assumed, see ``ERR_*``).

Parameters (``L`` = the ``laser`` option, ``laser1`` by default; other lasers do not exist here):

============================================  ==========================================================
``serial-number``, ``fw-ver``, ``system-type``  strings (options ``serial_number``, ``firmware``,
                                                 ``system_type``); read-only
``uptime``, ``ul``                              integers: seconds since the simulator was built; user
                                                 level (3 = normal at power-up; assumed numbering)
``system-health``, ``system-health-txt``        0 / ``"OK"``; otherwise bits 1 interlock open, 2 front key
                                                 locked, 4 over-temperature and a ``;``-joined text (assumed)
``interlock-open``, ``frontkey-locked``         booleans: bench ``interlock_tripped`` / ``keylock_tripped``
``emission``, ``L:emission``                    booleans, read-only: the bench laser's ``output_on``
``L:dl:cc:enabled``                             bool rw: the bench laser's ``output_on``. Setting ``#t`` while
                                                 the interlock is open or the key locked is accepted (status
                                                 0) but the output stays off; opening the interlock or
                                                 locking the key switches it off and it stays off after the
                                                 cause clears (latched, as the bench models every trip)
``L:dl:cc:current-set``                         mA rw, 0..current-clip (else ST_OUT_OF_RANGE, unchanged)
``L:dl:cc:current-act``                         mA: the setpoint while the output is on, else 0
``L:dl:cc:current-clip``                        mA rw, 0..``max_clip_ma``: the bench's ``current_limit_ma``;
                                                 lowering it below the setpoint pulls the setpoint down
``L:dl:cc:voltage-act``                         V: 0 while off, else 1.6 V + 4 ohm * I (assumed diode model)
``L:dl:cc:status``, ``L:dl:cc:status-txt``      0 / ``"OK"``; 1 / the inhibit reason while a trip is active
``L:dl:tc:enabled``                             bool rw: the bench's ``tec_on``; on, the diode sits at temp-set
``L:dl:tc:temp-set``                            degC rw, 5..45 (else ST_OUT_OF_RANGE)
``L:dl:tc:temp-act``                            degC: the bench's ``temperature_c`` (25 with the TEC off)
``L:dl:tc:ready``                               bool: TEC on and within 0.1 K of temp-set
``L:dl:serial-number``, ``L:dl:type``           strings, read-only
============================================  ==========================================================

Units: mA and degC are Toptica's convention as far as public code shows (the lantz DLC driver declares mA);
protocols.md marks them unverified.

The monitoring line (port 1999) is not simulated.

Test controls (any thread): :meth:`open_interlock`, :meth:`lock_frontkey`, :meth:`handle_line` (run one
command line and get the reply text, without a socket), :meth:`override` (raw reply text for a parameter,
to test a host against malformed replies), :meth:`inject` (raw bytes to every client),
:meth:`fragment_writes` (split output into small delayed writes), :attr:`stall` (read commands, never
answer), :attr:`history` (command lines received), :attr:`clients`.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, ClassVar

from drivers.params import Field
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.tcp import Client, TcpServer, read_lines

PROMPT = "\n> "
BANNER_FIRST_LINE = "DeCoP RealTime CommandLine"  # assumed banner text

# Error codes of "Error: <code> <text>" replies and negative param-set! statuses (assumed values).
ERR_SYNTAX = -1
ERR_UNKNOWN = -2
ERR_TYPE = -3
ERR_READONLY = -4
ST_OK = 0
ST_OUT_OF_RANGE = -5
ST_ACCESS = -6

TEC_RANGE_C = (5.0, 45.0)
AMBIENT_C = 25.0
NORMAL_UL = 3

_TOKEN = re.compile(r"""\s*(?:(?P<open>\()|(?P<close>\))|(?P<str>"(?:[^"\\]|\\.)*")|(?P<atom>[^\s()"]+))""")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INT = re.compile(r"^[+-]?\d+$")


class DecopError(Exception):
    """A command the simulator answers with ``Error: <code> <text>``."""

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text
        super().__init__(f"Error: {code} {text}")


def tokenize(line: str) -> list[tuple[str, str]]:
    """``(kind, text)`` tokens of one command line; DecopError on anything unreadable."""
    out: list[tuple[str, str]] = []
    pos, n = 0, len(line)
    while pos < n:
        if line[pos:].strip() == "":
            break
        m = _TOKEN.match(line, pos)
        if m is None or m.end() == pos:
            raise DecopError(ERR_SYNTAX, f"syntax error at column {pos + 1}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse_value(kind: str, text: str) -> Any:
    """A DeCoP literal: ``#t``/``#f``, an integer, a real, a quoted string. DecopError otherwise."""
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if text == "#t":
        return True
    if text == "#f":
        return False
    if _INT.match(text):
        return int(text)
    if _NUMBER.match(text):
        return float(text)
    raise DecopError(ERR_SYNTAX, f"cannot read value {text!r}")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "#t" if value else "#f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(float(value))
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


class _Param:
    def __init__(self, kind: type, get: Callable[[], Any], set: Callable[[Any], int] | None = None) -> None:
        self.kind = kind
        self.get = get
        self.set = set


class SimDLCPro:
    """Simulated Toptica DLC pro on a TCP socket, driving ``BenchState.laser`` (see the module docstring)."""

    model: ClassVar[str] = "toptica_dlcpro"
    options: ClassVar[dict[str, Field]] = {
        "host": Field(str, "127.0.0.1", doc="interface the command line listens on"),
        "port": Field(int, 0, min=0, max=65535, doc="command-line port (real unit: 1998); 0 = a free port, "
                                                    "chosen at the first start and kept across restarts"),
        "laser": Field(str, "laser1", choices=("laser1", "laser2"),
                       doc="the controller's laser that is the bench pump (the other one does not exist)"),
        "serial_number": Field(str, "DLCPRO-SIM-0001", doc="reported as serial-number"),
        "firmware": Field(str, "2.5.0 (qnetd simulator)", doc="reported as fw-ver"),
        "system_type": Field(str, "DLCpro", doc="reported as system-type"),
        "laser_type": Field(str, "DL pro", doc="reported as LASER:dl:type"),
        "max_clip_ma": Field(float, 500.0, unit="mA", min=0, doc="largest current-clip the controller accepts"),
        "password": Field(str, "", doc="password change-ul wants for user levels below 3 (normal)"),
        "echo": Field(bool, False, doc="repeat each command line before its reply (the echo setting)"),
        "crlf": Field(bool, False, doc='end reply text with "\\r\\n" before the "> " of the prompt'),
    }

    def __init__(self, name: str, state: BenchState, options: dict[str, Any] | None = None) -> None:
        opts = {k: f.default for k, f in self.options.items()}
        for key, value in (options or {}).items():
            if key not in self.options:
                raise ValueError(f"SimDLCPro {name}: unknown option {key!r}; "
                                 f"allowed: {', '.join(sorted(self.options))}")
            opts[key] = value
        if opts["laser"] not in ("laser1", "laser2"):
            raise ValueError(f"SimDLCPro {name}: laser must be laser1 or laser2")
        self.name = name
        self.state = state
        self.opts = opts
        self.laser: str = opts["laser"]
        self._lock = threading.RLock()  # parameters, overrides, client set
        self._t0 = time.monotonic()
        self._ul = NORMAL_UL
        self._temp_set_c = AMBIENT_C
        self._overrides: dict[str, str] = {}
        self._clients: set[Client] = set()
        self._fragment: tuple[int, float] | None = None
        self.stall = False
        self.history: deque[str] = deque(maxlen=1000)
        self._params = self._build_params()
        self._server = TcpServer(self._serve, opts["host"], int(opts["port"]), f"{name}-decop")

    # -- SimInstrument ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (on the same port after a stop())."""
        self._server.start()

    def stop(self) -> None:
        """Unplug: close the listener and every connection. Settings and bench state are kept."""
        self._server.stop()

    @property
    def running(self) -> bool:
        return self._server.running

    @property
    def address(self) -> str:
        """``host:port`` for the driver's ``address`` option (valid once started)."""
        if self._server.port == 0:
            raise RuntimeError(f"SimDLCPro {self.name}: the port is chosen at start(); start the simulator first")
        return f"{self._server.host}:{self._server.port}"

    # -- test controls ----------------------------------------------------------------------------------
    def open_interlock(self, is_open: bool = True) -> None:
        """Open (True) or close (False) the interlock; opening it switches emission off (latched)."""
        self.state.update_laser(interlock_tripped=bool(is_open))

    def lock_frontkey(self, locked: bool = True) -> None:
        """Turn the front key to locked (True) or back (False); locking switches emission off (latched)."""
        self.state.update_laser(keylock_tripped=bool(locked))

    def override(self, param: str, raw: str | None) -> None:
        """Answer ``(param-ref 'param)`` with ``raw`` verbatim (still framed by the prompt); None: normal."""
        with self._lock:
            if raw is None:
                self._overrides.pop(param, None)
            else:
                self._overrides[param] = raw

    def inject(self, data: bytes) -> None:
        """Send raw bytes to every connected client now."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            self._write(c, data)

    def fragment_writes(self, size: int | None, gap_s: float = 0.002) -> None:
        """Send all output in pieces of ``size`` bytes, ``gap_s`` apart (None: whole writes)."""
        with self._lock:
            self._fragment = None if size is None else (max(1, int(size)), float(gap_s))

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    @property
    def user_level(self) -> int:
        with self._lock:
            return self._ul

    def banner(self) -> str:
        return f"{BANNER_FIRST_LINE}\nqnetd simulated {self.opts['system_type']} ({self.opts['serial_number']})"

    def handle_line(self, line: str) -> str:
        """Execute one command line; return the reply text (without echo and prompt)."""
        try:
            return self._execute(line)
        except DecopError as e:
            return str(e)

    # -- parameters -------------------------------------------------------------------------------------
    def _build_params(self) -> dict[str, _Param]:
        L = self.laser
        st = self.state
        o = self.opts
        p: dict[str, _Param] = {
            "serial-number": _Param(str, lambda: o["serial_number"]),
            "fw-ver": _Param(str, lambda: o["firmware"]),
            "system-type": _Param(str, lambda: o["system_type"]),
            "uptime": _Param(int, lambda: int(time.monotonic() - self._t0)),
            "ul": _Param(int, lambda: self._ul),
            "system-health": _Param(int, lambda: self._health()[0]),
            "system-health-txt": _Param(str, lambda: self._health()[1]),
            "interlock-open": _Param(bool, lambda: st.laser.interlock_tripped),
            "frontkey-locked": _Param(bool, lambda: st.laser.keylock_tripped),
            "emission": _Param(bool, lambda: st.laser.output_on),
            f"{L}:emission": _Param(bool, lambda: st.laser.output_on),
            f"{L}:dl:serial-number": _Param(str, lambda: o["serial_number"] + "-DL"),
            f"{L}:dl:type": _Param(str, lambda: o["laser_type"]),
            f"{L}:dl:cc:enabled": _Param(bool, lambda: st.laser.output_on, self._set_enabled),
            f"{L}:dl:cc:current-set": _Param(float, lambda: st.laser.current_setpoint_ma, self._set_current),
            f"{L}:dl:cc:current-act": _Param(float, lambda: st.laser.current_ma),
            f"{L}:dl:cc:current-clip": _Param(float, lambda: st.laser.current_limit_ma, self._set_clip),
            f"{L}:dl:cc:voltage-act": _Param(float, self._voltage_act),
            f"{L}:dl:cc:status": _Param(int, lambda: 1 if self._inhibits() else 0),
            f"{L}:dl:cc:status-txt": _Param(str, lambda: "; ".join(self._inhibits()) or "OK"),
            f"{L}:dl:tc:enabled": _Param(bool, lambda: st.laser.tec_on, self._set_tec),
            f"{L}:dl:tc:temp-set": _Param(float, lambda: self._temp_set_c, self._set_temp),
            f"{L}:dl:tc:temp-act": _Param(float, lambda: st.laser.temperature_c),
            f"{L}:dl:tc:ready": _Param(bool, self._tec_ready),
        }
        return p

    def _inhibits(self) -> list[str]:
        laser = self.state.laser
        out = []
        if laser.interlock_tripped:
            out.append("interlock open")
        if laser.keylock_tripped:
            out.append("front key locked")
        if laser.overtemp_tripped:
            out.append("over-temperature")
        return out

    def _health(self) -> tuple[int, str]:
        laser = self.state.laser
        bits = (1 if laser.interlock_tripped else 0) | (2 if laser.keylock_tripped else 0) \
            | (4 if laser.overtemp_tripped else 0)
        return bits, "; ".join(self._inhibits()) or "OK"

    def _voltage_act(self) -> float:
        current = self.state.laser.current_ma
        return 0.0 if not self.state.laser.output_on else round(1.6 + 0.004 * current, 6)

    def _tec_ready(self) -> bool:
        laser = self.state.laser
        return laser.tec_on and abs(laser.temperature_c - self._temp_set_c) < 0.1

    def _set_enabled(self, value: bool) -> int:
        self.state.update_laser(output_on=bool(value))  # the bench keeps it off while a trip is active
        return ST_OK

    def _set_current(self, value: float) -> int:
        with self.state.lock:
            clip = self.state.laser.current_limit_ma
            if not 0.0 <= value <= clip * (1 + 1e-12):
                return ST_OUT_OF_RANGE
            self.state.update_laser(current_setpoint_ma=float(value))
        return ST_OK

    def _set_clip(self, value: float) -> int:
        if not 0.0 <= value <= float(self.opts["max_clip_ma"]):
            return ST_OUT_OF_RANGE
        with self.state.lock:
            setpoint = min(self.state.laser.current_setpoint_ma, float(value))
            self.state.update_laser(current_limit_ma=float(value), current_setpoint_ma=setpoint)
        return ST_OK

    def _set_tec(self, value: bool) -> int:
        on = bool(value)
        self.state.update_laser(tec_on=on, temperature_c=self._temp_set_c if on else AMBIENT_C)
        return ST_OK

    def _set_temp(self, value: float) -> int:
        lo, hi = TEC_RANGE_C
        if not lo <= value <= hi:
            return ST_OUT_OF_RANGE
        self._temp_set_c = float(value)
        if self.state.laser.tec_on:
            self.state.update_laser(temperature_c=float(value))
        return ST_OK

    # -- command interpreter ----------------------------------------------------------------------------
    def _execute(self, line: str) -> str:
        tokens = tokenize(line)
        if len(tokens) < 2 or tokens[0][0] != "open" or tokens[-1][0] != "close":
            raise DecopError(ERR_SYNTAX, "expected (command 'name ...)")
        body = tokens[1:-1]
        if any(kind in ("open", "close") for kind, _ in body):
            raise DecopError(ERR_SYNTAX, "nested expressions are not supported")
        if not body or body[0][0] != "atom":
            raise DecopError(ERR_SYNTAX, "expected a command name")
        op = body[0][1]
        args = body[1:]
        if not args or args[0][0] != "atom" or not args[0][1].startswith("'") or len(args[0][1]) < 2:
            raise DecopError(ERR_SYNTAX, f"{op}: expected a quoted name ('name)")
        name = args[0][1][1:]
        rest = args[1:]
        with self._lock:
            if op == "param-ref":
                if rest:
                    raise DecopError(ERR_SYNTAX, "param-ref takes one parameter name")
                if name in self._overrides:
                    return self._overrides[name]
                return format_value(self._param(name).get())
            if op == "param-set!":
                if len(rest) != 1:
                    raise DecopError(ERR_SYNTAX, "param-set! takes a parameter name and one value")
                param = self._param(name)
                if param.set is None:
                    raise DecopError(ERR_READONLY, f"parameter '{name}' is read-only")
                value = parse_value(*rest[0])
                return str(param.set(self._coerce(name, param.kind, value)))
            if op == "exec":
                return str(self._exec(name, [parse_value(k, t) for k, t in rest]))
        raise DecopError(ERR_UNKNOWN, f"unknown command '{op}'")

    def _param(self, name: str) -> _Param:
        param = self._params.get(name)
        if param is None:
            raise DecopError(ERR_UNKNOWN, f"unknown parameter '{name}'")
        return param

    @staticmethod
    def _coerce(name: str, kind: type, value: Any) -> Any:
        if kind is bool:
            if not isinstance(value, bool):
                raise DecopError(ERR_TYPE, f"'{name}' expects #t or #f")
            return value
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DecopError(ERR_TYPE, f"'{name}' expects a number")
            return float(value)
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise DecopError(ERR_TYPE, f"'{name}' expects an integer")
            return value
        if not isinstance(value, str):
            raise DecopError(ERR_TYPE, f"'{name}' expects a string")
        return value

    def _exec(self, name: str, args: list[Any]) -> int:
        if name == "change-ul":
            if len(args) != 2 or not isinstance(args[0], int) or isinstance(args[0], bool) \
                    or not isinstance(args[1], str):
                raise DecopError(ERR_TYPE, "change-ul expects a level (integer) and a password (string)")
            level, password = args
            if not 0 <= level <= 4:
                return ST_OUT_OF_RANGE
            if level < NORMAL_UL and password != self.opts["password"]:
                return ST_ACCESS
            self._ul = level
            return ST_OK
        raise DecopError(ERR_UNKNOWN, f"unknown command '{name}'")

    # -- connections ------------------------------------------------------------------------------------
    def _frame(self, text: str) -> bytes:
        if self.opts["crlf"]:
            text = text.replace("\n", "\r\n") + "\r"
        return (text + PROMPT).encode("utf-8")

    def _serve(self, conn: socket.socket) -> None:
        client = Client(conn)
        with self._lock:
            self._clients.add(client)
        try:
            self._write(client, self._frame(self.banner()))
            for raw in read_lines(conn, b"\n"):
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                self.history.append(line)
                if self.stall or not line.strip():
                    continue
                reply = self.handle_line(line)
                if self.opts["echo"]:
                    reply = line + "\n" + reply
                self._write(client, self._frame(reply))
        finally:
            with self._lock:
                self._clients.discard(client)

    def _write(self, client: Client, data: bytes) -> None:
        with self._lock:
            fragment = self._fragment
        client.send(data, fragment)


__all__ = ["DecopError", "PROMPT", "SimDLCPro", "ST_OUT_OF_RANGE", "format_value", "parse_value", "tokenize"]
