"""Simulated ID Quantique ID120 (visible-range Si SPAD module), speaking its SCPI-like commands over TCP.

A view onto one detector of the bench, ``BenchState.detector(options["detector"])``: ``REG:RUN`` switches
that detector's ``enabled`` flag (so the physics stops or starts its clicks), and the count rate it reports is
``BenchState.rates_hz[detector]``, the click rate the physics measured. The module's own settings (bias,
threshold, dead time, integration time, temperature set point, output polarity) live in this object: the
bench has no SPAD bias model. They survive :meth:`stop`/:meth:`start` like a real module's stored settings.

Commands, units and ranges as in protocols.md section 3 (wire values are integers in the stated units):

================================  =============================================================================
``*IDN?``                         ``IDQuantique,ID120,<serial>,<firmware>``
``REG:RUN TRUE|FALSE`` / ``?``    detection on/off (cooling, bias and output) = the bench detector's ``enabled``
``REG:STATE?``                    ``RUNNING``, ``STOPPED`` or ``BIAS_ERROR`` (simulator-defined words: the real
                                  module's strings are not in our sources; the driver passes them through)
``BIAS:VOLTAGE <uV>`` / ``?``     0..250 000 000 uV, rounded to the 80 000 uV (80 mV) step
``BIAS:ERROR_STATUS?``            ``TRUE``/``FALSE`` (set with :meth:`SimID120.set_bias_error`)
``THRESHOLD:VOLTAGE <uV>`` / ``?``  0..1 047 000 uV, rounded to the 500 uV step
``DEADTIME:TIME <n>`` / ``?``     40..1 000 000, rounded to the step of 40 (unit: see docs/hardware/idq-id120.md)
``COUNTERS:INTEGRATION_TIME <ms>``  200..100 000 ms (and ``?``)
``COUNTERS:DETECTION_FREQ?``      click rate in Hz (integer), 0 while not running
``COUNTERS:DETECTION_COUNT?``     clicks in one integration time (rate x integration time)
``REG:TEMP_SET_POINT <m degC>``   -50 000..-10 000 (and ``?``)
``REG:MEASURED_TEMP?``            m degC: the set point while running (regulation modelled as instant), else 25 000
``OUTPUT{1,2}:POLARITY POSITIVE|NEGATIVE`` / ``?``
``SYST:ERR?``, ``*RST``, ``*CLS``, ``*OPC?``  as in :mod:`drivers.sim.instruments.scpi`
================================  =============================================================================

Out of range: ``-222,"Data out of range;..."`` and the value is unchanged; a non-number: -104; an unknown
header: -113.
"""

from __future__ import annotations

from typing import Any

from drivers.params import Field
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.scpi import Call, ScpiError, ScpiInstrument, choice, number

# (minimum, maximum, step) of each setting in wire units (protocols.md section 3)
BIAS_UV = (0, 250_000_000, 80_000)
THRESHOLD_UV = (0, 1_047_000, 500)
DEADTIME = (40, 1_000_000, 40)
INTEGRATION_MS = (200, 100_000, 1)
TEMP_SET_POINT_MC = (-50_000, -10_000, 1)
AMBIENT_MC = 25_000


def _stepped(call: Call, limits: tuple[int, int, int], what: str) -> int:
    call.nargs(1)
    lo, hi, step = limits
    value = number(call.args[0])
    if not lo <= value <= hi:
        raise ScpiError(-222, f"{what} {value:g} outside {lo}..{hi}")
    return int(round(value / step) * step)


def _truefalse(text: str) -> bool:
    return choice(text, ("TRUE", "FALSE")) == "TRUE"


