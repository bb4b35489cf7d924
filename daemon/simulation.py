"""The simulated testbed inside the daemon: the optical bench and its protocol-level instruments.

A config with a ``[simulation]`` table makes the daemon build the virtual optical bench (drivers/sim/bench)
and start the simulated instruments listed under ``[simulation.instruments.NAME]`` (an SCPI pump laser on a
TCP socket, APT paddle controllers on pseudo-terminals, detector controllers...) before any device
connects. Device options may then name them as ``"sim://NAME"``: the daemon replaces such a value with the
instrument's address (a VISA resource, a pty path, host:port), and ``"sim://bench"`` with the bench model
itself (for the in-process bench tagger); an instrument with more than one port (the Eos counts stream)
also fills the matching driver options through its ``driver_options``. So the real drivers run unchanged
against the simulators.

RPC ``sim.*`` methods let tests and demos act on the bench: unplug and replug an instrument, trip the
laser interlock, set Eve's intercept fraction or the polarization drift rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import structlog

from drivers.params import Field, ParamError, validate_table

SIM_SCHEME = "sim://"
BENCH = "bench"

log = structlog.get_logger("qnetd.simulation")


@dataclass(frozen=True)
class InstrumentConfig:
    name: str
    model: str
    cls: type
    options: dict[str, Any]


@dataclass(frozen=True)
class SimulationConfig:
    bench: Any  # drivers.sim.bench.config.BenchConfig
    instruments: dict[str, InstrumentConfig]


def validate(raw: Any, errors: list[ParamError], path: str = "simulation") -> SimulationConfig | None:
    """Validate the [simulation] table: the bench physics (drivers.sim.bench.config) and the instruments."""
    if not isinstance(raw, dict):
        errors.append(ParamError(path, "expected a table"))
        return None
    from drivers.sim.bench import config as bench_config
    from drivers.sim.instruments import MODELS, load_model

    bench, bench_errors = bench_config.validate(raw, path)
    errors.extend(bench_errors)
    instruments: dict[str, InstrumentConfig] = {}
    table = raw.get("instruments", {})
    if not isinstance(table, dict):
        errors.append(ParamError(f"{path}.instruments", "expected a table of instruments ([simulation.instruments.NAME])"))
        table = {}
    for name, spec in table.items():
        ipath = f"{path}.instruments.{name}"
        if name == BENCH:
            errors.append(ParamError(ipath, f"{BENCH!r} is reserved for the bench model itself"))
            continue
        if not isinstance(spec, dict):
            errors.append(ParamError(ipath, "expected a table with at least `model`"))
            continue
        model = spec.get("model")
        if model not in MODELS:
            errors.append(ParamError(f"{ipath}.model", f"unknown simulated instrument {model!r}",
                                     "one of " + ", ".join(sorted(MODELS))))
            continue
        try:
            cls = load_model(model)
        except Exception as e:  # noqa: BLE001 - a broken simulator module is a config-time error, not a crash
            errors.append(ParamError(f"{ipath}.model", f"simulator {model!r} failed to load: {e}"))
            continue
        schema: dict[str, Field] = getattr(cls, "options", {})
        opts = validate_table(spec, schema, ipath, errors, extra_keys=("model",))
        instruments[name] = InstrumentConfig(name, model, cls, opts)
    if bench is None:
        return None
    return SimulationConfig(bench, instruments)


def sim_references(value: Any) -> list[str]:
    """The sim:// names a (possibly nested) option value refers to."""
    if isinstance(value, str):
        return [value[len(SIM_SCHEME):]] if value.startswith(SIM_SCHEME) else []
    if isinstance(value, list):
        return [r for v in value for r in sim_references(v)]
    return []


