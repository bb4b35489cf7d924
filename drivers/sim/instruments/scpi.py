"""A small reusable SCPI instrument for protocol-level simulators (served over TCP, one line per message).

What it implements (SCPI-1999 / IEEE 488.2 behaviour, as far as a bench simulator needs it):

* Headers are case-insensitive and match either their short or their long form, nothing in between:
  a pattern ``"SOURce#:CURRent[:LEVel]"`` accepts ``SOUR:CURR``, ``source:current:level``, ``SOUR1:CURR``.
  Upper-case letters of a pattern node are its short form; ``[...]`` marks an optional node; ``#`` marks a
  node that takes an optional numeric suffix (``OUTP1``/``OUTP2``; missing means 1). A node spelled all in
  upper case (``TEMP_SET_POINT``) has no short form.
* A query is the header followed by ``?``; parameters follow the header after white space, separated by
  commas (``SOUR:CURR? MAX``).
* Several commands can be chained with ``;`` in one line. A header that does not start with ``:`` or ``*``
  is first tried relative to the previous header's path (``SOUR:CURR 0.1;LIM 0.2`` sets the limit), then as
  an absolute header. Every unit of a chained line runs, each failure queues its own error. The replies of
  the queries in one line are joined with ``;`` into one response line.
* Numbers are decimal (``40``, ``4e-2``, ``.04``) with an optional unit suffix and SI prefix (``40 mA``,
  ``40MA`` = milliamperes as in SCPI, ``MAA`` would be mega-amperes; ``MHZ`` and ``MOHM`` are mega), or the
  keywords ``MINimum``/``MAXimum``/``DEFault`` where a command allows them. Booleans are ``ON|OFF|1|0``.
* An error queue read with ``SYST:ERR?`` (oldest first), ``+0,"No error"`` when empty. Full queue: the
  newest entry becomes ``-350,"Queue overflow"``. Codes used: -101 invalid character, -102 syntax error,
  -104 data type error, -108 parameter not allowed, -109 missing parameter, -113 undefined header,
  -114 header suffix out of range, -131 invalid suffix, -221 settings conflict, -222 data out of range,
  -224 illegal parameter value, -350 queue overflow, -363 input buffer overrun.
* Common commands: ``*IDN?``, ``*RST``, ``*CLS``, ``*OPC?``, ``*OPC``, ``*WAI``, ``*ESR?``, ``*STB?``,
  ``*TST?``; ``SYST:ERR[:NEXT]?``, ``SYST:ERR:COUN?``, ``SYST:VERS?``.
* The terminator is ``\\n`` both ways (a trailing ``\\r`` is tolerated). A query that fails produces no
  reply, as on a real instrument: the client's own timeout ends the wait, and the error is in the queue.

A subclass registers its commands in ``__init__`` with :meth:`ScpiInstrument.command` and implements
:meth:`reset` (``*RST``). :meth:`ScpiInstrument.handle_line` is pure (no sockets) so the parser is testable
without I/O; :meth:`start`/:meth:`stop` serve the instrument on a :class:`~drivers.sim.instruments.tcp.TcpServer`.
"""

from __future__ import annotations

import math
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

from drivers.params import REQUIRED, Field
from drivers.sim.instruments.tcp import TcpServer

__all__ = ["Call", "ScpiError", "ScpiInstrument", "STANDARD_ERRORS", "boolean", "choice", "fmt", "number",
           "split_number"]

STANDARD_ERRORS: dict[int, str] = {
    0: "No error",
    -100: "Command error",
    -101: "Invalid character",
    -102: "Syntax error",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -113: "Undefined header",
    -114: "Header suffix out of range",
    -131: "Invalid suffix",
    -200: "Execution error",
    -221: "Settings conflict",
    -222: "Data out of range",
    -224: "Illegal parameter value",
    -350: "Queue overflow",
    -363: "Input buffer overrun",
}


