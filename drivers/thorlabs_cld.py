"""Thorlabs CLD101x / ITC40xx / LDC40xx laser-diode controllers over SCPI (USB-TMC, or TCP in the simulator).

Entry point ``thorlabs.cld``. The same code runs in the lab (``resource = "USB0::0x1313::0x804F::M00XXXXXX::INSTR"``)
and in CI against :class:`drivers.sim.instruments.cld1015.SimCLD1015` (``TCPIP::127.0.0.1::<port>::SOCKET``,
which the daemon substitutes for ``"sim://<name>"``). Commands are those of protocols.md section 1.1.

Behaviour:

* ``connect``: open the VISA resource (``\\n`` terminations, ``timeout_s`` on every exchange), check that
  ``*IDN?`` names THORLABS and a CLD, ITC or LDC model (else DeviceError), read the temperature unit, drain
  the error queue (stale entries are logged) and ``*CLS``.
* ``set_current(milliamps)``: refuses a setpoint above the controller's own ``SOUR:CURR:LIM?`` reading
  (DeviceError; the daemon's configured ``current_ma`` limit is checked before the driver is called), writes
  ``SOUR:CURR <A>`` and checks ``SYST:ERR?``: any entry (e.g. ``-222,"Data out of range"``) is a DeviceError
  naming the command, and the instrument keeps its previous setpoint.
* ``set_output(True)``: with ``require_tec`` (the default) the TEC (``OUTP2``) is switched on first and read
  back, as the lantz CLD1015 driver orders it; then ``OUTP1:STAT ON``, the error queue, ``OUTP1:STAT?`` and the
  protection trip queries: a tripped interlock, key lock or over-temperature raises DeviceError saying which.
  The output is not retried (protocols.md section 7: clear the cause, then switch on explicitly).
* ``safe_state``: ``OUTP1:STAT OFF`` and read back. The TEC is deliberately left on: it keeps the diode at
  its set temperature and cannot emit light; switching it off is an operator decision.
* Any link failure (pyvisa ``VisaIOError``, ``OSError``) propagates, so the daemon faults the device and
  reconnects a fresh instance; a malformed reply is a DeviceError naming the command.
"""

from __future__ import annotations

import math
import re
from typing import Any

from drivers.base import DeviceError, Laser
from drivers.params import REQUIRED, Field
from drivers.visa import VisaLink, identity, split_idn

__all__ = ["ThorlabsCLD", "TRIPS", "CONDITION_BITS"]

# name in status()["trips"] -> query (each replies 0/1)
TRIPS: dict[str, str] = {
    "interlock": "OUTP:PROT:INTL:TRIP?",
    "keylock": "OUTP:PROT:KEYL:TRIP?",
    "overtemperature": "OUTP:PROT:OTEM:TRIP?",
    "compliance_voltage": "OUTP:PROT:VOLT:TRIP?",
    "external_enable": "OUTP:PROT:EXT:TRIP?",
}

# STAT:MEAS:COND? bit positions (protocols.md 1.1, Series 4000 manual) -> name in status()["conditions"]
CONDITION_BITS: dict[int, str] = {
    1: "ld_compliance_voltage",
    2: "ld_interlock",
    3: "ld_current_limit",
    4: "ld_output_inhibit",
    5: "power_limit",
    8: "temperature_protection",
    9: "temperature_window",
    10: "sensor_fail",
    12: "tec_connection",
    14: "overtemperature",
}

_MODEL_RE = re.compile(r"^(CLD|ITC|LDC)\d", re.IGNORECASE)
_TEMP_UNITS = {"C": "C", "CEL": "C", "K": "K", "F": "F", "FAR": "F"}


def _to_celsius(value: float, unit: str) -> float:
    if unit == "K":
        return value - 273.15
    if unit == "F":
        return (value - 32.0) * 5.0 / 9.0
    return value


