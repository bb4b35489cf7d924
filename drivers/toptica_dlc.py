"""Toptica DLC pro laser controller over its DeCoP command line (TCP port 1998): the SPDC pump.

Entry point ``toptica.dlcpro``. The same code runs in the lab (``address = "192.168.1.50"`` or
``"192.168.1.50:1998"``) and in CI against :class:`drivers.sim.instruments.dlcpro.SimDLCPro` (the daemon
replaces ``"sim://NAME"`` with the simulator's ``host:port``). Protocol facts: protocols.md section 1.2;
docs/hardware/toptica-dlcpro.md says what is assumed.

Wire behaviour:

* Every reply (the banner on connect included) ends with the prompt ``"\\n> "``; the driver reads up to it,
  strips an optional trailing ``\\r`` and, if the controller echoes commands, a first line equal to the
  command sent. Bytes that arrive between exchanges are discarded (and logged) before the next command.
* ``(param-ref 'NAME)`` replies are parsed strictly by the type the driver expects: a number, ``#t``/``#f``,
  a quoted string, an integer. ``(param-set! 'NAME VALUE)`` must answer an integer status: ``0`` OK, ``> 0``
  warning (logged), ``< 0`` refused (DeviceError). A reply starting with ``Error:`` is a DeviceError. Any
  other reply is malformed: DeviceError naming the command.
* Every exchange has a deadline (``timeout_s``). No byte in time: ``TimeoutError``; the connection closed:
  ``ConnectionError``. Both are ``OSError``: the daemon marks the device faulted and reconnects a fresh
  instance. Some bytes but no prompt in time is a malformed reply (DeviceError): the controller is alive.

Behaviour:

* ``connect``: TCP connect, read the banner up to the prompt, then ``system-type`` (must name a DLC),
  ``serial-number``, ``fw-ver`` and ``LASER:dl:cc:current-clip`` (proves the configured laser exists).
* ``set_current(mA)``: refused (nothing sent) above the controller's ``current-clip``; ``param-set!
  current-set``; a negative status is a DeviceError that reports the setpoint the controller kept; the
  setpoint is read back and must match.
* ``set_output(on)``: ``param-set! cc:enabled``. Switching on then waits up to ``emission_wait_s`` for
  ``LASER:emission``; if emission stays off the driver switches ``cc:enabled`` back off (so the laser cannot
  come on by itself later) and raises DeviceError saying why: interlock open, front key locked, the current
  driver not enabled, plus ``system-health-txt``. It does not retry (protocols.md section 7).
* ``safe_state``: ``cc:enabled #f``, checked by reading ``cc:enabled`` and ``LASER:emission`` back.

Units: currents in mA and temperatures in degC, as Toptica's convention and public drivers have it
(protocols.md: unverified; check against the front panel on the real unit).
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from typing import Any

from drivers import net
from drivers.base import DeviceError, Laser
from drivers.params import REQUIRED, Field, ParamError

__all__ = ["DEFAULT_PORT", "DecopLink", "PROMPT", "TopticaDLCPro", "parse_address"]

DEFAULT_PORT = 1998
PROMPT = b"\n> "
MAX_REPLY = 1 << 20
POLL_S = 0.05  # how often set_output re-reads emission while waiting for it
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INT = re.compile(r"^[+-]?\d+$")


def parse_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``tcp://host:port`` -> (host, port). ValueError if invalid."""
    return net.parse_address(address, default_port)


