"""Simulated Thorlabs CLD1015 laser-diode and TEC controller, speaking SCPI over TCP.

A view onto :attr:`BenchState.laser <drivers.sim.bench.state.BenchState.laser>`: setting the current changes
the bench's pump (and so the pair rate the tagger sees), and a protection trip set on the bench (by this
class's test controls, or by the daemon's ``sim.trip_interlock``) switches the LD output off, as the real
controller does. The real driver (:mod:`drivers.thorlabs_cld`) opens it through pyvisa-py as
``TCPIP::127.0.0.1::<port>::SOCKET``.

Commands (SCPI rules of :mod:`drivers.sim.instruments.scpi`: short/long forms, any case, ``;`` chains):

==========================================  ================================================================
``OUTP1[:STAT] ON|OFF|1|0`` / ``?``         LD output. ON is refused while a protection is tripped: the
                                            output stays off and ``-221,"Settings conflict;..."`` is queued.
                                            The TEC is not required by the controller (the driver orders it).
``OUTP2[:STAT] ON|OFF|1|0`` / ``?``         TEC output. On: the diode settles at once to the TEC setpoint;
                                            off: back to ambient (25 degC).
``SOUR[1]:CURR <A>`` / ``?`` [MIN|MAX]      LD current setpoint in A; 0 <= I <= limit, else -222 and the
                                            setpoint is unchanged. ``? MAX`` is the current limit.
``SOUR[1]:CURR:LIM <A>`` / ``?`` [MIN|MAX]  LD current limit, 0 <= limit <= 1.5 A (CLD1015 range); lowering
                                            it below the setpoint pulls the setpoint down to it.
``SOUR:CURR:LIM:TRIP?``                     1 while the output is on with the setpoint at the limit.
``SOUR2:TEMP <T>`` / ``?`` [MIN|MAX]        TEC setpoint in the ``UNIT:TEMP`` unit (suffix C/CEL/K allowed),
                                            5..45 degC, else -222.
``UNIT:TEMP C|CEL|K|F|FAR`` / ``?``         temperature unit of SOUR2:TEMP and MEAS:TEMP (reply C, K or F).
``MEAS[:SCAL]:CURR?``                       actual current in A: the setpoint while on, else 0.
``MEAS[:SCAL]:POW?``, ``MEAS:POW2?``        optical power in W (bench model: slope * (I - I_th), 0 when off).
``MEAS[:SCAL]:TEMP?``                       diode temperature in the ``UNIT:TEMP`` unit.
``OUTP:PROT:INTL:TRIP?`` and KEYL, OTEM,    0/1. VOLT (compliance) and EXT (LD ENABLE input) are not
VOLT, EXT                                   modelled by the bench and always read 0.
``STAT:MEAS:COND?``                         bits (protocols.md): 2 = interlock, 3 = current limit, 4 = LD
                                            output inhibit (key lock), 14 = over-temperature.
``*IDN?``, ``*RST`` (outputs off, setpoint 0, TEC setpoint 25 degC, unit C; the current limit is kept),
``*CLS``, ``*OPC?``, ``SYST:ERR?``
==========================================  ================================================================
"""

from __future__ import annotations

from typing import Any

from drivers.params import Field
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.scpi import Call, ScpiError, ScpiInstrument, boolean, choice, fmt, number, split_number

HARDWARE_MAX_A = 1.5  # CLD1015: the largest current limit the controller accepts
TEC_RANGE_C = (5.0, 45.0)
AMBIENT_C = 25.0

# STAT:MEAS:COND? bit positions (protocols.md 1.1)
COND_BITS = {
    "ld_compliance_voltage": 1,
    "ld_interlock": 2,
    "ld_current_limit": 3,
    "ld_output_inhibit": 4,
    "power_limit": 5,
    "temperature_protection": 8,
    "temperature_window": 9,
    "sensor_fail": 10,
    "tec_connection": 12,
    "overtemperature": 14,
}


def _to_c(value: float, unit: str) -> float:
    return {"C": value, "K": value - 273.15, "F": (value - 32.0) * 5.0 / 9.0}[unit]


def _from_c(value_c: float, unit: str) -> float:
    return {"C": value_c, "K": value_c + 273.15, "F": value_c * 9.0 / 5.0 + 32.0}[unit]


