"""ID Quantique ID120 visible-range Si SPAD module over its SCPI-like command set (USB-TMC; TCP in the simulator).

Entry point ``idq.id120``. The same code runs in the lab (``resource = "USB0::0x1DDC::0x0330::<SN>::INSTR"``) and
in CI against :class:`drivers.sim.instruments.id120.SimID120`. Commands, wire units and ranges are those of
protocols.md section 3 (all wire values are integers): ``BIAS:VOLTAGE`` in uV (0-250 V, 80 mV step),
``THRESHOLD:VOLTAGE`` in uV (0-1.047 V, 500 uV step), ``DEADTIME:TIME`` (40-1 000 000, step 40; unit: option
``dead_time_unit``), ``COUNTERS:INTEGRATION_TIME`` in ms (200-100 000), ``REG:MEASURED_TEMP?`` in m degC,
``REG:RUN TRUE|FALSE``, ``COUNTERS:DETECTION_FREQ?`` in Hz.

Behaviour:

* The ID120 is a *voltage*-biased SPAD: the interface's ``set_bias(microamps)`` raises DeviceError saying so;
  use ``set_bias_voltage(volts)``, bound to the ``bias_v`` safety limit (required in the config).
* Every setting is written, then read back: a value the module did not take (out of its range, refused)
  raises DeviceError naming the command and what the module kept. With ``error_queue = true`` the driver also
  drains ``SYST:ERR?`` after each setting and puts the entries in the error (off by default: our sources do
  not show that the ID120 firmware answers ``SYST:ERR?``, and an unanswered query costs a full timeout).
* Replies can be slow (the reference driver uses 20 s, the default ``timeout_s``). Give the device a
  ``call_timeout_s`` above it in the config, or the supervisor gives up first.
* Safe state: ``REG:RUN FALSE`` (detection off), read back.
* A malformed reply is a DeviceError naming the command; link failures (pyvisa ``VisaIOError``, ``OSError``)
  propagate so the daemon faults and reconnects a fresh driver instance.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from drivers.base import DeviceError, PhotonDetector, exposed
from drivers.params import REQUIRED, Field
from drivers.visa import VisaLink, identity, parse_float, split_idn

__all__ = ["IDQuantiqueID120"]

BIAS_STEP_UV = 80_000
THRESHOLD_STEP_UV = 500
DEADTIME_STEP = 40


class IDQuantiqueID120(PhotonDetector):
    """ID Quantique ID120 Si SPAD module. Safe state: detection off (``REG:RUN FALSE``)."""

    options = {
        "resource": Field(str, REQUIRED, doc='VISA resource, e.g. "USB0::0x1DDC::0x0330::002001::INSTR", or '
                                             '"sim://NAME" in the simulated testbed'),
        "timeout_s": Field(float, 20.0, unit="s", min=0.05, max=120.0,
                           doc="timeout of every exchange (the module answers slowly; 20 s as the reference driver)"),
        "backend": Field(str, "@py",
                         doc='pyvisa backend: "@py" (pyvisa-py; USB needs pyusb) or "@ivi" (NI/Keysight VISA)'),
        "error_queue": Field(bool, False,
                             doc="also drain SYST:ERR? after each setting (only if the firmware answers it)"),
        "dead_time_unit": Field(str, "ns", choices=("ns", "us"),
                                doc="unit of the DEADTIME:TIME wire value (unverified: 'ns' fits the 40-step "
                                    "granularity; check against your module's manual)"),
    }
    limits = {"bias_v": Field(unit="V", doc="allowed SPAD bias voltages")}
    required_limits = ("bias_v",)

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        self._link: VisaLink | None = None
        self._idn: dict[str, str] = {}

    # -- life cycle ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        link = VisaLink(self.opts["resource"], self.opts["timeout_s"], backend=self.opts.get("backend", "@py"),
                        log=self.log)
        link.open()
        self._link = link
        try:
            idn = link.query("*IDN?")
            parts = split_idn(idn)
            vendor = parts[0].upper().replace(" ", "") if parts else ""
            if len(parts) < 2 or not vendor.startswith("IDQ") or "ID120" not in parts[1].upper():
                raise DeviceError(f"not an ID Quantique ID120: *IDN? answered {idn[:80]!r}", "*IDN?")
            self._idn = identity("ID Quantique", parts)
            if self.opts.get("error_queue"):
                link.drain_stale_errors()
        except BaseException:
            self.close()
            raise

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

    def _query_int(self, command: str) -> int:
        value = parse_float(self.link.query(command), command)
        return int(round(value))

    def _query_truefalse(self, command: str) -> bool:
        reply = self.link.query(command).strip().upper()
        if reply in ("TRUE", "1"):
            return True
        if reply in ("FALSE", "0"):
            return False
        raise DeviceError(f"expected TRUE or FALSE, got {reply[:60]!r}", command)

    def _set(self, header: str, value: int | str) -> None:
        """Write ``header value``, check the error queue (if enabled) and read the value back."""
        command = f"{header} {value}"
        link = self.link
        link.write(command)
        errors = link.read_errors() if self.opts.get("error_queue") else []
        if isinstance(value, str):
            kept: Any = "TRUE" if self._query_truefalse(header + "?") else "FALSE"
        else:
            kept = self._query_int(header + "?")
        if errors or kept != value:
            text = f"the module kept {kept} instead of {value} (out of its range or refused)" if kept != value else ""
            if errors:
                text = "; ".join(filter(None, [text, "instrument reported " + "; ".join(str(e) for e in errors)]))
            raise DeviceError(text, command)

    @staticmethod
    def _steps(value: float, scale: float, step: int, command: str) -> int:
        if not math.isfinite(value):
            raise DeviceError(f"{value!r} is not a finite number", command)
        return int(round(value * scale / step)) * step

    # -- the PhotonDetector interface ----------------------------------------------------------------------
    def set_bias(self, microamps: float) -> None:
        """Not available: the ID120 is a voltage-biased SPAD (use set_bias_voltage)."""
        raise DeviceError("the ID120 is a Geiger-mode SPAD biased by a voltage, not a current: use "
                          "set_bias_voltage(volts) (limit bias_v)", "set_bias")

    @exposed
    def set_bias_voltage(self, volts: Annotated[float, Field(unit="V", min=0, max=250, limit="bias_v")]) -> None:
        """Set the SPAD bias voltage (BIAS:VOLTAGE, rounded to the module's 80 mV step)."""
        self._set("BIAS:VOLTAGE", self._steps(volts, 1e6, BIAS_STEP_UV, "BIAS:VOLTAGE"))

    def set_enabled(self, on: bool) -> None:
        """Detection on or off (REG:RUN TRUE|FALSE)."""
        self._set("REG:RUN", "TRUE" if on else "FALSE")

    @exposed
    def set_threshold(self, volts: Annotated[float, Field(unit="V", min=0, max=1.047)]) -> None:
        """Set the discriminator threshold (THRESHOLD:VOLTAGE, rounded to 0.5 mV)."""
        self._set("THRESHOLD:VOLTAGE", self._steps(volts, 1e6, THRESHOLD_STEP_UV, "THRESHOLD:VOLTAGE"))

    @exposed
    def set_dead_time(self, microseconds: Annotated[float, Field(unit="us", min=0)]) -> None:
        """Set the dead time after each detection (DEADTIME:TIME, rounded to the module's step of 40 wire units)."""
        scale = 1000.0 if self.opts.get("dead_time_unit", "ns") == "ns" else 1.0
        self._set("DEADTIME:TIME", self._steps(microseconds, scale, DEADTIME_STEP, "DEADTIME:TIME"))

    @exposed
    def set_integration_time(self, milliseconds: Annotated[int, Field(unit="ms", min=200, max=100000)]) -> None:
        """Set the counters' integration time (COUNTERS:INTEGRATION_TIME), which averages count_rate_hz."""
        self._set("COUNTERS:INTEGRATION_TIME", self._steps(milliseconds, 1.0, 1, "COUNTERS:INTEGRATION_TIME"))

    def safe_state(self) -> None:
        """Detection off (REG:RUN FALSE)."""
        self.set_enabled(False)

    def status(self) -> dict:
        """enabled, state, bias_v, bias_error, count_rate_hz, temperature_c, threshold_v, dead_time_us,
        integration_time_ms, latched (always false: a SPAD does not latch), errors (with error_queue)."""
        scale = 1000.0 if self.opts.get("dead_time_unit", "ns") == "ns" else 1.0
        out: dict[str, Any] = {
            "enabled": self._query_truefalse("REG:RUN?"),
            "state": self.link.query("REG:STATE?").strip(),
            "bias_v": self._query_int("BIAS:VOLTAGE?") / 1e6,
            "bias_error": self._query_truefalse("BIAS:ERROR_STATUS?"),
            "count_rate_hz": parse_float(self.link.query("COUNTERS:DETECTION_FREQ?"), "COUNTERS:DETECTION_FREQ?"),
            "temperature_c": self._query_int("REG:MEASURED_TEMP?") / 1000.0,
            "threshold_v": self._query_int("THRESHOLD:VOLTAGE?") / 1e6,
            "dead_time_us": self._query_int("DEADTIME:TIME?") / scale,
            "integration_time_ms": self._query_int("COUNTERS:INTEGRATION_TIME?"),
            "latched": False,
        }
        if self.opts.get("error_queue"):
            out["errors"] = [str(e) for e in self.link.read_errors()]
        return out