class ScpiError(Exception):
    """Raised by a command handler: queued as ``code,"<standard text>[;detail]"``."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(self.entry)

    @property
    def entry(self) -> str:
        text = STANDARD_ERRORS.get(self.code, "Device-specific error")
        if self.detail:
            text += ";" + self.detail
        return f'{self.code:+d},"{text}"'


# ----------------------------------------------------------------------------------------------------------
# Parameter parsing helpers for handlers

_NUMBER = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)$")
_PREFIXES = {
    "": 1.0, "EX": 1e18, "PE": 1e15, "T": 1e12, "G": 1e9, "MA": 1e6, "K": 1e3,
    "M": 1e-3, "U": 1e-6, "N": 1e-9, "P": 1e-12, "F": 1e-15, "A": 1e-18,
}
_KEYWORDS = {"MIN": "MIN", "MINIMUM": "MIN", "MAX": "MAX", "MAXIMUM": "MAX", "DEF": "DEF", "DEFAULT": "DEF"}


def split_number(text: str) -> tuple[float, str]:
    """``"40 mA"`` -> ``(40.0, "MA")``: the decimal number and its (upper-cased) suffix. -104 if not a number."""
    m = _NUMBER.match(text.strip())
    if not m:
        raise ScpiError(-104, f"expected a number, got {text.strip()[:40]!r}")
    return float(m.group(1)), m.group(2).upper()


def number(text: str, unit: str | None = None, *, minimum: float | None = None, maximum: float | None = None,
           default: float | None = None) -> float:
    """A numeric parameter in base units.

    ``unit`` (e.g. ``"A"``) is the only suffix accepted, with an optional SI prefix (``MA`` = milli-A, as SCPI
    reads it; ``MHZ``/``MOHM`` = mega). ``MIN``/``MAX``/``DEF`` give ``minimum``/``maximum``/``default`` where
    those are not None, else -224. Range checks are the caller's (it knows which error detail to give).
    """
    word = _KEYWORDS.get(text.strip().upper())
    if word is not None:
        value = {"MIN": minimum, "MAX": maximum, "DEF": default}[word]
        if value is None:
            raise ScpiError(-224, f"{text.strip()} is not allowed here")
        return value
    value, suffix = split_number(text)
    if not suffix:
        return value
    if unit is None:
        raise ScpiError(-131, f"no unit allowed, got {suffix!r}")
    unit = unit.upper()
    if not suffix.endswith(unit):
        raise ScpiError(-131, f"expected a value in {unit}, got {suffix!r}")
    prefix = suffix[: len(suffix) - len(unit)]
    if prefix == "M" and unit in ("HZ", "OHM"):
        return value * 1e6  # SCPI: MHZ and MOHM are mega
    if prefix not in _PREFIXES:
        raise ScpiError(-131, f"unknown prefix in {suffix!r}")
    return value * _PREFIXES[prefix]


def boolean(text: str) -> bool:
    """``ON|OFF|1|0`` (a number is rounded: non-zero is ON). -224 otherwise."""
    t = text.strip().upper()
    if t == "ON":
        return True
    if t == "OFF":
        return False
    m = _NUMBER.match(t)
    if m and not m.group(2):
        return round(float(m.group(1))) != 0
    raise ScpiError(-224, f"expected ON, OFF, 1 or 0, got {text.strip()[:40]!r}")


def _short(long: str) -> str:
    i = 0
    while i < len(long) and (long[i].isupper() or long[i] in "_*"):
        i += 1
    return long[:i] or long


def choice(text: str, options: Iterable[str]) -> str:
    """Match a character parameter against mnemonics (``"POSitive"`` accepts POS and POSITIVE); returns the
    long form in upper case. -224 otherwise."""
    t = text.strip().upper()
    opts = list(options)
    for opt in opts:
        if t in (opt.upper(), _short(opt).upper()):
            return opt.upper()
    raise ScpiError(-224, f"expected one of {', '.join(o.upper() for o in opts)}, got {text.strip()[:40]!r}")


# ----------------------------------------------------------------------------------------------------------
# Header patterns


@dataclass(frozen=True)
class _Node:
    long: str
    short: str
    optional: bool
    suffix: bool

    def match(self, token: str) -> int | None:
        """The numeric suffix (1 if absent) if ``token`` (upper case) names this node, else None."""
        if self.suffix:
            m = re.fullmatch(r"([A-Z_*]+?)(\d*)", token)
            if not m:
                return None
            name, digits = m.group(1), m.group(2)
            if name in (self.long, self.short):
                return int(digits) if digits else 1
            return None
        return 1 if token in (self.long, self.short) else None


_NODE_RE = re.compile(r"(\[:?)?([*A-Za-z_]+)(#)?\]?")


def _compile(pattern: str) -> tuple[_Node, ...]:
    nodes = []
    for m in _NODE_RE.finditer(pattern):
        long = m.group(2)
        nodes.append(_Node(long.upper(), _short(long).upper(), bool(m.group(1)), bool(m.group(3))))
    if not nodes:
        raise ValueError(f"empty SCPI pattern {pattern!r}")
    return tuple(nodes)


def _match(nodes: Sequence[_Node], tokens: Sequence[str]) -> list[int] | None:
    """Suffixes of the ``#`` nodes (in order) if ``tokens`` match ``nodes``, else None."""
    if not nodes:
        return [] if not tokens else None
    node, rest = nodes[0], nodes[1:]
    if tokens:
        suffix = node.match(tokens[0])
        if suffix is not None:
            tail = _match(rest, tokens[1:])
            if tail is not None:
                return ([suffix] if node.suffix else []) + tail
    if node.optional:
        tail = _match(rest, tokens)
        if tail is not None:
            return ([1] if node.suffix else []) + tail
    return None


