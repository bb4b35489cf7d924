"""A pyvisa session for SCPI-style instruments, with the failure semantics qnetd's drivers need.

:class:`VisaLink` opens a resource with explicit terminations (``\\n`` both ways: pyvisa's default write
termination ``\\r\\n`` silently breaks many instruments, protocols.md section 5) and a timeout on every
exchange, and sorts failures into the two kinds :mod:`drivers.base` distinguishes:

* the instrument answered, but wrongly -- a reply that is not what the command promises (not a number, not
  ASCII, too long), or an entry in its error queue -- raises :class:`~drivers.base.DeviceError` naming the
  command, so the device stays ready;
* anything about the link -- pyvisa's ``VisaIOError`` (timeout, connection lost), ``OSError``, a failed open --
  propagates unchanged, and the daemon faults the device and reconnects a fresh driver instance.

A reply is read chunk by chunk up to the terminator with a deadline of ``timeout_s`` for the whole reply, so
an instrument that streams bytes without ever terminating cannot hold a call longer than that (pyvisa's own
read loop only times out when data *stops*).

The backend is pyvisa-py (``"@py"``) by default: pure Python, opens ``TCPIP::host::port::SOCKET`` resources
(the simulators) and, with pyusb, USB-TMC instruments. ``"@ivi"`` (or ``""``) selects an installed NI/Keysight
VISA instead.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

from drivers.base import DeviceError

__all__ = ["ErrorEntry", "VisaLink", "identity", "parse_bool01", "parse_float", "split_idn"]

_ERR_RE = re.compile(r'^\s*([+-]?\d+)\s*,\s*"?(.*?)"?\s*$')
SIM_SCHEME = "sim://"


@dataclass(frozen=True)
class ErrorEntry:
    """One ``SYST:ERR?`` entry."""

    code: int
    message: str

    def __str__(self) -> str:
        return f'{self.code:+d},"{self.message}"'


def parse_float(text: str, command: str) -> float:
    """A finite number from a reply, or DeviceError naming ``command``."""
    try:
        value = float(text.strip())
    except ValueError:
        raise DeviceError(f"expected a number, got {_show(text)}", command) from None
    if not math.isfinite(value) or abs(value) >= 9.9e37:  # 9.91E+37 is SCPI's NaN
        raise DeviceError(f"instrument reports no valid value ({_show(text)})", command)
    return value


def parse_bool01(text: str, command: str) -> bool:
    """SCPI boolean replies ``1``/``0`` (``ON``/``OFF`` accepted), or DeviceError naming ``command``."""
    t = text.strip().upper()
    if t in ("1", "ON", "+1"):
        return True
    if t in ("0", "OFF", "+0"):
        return False
    raise DeviceError(f"expected 1 or 0, got {_show(text)}", command)


def split_idn(idn: str) -> list[str]:
    """The comma-separated fields of an ``*IDN?`` reply: maker, model, serial, firmware (which may contain
    commas)."""
    return [p.strip() for p in idn.split(",")]


def identity(vendor: str, fields: list[str]) -> dict[str, str]:
    """What a driver's describe() reports from the ``*IDN?`` fields (at least maker and model)."""
    return {
        "vendor": vendor,
        "model": fields[1],
        "serial": fields[2] if len(fields) > 2 else "",
        "firmware": ",".join(fields[3:]) if len(fields) > 3 else "",
    }