class SimID120(ScpiInstrument):
    """ID Quantique ID120 on a TCP socket, reflecting ``BenchState.detector(options["detector"])``.

    Test control: :meth:`set_bias_error`.
    """

    model = "idq_id120"
    options = {
        **ScpiInstrument.options,
        "detector": Field(int, 0, min=0, doc="index of the bench detector this module is (0-3 Alice, 4-7 Bob)"),
        "serial": Field(str, "002001", doc="serial number reported by *IDN?"),
        "firmware": Field(str, "2.1.0", doc="firmware version reported by *IDN?"),
    }

    def __init__(self, name: str, state: BenchState, options: dict[str, Any] | None = None) -> None:
        super().__init__(name, options)
        self.state = state
        self.detector = int(self.opts["detector"])
        if not 0 <= self.detector < state.detector_count:
            raise ValueError(f"detector {self.detector} does not exist (the bench has {state.detector_count})")
        self._bias_error = False
        self._defaults()
        self.command("REG:RUN", set=self._set_run, query=self._q_run)
        self.command("REG:STATE", query=self._q_state)
        self.command("REG:TEMP_SET_POINT", set=self._setter("temp_set_point", TEMP_SET_POINT_MC),
                     query=self._getter("temp_set_point"))
        self.command("REG:MEASURED_TEMP", query=self._q_temp)
        self.command("BIAS:VOLTAGE", set=self._setter("bias_uv", BIAS_UV), query=self._getter("bias_uv"))
        self.command("BIAS:ERROR_STATUS", query=self._q_bias_error)
        self.command("THRESHOLD:VOLTAGE", set=self._setter("threshold_uv", THRESHOLD_UV),
                     query=self._getter("threshold_uv"))
        self.command("DEADTIME:TIME", set=self._setter("deadtime", DEADTIME), query=self._getter("deadtime"))
        self.command("COUNTERS:INTEGRATION_TIME", set=self._setter("integration_ms", INTEGRATION_MS),
                     query=self._getter("integration_ms"))
        self.command("COUNTERS:DETECTION_FREQ", query=self._q_freq)
        self.command("COUNTERS:DETECTION_COUNT", query=self._q_count)
        self.command("OUTPUT#:POLARITY", set=self._set_polarity, query=self._q_polarity)

    def _defaults(self) -> None:
        self.settings: dict[str, int] = {
            "bias_uv": 0,
            "threshold_uv": 50_000,
            "deadtime": 1_000,
            "integration_ms": 1_000,
            "temp_set_point": -30_000,
        }
        self.polarity = {1: "POSITIVE", 2: "POSITIVE"}

    def identity(self) -> str:
        return f"IDQuantique,ID120,{self.opts['serial']},{self.opts['firmware']}"

    def reset(self) -> None:
        self._defaults()
        self.state.update_detector(self.detector, enabled=False)

    # -- test control ---------------------------------------------------------------------------------------
    def set_bias_error(self, on: bool = True) -> None:
        """Make ``BIAS:ERROR_STATUS?`` report TRUE (and ``REG:STATE?`` BIAS_ERROR while running)."""
        with self.lock:
            self._bias_error = bool(on)

    # -- handlers -------------------------------------------------------------------------------------------
    @property
    def _running(self) -> bool:
        return self.state.detector(self.detector).enabled

    def _setter(self, key: str, limits: tuple[int, int, int]):
        def set_(call: Call) -> None:
            self.settings[key] = _stepped(call, limits, call.header.upper())

        return set_

    def _getter(self, key: str):
        def query(call: Call) -> str:
            call.nargs(0)
            return str(self.settings[key])

        return query

    def _set_run(self, call: Call) -> None:
        call.nargs(1)
        self.state.update_detector(self.detector, enabled=_truefalse(call.args[0]))

    def _q_run(self, call: Call) -> str:
        call.nargs(0)
        return "TRUE" if self._running else "FALSE"

    def _q_state(self, call: Call) -> str:
        call.nargs(0)
        if not self._running:
            return "STOPPED"
        return "BIAS_ERROR" if self._bias_error else "RUNNING"

    def _q_bias_error(self, call: Call) -> str:
        call.nargs(0)
        return "TRUE" if self._bias_error else "FALSE"

    def _q_temp(self, call: Call) -> str:
        call.nargs(0)
        return str(self.settings["temp_set_point"] if self._running else AMBIENT_MC)

    def _rate(self) -> float:
        if not self.state.detector(self.detector).counting:
            return 0.0
        return max(0.0, float(self.state.rates_hz[self.detector]))

    def _q_freq(self, call: Call) -> str:
        call.nargs(0)
        return str(int(round(self._rate())))

    def _q_count(self, call: Call) -> str:
        call.nargs(0)
        return str(int(round(self._rate() * self.settings["integration_ms"] / 1000.0)))

    def _set_polarity(self, call: Call) -> None:
        channel = call.suffix(0, allowed=(1, 2))
        call.nargs(1)
        self.polarity[channel] = choice(call.args[0], ("POSITIVE", "NEGATIVE"))

    def _q_polarity(self, call: Call) -> str:
        channel = call.suffix(0, allowed=(1, 2))
        call.nargs(0)
        return self.polarity[channel]


__all__ = ["SimID120"]
