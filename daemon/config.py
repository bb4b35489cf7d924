"""Configuration: TOML, validated completely before any device is touched.

Every problem is reported with its TOML key path and what is allowed, all at once (not the first only).
The embedded default, ``config/sim.toml`` (the simulated testbed), ships inside the package as
``daemon.embedded/sim.toml``. docs/configuration.md documents every key; :func:`schema_doc` generates the
tables it shows.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from daemon.api.protocol import EndpointError, check_endpoint
from daemon.api.security import CurveConfig, KeyFileError, load_authorized, load_secret_key
from drivers import registry
from drivers.base import GENERIC_METHODS, Device, all_limits, all_required_limits, exposed_methods
from drivers.params import REQUIRED, Field, ParamError, validate_table

EX_CONFIG = 78  # sysexits.h: configuration error

DAEMON_FIELDS: dict[str, Field] = {
    "control": Field(str, "tcp://127.0.0.1:5555", doc="ROUTER endpoint for JSON-RPC control (loopback or ipc unless [daemon.curve] is set)"),
    "publish": Field(str, "tcp://127.0.0.1:5556", doc="PUB endpoint for published topics (loopback or ipc unless [daemon.curve] is set)"),
    "log_format": Field(str, "auto", choices=("auto", "console", "json"), doc="auto: console on a TTY, JSON lines otherwise"),
    "log_level": Field(str, "info", choices=("debug", "info", "warning", "error"), doc="lowest level logged"),
    "max_request_bytes": Field(int, 1_048_576, unit="bytes", min=1024, max=256 * 1_048_576, doc="larger requests get -32600"),
    "max_requests_in_flight": Field(int, 256, min=1, max=100_000, doc="more concurrent requests get -32003 busy"),
    "health_interval_s": Field(float, 5.0, unit="s", min=0.1, max=3600, doc="period of the `daemon` topic"),
    "shutdown_timeout_s": Field(float, 8.0, unit="s", min=0.5, max=60, doc="total time allowed for safe states and close on stop"),
}

CURVE_FIELDS: dict[str, Field] = {
    "server_secret_key": Field(str, doc="the daemon's secret key file (NAME.key_secret from `qnetd keygen`, mode 0600)"),
    "authorized_clients": Field(str, doc="directory of the authorized clients' public key files (*.key)"),
}

SUPERVISOR_FIELDS: dict[str, Field] = {
    "connect_timeout_s": Field(float, 10.0, unit="s", min=0.01, max=600, doc="a connect that takes longer is a fault"),
    "call_timeout_s": Field(float, 5.0, unit="s", min=0.01, max=3600, doc="a device call that takes longer is a fault"),
    "backoff_initial_s": Field(float, 1.0, unit="s", min=0.0, max=3600, doc="delay before the first reconnect"),
    "backoff_factor": Field(float, 2.0, min=1.0, max=10, doc="each further attempt waits this much longer"),
    "backoff_max_s": Field(float, 60.0, unit="s", min=0.0, max=86400, doc="cap on the reconnect delay"),
}

ACQUISITION_FIELDS: dict[str, Field] = {
    "tagger": Field(str, "", doc="device name of the time tagger to stream from; empty: the only one configured"),
    "counts_interval_s": Field(float, 1.0, unit="s", min=0.001, max=3600, doc="integration time of the `counts` topic (tagger time)"),
    "read_timeout_s": Field(float, 0.25, unit="s", min=0.001, max=60, doc="how long one stream read may wait for tags"),
    "record_dir": Field(str, "", doc="directory for acquisition.record_start PTU files; empty: recording disabled"),
}

DEVICE_FIELDS: dict[str, Field] = {
    "driver": Field(str, doc="driver entry-point name (qnetd drivers lists them)"),
    "enabled": Field(bool, True, doc="false: keep the device in the config but do not start it"),
    "options": Field(dict, {}, doc="driver options (see the driver's documentation)"),
    "limits": Field(dict, {}, doc="safety limits, NAME = [min, max] in the limit's unit"),
    **{k: Field(v.type, None, unit=v.unit, min=v.min, max=v.max, doc="overrides [supervisor] for this device")
       for k, v in SUPERVISOR_FIELDS.items()},
}

RESERVED_NAMES = {"daemon", "acquisition", "analysis", "counts", "keys", "qkd", "control", "histogram", "device", "sim"}
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")  # used with fullmatch: no trailing newline slips through


class ConfigError(Exception):
    """One or more config problems; ``errors`` lists each with its key path."""

    def __init__(self, errors: list[ParamError], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: {len(errors)} problem(s)\n" + "\n".join(f"  {e}" for e in errors))


@dataclass(frozen=True)
class SupervisorConfig:
    connect_timeout_s: float
    call_timeout_s: float
    backoff_initial_s: float
    backoff_factor: float
    backoff_max_s: float


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    driver: str
    driver_cls: type[Device]
    options: dict[str, Any]
    limits: dict[str, tuple[float, float]]
    supervisor: SupervisorConfig
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    daemon: dict[str, Any]
    supervisor: SupervisorConfig
    acquisition: dict[str, Any]
    devices: dict[str, DeviceConfig]
    simulation: Any = None  # daemon.simulation.SimulationConfig when the config runs the simulated testbed
    analysis: dict[str, Any] | None = None  # validated [analysis] (daemon/analysis/pipeline.py), None: off
    source: str = "config"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    curve: CurveConfig | None = None  # [daemon.curve]: both sockets are CURVE servers; None: no authentication
    control: dict[str, Any] = field(default_factory=dict)  # [control.polarization.NAME] (daemon/control)
    qkd: dict[str, Any] | None = None  # validated [qkd] with its enabled links (daemon/qkd/service.py), None: off

    @property
    def tagger(self) -> str | None:
        """Name of the streaming time tagger, or None if the config has none."""
        return self.acquisition["tagger"] or None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _limits(raw: dict[str, Any], cls: type[Device], path: str, errors: list[ParamError]) -> dict[str, tuple[float, float]]:
    out = {}
    known = all_limits(cls)
    for key, value in raw.items():
        kp = _join(path, key)
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none (this driver has no limits)"
            errors.append(ParamError(kp, "unknown limit", allowed))
            continue
        unit = known[key].unit or ""
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[0] <= value[1]
        )
        if not ok:
            errors.append(ParamError(kp, f"expected [min, max], got {value!r}", f"two finite numbers min <= max ({unit})"))
            continue
        out[key] = (float(value[0]), float(value[1]))
    for key in all_required_limits(cls):
        if key not in out and key not in raw:
            unit = known[key].unit if key in known else ""
            errors.append(
                ParamError(_join(path, key), f"missing: a {cls.kind} must have this safety limit", f"[min, max] in {unit}")
            )
    return out


def _device(name: str, raw: Any, sup: dict[str, Any], errors: list[ParamError]) -> DeviceConfig | None:
    path = f"devices.{name}"
    if not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        errors.append(
            ParamError(path, f"invalid device name {name!r}", "lower-case letters, digits and _, starting with a letter, "
                       f"at most 32 characters, not one of {', '.join(sorted(RESERVED_NAMES))}")
        )
        return None
    n_before = len(errors)
    table = validate_table(raw, DEVICE_FIELDS, path, errors)
    if len(errors) > n_before and "driver" not in (raw if isinstance(raw, dict) else {}):
        return None
    driver = table["driver"]
    if not isinstance(driver, str):
        return None
    try:
        cls = registry.load(driver)
    except registry.DriverNotFound:
        errors.append(ParamError(f"{path}.driver", f"no driver named {driver!r} is installed",
                                 "one of " + ", ".join(sorted(registry.available()))))
        return None
    except Exception as e:  # a broken third-party driver package must not crash validation
        errors.append(ParamError(f"{path}.driver", f"driver {driver!r} failed to load: {e}"))
        return None
    clash = sorted(set(exposed_methods(cls)) & set(GENERIC_METHODS))
    if clash:
        errors.append(ParamError(f"{path}.driver", f"driver {driver!r} exposes {', '.join(clash)}, which every device "
                                 "gets from the daemon", "a driver that renames those methods"))
        return None
    opts_errors: list[ParamError] = []
    options = validate_table(table["options"], cls.options, f"{path}.options", opts_errors)
    if not opts_errors:
        for e in cls.check_options(options):
            opts_errors.append(ParamError(f"{path}.options.{e.path}", e.message, e.allowed))
    errors.extend(opts_errors)
    limits = _limits(table["limits"], cls, f"{path}.limits", errors)
    merged = {k: (table[k] if table[k] is not None else sup[k]) for k in SUPERVISOR_FIELDS}
    return DeviceConfig(name, driver, cls, options, limits, SupervisorConfig(**merged), table["enabled"])


TOP_LEVEL = {"daemon", "supervisor", "acquisition", "devices", "simulation", "analysis", "control", "qkd"}


def _simulation(raw: dict[str, Any], devices: dict[str, DeviceConfig], errors: list[ParamError]) -> Any:
    """Validate [simulation] (if present and enabled) and every sim:// reference in device options."""
    from daemon import simulation

    table = raw.get("simulation")
    enabled = table is not None and not (isinstance(table, dict) and table.get("enabled", True) is False)
    sim = simulation.validate(table, errors) if table is not None else None  # validated even when disabled
    if enabled and sim is None:
        return None  # [simulation] itself is invalid: already reported, references cannot be checked
    if not enabled:
        sim = None
    known = (set(sim.instruments) | {simulation.BENCH}) if sim is not None else set()
    for dev in devices.values():
        for key, value in dev.options.items():
            for ref in simulation.sim_references(value):
                path = f"devices.{dev.name}.options.{key}"
                if sim is None:
                    errors.append(ParamError(path, f"refers to sim://{ref} but the config has no enabled [simulation]",
                                             "a real address, or an enabled [simulation] table"))
                elif ref not in known:
                    errors.append(ParamError(path, f"no simulated instrument named {ref!r}",
                                             "one of " + ", ".join(f"sim://{k}" for k in sorted(known))))
    return sim


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    errors: list[ParamError] = []
    for key in raw:
        if key not in TOP_LEVEL:
            errors.append(ParamError(key, "unknown section", "one of " + ", ".join(sorted(TOP_LEVEL))))
    daemon = validate_table(raw.get("daemon", {}), DAEMON_FIELDS, "daemon", errors, extra_keys=("curve",))
    curve_raw = raw.get("daemon", {}).get("curve") if isinstance(raw.get("daemon"), dict) else None
    curve = _curve(curve_raw, errors) if curve_raw is not None else None
    for key in ("control", "publish"):
        if isinstance(daemon[key], str):
            try:
                # a remote bind needs CURVE; a [daemon.curve] with errors is already reported, so do not add
                # a second, misleading "not loopback" error for it
                check_endpoint(daemon[key], allow_remote=curve_raw is not None)
            except EndpointError as e:
                errors.append(ParamError(f"daemon.{key}", str(e)))
    if daemon["control"] == daemon["publish"]:
        errors.append(ParamError("daemon.publish", "is the same endpoint as daemon.control", "a different endpoint"))
    sup = validate_table(raw.get("supervisor", {}), SUPERVISOR_FIELDS, "supervisor", errors)
    acq = validate_table(raw.get("acquisition", {}), ACQUISITION_FIELDS, "acquisition", errors)
    devices_raw = raw.get("devices", {})
    devices: dict[str, DeviceConfig] = {}
    if not isinstance(devices_raw, dict):
        errors.append(ParamError("devices", "expected a table of devices ([devices.NAME])"))
    else:
        for name, table in devices_raw.items():
            dev = _device(name, table, sup, errors)
            if dev is not None:
                devices[name] = dev
    # the streaming tagger
    taggers = [d.name for d in devices.values() if d.driver_cls.kind == "time_tagger" and d.enabled]
    if acq["tagger"]:
        if acq["tagger"] not in devices and acq["tagger"] not in (devices_raw if isinstance(devices_raw, dict) else {}):
            errors.append(ParamError("acquisition.tagger", f"no device named {acq['tagger']!r}",
                                     "one of " + (", ".join(taggers) or "(no time tagger configured)")))
        elif acq["tagger"] in devices and acq["tagger"] not in taggers:
            errors.append(ParamError("acquisition.tagger", f"{acq['tagger']!r} is not an enabled time tagger",
                                     "one of " + (", ".join(taggers) or "(none)")))
    elif len(taggers) == 1:
        acq["tagger"] = taggers[0]
    elif len(taggers) > 1:
        errors.append(ParamError("acquisition.tagger", "several time taggers are configured: name the one to stream from",
                                 "one of " + ", ".join(taggers)))
    sim = _simulation(raw, devices, errors)
    analysis = None
    if "analysis" in raw:
        from daemon.analysis.pipeline import validate as validate_analysis

        analysis, analysis_errors = validate_analysis(raw["analysis"], "analysis")
        errors.extend(analysis_errors)
        if analysis is not None and not analysis.get("enabled", True):
            analysis = None
        elif analysis is not None and not acq["tagger"]:
            errors.append(ParamError("analysis", "coincidence analysis needs a streaming time tagger",
                                     "a [devices.NAME] time tagger, or analysis.enabled = false"))
    control: dict[str, Any] = {}
    if "control" in raw:
        from daemon.control.polarization import validate as validate_control

        links = [lk["name"] for lk in (analysis or {}).get("links", [])]
        control = validate_control(raw["control"], errors, devices=devices, links=links)
    qkd = None
    if "qkd" in raw:
        from daemon.qkd.service import validate as validate_qkd

        links = {lk["name"]: lk for lk in (analysis or {}).get("links", [])}
        qkd = validate_qkd(raw["qkd"], errors, links=links, curve=curve_raw is not None)
        if qkd is not None and not qkd["links"]:
            qkd = None
    if errors:
        raise ConfigError(errors, source)
    return Config(daemon, SupervisorConfig(**sup), acq, devices, sim, analysis, source, raw, curve, control, qkd)