class SimCLD1015(ScpiInstrument):
    """Thorlabs CLD1015 on a TCP socket, reflecting ``BenchState.laser``.

    Test controls (also what the daemon's ``sim.*`` RPC can use): :meth:`trip_interlock`,
    :meth:`trip_keylock`, :meth:`trip_overtemp` (a trip forces the LD output off; the output stays off
    after the trip clears, until switched on again).
    """

    model = "thorlabs_cld1015"
    options = {
        **ScpiInstrument.options,
        "serial": Field(str, "M00000001", doc="serial number reported by *IDN?"),
        "firmware": Field(str, "1.3.5/1.0.6/1.1.2", doc="firmware versions reported by *IDN?"),
    }

    def __init__(self, name: str, state: BenchState, options: dict[str, Any] | None = None) -> None:
        super().__init__(name, options)
        self.state = state
        self._tec_setpoint_c = AMBIENT_C
        self._unit = "C"
        self.command("OUTPut#[:STATe]", set=self._set_output, query=self._q_output)
        self.command("OUTPut#:PROTection:INTLock:TRIPped", query=self._trip("interlock_tripped"))
        self.command("OUTPut#:PROTection:KEYLock:TRIPped", query=self._trip("keylock_tripped"))
        self.command("OUTPut#:PROTection:OTEMp:TRIPped", query=self._trip("overtemp_tripped"))
        self.command("OUTPut#:PROTection:VOLTage:TRIPped", query=self._trip(None))
        self.command("OUTPut#:PROTection:EXTernal:TRIPped", query=self._trip(None))
        self.command("SOURce#[:CURRent][:LEVel][:IMMediate][:AMPLitude]", set=self._set_current, query=self._q_current)
        self.command("SOURce#:CURRent:LIMit[:AMPLitude]", set=self._set_limit, query=self._q_limit)
        self.command("SOURce#:CURRent:LIMit:TRIPped", query=self._q_limit_trip)
        self.command("SOURce#:TEMPerature[:SPOint]", set=self._set_tec, query=self._q_tec)
        self.command("UNIT:TEMPerature", set=self._set_unit, query=self._q_unit)
        self.command("MEASure[:SCALar]:CURRent#", query=self._q_meas_current)
        self.command("MEASure[:SCALar]:POWer#", query=self._q_meas_power)
        self.command("MEASure[:SCALar]:TEMPerature", query=self._q_meas_temp)
        self.command("STATus:MEASurement:CONDition", query=self._q_condition)

    def identity(self) -> str:
        return f"THORLABS,CLD1015,{self.opts['serial']},{self.opts['firmware']}"

    def reset(self) -> None:
        self._tec_setpoint_c = AMBIENT_C
        self._unit = "C"
        self.state.update_laser(output_on=False, tec_on=False, current_setpoint_ma=0.0, temperature_c=AMBIENT_C)

    # -- test controls --------------------------------------------------------------------------------------
    def trip_interlock(self, on: bool = True) -> None:
        """Open (True) or close (False) the interlock; opening it switches the LD output off."""
        self.state.update_laser(interlock_tripped=bool(on))

    def trip_keylock(self, on: bool = True) -> None:
        """Turn the key switch to off (True) or back (False); off switches the LD output off."""
        self.state.update_laser(keylock_tripped=bool(on))

    def trip_overtemp(self, on: bool = True) -> None:
        """Raise (True) or clear (False) the over-temperature protection; raising it switches the LD off."""
        self.state.update_laser(overtemp_tripped=bool(on))

    # -- outputs --------------------------------------------------------------------------------------------
    def _set_output(self, call: Call) -> None:
        channel = call.suffix(0, allowed=(1, 2))
        on = boolean(call.arg(0))
        call.nargs(1)
        if channel == 2:
            temp = self._tec_setpoint_c if on else AMBIENT_C
            self.state.update_laser(tec_on=on, temperature_c=temp)
            return
        laser = self.state.laser
        if on and laser.tripped:
            names = [n for n, t in (("interlock", laser.interlock_tripped), ("key lock", laser.keylock_tripped),
                                    ("over-temperature", laser.overtemp_tripped)) if t]
            raise ScpiError(-221, "LD output inhibited: " + ", ".join(names) + " tripped")
        self.state.update_laser(output_on=on)

    def _q_output(self, call: Call) -> str:
        channel = call.suffix(0, allowed=(1, 2))
        call.nargs(0)
        laser = self.state.laser
        return "1" if (laser.tec_on if channel == 2 else laser.output_on) else "0"

    def _trip(self, attr: str | None):
        def query(call: Call) -> str:
            call.suffix(0, allowed=(1,))
            call.nargs(0)
            return "1" if attr is not None and getattr(self.state.laser, attr) else "0"

        return query

    # -- LD current -----------------------------------------------------------------------------------------
    @staticmethod
    def _minmax_query(call: Call, value: float, minimum: float, maximum: float, default: float) -> str:
        call.nargs(0, 1)
        if call.args:
            return fmt(number(call.args[0], minimum=minimum, maximum=maximum, default=default))
        return fmt(value)

    def _set_current(self, call: Call) -> None:
        call.suffix(0, allowed=(1,))
        call.nargs(1)
        limit_a = self.state.laser.current_limit_ma / 1000.0
        amps = number(call.args[0], "A", minimum=0.0, maximum=limit_a, default=0.0)
        if amps < 0.0 or amps > limit_a * (1 + 1e-9):
            raise ScpiError(-222, f"{amps:g} A outside 0..{limit_a:g} A (current limit)")
        self.state.update_laser(current_setpoint_ma=min(amps, limit_a) * 1000.0)

    def _q_current(self, call: Call) -> str:
        call.suffix(0, allowed=(1,))
        laser = self.state.laser
        return self._minmax_query(call, laser.current_setpoint_ma / 1000.0, 0.0, laser.current_limit_ma / 1000.0, 0.0)

    def _set_limit(self, call: Call) -> None:
        call.suffix(0, allowed=(1,))
        call.nargs(1)
        amps = number(call.args[0], "A", minimum=0.0, maximum=HARDWARE_MAX_A, default=HARDWARE_MAX_A)
        if not 0.0 <= amps <= HARDWARE_MAX_A:
            raise ScpiError(-222, f"{amps:g} A outside 0..{HARDWARE_MAX_A:g} A")
        with self.state.lock:
            laser = self.state.laser
            setpoint = min(laser.current_setpoint_ma, amps * 1000.0)
            self.state.update_laser(current_limit_ma=amps * 1000.0, current_setpoint_ma=setpoint)

    def _q_limit(self, call: Call) -> str:
        call.suffix(0, allowed=(1,))
        return self._minmax_query(call, self.state.laser.current_limit_ma / 1000.0, 0.0, HARDWARE_MAX_A, HARDWARE_MAX_A)

    def _q_limit_trip(self, call: Call) -> str:
        call.suffix(0, allowed=(1,))
        call.nargs(0)
        laser = self.state.laser
        return "1" if laser.output_on and laser.current_setpoint_ma >= laser.current_limit_ma else "0"

    # -- TEC ------------------------------------------------------------------------------------------------
    def _set_tec(self, call: Call) -> None:
        call.suffix(0, allowed=(2,))
        call.nargs(1)
        lo, hi = TEC_RANGE_C
        word = call.args[0].strip().upper()
        if word in ("MIN", "MINIMUM", "MAX", "MAXIMUM", "DEF", "DEFAULT"):
            value_c = number(word, minimum=lo, maximum=hi, default=AMBIENT_C)
        else:
            value, suffix = split_number(call.args[0])
            if not suffix:
                value_c = _to_c(value, self._unit)
            elif suffix in ("C", "CEL"):
                value_c = value
            elif suffix == "K":
                value_c = value - 273.15
            else:
                raise ScpiError(-131, f"expected C, CEL or K, got {suffix!r}")
        if not lo - 1e-9 <= value_c <= hi + 1e-9:
            raise ScpiError(-222, f"{value_c:g} degC outside {lo:g}..{hi:g} degC")
        self._tec_setpoint_c = value_c
        if self.state.laser.tec_on:
            self.state.update_laser(temperature_c=value_c)

    def _q_tec(self, call: Call) -> str:
        call.suffix(0, allowed=(2,))
        call.nargs(0, 1)
        lo, hi = TEC_RANGE_C
        value_c = number(call.args[0], minimum=lo, maximum=hi, default=AMBIENT_C) if call.args else self._tec_setpoint_c
        return fmt(_from_c(value_c, self._unit))

    def _set_unit(self, call: Call) -> None:
        call.nargs(1)
        word = choice(call.args[0], ("C", "CEL", "K", "F", "FAR"))
        self._unit = {"CEL": "C", "FAR": "F"}.get(word, word)

    def _q_unit(self, call: Call) -> str:
        call.nargs(0)
        return self._unit

    # -- measurements ---------------------------------------------------------------------------------------
    def _q_meas_current(self, call: Call) -> str:
        call.suffix(0, allowed=(1,))
        call.nargs(0)
        return fmt(self.state.laser.current_ma / 1000.0)

    def _q_meas_power(self, call: Call) -> str:
        call.suffix(0, allowed=(1, 2))
        call.nargs(0)
        return fmt(self.state.laser.power_mw / 1000.0)

    def _q_meas_temp(self, call: Call) -> str:
        call.nargs(0)
        return fmt(_from_c(self.state.laser.temperature_c, self._unit))

    def _q_condition(self, call: Call) -> str:
        call.nargs(0)
        laser = self.state.laser
        bits = 0
        if laser.interlock_tripped:
            bits |= 1 << COND_BITS["ld_interlock"]
        if laser.keylock_tripped:
            bits |= 1 << COND_BITS["ld_output_inhibit"]
        if laser.overtemp_tripped:
            bits |= 1 << COND_BITS["overtemperature"]
        if laser.output_on and laser.current_setpoint_ma >= laser.current_limit_ma:
            bits |= 1 << COND_BITS["ld_current_limit"]
        return str(bits)


__all__ = ["COND_BITS", "SimCLD1015"]
