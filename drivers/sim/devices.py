"""In-process simulated laser, polarization controller and photon detector.

These implement the driver interfaces directly, with simple, documented behaviour, so the daemon, its RPC
surface and its safety policy can be exercised without hardware. They are *not* protocol-level
simulators: the virtual optical bench replaces them with devices that speak the instruments' wire protocols
to the real drivers.
"""

from __future__ import annotations

import time
from typing import Any

from drivers.base import DeviceError, Laser, PhotonDetector, PolarizationController
from drivers.params import Field
from drivers.sim.faults import SimFaults


class _SimDevice(SimFaults):
    opts: dict[str, Any]
    name: str

    def _require(self) -> None:
        if not getattr(self, "_connected", False):
            raise ConnectionError(f"simulated {self.name} is not connected")


class SimLaser(_SimDevice, Laser):
    """Simulated diode laser: P = slope * max(0, I - I_th) while the output is on."""

    options = {
        "threshold_ma": Field(float, 20.0, unit="mA", min=0, doc="lasing threshold current"),
        "slope_mw_per_ma": Field(float, 0.5, unit="mW/mA", min=0, doc="slope efficiency above threshold"),
        "max_current_ma": Field(float, 200.0, unit="mA", min=0, doc="hardware current limit of the driver"),
        **SimFaults.fault_options,
    }

    def connect(self) -> None:
        self.simulate_connect()
        self._setpoint = 0.0
        self._output = False
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def describe(self) -> dict[str, Any]:
        return {"vendor": "qnetd", "model": "in-process simulated laser"}

    def set_current(self, milliamps: float) -> None:
        self._require()
        if milliamps > self.opts["max_current_ma"]:
            raise DeviceError(f"{milliamps} mA is above the hardware limit {self.opts['max_current_ma']} mA", "set_current")
        self._setpoint = milliamps

    def set_output(self, on: bool) -> None:
        self._require()
        self._output = on

    def power_mw(self) -> float:
        if not self._output:
            return 0.0
        return self.opts["slope_mw_per_ma"] * max(0.0, self._setpoint - self.opts["threshold_ma"])

    def status(self) -> dict:
        self._require()
        return {
            "output": self._output,
            "current_setpoint_ma": self._setpoint,
            "current_ma": self._setpoint if self._output else 0.0,
            "power_mw": self.power_mw(),
            "temperature_c": 25.0,
            "trips": [],
        }


class SimPolarizationController(_SimDevice, PolarizationController):
    """Simulated motorized paddle controller: moves take ``move_time_s`` per 100 degrees."""

    options = {
        "paddles": Field(int, 3, min=1, max=8, doc="number of paddles"),
        "move_time_s": Field(float, 0.0, unit="s", min=0, max=60, doc="time per 100 degrees of travel"),
        **SimFaults.fault_options,
    }
    HARDWARE_RANGE = (0.0, 170.0)  # MPC320 paddle travel, degrees

    def connect(self) -> None:
        self.simulate_connect()
        self._angles = [0.0] * self.opts["paddles"]
        self._homed = False
        self._connected = True

    def close(self) -> None:
        self._connected = False

    @property
    def paddle_count(self) -> int:
        return self.opts["paddles"]

    def describe(self) -> dict[str, Any]:
        return {"vendor": "qnetd", "model": "in-process simulated polarization controller"}

    def move(self, paddle: int, degrees: float) -> None:
        self._require()
        if paddle >= self.paddle_count:
            raise DeviceError(f"paddle {paddle} does not exist (0..{self.paddle_count - 1})", "move")
        lo, hi = self.HARDWARE_RANGE
        if not lo <= degrees <= hi:
            raise DeviceError(f"{degrees} degrees is outside the paddle travel {lo}..{hi}", "move")
        time.sleep(abs(degrees - self._angles[paddle]) / 100.0 * self.opts["move_time_s"])
        self._angles[paddle] = degrees

    def home(self) -> None:
        self._require()
        for i in range(self.paddle_count):
            self.move(i, 0.0)
        self._homed = True

    def positions(self) -> list[float]:
        self._require()
        return list(self._angles)

    def status(self) -> dict:
        self._require()
        return {"positions_deg": list(self._angles), "homed": self._homed}


class SimPhotonDetector(_SimDevice, PhotonDetector):
    """Simulated SNSPD channel: counts at ``dark_count_hz`` when enabled; latches above ``critical_bias_ua``.

    A latched detector reports ``latched`` and no counts until it is disabled (bias to zero) and re-enabled.
    """

    options = {
        "dark_count_hz": Field(float, 100.0, unit="Hz", min=0, doc="dark count rate when enabled"),
        "critical_bias_ua": Field(float, 20.0, unit="uA", min=0, doc="bias above which the nanowire latches"),
        **SimFaults.fault_options,
    }

    def connect(self) -> None:
        self.simulate_connect()
        self._bias = 0.0
        self._enabled = False
        self._latched = False
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def describe(self) -> dict[str, Any]:
        return {"vendor": "qnetd", "model": "in-process simulated SNSPD channel"}

    def set_bias(self, microamps: float) -> None:
        self._require()
        self._bias = microamps
        self._update_latch()

    def set_enabled(self, on: bool) -> None:
        self._require()
        self._enabled = on
        if not on:
            self._latched = False  # bias removed: the nanowire recovers
        self._update_latch()

    def _update_latch(self) -> None:
        if self._enabled and self._bias > self.opts["critical_bias_ua"]:
            self._latched = True

    def safe_state(self) -> None:
        self.set_enabled(False)
        self.set_bias(0.0)

    def status(self) -> dict:
        self._require()
        counting = self._enabled and not self._latched
        return {
            "enabled": self._enabled,
            "bias_ua": self._bias,
            "latched": self._latched,
            "count_rate_hz": self.opts["dark_count_hz"] if counting else 0.0,
        }
