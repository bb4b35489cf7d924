"""The ``[simulation]`` table: parameters of the virtual optical bench, validated completely.

:func:`validate` checks every key against a documented :class:`~drivers.params.Field` (type, unit, range,
choices) plus the cross-key physics (a current setpoint above the controller's limit, an SNSPD biased above
its critical current, a list with the wrong length), reports *every* problem with its full key path and what
is allowed, and returns a frozen :class:`BenchConfig`. The ``instruments`` subtable belongs to the instrument
simulators and is skipped here. Defaults describe a typical fiber BBM92 lab at 1550 nm (physics.md, "Typical
lab values"): docs/simulator.md lists them all.

Layout::

    [simulation]            enabled, seed, block_ms
    [simulation.source]     brightness, visibility, bell_state
    [simulation.pump]       threshold_ma, slope_mw_per_ma, current_limit_ma, current_ma, output_on
    [simulation.arms.alice] loss_db, fiber_km, loss_db_per_km, group_index, drift_rad2_per_s, initial_unitary,
                            delay_drift_ps_per_s
    [simulation.arms.bob]   (the same keys)
    [simulation.receivers]  mode, alice_angles_deg, bob_angles_deg
    [simulation.detectors]  preset, and overrides: efficiency, dark_count_hz, dead_time_ns, jitter_ps,
                            afterpulse_probability, afterpulse_time_ns, critical_bias_ua, nominal_bias_ua
    [simulation.tagger]     channels, resolution_ps, jitter_ps, input_delays_ps, dead_time_ns, max_rate_hz
    [simulation.eve]        fraction, arm
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drivers.params import Field, ParamError, check_value, validate_table

__all__ = [
    "ARM_FIELDS",
    "BenchConfig",
    "DETECTORS",
    "DETECTOR_FIELDS",
    "DETECTOR_PRESETS",
    "SCHEMA",
    "ArmConfig",
    "DetectorConfig",
    "EveConfig",
    "PumpConfig",
    "ReceiverConfig",
    "SourceConfig",
    "TaggerConfig",
    "default_config",
    "validate",
]

DETECTORS = 8  # 4 receiver outputs per side: detectors 0-3 Alice, 4-7 Bob, on tagger channels 0-7
C_M_PER_S = 299_792_458.0

BELL_CHOICES = ("phi+", "phi-", "psi+", "psi-")

TOP_FIELDS: dict[str, Field] = {
    "enabled": Field(bool, True, doc="false: the daemon runs no simulation (the table is still validated)"),
    "seed": Field(int, 1, min=0, doc="random seed: the same seed, config and commands give the same tags"),
    "block_ms": Field(float, 10.0, unit="ms", min=0.01, max=1000.0,
                      doc="simulated time per generated block: the grain of state changes and drift steps"),
}

SOURCE_FIELDS: dict[str, Field] = {
    "brightness": Field(float, 1.0e5, unit="pairs/s/mW", min=0,
                        doc="SPDC pair rate per mW of pump power, R = B * P_pump"),
    "visibility": Field(float, 0.98, min=0, max=1,
                        doc="Werner visibility V: rho = V |Psi><Psi| + (1 - V) I/4"),
    "bell_state": Field(str, "phi+", choices=BELL_CHOICES, doc="the entangled state |Psi> the source emits"),
}

PUMP_FIELDS: dict[str, Field] = {
    "threshold_ma": Field(float, 20.0, unit="mA", min=0, doc="lasing threshold current I_th"),
    "slope_mw_per_ma": Field(float, 0.5, unit="mW/mA", min=0,
                             doc="slope efficiency: P_pump = slope * max(0, I - I_th) while the output is on"),
    "current_limit_ma": Field(float, 100.0, unit="mA", min=0, max=10_000.0,
                              doc="the laser controller's own current limit (its LIM setting)"),
    "current_ma": Field(float, 30.0, unit="mA", min=0, doc="drive current setpoint at start (30 mA: 5 mW)"),
    "output_on": Field(bool, True, doc="laser output (and TEC) on at start, so a fresh bench emits pairs"),
}


def _arm_fields(fiber_km: float) -> dict[str, Field]:
    return {
        "loss_db": Field(float, 2.0, unit="dB", min=0, max=200.0,
                         doc="loss of the arm's components (connectors, polarization controller, receiver)"),
        "fiber_km": Field(float, fiber_km, unit="km", min=0, max=100_000.0, doc="fiber length"),
        "loss_db_per_km": Field(float, 0.2, unit="dB/km", min=0, max=100.0, doc="fiber attenuation (0.2 at 1550 nm)"),
        "group_index": Field(float, 1.468, min=1.0, max=5.0, doc="group index n_g: delay = L / (c / n_g)"),
        "drift_rad2_per_s": Field(float, 1.0e-4, unit="rad^2/s", min=0, max=1.0e6,
                                  doc="polarization drift rate D: each block, U <- exp(-i theta n.sigma/2) U, "
                                      "theta ~ N(0, 2 D dt)"),
        "initial_unitary": Field(str, "identity", choices=("identity", "random"),
                                 doc="fiber unitary at t = 0: identity, or Haar-random from the seed"),
        "delay_drift_ps_per_s": Field(float, 0.0, unit="ps/s", min=-1.0e6, max=1.0e6,
                                      doc="fiber delay change rate (temperature: ~7 ppm/K, 35 ps/km/K: about 0.1 ps/s "
                                          "for 10 km warming 1 K/h); the delay moves from the fiber_km value, "
                                          "block by block"),
    }


ARM_FIELDS: dict[str, dict[str, Field]] = {"alice": _arm_fields(2.0), "bob": _arm_fields(10.0)}

RECEIVER_DEFAULTS = {"bbm92": ([0.0, 45.0], [0.0, 45.0]), "chsh": ([0.0, 45.0], [22.5, 67.5])}
RECEIVER_FIELDS: dict[str, Field] = {
    "mode": Field(str, "bbm92", choices=("bbm92", "chsh"),
                  doc="bbm92: analysers H/V and D/A on both sides; chsh: Bob's analysers at 22.5 and 67.5 degrees"),
    "alice_angles_deg": Field(list[float] | None, None, unit="degrees",
                              doc="Alice's two analyser angles [theta0, theta1] (outcomes theta and theta + 90); "
                                  "default [0, 45]"),
    "bob_angles_deg": Field(list[float] | None, None, unit="degrees",
                            doc="Bob's two analyser angles; default [0, 45] (bbm92), [22.5, 67.5] (chsh)"),
}

# Detector presets. SNSPD: physics.md typical values. SPAD: a thick-junction silicon SPAD module (Excelitas
# SPCM-AQRH class, ~800 nm): 0.5 efficiency, 300 Hz dark counts, 22 ns dead time, 150 ps rms jitter (about
# 350 ps FWHM), 0.5% afterpulsing with a short (50 ns) release time. Silicon does not detect 1550 nm: with
# this preset, set the arms' fiber loss for ~800 nm (about 3-4 dB/km).
DETECTOR_PRESETS: dict[str, dict[str, float | None]] = {
    "snspd": dict(efficiency=0.85, dark_count_hz=100.0, dead_time_ns=50.0, jitter_ps=20.0,
                  afterpulse_probability=0.0, afterpulse_time_ns=100.0, critical_bias_ua=20.0, nominal_bias_ua=15.0),
    "spad": dict(efficiency=0.5, dark_count_hz=300.0, dead_time_ns=22.0, jitter_ps=150.0,
                 afterpulse_probability=0.005, afterpulse_time_ns=50.0, critical_bias_ua=None, nominal_bias_ua=0.0),
}


def _preset_doc(key: str) -> str:
    s, p = DETECTOR_PRESETS["snspd"][key], DETECTOR_PRESETS["spad"][key]
    return f"default by preset: snspd {s}, spad {p}; a number (all detectors) or an array of {DETECTORS} (detectors 0-7)"


DETECTOR_FIELDS: dict[str, Field] = {
    "preset": Field(str, "snspd", choices=("snspd", "spad"), doc="detector technology; sets the defaults below"),
    "efficiency": Field(float, None, min=0, max=1, doc="detection efficiency eta_det per photon; " + _preset_doc("efficiency")),
    "dark_count_hz": Field(float, None, unit="Hz", min=0, max=1e8, doc="dark count rate (Poisson); " + _preset_doc("dark_count_hz")),
    "dead_time_ns": Field(float, None, unit="ns", min=0, max=1e7, doc="non-paralyzable dead time; " + _preset_doc("dead_time_ns")),
    "jitter_ps": Field(float, None, unit="ps", min=0, max=1e6, doc="Gaussian timing jitter, rms; " + _preset_doc("jitter_ps")),
    "afterpulse_probability": Field(float, None, min=0, max=0.5,
                                    doc="probability that a click is followed by an afterpulse; "
                                        + _preset_doc("afterpulse_probability")),
    "afterpulse_time_ns": Field(float, None, unit="ns", min=0, max=1e7,
                                doc="mean of the exponential afterpulse delay after the dead time; "
                                    + _preset_doc("afterpulse_time_ns")),
    "critical_bias_ua": Field(float, None, unit="uA", min=0, max=1e4,
                              doc="SNSPD latching current: biased above it, a detector stops counting until "
                                  "the bias goes to 0; snspd only; " + _preset_doc("critical_bias_ua")),
    "nominal_bias_ua": Field(float, None, unit="uA", min=0, max=1e4,
                             doc="bias at start (bias does not change efficiency or dark counts in this model); "
                                 + _preset_doc("nominal_bias_ua")),
}

TAGGER_FIELDS: dict[str, Field] = {
    "channels": Field(int, 8, min=DETECTORS, max=256, doc="input channels; 0-3 Alice, 4-7 Bob, the rest unconnected"),
    "resolution_ps": Field(int, 1, unit="ps", min=1, max=1_000_000, doc="timestamps are floored to multiples of this"),
    "jitter_ps": Field(float, 10.0, unit="ps", min=0, max=1e5, doc="the tagger's own Gaussian jitter, rms, per tag"),
    "input_delays_ps": Field(list[int], [], unit="ps", min=0, max=1_000_000_000_000,
                             doc="per-channel input delay (empty: all 0); changeable at run time"),
    "dead_time_ns": Field(float, 2.0, unit="ns", min=0, max=1e7,
                          doc="per-channel dead time; a number (all channels) or an array of one per channel"),
    "max_rate_hz": Field(float, 6.5e7, unit="Hz", min=0, max=1e10,
                         doc="sustained tag rate: beyond it, the tags at the end of each block are dropped and "
                             "the batch is flagged overflow (0: no limit)"),
}

EVE_FIELDS: dict[str, Field] = {
    "fraction": Field(float, 0.0, min=0, max=1, doc="fraction p of the pairs whose photon in `arm` Eve intercepts"),
    "arm": Field(str, "bob", choices=("alice", "bob"), doc="the arm Eve taps (at the source's output)"),
}

SCHEMA: dict[str, dict[str, Field]] = {
    "simulation": TOP_FIELDS,
    "simulation.source": SOURCE_FIELDS,
    "simulation.pump": PUMP_FIELDS,
    "simulation.arms.alice": ARM_FIELDS["alice"],
    "simulation.arms.bob": ARM_FIELDS["bob"],
    "simulation.receivers": RECEIVER_FIELDS,
    "simulation.detectors": DETECTOR_FIELDS,
    "simulation.tagger": TAGGER_FIELDS,
    "simulation.eve": EVE_FIELDS,
}

SUBTABLES = ("source", "pump", "arms", "receivers", "detectors", "tagger", "eve")
IGNORED = ("instruments",)


# --------------------------------------------------------------------------------------------------------
# The validated configuration


@dataclass(frozen=True)
class SourceConfig:
    brightness: float  # pairs/s/mW
    visibility: float
    bell_state: str


@dataclass(frozen=True)
class PumpConfig:
    threshold_ma: float
    slope_mw_per_ma: float
    current_limit_ma: float
    current_ma: float
    output_on: bool

    @property
    def power_mw(self) -> float:
        return self.slope_mw_per_ma * max(0.0, self.current_ma - self.threshold_ma) if self.output_on else 0.0


@dataclass(frozen=True)
class ArmConfig:
    loss_db: float
    fiber_km: float
    loss_db_per_km: float
    group_index: float
    drift_rad2_per_s: float
    initial_unitary: str
    delay_drift_ps_per_s: float = 0.0

    @property
    def total_loss_db(self) -> float:
        return self.loss_db + self.fiber_km * self.loss_db_per_km

    @property
    def transmission(self) -> float:
        """eta_ch = 10^(-(loss_db + fiber_km * loss_db_per_km) / 10)."""
        return 10.0 ** (-self.total_loss_db / 10.0)

    @property
    def delay_ps(self) -> int:
        """Fiber delay L / (c / n_g), rounded to ps."""
        return int(round(self.fiber_km * 1e3 * self.group_index / C_M_PER_S * 1e12))


@dataclass(frozen=True)
class ReceiverConfig:
    mode: str
    alice_angles_deg: tuple[float, float]
    bob_angles_deg: tuple[float, float]


@dataclass(frozen=True)
class DetectorConfig:
    """Per-detector parameters (tuples of 8, detectors 0-7) after applying the preset and overrides."""

    preset: str
    efficiency: tuple[float, ...]
    dark_count_hz: tuple[float, ...]
    dead_time_ns: tuple[float, ...]
    jitter_ps: tuple[float, ...]
    afterpulse_probability: tuple[float, ...]
    afterpulse_time_ns: tuple[float, ...]
    critical_bias_ua: tuple[float | None, ...]
    nominal_bias_ua: tuple[float, ...]


@dataclass(frozen=True)
class TaggerConfig:
    channels: int
    resolution_ps: int
    jitter_ps: float
    input_delays_ps: tuple[int, ...]  # one per channel
    dead_time_ns: tuple[float, ...]  # one per channel
    max_rate_hz: float


@dataclass(frozen=True)
class EveConfig:
    fraction: float
    arm: str


@dataclass(frozen=True)
class BenchConfig:
    """The validated [simulation] table (build it with :func:`validate`)."""

    enabled: bool
    seed: int
    block_ms: float
    source: SourceConfig
    pump: PumpConfig
    arms: dict[str, ArmConfig]  # "alice", "bob"
    receivers: ReceiverConfig
    detectors: DetectorConfig
    tagger: TaggerConfig
    eve: EveConfig

    @property
    def alice(self) -> ArmConfig:
        return self.arms["alice"]

    @property
    def bob(self) -> ArmConfig:
        return self.arms["bob"]


# --------------------------------------------------------------------------------------------------------
# Validation


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _table(raw: Any, schema: dict[str, Field], path: str, errors: list[ParamError],
           custom: tuple[str, ...] = ()) -> dict[str, Any]:
    return validate_table(raw, schema, path, errors, custom=custom, not_table_hint="a TOML table")


def _number_or_list(value: Any, fld: Field, path: str, n: int, errors: list[ParamError]) -> tuple[float, ...] | None:
    """A number for all n items, or an array of exactly n numbers, each within fld's range."""
    if isinstance(value, list):
        if len(value) != n:
            errors.append(ParamError(path, f"has {len(value)} entries", f"a number or an array of {n} numbers"))
            return None
        out = []
        ok = True
        for i, v in enumerate(value):
            try:
                out.append(check_value(v, fld, f"{path}[{i}]", float))
            except ParamError as e:
                errors.append(e)
                ok = False
        return tuple(out) if ok else None
    try:
        return (check_value(value, fld, path, float),) * n
    except ParamError as e:
        errors.append(ParamError(path, e.message, f"{fld.allowed(float)}, or an array of {n} such numbers"))
        return None