class DecopLink:
    """One DeCoP command-line connection: prompt framing, deadlines, echo and stale-byte handling."""

    def __init__(self, host: str, port: int, timeout_s: float, log: Any) -> None:
        self.host = host
        self.port = port
        self.timeout_s = float(timeout_s)
        self.log = log
        self._sock: socket.socket | None = None
        self._buf = b""
        self.banner = ""

    def open(self) -> str:
        """Connect and read the banner up to the first prompt; returns the banner text."""
        sock = net.connect(self.host, self.port, self.timeout_s)
        self._sock, self._buf = sock, b""
        try:
            self.banner = self._read_reply("(banner)")
        except BaseException:
            self.close()
            raise
        return self.banner

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionError("not connected to the DLC pro")
        return self._sock

    def _drain(self) -> None:
        """Discard bytes that arrived since the last reply (a late reply, an unsolicited message)."""
        sock = self._socket()
        stale = self._buf
        self._buf = b""
        while (data := net.recv_some(sock, None)) is not None:
            if not data:
                raise ConnectionError("the DLC pro closed the connection")
            stale += data
        if stale:
            self.log.warning("discarded bytes received between exchanges", data=stale[:200].decode("utf-8", "replace"))

    def _read_reply(self, command: str) -> str:
        sock = self._socket()
        deadline = time.monotonic() + self.timeout_s
        while True:
            i = self._buf.find(PROMPT)
            if i >= 0:
                data, self._buf = self._buf[:i], self._buf[i + len(PROMPT):]
                try:
                    return data.decode("utf-8")
                except UnicodeDecodeError:
                    raise DeviceError(f"reply is not text: {data[:80]!r}", command) from None
            if len(self._buf) > MAX_REPLY:
                self._buf = b""
                raise DeviceError(f"reply longer than {MAX_REPLY} bytes without the prompt", command)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self._buf:
                    partial, self._buf = self._buf, b""
                    raise DeviceError(f"incomplete reply, no prompt within {self.timeout_s:g} s: {partial[:80]!r}",
                                      command)
                raise TimeoutError(f"no reply from the DLC pro at {self.host}:{self.port} to {command} "
                                   f"within {self.timeout_s:g} s")
            chunk = net.recv_some(sock, remaining)
            if chunk is None:
                continue
            if not chunk:
                raise ConnectionError("the DLC pro closed the connection")
            self._buf += chunk

    def exchange(self, command: str) -> str:
        """Send one command line; return the reply text without prompt, trailing CR/LF and echo."""
        sock = self._socket()
        self._drain()
        sock.settimeout(self.timeout_s)
        sock.sendall(command.encode("ascii") + b"\n")
        text = self._read_reply(command)
        lines = [line.rstrip("\r") for line in text.split("\n")]
        if lines and lines[0].strip() == command:
            lines = lines[1:]  # the controller echoes commands
        return "\n".join(lines).strip()


def _bool(value: bool) -> str:
    return "#t" if value else "#f"