class SimulationHost:
    """Owns the bench model and the running simulated instruments."""

    def __init__(self, cfg: SimulationConfig) -> None:
        from drivers.sim.bench.model import BenchModel

        self.cfg = cfg
        self.model = BenchModel(cfg.bench)
        self.state = self.model.state
        self.instruments: dict[str, Any] = {
            name: ic.cls(name, self.state, dict(ic.options)) for name, ic in cfg.instruments.items()
        }

    def start(self) -> None:
        for name, inst in self.instruments.items():
            inst.start()
            log.info("simulated instrument started", instrument=name, model=self.cfg.instruments[name].model,
                     address=inst.address)

    def warm_up(self) -> float:
        """Compile (first run, ~20 s) or load from numba's cache the bench kernels; seconds spent. Blocking:
        the daemon runs it in a thread before the devices connect, so no connect timeout is spent on it."""
        return float(self.model.warm_up())

    def stop(self) -> None:
        for name, inst in self.instruments.items():
            try:
                inst.stop()
            except Exception as e:  # noqa: BLE001 - shutting down: report and go on
                log.warning("simulated instrument did not stop cleanly", instrument=name, error=str(e))

    def resolve(self, value: Any) -> Any:
        """Replace sim:// references in an option value by the live address (or the bench model)."""
        if isinstance(value, str) and value.startswith(SIM_SCHEME):
            name = value[len(SIM_SCHEME):]
            if name == BENCH:
                return self.model
            return self.instruments[name].address
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Resolve sim:// values; an instrument that publishes ``driver_options`` (e.g. a second port) also
        sets those of the driver's options that the driver has, so the driver needs only ``sim://NAME``."""
        out = {k: self.resolve(v) for k, v in options.items()}
        for value in options.values():
            for ref in sim_references(value):
                extra = getattr(self.instruments.get(ref), "driver_options", None) or {}
                out.update({k: v for k, v in extra.items() if k in out and not sim_references(options[k])})
        return out

    # -- RPC ----------------------------------------------------------------------------------------------
    def _instrument(self, name: str) -> Any:
        from daemon.api.errors import InvalidParams

        if name not in self.instruments:
            raise InvalidParams(f"no simulated instrument {name!r}",
                                data={"param": "name", "allowed": "one of " + ", ".join(sorted(self.instruments)),
                                      "instruments": sorted(self.instruments)})
        return self.instruments[name]

    def register(self, table: Any) -> None:
        """Add the sim.* methods to the daemon's method table."""

        async def status() -> dict:
            """The simulated bench: instruments with model and address, laser, paddles, detectors, Eve."""
            snap = self.state.snapshot()
            return {
                "instruments": {n: {"model": self.cfg.instruments[n].model, "address": i.address,
                                    "running": bool(getattr(i, "running", True))}
                                for n, i in self.instruments.items()},
                "laser": {"output_on": snap.laser.output_on, "current_ma": snap.laser.current_ma,
                          "power_mw": snap.laser.power_mw, "tripped": snap.laser.tripped},
                "paddles_deg": {arm: list(p) for arm, p in snap.paddles_deg.items()},
                "detectors": [{"enabled": d.enabled, "bias_ua": d.bias_ua, "latched": d.latched}
                              for d in snap.detectors],
                "rates_hz": list(self.state.rates_hz),
                "eve": {"fraction": snap.eve_fraction, "arm": snap.eve_arm},
            }

        async def stop_instrument(name: str) -> None:
            """Unplug a simulated instrument (its driver sees the link drop)."""
            self._instrument(name).stop()

        async def start_instrument(name: str) -> str:
            """Plug a simulated instrument back in; returns its address."""
            inst = self._instrument(name)
            inst.start()
            return inst.address

        async def set_eve(fraction: Annotated[float, Field(min=0, max=1, doc="share of pairs intercepted")],
                          arm: Annotated[str, Field(choices=("alice", "bob"))] = "bob") -> None:
            """Intercept-resend attack on a fraction of the pairs in one arm (QBER rises by fraction/4)."""
            self.state.set_eve(fraction, arm)

        async def trip_interlock(tripped: bool = True) -> None:
            """Open (or close) the pump laser's interlock; a trip switches the laser output off."""
            self.state.update_laser(interlock_tripped=tripped)

        async def set_drift(arm: Annotated[str, Field(choices=("alice", "bob"))],
                            rad2_per_s: Annotated[float, Field(unit="rad^2/s", min=0, max=100)]) -> None:
            """Set the polarization drift rate D of one arm's fiber."""
            self.model.set_drift_rate(arm, rad2_per_s)

        async def compensating_paddles(arm: Annotated[str, Field(choices=("alice", "bob"))]) -> list[float]:
            """Paddle angles (degrees) that would undo the arm's current fiber unitary: ground truth for tests
            of compensation loops, which must find them through the real drivers."""
            return [float(x) for x in self.model.compensating_paddles(arm)]

        async def set_delay_drift(arm: Annotated[str, Field(choices=("alice", "bob"))],
                                  ps_per_s: Annotated[float, Field(unit="ps/s", min=-1e6, max=1e6)]) -> None:
            """Set the rate at which one arm's fiber delay changes (a fiber warming up or cooling down)."""
            self.model.set_delay_drift(arm, ps_per_s)

        async def set_fiber_delay(arm: Annotated[str, Field(choices=("alice", "bob"))],
                                  picoseconds: Annotated[float, Field(unit="ps", min=0, max=1e12)]) -> float:
            """Set one arm's fiber delay (a fiber length change, from the next block); returns the previous one."""
            prev = self.model.fiber_delay_ps(arm)
            self.model.set_fiber_delay(arm, picoseconds)
            return prev

        async def fiber_delay(arm: Annotated[str, Field(choices=("alice", "bob"))]) -> float:
            """One arm's fiber delay now (ps): ground truth for tests of delay tracking."""
            return self.model.fiber_delay_ps(arm)

        for fn in (status, stop_instrument, start_instrument, set_eve, trip_interlock, set_drift,
                   compensating_paddles, set_delay_drift, set_fiber_delay, fiber_delay):
            table.add(f"sim.{fn.__name__}", fn, group="sim")
