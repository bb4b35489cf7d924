"""OZ Optics EPC-04 / EPC-400 electronic polarization controller: four fiber squeezers driven by voltages,
over its ASCII serial dialect (protocols.md section 2.2).

Entry point ``ozoptics.epc``. The same code runs in the lab (``resource = "/dev/serial/by-id/usb-..."``) and in
CI against :class:`drivers.sim.instruments.epc04.SimEPC04` on a pseudo-terminal (``"sim://NAME"``, which the
daemon replaces with the simulator's port). See docs/hardware/ozoptics-epc.md.

Link: 9600 baud 8N1, no flow control. Commands end with ``\\r\\n``. A reply is zero or more lines, then a line
``Done`` (success) or a line ending in ``Error!`` (failure); a first line equal to the command is an echo and
is dropped. Bytes waiting before a command are discarded (and logged).

Errors: ``Error!`` and a malformed reply (unparseable line, missing channels, some bytes but no ``Done`` /
``Error!`` within ``timeout_s``) raise :class:`~drivers.base.DeviceError` naming the command. No byte at all
within ``timeout_s`` raises ``TimeoutError``, and a port that fails raises ``serial.SerialException`` /
``OSError``: the link is in doubt and the daemon reconnects a fresh driver instance.

The interface's paddles: the EPC-04 has no paddle angles. :meth:`move` and :meth:`positions` raise
DeviceError saying so; use :meth:`set_voltage` / :meth:`voltages` (0-based channels, millivolts) instead.
:meth:`home` sets every channel to 0 V.
"""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Annotated, Any

import serial

from drivers.base import DeviceError, PolarizationController, exposed
from drivers.params import REQUIRED, Field

__all__ = ["CHANNELS", "MAX_FREQUENCY_HZ", "MAX_MV", "OZOpticsEPC", "parse_channels"]

CHANNELS = 4
MAX_MV = 5000  # +-5 V output range (pylablib clamps to it)
MAX_FREQUENCY_HZ = 100  # pylablib's scrambling frequency range 0..100 Hz
POLL_S = 0.02  # serial read timeout: how often a waiting loop checks its deadline
MAX_REPLY = 64 * 1024

_CHANNELS_RE = re.compile(r"^\s*" + r"\s+".join(rf"CH{i}\s*([+-]?\d+)" for i in range(1, CHANNELS + 1)) + r"\s*$",
                          re.IGNORECASE)
_MODE_RE = re.compile(r"\b(AC|DC)\b", re.IGNORECASE)


def parse_channels(line: str) -> list[int] | None:
    """``CH1 <n> CH2 <n> CH3 <n> CH4 <n>`` -> the four integers; None if the line has another shape."""
    m = _CHANNELS_RE.match(line)
    return [int(g) for g in m.groups()] if m else None