def _show(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


class VisaLink:
    """One open VISA message-based session (blocking; used from the device's worker thread only)."""

    def __init__(self, resource: str, timeout_s: float, *, backend: str = "@py", log: Any = None,
                 max_reply: int = 65536, error_limit: int = 32) -> None:
        self.resource = resource
        self.timeout_s = float(timeout_s)
        self.backend = backend
        self.log = log
        self.max_reply = max_reply
        self.error_limit = error_limit
        self._rm: Any = None
        self._res: Any = None

    # -- life cycle ----------------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the resource. A failure to open propagates as pyvisa raised it (the link is in doubt)."""
        if self.resource.startswith(SIM_SCHEME):
            raise DeviceError(f"{self.resource!r} was not resolved: sim:// addresses need a [simulation] table in "
                              "the config, which makes the daemon pass the simulator's VISA address instead",
                              "open")
        import pyvisa

        ms = max(1, int(round(self.timeout_s * 1000)))
        self._rm = pyvisa.ResourceManager(self.backend)
        try:
            self._res = self._rm.open_resource(self.resource, read_termination="\n", write_termination="\n",
                                               timeout=ms, open_timeout=ms)
            try:
                self._res.clear()  # drop anything left over from an earlier session
            except Exception:  # noqa: BLE001 - not every interface supports clear(); harmless if it fails
                pass
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close this session; never raises (the link may already be gone).

        Only the resource is closed, never the ResourceManager: pyvisa shares one manager per backend
        between all its users, and closing it would close every other device's session too.
        """
        res, self._res = self._res, None
        self._rm = None
        if res is not None:
            try:
                res.close()
            except Exception:  # noqa: BLE001 - closing a dead link
                pass

    @property
    def is_open(self) -> bool:
        return self._res is not None

    def _session(self) -> Any:
        if self._res is None:
            raise ConnectionError(f"{self.resource} is not open")
        return self._res

    # -- exchanges -----------------------------------------------------------------------------------------
    def write(self, command: str) -> None:
        """Send one command line."""
        res = self._session()
        if self.log is not None:
            self.log.debug("visa write", command=command)
        res.write(command)

    def read_line(self, command: str) -> str:
        """Read one reply line for ``command`` (terminator stripped) within ``timeout_s``.

        Link failures (timeout, connection lost) propagate; a reply that is too long or not ASCII raises
        DeviceError. If bytes keep arriving without a terminator past the deadline, TimeoutError (the
        session is out of step: reconnect).
        """
        res = self._session()
        from pyvisa import constants

        deadline = time.monotonic() + self.timeout_s
        out = bytearray()
        more = constants.StatusCode.success_max_count_read
        with res.ignore_warning(more):
            while True:
                chunk, status = res.visalib.read(res.session, 4096)
                out.extend(chunk)
                if status != more:
                    break  # terminator read, or the message ended
                if len(out) > self.max_reply:
                    raise DeviceError(f"reply longer than {self.max_reply} bytes without a terminator", command)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command}: reply still incomplete after {self.timeout_s:g} s")
        raw = bytes(out).rstrip(b"\r\n")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise DeviceError(f"reply is not ASCII text: {raw[:60]!r}", command) from None
        if self.log is not None:
            self.log.debug("visa reply", command=command, reply=text)
        return text

    def query(self, command: str) -> str:
        """Send a query and return its reply line (stripped)."""
        self.write(command)
        return self.read_line(command).strip()

    def query_float(self, command: str) -> float:
        return parse_float(self.query(command), command)

    def query_bool01(self, command: str) -> bool:
        return parse_bool01(self.query(command), command)

    # -- error queue ---------------------------------------------------------------------------------------
    def read_errors(self) -> list[ErrorEntry]:
        """Drain ``SYST:ERR?`` until ``0,"No error"`` (at most ``error_limit`` entries)."""
        errors: list[ErrorEntry] = []
        for _ in range(self.error_limit):
            reply = self.query("SYST:ERR?")
            m = _ERR_RE.match(reply)
            if not m:
                raise DeviceError(f"expected '<code>,\"<message>\"', got {_show(reply)}", "SYST:ERR?")
            code = int(m.group(1))
            if code == 0:
                return errors
            errors.append(ErrorEntry(code, m.group(2)))
        raise DeviceError(f"error queue did not empty after {self.error_limit} reads: "
                          + "; ".join(str(e) for e in errors[-3:]), "SYST:ERR?")

    def drain_stale_errors(self) -> None:
        """Empty the error queue at connect; what an earlier session left there is logged, not raised."""
        stale = self.read_errors()
        if stale and self.log is not None:
            self.log.warning("instrument had queued errors at connect", errors=[str(e) for e in stale])

    def check(self, command: str) -> None:
        """Raise DeviceError naming ``command`` if the instrument queued errors (draining the queue)."""
        errors = self.read_errors()
        if errors:
            raise DeviceError("instrument reported " + "; ".join(str(e) for e in errors), command)

    def write_checked(self, command: str) -> None:
        """Send a command, then check the error queue: DeviceError naming the command on any entry."""
        self.write(command)
        self.check(command)