@dataclass
class Call:
    """One parsed command or query, as a handler sees it."""

    header: str  # as received, without the '?'
    query: bool
    args: list[str]
    suffixes: list[int] = field(default_factory=list)  # one per '#' node of the pattern, 1 if not given

    def suffix(self, index: int = 0, allowed: Iterable[int] | None = None) -> int:
        value = self.suffixes[index]
        if allowed is not None and value not in tuple(allowed):
            raise ScpiError(-114, f"{self.header}")
        return value

    def nargs(self, lo: int, hi: int | None = None) -> None:
        """Require between ``lo`` and ``hi`` (default: exactly ``lo``) parameters."""
        hi = lo if hi is None else hi
        if len(self.args) < lo:
            raise ScpiError(-109, self.header)
        if len(self.args) > hi:
            raise ScpiError(-108, self.header)

    def arg(self, index: int = 0) -> str:
        self.nargs(index + 1, max(index + 1, len(self.args)))
        return self.args[index]


SetHandler = Callable[[Call], None]
QueryHandler = Callable[[Call], str]


@dataclass(frozen=True)
class _Command:
    pattern: str
    nodes: tuple[_Node, ...]
    set: SetHandler | None
    query: QueryHandler | None


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, buf, quote = [], [], ""
    for ch in text:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            buf.append(ch)
        elif ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if quote:
        raise ScpiError(-102, "unterminated string")
    parts.append("".join(buf))
    return parts


# ----------------------------------------------------------------------------------------------------------
# The instrument