def _curve(raw: Any, errors: list[ParamError]) -> CurveConfig | None:
    """Validate [daemon.curve] and load its key files (errors name the key and the file, never key material)."""
    n_before = len(errors)
    table = validate_table(raw, CURVE_FIELDS, "daemon.curve", errors,
                           not_table_hint="a table with server_secret_key and authorized_clients")
    if len(errors) > n_before:
        return None
    try:
        public, secret = load_secret_key(table["server_secret_key"])
    except KeyFileError as e:
        errors.append(ParamError("daemon.curve.server_secret_key", str(e)))
        public = secret = None
    try:
        authorized = load_authorized(table["authorized_clients"])
    except KeyFileError as e:
        errors.append(ParamError("daemon.curve.authorized_clients", str(e)))
        authorized = None
    if public is None or secret is None or authorized is None:
        return None
    return CurveConfig(table["server_secret_key"], table["authorized_clients"], public, secret, authorized)


def parse(text: str, source: str = "config") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([ParamError(source, f"not valid TOML: {e}")], source) from None


def default_config_text() -> str:
    """The embedded default config (the simulated testbed)."""
    return resources.files("daemon.embedded").joinpath("sim.toml").read_text(encoding="utf-8")


DEFAULT_SOURCE = "<embedded config/sim.toml>"