class TopticaDLCPro(Laser):
    """Toptica DLC pro: current setpoint, current driver on/off, emission and interlock state.

    Safe state: ``LASER:dl:cc:enabled #f`` (read back, and emission checked off).
    """

    options = {
        "address": Field(str, REQUIRED, doc='"host" or "host:port" of the command line (default port 1998); '
                                            '"sim://NAME" in the simulated testbed'),
        "timeout_s": Field(float, 2.0, unit="s", min=0.05, max=60.0, doc="deadline of every exchange"),
        "laser": Field(str, "laser1", choices=("laser1", "laser2"), doc="which laser of the controller"),
        "emission_wait_s": Field(float, 1.0, unit="s", min=0.0, max=30.0,
                                 doc="after enabling the current driver, how long to wait for emission before "
                                     "reporting why it is off; keep it well below the device's call_timeout_s"),
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        """The address must parse (a ``sim://`` reference is resolved by the daemon later)."""
        address = opts.get("address")
        if isinstance(address, str) and not address.startswith("sim://"):
            try:
                parse_address(address)
            except ValueError as e:
                return [ParamError("address", str(e), '"host" or "host:port"')]
        return []

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        self._link: DecopLink | None = None
        self._lock = threading.RLock()
        self._ident: dict[str, str] = {}
        self.laser = str(options.get("laser", "laser1"))

    # -- life cycle ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        try:
            host, port = parse_address(self.opts["address"])
        except ValueError as e:
            raise DeviceError(str(e), "connect") from None
        link = DecopLink(host, port, float(self.opts.get("timeout_s", 2.0)), self.log)
        link.open()
        self._link = link
        try:
            system_type = self._ref_str("system-type")
            if "dlc" not in re.sub(r"[\s_-]", "", system_type).lower():
                raise DeviceError(f"not a DLC pro: system-type is {system_type!r}", "(param-ref 'system-type)")
            self._ident = {
                "vendor": "Toptica",
                "model": system_type,
                "serial": self._ref_str("serial-number"),
                "firmware": self._ref_str("fw-ver"),
                "laser": self.laser,
            }
            clip = self._ref_float(self._p("dl:cc:current-clip"))
            self.log.info("connected", banner=link.banner.strip().splitlines()[:1], current_clip_ma=clip,
                          **self._ident)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def describe(self) -> dict[str, Any]:
        return dict(self._ident, address=self.opts.get("address"))

    # -- exchanges -----------------------------------------------------------------------------------------
    def _p(self, suffix: str) -> str:
        return f"{self.laser}:{suffix}"

    def _exchange(self, command: str) -> str:
        if self._link is None:
            raise ConnectionError(f"{self.name} is not connected")
        with self._lock:
            reply = self._link.exchange(command)
        if reply.startswith("Error"):
            raise DeviceError(f"controller answered {reply!r}", command)
        return reply

    def _ref(self, param: str) -> tuple[str, str]:
        command = f"(param-ref '{param})"
        return command, self._exchange(command)

    def _ref_float(self, param: str) -> float:
        command, reply = self._ref(param)
        if not _NUMBER.match(reply) or not math.isfinite(float(reply)):
            raise DeviceError(f"expected a number, got {reply[:80]!r}", command)
        return float(reply)

    def _ref_int(self, param: str) -> int:
        command, reply = self._ref(param)
        if not _INT.match(reply):
            raise DeviceError(f"expected an integer, got {reply[:80]!r}", command)
        return int(reply)

    def _ref_bool(self, param: str) -> bool:
        command, reply = self._ref(param)
        if reply not in ("#t", "#f"):
            raise DeviceError(f"expected #t or #f, got {reply[:80]!r}", command)
        return reply == "#t"

    def _ref_str(self, param: str) -> str:
        command, reply = self._ref(param)
        if len(reply) < 2 or reply[0] != '"' or reply[-1] != '"' or "\n" in reply:
            raise DeviceError(f"expected a quoted string, got {reply[:80]!r}", command)
        return re.sub(r"\\(.)", r"\1", reply[1:-1])

    def _set(self, param: str, value: str, check: bool = True) -> tuple[str, int]:
        """``param-set!``; returns (command, status). With ``check`` a negative status is a DeviceError."""
        command = f"(param-set! '{param} {value})"
        reply = self._exchange(command)
        if not _INT.match(reply):
            raise DeviceError(f"expected an integer status, got {reply[:80]!r}", command)
        status = int(reply)
        if status < 0 and check:
            raise DeviceError(f"refused with status {status}", command)
        if status > 0:
            self.log.warning("controller accepted a setting with a warning", command=command, status=status)
        return command, status

    # -- the Laser interface -------------------------------------------------------------------------------
    def set_current(self, milliamps: float) -> None:
        """Set the current setpoint (mA); refused above the controller's current-clip."""
        param = self._p("dl:cc:current-set")
        ma = float(milliamps)
        command = f"(param-set! '{param} {ma:.6f})"
        if not math.isfinite(ma) or ma < 0:
            raise DeviceError(f"{milliamps!r} mA is not a valid current; nothing was sent", command)
        clip = self._ref_float(self._p("dl:cc:current-clip"))
        if ma > clip * (1 + 1e-9):
            raise DeviceError(f"{ma:g} mA is above the controller's current-clip {clip:g} mA; nothing was sent",
                              command)
        _, status = self._set(param, f"{ma:.6f}", check=False)
        if status < 0:
            raise DeviceError(f"refused with status {status}; the setpoint is still "
                              f"{self._ref_float(param):g} mA", command)
        readback = self._ref_float(param)
        if abs(readback - ma) > max(0.01, 1e-4 * abs(ma)):
            raise DeviceError(f"the controller holds {readback:g} mA after setting {ma:g} mA", command)

    def set_output(self, on: bool) -> None:
        """Enable (emission checked, the reason reported if it stays off) or disable the current driver."""
        enabled = self._p("dl:cc:enabled")
        if not on:
            command, _ = self._set(enabled, "#f")
            if self._ref_bool(enabled):
                raise DeviceError("the current driver still reports enabled after switching it off", command)
            return
        command, _ = self._set(enabled, "#t")
        deadline = time.monotonic() + float(self.opts.get("emission_wait_s", 1.0))
        while True:
            if self._ref_bool(self._p("emission")):
                return
            interlock = self._ref_bool("interlock-open")
            key = self._ref_bool("frontkey-locked")
            if interlock or key or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        reasons = []
        if interlock:
            reasons.append("the interlock is open (interlock-open = #t)")
        if key:
            reasons.append("the front key is locked (frontkey-locked = #t)")
        if not self._ref_bool(enabled):
            reasons.append(f"the current driver is not enabled ({enabled} reads #f)")
        if not reasons:
            reasons.append(f"no cause reported within {self.opts.get('emission_wait_s', 1.0):g} s")
        try:
            health = self._ref_str("system-health-txt")
        except DeviceError as e:
            health = f"unreadable ({e})"
        try:
            self._set(enabled, "#f")  # do not leave it armed: it must not come on by itself later
            armed = ""
        except DeviceError as e:
            armed = f"; switching the current driver back off failed: {e}"
        raise DeviceError("emission is off: " + "; ".join(reasons) + f"; system health: {health!r}. The current "
                          "driver was switched back off: clear the cause, then switch the output on again" + armed,
                          command)

    def safe_state(self) -> None:
        """Current driver off (``cc:enabled #f``), read back, and emission checked off."""
        command, _ = self._set(self._p("dl:cc:enabled"), "#f")
        if self._ref_bool(self._p("dl:cc:enabled")):
            raise DeviceError("the current driver still reports enabled", command)
        if self._ref_bool(self._p("emission")):
            raise DeviceError(f"{self.laser}:emission still reads #t with the current driver off", command)

    def status(self) -> dict:
        """output (cc:enabled), emission (LASER:emission), emission_global, current_setpoint_ma,
        current_clip_ma, current_ma, voltage_v, temperature_c, temperature_setpoint_c, tec_enabled, tec_ready,
        interlock_open, frontkey_locked, system_health, system_health_txt, cc_status, cc_status_txt, trips
        (names), power_mw (None: the DLC pro reports no optical power here)."""
        out: dict[str, Any] = {
            "output": self._ref_bool(self._p("dl:cc:enabled")),
            "emission": self._ref_bool(self._p("emission")),
            "emission_global": self._ref_bool("emission"),
            "current_setpoint_ma": self._ref_float(self._p("dl:cc:current-set")),
            "current_clip_ma": self._ref_float(self._p("dl:cc:current-clip")),
            "current_ma": self._ref_float(self._p("dl:cc:current-act")),
            "voltage_v": self._ref_float(self._p("dl:cc:voltage-act")),
            "power_mw": None,
            "temperature_c": self._ref_float(self._p("dl:tc:temp-act")),
            "temperature_setpoint_c": self._ref_float(self._p("dl:tc:temp-set")),
            "tec_enabled": self._ref_bool(self._p("dl:tc:enabled")),
            "tec_ready": self._ref_bool(self._p("dl:tc:ready")),
            "interlock_open": self._ref_bool("interlock-open"),
            "frontkey_locked": self._ref_bool("frontkey-locked"),
            "system_health": self._ref_int("system-health"),
            "system_health_txt": self._ref_str("system-health-txt"),
            "cc_status": self._ref_int(self._p("dl:cc:status")),
            "cc_status_txt": self._ref_str(self._p("dl:cc:status-txt")),
        }
        out["trips"] = [n for n, k in (("interlock", "interlock_open"), ("frontkey", "frontkey_locked")) if out[k]]
        return out