class ScpiInstrument:
    """Base of SCPI simulators: parser, error queue, common commands and a TCP server.

    Subclasses set ``model`` and ``options`` (the SimInstrument protocol), ``idn`` (or override
    :meth:`identity`), register commands in ``__init__`` and implement :meth:`reset`.
    """

    model: ClassVar[str] = "scpi"
    options: ClassVar[dict[str, Field]] = {
        "port": Field(int, 0, min=0, max=65535, doc="TCP port on 127.0.0.1; 0 picks a free one (kept across restarts)"),
    }
    terminator: ClassVar[bytes] = b"\n"
    error_queue_size: ClassVar[int] = 30
    max_line: ClassVar[int] = 65536

    def __init__(self, name: str, options: dict[str, Any] | None = None) -> None:
        self.name = name
        opts = dict(options or {})
        for key, fld in type(self).options.items():
            if key not in opts and fld.default is not REQUIRED:
                opts[key] = fld.default
        self.opts = opts
        self.lock = threading.RLock()
        self._errors: deque[str] = deque()
        self._esr = 0
        self._commands: list[_Command] = []
        self.history: deque[str] = deque(maxlen=1000)  # program messages received, oldest first (for tests)
        self._server = TcpServer(self._serve, "127.0.0.1", int(opts.get("port", 0)), name=name)
        self.command("SYSTem:ERRor[:NEXT]", query=self._q_error)
        self.command("SYSTem:ERRor:COUNt", query=lambda c: str(len(self._errors)))
        self.command("SYSTem:VERSion", query=lambda c: "1999.0")

    # -- what subclasses provide ----------------------------------------------------------------------------
    def identity(self) -> str:
        """The ``*IDN?`` reply."""
        return "QNETD,SCPI-SIM,0,0"

    def reset(self) -> None:
        """``*RST``: the instrument's reset state."""

    def command(self, pattern: str, set: SetHandler | None = None, query: QueryHandler | None = None) -> None:
        """Register a header pattern with a set handler and/or a query handler."""
        self._commands.append(_Command(pattern, _compile(pattern), set, query))

    # -- error queue ----------------------------------------------------------------------------------------
    def push_error(self, code: int, detail: str = "") -> None:
        self._push(ScpiError(code, detail))

    def _push(self, err: ScpiError) -> None:
        with self.lock:
            if -199 <= err.code <= -100:
                self._esr |= 32  # command error
            elif -299 <= err.code <= -200:
                self._esr |= 16  # execution error
            elif -399 <= err.code <= -300 or err.code > 0:
                self._esr |= 8  # device-dependent error
            elif -499 <= err.code <= -400:
                self._esr |= 4  # query error
            if len(self._errors) >= self.error_queue_size:
                self._errors[-1] = ScpiError(-350).entry
            else:
                self._errors.append(err.entry)

    @property
    def errors(self) -> list[str]:
        """The queued error entries, oldest first (for tests; does not clear)."""
        with self.lock:
            return list(self._errors)

    def _q_error(self, call: Call) -> str:
        call.nargs(0)
        return self._errors.popleft() if self._errors else '+0,"No error"'

    # -- parsing --------------------------------------------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        """Execute one program message; the response line (without terminator), or None if nothing to send."""
        with self.lock:
            return self._handle_line(line)

    def _handle_line(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        self.history.append(line)
        bad = next((ch for ch in line if not (ch == "\t" or " " <= ch <= "~")), None)
        if bad is not None:
            self.push_error(-101, f"character {ord(bad):#04x}")
            return None
        try:
            units = _split_outside_quotes(line, ";")
        except ScpiError as e:
            self._push(e)
            return None
        replies: list[str] = []
        path: list[str] = []  # the previous header's path, for relative headers after ';'
        for unit in units:
            unit = unit.strip()
            if not unit:
                continue
            try:
                reply, path = self._execute(unit, path)
            except ScpiError as e:
                self._push(e)
                continue
            if reply is not None:
                replies.append(reply)
        return ";".join(replies) if replies else None

    def _execute(self, unit: str, path: list[str]) -> tuple[str | None, list[str]]:
        parts = unit.split(None, 1)
        header = parts[0]
        rest = parts[1].strip() if len(parts) > 1 else ""
        query = header.endswith("?")
        if query:
            header = header[:-1]
        args = [a.strip() for a in _split_outside_quotes(rest, ",")] if rest else []
        if any(a == "" for a in args):
            raise ScpiError(-102, f"empty parameter in {unit[:60]!r}")
        if header.startswith("*"):
            return self._common(header.upper(), query, args, unit), path
        absolute = header.startswith(":")
        tokens = header.lstrip(":").upper().split(":")
        if not header.lstrip(":") or any(not t for t in tokens) or "?" in header:
            raise ScpiError(-102, f"header {header[:60]!r}")
        candidates = [tokens] if absolute or not path else [path + tokens, tokens]
        for toks in candidates:
            for cmd in self._commands:
                suffixes = _match(cmd.nodes, toks)
                if suffixes is None:
                    continue
                handler = cmd.query if query else cmd.set
                if handler is None:
                    why = "no query form" if query else "query only"
                    raise ScpiError(-113, f"{header}{'?' if query else ''} ({why})")
                call = Call(header, query, args, suffixes)
                result = handler(call)
                new_path = toks[:-1]
                if query:
                    return (str(result) if result is not None else ""), new_path
                return None, new_path
        raise ScpiError(-113, f"{header}{'?' if query else ''}")

    def _common(self, header: str, query: bool, args: list[str], unit: str) -> str | None:
        key = header + ("?" if query else "")
        if key not in ("*IDN?", "*RST", "*CLS", "*OPC?", "*OPC", "*WAI", "*ESR?", "*STB?", "*TST?"):
            raise ScpiError(-113, key)
        if args:
            raise ScpiError(-108, key)
        if key == "*IDN?":
            return self.identity()
        if key == "*RST":
            self.reset()
        elif key == "*CLS":
            self._errors.clear()
            self._esr = 0
        elif key == "*OPC?":
            return "1"
        elif key == "*ESR?":
            esr, self._esr = self._esr, 0
            return str(esr)
        elif key == "*STB?":
            return str((4 if self._errors else 0) | (32 if self._esr else 0))
        elif key == "*TST?":
            return "0"
        return None

    # -- serving (the SimInstrument protocol) ---------------------------------------------------------------
    def start(self) -> None:
        """Serve on 127.0.0.1 (restartable after stop(), same port)."""
        self._server.start()

    def stop(self) -> None:
        """Unplug: close the listener and every connection; the instrument keeps its state."""
        self._server.stop()

    @property
    def running(self) -> bool:
        return self._server.running

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def address(self) -> str:
        """The VISA resource pyvisa-py opens: ``TCPIP::127.0.0.1::<port>::SOCKET``."""
        return f"TCPIP::127.0.0.1::{self._server.port}::SOCKET"

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        overrun = False
        term = self.terminator
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while term in buf:
                raw, buf = buf.split(term, 1)
                if overrun:  # the tail of an over-long line: drop it
                    overrun = False
                    continue
                reply = self.handle_line(raw.decode("latin-1"))
                if reply is not None:
                    conn.sendall(reply.encode("latin-1", errors="replace") + term)
            if len(buf) > self.max_line:
                buf = b""
                if not overrun:
                    overrun = True
                    self.push_error(-363, f"line longer than {self.max_line} bytes")


def fmt(value: float) -> str:
    """SCPI NR3 number format used in replies (``4.000000E-02``)."""
    if not math.isfinite(value):
        return "9.91E+37"  # SCPI's NaN
    return f"{value:.6E}"