def load(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read, merge command-line overrides into, and validate a config file (None: the embedded default)."""
    if path is None:
        text, source = default_config_text(), DEFAULT_SOURCE
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([ParamError(source, f"cannot read: {e.strerror or e}")], source) from None
        except UnicodeDecodeError as e:
            raise ConfigError([ParamError(source, f"not UTF-8 text: {e}")], source) from None
    raw = parse(text, source)
    for section, values in (overrides or {}).items():
        if values:
            table = raw.setdefault(section, {})
            if isinstance(table, dict):
                table.update(values)
    return validate(raw, source)


def schema_doc() -> str:
    """Markdown tables of every section's keys (used to write docs/configuration.md)."""
    out = []
    for title, schema in (("[daemon]", DAEMON_FIELDS), ("[daemon.curve]", CURVE_FIELDS), ("[supervisor]", SUPERVISOR_FIELDS),
                          ("[acquisition]", ACQUISITION_FIELDS), ("[devices.NAME]", DEVICE_FIELDS)):
        out.append(f"### {title}\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|")
        for key, f in schema.items():
            default = "required" if f.default is REQUIRED else ("" if f.default is None else repr(f.default))
            out.append(f"| `{key}` | {f.describe()['type']} | {default} | {f.allowed()} | {f.doc} |")
        out.append("")
    return "\n".join(out)