class ThorlabsCLD(Laser):
    """Thorlabs CLD101x (and ITC40xx / LDC40xx) laser-diode controller: the SPDC pump.

    Safe state: LD output off (``OUTP1:STAT OFF``); the TEC stays on.
    """

    options = {
        "resource": Field(str, REQUIRED, doc='VISA resource, e.g. "USB0::0x1313::0x804F::M00XXXXXX::INSTR", or '
                                             '"sim://NAME" in the simulated testbed'),
        "timeout_s": Field(float, 3.0, unit="s", min=0.05, max=60.0, doc="timeout of every exchange"),
        "require_tec": Field(bool, True, doc="switch the TEC on (and check it) before the LD output, as the lantz "
                                             "driver does; false on an LDC (no TEC) or to drive an uncooled diode"),
        "backend": Field(str, "@py",
                         doc='pyvisa backend: "@py" (pyvisa-py; USB needs pyusb) or "@ivi" (NI/Keysight VISA)'),
    }

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        self._link: VisaLink | None = None
        self._idn: dict[str, str] = {}
        self._temp_unit = "C"
        self._has_tec = True

    # -- life cycle ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        link = VisaLink(self.opts["resource"], self.opts["timeout_s"], backend=self.opts.get("backend", "@py"),
                        log=self.log)
        link.open()
        self._link = link
        try:
            self._identify()
            if self._has_tec:
                unit = link.query("UNIT:TEMP?").upper()
                if unit not in _TEMP_UNITS:
                    raise DeviceError(f"unknown temperature unit {unit!r}", "UNIT:TEMP?")
                self._temp_unit = _TEMP_UNITS[unit]
            link.drain_stale_errors()
            link.write("*CLS")
        except BaseException:
            self.close()
            raise

    def _identify(self) -> None:
        idn = self._q("*IDN?")
        parts = split_idn(idn)
        if len(parts) < 2 or "THORLABS" not in parts[0].upper() or not _MODEL_RE.match(parts[1]):
            raise DeviceError(f"not a Thorlabs CLD/ITC/LDC controller: *IDN? answered {idn[:80]!r}", "*IDN?")
        self._idn = identity("Thorlabs", parts)
        self._has_tec = not parts[1].upper().startswith("LDC")
        if not self._has_tec and self.opts["require_tec"]:
            raise DeviceError(f"{parts[1]} has no TEC output: set options.require_tec = false", "*IDN?")

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def describe(self) -> dict[str, Any]:
        return dict(self._idn, resource=self.opts["resource"])

    # -- helpers -------------------------------------------------------------------------------------------
    @property
    def link(self) -> VisaLink:
        if self._link is None:
            raise ConnectionError(f"{self.name} is not connected")
        return self._link

    def _q(self, command: str) -> str:
        return self.link.query(command)

    def _ld(self, suffix: str = "") -> str:
        """The LD output header: OUTP1 on controllers with a TEC, OUTP on an LDC."""
        return "OUTP1:STAT" + suffix if self._has_tec else "OUTP:STAT" + suffix

    def _current_limit_a(self) -> float:
        return self.link.query_float("SOUR:CURR:LIM?")

    def _tripped(self) -> list[str]:
        return [name for name, query in TRIPS.items() if self.link.query_bool01(query)]

    # -- the Laser interface -------------------------------------------------------------------------------
    def set_current(self, milliamps: float) -> None:
        """Set the LD current setpoint (mA); refused above the controller's own current limit."""
        amps = float(milliamps) / 1000.0
        command = f"SOUR:CURR {amps:.9g}"
        if not math.isfinite(amps):
            raise DeviceError(f"{milliamps!r} mA is not a finite current", command)
        limit_a = self._current_limit_a()
        if amps > limit_a * (1 + 1e-9):
            raise DeviceError(f"{milliamps:g} mA is above the controller's current limit {limit_a * 1000:g} mA "
                              "(SOUR:CURR:LIM?); nothing was sent", command)
        self.link.write_checked(command)

    def set_output(self, on: bool) -> None:
        """Switch the LD output on (TEC first when required; trips reported) or off."""
        link = self.link
        if not on:
            command = self._ld(" OFF")
            link.write_checked(command)
            if link.query_bool01(self._ld("?")):
                raise DeviceError("the LD output is still on after switching it off", command)
            return
        if self.opts["require_tec"] and self._has_tec:
            if not link.query_bool01("OUTP2:STAT?"):
                link.write_checked("OUTP2:STAT ON")
                if not link.query_bool01("OUTP2:STAT?"):
                    raise DeviceError("the TEC did not switch on; the LD output was not switched on", "OUTP2:STAT ON")
        command = self._ld(" ON")
        link.write(command)
        errors = link.read_errors()
        is_on = link.query_bool01(self._ld("?"))
        trips = self._tripped()
        detail = ("; instrument reported " + "; ".join(str(e) for e in errors)) if errors else ""
        if trips:
            raise DeviceError(f"LD output refused: protection tripped ({', '.join(trips)}); clear the cause, "
                              "then switch the output on again" + detail, command)
        if errors:
            raise DeviceError("instrument reported " + "; ".join(str(e) for e in errors), command)
        if not is_on:
            raise DeviceError("the LD output did not switch on (no error and no trip reported)", command)

    def safe_state(self) -> None:
        """LD output off (the TEC is left on: it holds the diode temperature and emits no light)."""
        self.set_output(False)

    def status(self) -> dict:
        """output, tec, current_setpoint_ma, current_limit_ma, current_ma, power_mw, temperature_c,
        tec_setpoint_c, trips (names), conditions (STAT:MEAS:COND? bits by name), errors (drained)."""
        link = self.link
        out: dict[str, Any] = {
            "output": link.query_bool01(self._ld("?")),
            "tec": link.query_bool01("OUTP2:STAT?") if self._has_tec else None,
            "current_setpoint_ma": link.query_float("SOUR:CURR?") * 1000.0,
            "current_limit_ma": self._current_limit_a() * 1000.0,
            "current_ma": link.query_float("MEAS:CURR?") * 1000.0,
            "power_mw": link.query_float("MEAS:POW2?") * 1000.0,
        }
        if self._has_tec:
            unit = self._temp_unit
            out["temperature_c"] = _to_celsius(link.query_float("MEAS:SCAL:TEMP?"), unit)
            out["tec_setpoint_c"] = _to_celsius(link.query_float("SOUR2:TEMP?"), unit)
        else:
            out["temperature_c"] = None
        out["trips"] = self._tripped()
        cond_text = link.query("STAT:MEAS:COND?")
        try:
            cond = int(float(cond_text))
        except ValueError:
            raise DeviceError(f"expected an integer, got {cond_text[:60]!r}", "STAT:MEAS:COND?") from None
        out["conditions"] = [name for bit, name in CONDITION_BITS.items() if cond & (1 << bit)]
        out["errors"] = [str(e) for e in link.read_errors()]
        return out