class OZOpticsEPC(PolarizationController):
    """OZ Optics EPC-04 / EPC-400: per-channel voltages (mV), DC hold or AC scrambling.

    Safe state: DC mode (no scrambling) and every channel at 0 V, read back.
    """

    options = {
        "resource": Field(str, REQUIRED, doc="serial port path (lab: /dev/serial/by-id/...; simulated testbed: "
                                             "sim://NAME) or a pyserial URL"),
        "timeout_s": Field(float, 2.0, unit="s", min=0.05, max=60.0,
                           doc="deadline of every exchange; no reply = link fault"),
    }
    limits = {"voltage_mv": Field(unit="mV", doc="allowed channel voltages")}

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        self._ser: serial.SerialBase | None = None
        self._lock = threading.RLock()
        self._rest = b""
        self.configuration: list[str] = []

    @property
    def paddle_count(self) -> int:
        return CHANNELS

    # -- life cycle ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        self._ser = serial.serial_for_url(
            self.opts["resource"], baudrate=9600, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE, rtscts=False, xonxoff=False, timeout=POLL_S,
            write_timeout=float(self.opts.get("timeout_s", 2.0)),
        )
        try:
            self._ser.reset_input_buffer()
            self.configuration = self._query("CD")
            volts = self._read_voltages()
            mode = self._read_mode()
            self.log.info("connected", configuration=self.configuration, voltages_mv=volts, mode=mode)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:  # noqa: BLE001 - close must not raise on a dead link
                pass

    def describe(self) -> dict[str, Any]:
        return {"vendor": "OZ Optics", "model": "EPC-04", "channels": CHANNELS,
                "configuration": list(self.configuration), "resource": self.opts.get("resource")}

    def safe_state(self) -> None:
        """DC mode (stop any scrambling), then every channel to 0 V; both read back."""
        self._command("MDC")
        for ch in range(CHANNELS):
            self._command(f"V{ch + 1},{0:04d}")
        mode = self._read_mode()
        volts = self._read_voltages()
        if mode != "dc" or any(volts):
            raise DeviceError(f"after the safe state the controller reports mode {mode!r} and {volts} mV", "MDC")

    # -- exchanges -----------------------------------------------------------------------------------------
    def _port(self) -> serial.SerialBase:
        if self._ser is None:
            raise serial.SerialException(f"{self.name}: port is not open")
        return self._ser

    def _drain(self) -> None:
        ser = self._port()
        stale = self._rest
        self._rest = b""
        n = ser.in_waiting
        if n:
            stale += ser.read(n)
        if stale:
            self.log.warning("discarded bytes received between exchanges", data=stale[:200].decode("ascii", "replace"))

    def _query(self, command: str) -> list[str]:
        """Send ``command``; return the reply lines before ``Done`` (echo removed). ``Error!``: DeviceError."""
        with self._lock:
            ser = self._port()
            self._drain()
            ser.write(command.encode("ascii") + b"\r\n")
            ser.flush()
            timeout = float(self.opts.get("timeout_s", 2.0))
            deadline = time.monotonic() + timeout
            buf = b""
            lines: list[str] = []
            got_any = False
            while True:
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    text = raw.decode("ascii", errors="replace").strip()
                    if not text:
                        continue
                    if not lines and text == command:
                        got_any = True
                        continue  # echo
                    if text == "Done":
                        self._rest = buf
                        return lines
                    if text.endswith("Error!"):
                        self._rest = buf
                        detail = "; ".join(lines + ([text] if text != "Error!" else []))
                        raise DeviceError("controller answered Error!" + (f" ({detail})" if detail else ""), command)
                    lines.append(text)
                if len(buf) + sum(map(len, lines)) > MAX_REPLY:
                    raise DeviceError("reply too long without Done or Error!", command)
                if time.monotonic() >= deadline:
                    if got_any or lines or buf:
                        shown = "; ".join(lines + ([buf.decode("ascii", "replace")] if buf else []))
                        raise DeviceError(f"incomplete reply, no Done or Error! within {timeout:g} s: {shown[:120]!r}",
                                          command)
                    raise TimeoutError(f"{self.name}: no reply to {command} within {timeout:g} s")
                data = ser.read(max(1, ser.in_waiting))
                if data:
                    buf += data

    def _command(self, command: str) -> None:
        """A setting: ``Done`` expected. Text lines before it are logged (their content is not specified)."""
        lines = self._query(command)
        if lines:
            self.log.debug("setting answered with text", command=command, lines=lines)

    def _read_channels(self, command: str) -> list[int]:
        lines = self._query(command)
        values = parse_channels(lines[0]) if len(lines) == 1 else None
        if values is None:
            raise DeviceError(f"expected 'CH1 <n> CH2 <n> CH3 <n> CH4 <n>', got {lines!r}"[:200], command)
        return values

    def _read_voltages(self) -> list[int]:
        return self._read_channels("V?")

    def _read_mode(self) -> str:
        lines = self._query("M?")
        found = {m.upper() for line in lines for m in _MODE_RE.findall(line)}
        if len(found) != 1:
            raise DeviceError(f"cannot tell AC from DC in {lines!r}"[:200], "M?")
        return found.pop().lower()

    @staticmethod
    def _check_channel(channel: int, command: str) -> None:
        if not isinstance(channel, int) or isinstance(channel, bool) or not 0 <= channel < CHANNELS:
            raise DeviceError(f"channel {channel!r} does not exist (0..{CHANNELS - 1})", command)

    # -- voltages, mode, frequencies -------------------------------------------------------------------------
    @exposed
    def set_voltage(
        self,
        channel: Annotated[int, Field(min=0, max=CHANNELS - 1, doc="0-based channel (the unit's CH1 is 0)")],
        millivolts: Annotated[float, Field(unit="mV", min=-MAX_MV, max=MAX_MV, limit="voltage_mv")],
    ) -> None:
        """Set one channel's voltage (rounded to whole mV) and check the controller holds it."""
        self._check_channel(channel, "V<ch>,<mV>")
        value = float(millivolts)
        if not math.isfinite(value) or abs(round(value)) > MAX_MV:
            raise DeviceError(f"{millivolts!r} mV is outside the +-{MAX_MV} mV range; nothing was sent",
                              f"V{channel + 1},<mV>")
        mv = round(value)
        command = f"V{channel + 1},{mv:04d}"
        self._command(command)
        held = self._read_voltages()[channel]
        if held != mv:
            raise DeviceError(f"the controller holds {held} mV on channel {channel} after setting {mv} mV "
                              "(clamped to its range?)", command)

    @exposed
    def voltages(self) -> list[float]:
        """The four channel voltages in mV (channel 0 first)."""
        return [float(v) for v in self._read_voltages()]

    @exposed
    def set_mode(
        self, mode: Annotated[str, Field(choices=("dc", "ac"), doc="dc: hold the voltages; ac: scramble")],
    ) -> None:
        """DC (voltages held) or AC (polarization scrambling at the channel frequencies)."""
        mode = str(mode).lower()
        command = f"M{mode.upper()}"
        if mode not in ("dc", "ac"):
            raise DeviceError(f"mode must be 'dc' or 'ac', got {mode!r}", command)
        self._command(command)
        got = self._read_mode()
        if got != mode:
            raise DeviceError(f"the controller reports mode {got!r} after {command}", command)

    @exposed
    def set_frequency(
        self,
        channel: Annotated[int, Field(min=0, max=CHANNELS - 1, doc="0-based channel")],
        hertz: Annotated[int, Field(unit="Hz", min=0, max=MAX_FREQUENCY_HZ)],
    ) -> None:
        """Set one channel's scrambling frequency (used in AC mode)."""
        self._check_channel(channel, "F<ch>,<Hz>")
        if isinstance(hertz, bool) or not isinstance(hertz, int) or not 0 <= hertz <= MAX_FREQUENCY_HZ:
            raise DeviceError(f"{hertz!r} Hz is outside 0..{MAX_FREQUENCY_HZ} Hz; nothing was sent",
                              f"F{channel + 1},<Hz>")
        command = f"F{channel + 1},{hertz:04d}"
        self._command(command)
        held = self._read_channels("F?")[channel]
        if held != hertz:
            raise DeviceError(f"the controller reports {held} Hz on channel {channel} after setting {hertz} Hz",
                              command)

    # -- PolarizationController ------------------------------------------------------------------------------
    def move(self, paddle: int, degrees: float) -> None:
        """Not available: the EPC-04 has voltage-driven squeezers, not paddles at angles."""
        raise DeviceError("the OZ Optics EPC-04 has no paddle angles: its fiber squeezers are driven by voltages; "
                          "use set_voltage(channel, millivolts) instead (no angle-to-voltage calibration is "
                          "known)", "move")

    def home(self) -> None:
        """Every channel to 0 V (the mode is left as it is)."""
        for ch in range(CHANNELS):
            self._command(f"V{ch + 1},{0:04d}")
        volts = self._read_voltages()
        if any(volts):
            raise DeviceError(f"channels did not all go to 0 V: {volts} mV", "V?")

    def positions(self) -> list[float]:
        """Not available: there are no paddle angles; read voltages() instead."""
        raise DeviceError("the OZ Optics EPC-04 has no paddle angles; read voltages() (mV) instead", "positions")

    def status(self) -> dict:
        """voltages_mv, mode ("dc"/"ac"), frequencies_hz, channels; positions_deg is [] (no angles) and homed
        is true (voltages are absolute: nothing to home)."""
        return {
            "voltages_mv": [float(v) for v in self._read_voltages()],
            "mode": self._read_mode(),
            "frequencies_hz": [float(f) for f in self._read_channels("F?")],
            "channels": CHANNELS,
            "positions_deg": [],
            "homed": True,
        }
