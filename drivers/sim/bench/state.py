"""The bench's mutable instrument state: what simulated instruments change and the physics reads.

This is the contract between the protocol-level simulators (drivers/sim/instruments: the SCPI pump laser,
the APT paddle controllers, the detector controllers) and the physics (drivers/sim/bench): a command to
one instrument changes what another measures (pump current -> pair rate -> counts on the tagger).

Thread safety: instruments run in their own threads and the tagger reads from the daemon's worker thread.
Every mutation goes through a method that holds ``lock``; the physics takes a :meth:`BenchState.snapshot`
(an immutable copy) once per generated block, so a block is computed from one consistent state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

ARMS = ("alice", "bob")
DETECTORS_PER_SIDE = 4  # receiver outputs per side: basis 0 (+, -), basis 1 (+, -) = H, V, D, A in BBM92


@dataclass(frozen=True)
class LaserState:
    """The pump laser diode and its controller (a Thorlabs CLD1015-like instrument)."""

    output_on: bool = False
    tec_on: bool = False
    current_setpoint_ma: float = 0.0
    current_limit_ma: float = 100.0  # the controller's own hardware limit (SOUR:CURR:LIM)
    threshold_ma: float = 20.0  # lasing threshold
    slope_mw_per_ma: float = 0.5  # slope efficiency above threshold
    interlock_tripped: bool = False
    keylock_tripped: bool = False
    overtemp_tripped: bool = False
    temperature_c: float = 25.0

    @property
    def tripped(self) -> bool:
        return self.interlock_tripped or self.keylock_tripped or self.overtemp_tripped

    @property
    def current_ma(self) -> float:
        """Actual drive current: the setpoint while the output is on, else 0."""
        return self.current_setpoint_ma if self.output_on else 0.0

    @property
    def power_mw(self) -> float:
        """Optical power: slope * max(0, I - I_th) while on (physics.md, 'Pump laser diode')."""
        return self.slope_mw_per_ma * max(0.0, self.current_ma - self.threshold_ma)


@dataclass(frozen=True)
class DetectorState:
    """One single-photon detector channel.

    ``enabled``: biased and counting (SNSPD: bias applied / DetectorEnable; SPAD: REG:RUN TRUE).
    ``critical_bias_ua`` is set for SNSPDs: above it the nanowire latches and stops counting until the bias is
    brought to zero (or the detector disabled) and restored.
    """

    enabled: bool = True
    bias_ua: float = 0.0
    critical_bias_ua: float | None = None
    latched: bool = False
    trigger_level_mv: float = 100.0

    @property
    def counting(self) -> bool:
        return self.enabled and not self.latched


@dataclass(frozen=True)
class Snapshot:
    """An immutable, consistent copy of the bench state for one block of physics."""

    laser: LaserState
    paddles_deg: dict[str, tuple[float, float, float]]
    detectors: tuple[DetectorState, ...]
    eve_fraction: float
    eve_arm: str
    analyser_angles_deg: dict[str, tuple[float, float]]
    generation: int


class BenchState:
    """Mutable state of every simulated instrument on the bench; all access under ``lock``."""

    def __init__(self, *, laser: LaserState | None = None, detectors: int = 2 * DETECTORS_PER_SIDE,
                 detector: DetectorState | None = None, eve_fraction: float = 0.0, eve_arm: str = "bob",
                 analyser_angles_deg: dict[str, tuple[float, float]] | None = None) -> None:
        self.lock = threading.RLock()
        self._laser = laser or LaserState()
        self._paddles: dict[str, list[float]] = {arm: [0.0, 0.0, 0.0] for arm in ARMS}
        self._detectors = [detector or DetectorState() for _ in range(detectors)]
        self._eve_fraction = eve_fraction
        self._eve_arm = eve_arm
        self._angles = dict(analyser_angles_deg or {"alice": (0.0, 45.0), "bob": (0.0, 45.0)})
        self._generation = 0
        self.rates_hz: list[float] = [0.0] * detectors  # last measured click rate per detector (physics writes)

    def _bump(self) -> None:
        self._generation += 1

    # -- reading ----------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(
                laser=self._laser,
                paddles_deg={arm: tuple(p) for arm, p in self._paddles.items()},  # type: ignore[misc]
                detectors=tuple(self._detectors),
                eve_fraction=self._eve_fraction,
                eve_arm=self._eve_arm,
                analyser_angles_deg=dict(self._angles),
                generation=self._generation,
            )

    @property
    def laser(self) -> LaserState:
        with self.lock:
            return self._laser

    def paddles(self, arm: str) -> list[float]:
        with self.lock:
            return list(self._paddles[arm])

    def detector(self, index: int) -> DetectorState:
        with self.lock:
            return self._detectors[index]

    @property
    def detector_count(self) -> int:
        return len(self._detectors)

    # -- laser ------------------------------------------------------------------------------------------
    def update_laser(self, **changes: object) -> LaserState:
        """Change laser fields; a protection trip forces the output off (as the real controller does)."""
        with self.lock:
            laser = replace(self._laser, **changes)  # type: ignore[arg-type]
            if laser.tripped and laser.output_on:
                laser = replace(laser, output_on=False)
            self._laser = laser
            self._bump()
            return laser

    # -- polarization controllers -----------------------------------------------------------------------
    def set_paddle(self, arm: str, paddle: int, degrees: float) -> None:
        with self.lock:
            self._paddles[arm][paddle] = float(degrees)
            self._bump()

    # -- detectors --------------------------------------------------------------------------------------
    def update_detector(self, index: int, **changes: object) -> DetectorState:
        """Change a detector; applies SNSPD latching: enabled with bias above critical latches; bias to 0 or
        disabling releases the latch."""
        with self.lock:
            d = replace(self._detectors[index], **changes)  # type: ignore[arg-type]
            if not d.enabled or d.bias_ua <= 0.0:
                d = replace(d, latched=False)
            elif d.critical_bias_ua is not None and d.bias_ua > d.critical_bias_ua:
                d = replace(d, latched=True)
            self._detectors[index] = d
            self._bump()
            return d

    # -- the rest of the bench --------------------------------------------------------------------------
    def set_eve(self, fraction: float, arm: str | None = None) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("Eve's intercepted fraction must be in [0, 1]")
        with self.lock:
            self._eve_fraction = float(fraction)
            if arm is not None:
                if arm not in ARMS:
                    raise ValueError(f"arm must be one of {ARMS}")
                self._eve_arm = arm
            self._bump()

    def set_analyser_angles(self, arm: str, angles_deg: tuple[float, float]) -> None:
        with self.lock:
            self._angles[arm] = (float(angles_deg[0]), float(angles_deg[1]))
            self._bump()


__all__ = ["ARMS", "BenchState", "DETECTORS_PER_SIDE", "DetectorState", "LaserState", "Snapshot"]