def _int_list(value: Any, fld: Field, path: str, errors: list[ParamError]) -> list[int]:
    """An array of integers, each checked against fld (errors name the index)."""
    if not isinstance(value, list):
        errors.append(ParamError(path, f"expected an array, got {type(value).__name__}", fld.allowed()))
        return []
    out, ok = [], True
    for i, v in enumerate(value):
        try:
            out.append(check_value(v, Field(int, min=fld.min, max=fld.max, unit=fld.unit), f"{path}[{i}]"))
        except ParamError as e:
            errors.append(e)
            ok = False
    return out if ok else []


def _angles(value: Any, fld: Field, path: str, default: list[float], errors: list[ParamError]) -> tuple[float, float]:
    if value is None:
        return (float(default[0]), float(default[1]))
    try:
        v = check_value(value, Field(list[float], unit="degrees"), path)
    except ParamError as e:
        errors.append(ParamError(path, e.message, "an array of two angles in degrees"))
        return (float(default[0]), float(default[1]))
    if len(v) != 2:
        errors.append(ParamError(path, f"has {len(v)} entries", "an array of two angles in degrees [theta0, theta1]"))
        return (float(default[0]), float(default[1]))
    return (float(v[0]), float(v[1]))


def validate(raw: dict, path: str = "simulation") -> tuple[BenchConfig | None, list[ParamError]]:
    """Validate the [simulation] table; return (config, []) or (None, every problem found).

    ``path`` prefixes the key paths in errors. The ``instruments`` subtable is ignored (the instrument
    simulators validate it).
    """
    errors: list[ParamError] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return None, [ParamError(path, f"expected a table, got {type(raw).__name__}", "a TOML table")]
    top_schema = {**TOP_FIELDS, **{k: Field(dict, {}, doc=f"[{path}.{k}]") for k in (*SUBTABLES, *IGNORED)}}
    top = _table(raw, top_schema, path, errors, custom=(*SUBTABLES, *IGNORED))

    source = _table(top["source"], SOURCE_FIELDS, _join(path, "source"), errors)
    pump = _table(top["pump"], PUMP_FIELDS, _join(path, "pump"), errors)
    if pump["current_ma"] > pump["current_limit_ma"]:
        errors.append(ParamError(_join(path, "pump.current_ma"),
                                 f"{pump['current_ma']} mA is above current_limit_ma ({pump['current_limit_ma']} mA)",
                                 f"0 <= current_ma <= {pump['current_limit_ma']:g} (in mA)"))

    arms_path = _join(path, "arms")
    arms_raw = top["arms"]
    if arms_raw is not None and not isinstance(arms_raw, dict):
        errors.append(ParamError(arms_path, f"expected a table, got {type(arms_raw).__name__}", "tables alice and bob"))
        arms_raw = {}
    arms_raw = arms_raw or {}
    for key in arms_raw:
        if key not in ARM_FIELDS:
            errors.append(ParamError(_join(arms_path, key), "unknown arm", "alice, bob"))
    arms = {arm: ArmConfig(**_table(arms_raw.get(arm, {}), ARM_FIELDS[arm], _join(arms_path, arm), errors))
            for arm in ARM_FIELDS}

    rp = _join(path, "receivers")
    rec = _table(top["receivers"], RECEIVER_FIELDS, rp, errors, custom=("alice_angles_deg", "bob_angles_deg"))
    da, db = RECEIVER_DEFAULTS.get(rec["mode"], RECEIVER_DEFAULTS["bbm92"])
    receivers = ReceiverConfig(
        rec["mode"],
        _angles(rec["alice_angles_deg"], RECEIVER_FIELDS["alice_angles_deg"], _join(rp, "alice_angles_deg"), da, errors),
        _angles(rec["bob_angles_deg"], RECEIVER_FIELDS["bob_angles_deg"], _join(rp, "bob_angles_deg"), db, errors),
    )

    dp = _join(path, "detectors")
    per_det = tuple(k for k in DETECTOR_FIELDS if k != "preset")
    det = _table(top["detectors"], DETECTOR_FIELDS, dp, errors, custom=per_det)
    preset = DETECTOR_PRESETS.get(det["preset"], DETECTOR_PRESETS["snspd"])
    det_values: dict[str, tuple] = {}
    for key in per_det:
        kp = _join(dp, key)
        value = det[key]
        if key == "critical_bias_ua" and det["preset"] == "spad" and value is not None:
            errors.append(ParamError(kp, "SPADs do not latch", "no critical_bias_ua with preset 'spad' (use 'snspd')"))
            value = None
        if value is None:
            det_values[key] = (preset[key],) * DETECTORS
            continue
        got = _number_or_list(value, DETECTOR_FIELDS[key], kp, DETECTORS, errors)
        det_values[key] = got if got is not None else (preset[key],) * DETECTORS
    if det["preset"] == "snspd":
        for i, (nom, crit) in enumerate(zip(det_values["nominal_bias_ua"], det_values["critical_bias_ua"])):
            if crit is not None and nom >= crit:
                errors.append(ParamError(_join(dp, "nominal_bias_ua"),
                                         f"detector {i}: nominal bias {nom} uA is not below the critical bias {crit} uA "
                                         "(the SNSPD would latch at start)", "nominal_bias_ua < critical_bias_ua"))
                break
    detectors = DetectorConfig(preset=det["preset"], **det_values)  # type: ignore[arg-type]

    tp = _join(path, "tagger")
    tag = _table(top["tagger"], TAGGER_FIELDS, tp, errors, custom=("dead_time_ns", "input_delays_ps"))
    n_ch = tag["channels"]
    delays = _int_list(tag["input_delays_ps"], TAGGER_FIELDS["input_delays_ps"], _join(tp, "input_delays_ps"), errors)
    if delays and len(delays) != n_ch:
        errors.append(ParamError(_join(tp, "input_delays_ps"), f"has {len(delays)} entries for {n_ch} channels",
                                 f"empty (all 0) or {n_ch} delays in ps, each >= 0"))
        delays = []
    dead = _number_or_list(tag["dead_time_ns"], TAGGER_FIELDS["dead_time_ns"], _join(tp, "dead_time_ns"), n_ch, errors)
    tagger = TaggerConfig(
        channels=n_ch,
        resolution_ps=tag["resolution_ps"],
        jitter_ps=tag["jitter_ps"],
        input_delays_ps=tuple(int(d) for d in delays) or (0,) * n_ch,
        dead_time_ns=dead if dead is not None else (TAGGER_FIELDS["dead_time_ns"].default,) * n_ch,
        max_rate_hz=tag["max_rate_hz"],
    )
    eve = EveConfig(**_table(top["eve"], EVE_FIELDS, _join(path, "eve"), errors))

    if errors:
        return None, errors
    cfg = BenchConfig(
        enabled=top["enabled"], seed=top["seed"], block_ms=top["block_ms"],
        source=SourceConfig(**source), pump=PumpConfig(**pump), arms=arms, receivers=receivers,
        detectors=detectors, tagger=tagger, eve=eve,
    )
    return cfg, []


def default_config(**overrides: Any) -> BenchConfig:
    """The default bench (every key at its default), with optional top-level table overrides; raises
    ValueError listing the problems if the overrides are invalid."""
    cfg, errors = validate(dict(overrides))
    if cfg is None:
        raise ValueError("invalid [simulation] table:\n" + "\n".join(f"  {e}" for e in errors))
    return cfg
