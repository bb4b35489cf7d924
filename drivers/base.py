"""Driver interfaces: the contract between qnetd and every instrument it runs.

A driver is a class deriving from one of the four interfaces below. Its methods are *blocking*: the daemon
calls them from the device's own worker thread (one thread per device, calls in order), never from the
event loop, and puts a timeout on every call. A driver therefore writes plain synchronous I/O code
(pyvisa, pyserial, sockets, vendor libraries).

Errors a driver raises mean one of two things:

* :class:`DeviceError` -- the instrument answered, but with an error (an SCPI error queue entry, a refused
  command, a malformed reply). The call fails with an RPC "device error"; the device stays ``ready``.
* anything else (``OSError``, ``TimeoutError``, a vendor exception) -- the link is in doubt. The device is
  marked ``faulted``, put through reconnect with backoff, and calls fail with "device unavailable" meanwhile.

Methods marked :func:`exposed` become RPC methods ``<device>.<method>``; their parameters are validated from
the type hints and :class:`~drivers.params.Field` annotations, and configured safety limits (``limit=``) are
enforced by the daemon before the driver is ever called. Units are in parameter names or Field units:
ps, Hz, mW, mA, degrees, uA, mV, K.
"""

from __future__ import annotations

import enum
import inspect
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar

import numpy as np

from drivers.params import REQUIRED, Field, ParamError, type_name

__all__ = [
    "Device",
    "DeviceError",
    "DeviceState",
    "Laser",
    "MethodSpec",
    "ParamSpec",
    "PhotonDetector",
    "PolarizationController",
    "TagBatch",
    "TagFlags",
    "TimeTagger",
    "all_limits",
    "all_required_limits",
    "exposed",
    "exposed_methods",
]


class DeviceState(str, enum.Enum):
    """Life cycle of a device under its supervisor: disconnected -> connecting -> ready <-> busy; faulted."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    READY = "ready"
    BUSY = "busy"
    FAULTED = "faulted"


class DeviceError(Exception):
    """The instrument answered with an error or an unexpected reply; the link itself is fine.

    ``command`` names what was sent, so the message tells the user which exchange failed.
    """

    def __init__(self, message: str, command: str | None = None) -> None:
        self.command = command
        super().__init__(f"{command}: {message}" if command else message)


class TagFlags(enum.IntFlag):
    """Quality flags of a TagBatch, as real taggers report them."""

    NONE = 0
    OVERFLOW = 1  # the tagger dropped tags (rate above its sustained maximum, buffer overrun)
    MISSED_EVENTS = 2  # some channels missed events; ``missed_events`` says how many


@dataclass(frozen=True, slots=True)
class TagBatch:
    """A time-ordered chunk of time tags covering the tagger interval ``[t_begin, t_end)``.

    ``timestamps`` are int64 picoseconds, monotonic and unwrapped by the driver; ``channels`` are uint8
    channel indices (0-based). ``t_end`` is a promise: no later batch holds a tag before it, so an empty
    batch still advances time for downstream watermarks. Data in a batch with ``OVERFLOW`` is incomplete
    and must be marked invalid downstream, never silently counted.
    """

    timestamps: np.ndarray
    channels: np.ndarray
    t_begin: int
    t_end: int
    flags: TagFlags = TagFlags.NONE
    missed_events: int = 0

    def __post_init__(self) -> None:
        if self.timestamps.dtype != np.int64 or self.timestamps.ndim != 1:
            raise TypeError("TagBatch.timestamps must be a 1-D int64 array (picoseconds)")
        if self.channels.dtype != np.uint8 or self.channels.shape != self.timestamps.shape:
            raise TypeError("TagBatch.channels must be a uint8 array of the same length as timestamps")
        if self.t_end < self.t_begin:
            raise ValueError(f"TagBatch interval is reversed: [{self.t_begin}, {self.t_end})")

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])

    @property
    def overflow(self) -> bool:
        return bool(self.flags & TagFlags.OVERFLOW)

    def check_order(self) -> None:
        """Raise ValueError unless tags are sorted and inside [t_begin, t_end) (O(n); for tests and replay)."""
        ts = self.timestamps
        if len(ts) == 0:
            return
        if ts[0] < self.t_begin or ts[-1] >= self.t_end:
            raise ValueError("TagBatch has tags outside its interval")
        if np.any(np.diff(ts) < 0):
            raise ValueError("TagBatch timestamps are not sorted")

    @classmethod
    def empty(cls, t_begin: int, t_end: int, flags: TagFlags = TagFlags.NONE) -> TagBatch:
        return cls(np.empty(0, np.int64), np.empty(0, np.uint8), t_begin, t_end, flags)


# --------------------------------------------------------------------------------------------------------
# RPC exposure


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: Any
    field: Field
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, **self.field.describe(self.type), "required": self.required}
        if not self.required:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class MethodSpec:
    """An RPC-callable method: name, parameters with types and units, and docstring."""

    name: str
    params: tuple[ParamSpec, ...]
    doc: str
    returns: str
    func: Callable[..., Any] = field(repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "params": [p.describe() for p in self.params],
            "returns": self.returns,
        }


_EXPOSED = "__qnetd_exposed__"


def exposed(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a driver method as callable over RPC as ``<device>.<method name>``."""
    setattr(func, _EXPOSED, True)
    return func


def method_spec(name: str, func: Callable[..., Any], skip_self: bool = True) -> MethodSpec:
    """Build a MethodSpec from a function's signature, ``Annotated[T, Field]`` hints and docstring."""
    hints = typing.get_type_hints(func, include_extras=True)
    sig = inspect.signature(func)
    params = []
    for i, (pname, p) in enumerate(sig.parameters.items()):
        if skip_self and i == 0:
            continue
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"{name}: only named parameters can be exposed over RPC ({pname})")
        hint = hints.get(pname, Any)
        fld = Field()
        if typing.get_origin(hint) is Annotated:
            base, *meta = typing.get_args(hint)
            for m in meta:
                if isinstance(m, Field):
                    fld = m
            hint = base
        default = REQUIRED if p.default is p.empty else p.default
        params.append(ParamSpec(pname, hint, fld, default))
    ret = hints.get("return", Any)
    if typing.get_origin(ret) is Annotated:
        ret = typing.get_args(ret)[0]
    returns = "null" if ret is type(None) or ret is None else type_name(ret)
    doc = inspect.cleandoc(func.__doc__ or "").strip()
    return MethodSpec(name, tuple(params), doc, returns, func)


def exposed_methods(cls: type) -> dict[str, MethodSpec]:
    """All methods of a driver class marked :func:`exposed`, by name.

    The signature (parameter types, units, limits) and docstring come from the *first* class in the MRO
    that exposes the name, so a driver overriding ``Laser.set_current`` keeps the interface's limit
    annotation even if its override is unannotated: a driver cannot silently drop a safety limit. The
    daemon calls the most derived implementation by name.
    """
    out: dict[str, MethodSpec] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if name not in out and callable(attr) and getattr(attr, _EXPOSED, False):
                out[name] = method_spec(name, attr)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------------------
# The device interfaces


class Device:
    """Base of every driver.

    Class attributes a driver sets:

    * ``kind`` -- the interface family (set by the four interfaces below);
    * ``options`` -- its config options, ``{name: Field(type=..., default=...)}``, validated at start-up
      and passed to ``__init__`` as a dict with defaults filled in;
    * ``limits`` -- the safety limits it understands, ``{name: Field(unit=...)}``; the config gives each as
      ``[min, max]`` and the daemon checks every parameter annotated ``Field(limit=name)`` against it. A
      driver's ``limits`` add to those of its interface (see :func:`all_limits`);
    * ``required_limits`` -- limits a config must set (a laser without a current limit is refused); like
      ``limits``, a driver's add to its interface's.
    """

    kind: ClassVar[str] = "device"
    options: ClassVar[dict[str, Field]] = {}
    limits: ClassVar[dict[str, Field]] = {}
    required_limits: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        """Cross-option checks beyond each Field (lengths that must match, ...). Paths are option names."""
        return []

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        self.name = name
        self.opts = options
        if log is None:
            import structlog

            log = structlog.get_logger("qnetd.driver").bind(device=name)
        self.log = log

    def connect(self) -> None:
        """Open the link and check the instrument answers (blocking). Raise on failure."""

    def close(self) -> None:
        """Release the link. Must not raise if the link is already gone."""

    def safe_state(self) -> None:
        """Put the instrument where it can be left unattended (output off, detector disabled, stream stopped)."""

    def describe(self) -> dict[str, Any]:
        """Identity of the instrument (vendor, model, serial, firmware) as far as it reports it."""
        return {}


GENERIC_METHODS = ("describe", "safe_state", "reconnect")  # every device has these RPC methods from the daemon


def all_limits(cls: type) -> dict[str, Field]:
    """Every safety limit a driver class understands: its own ``limits`` merged with its bases'."""
    out: dict[str, Field] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("limits", {}))
    return out


def all_required_limits(cls: type) -> list[str]:
    """Every limit a config must set for a driver class: its own ``required_limits`` and its bases'."""
    out: list[str] = []
    for klass in reversed(cls.__mro__):
        out.extend(k for k in vars(klass).get("required_limits", ()) if k not in out)
    return out


class TimeTagger(Device):
    """A time-to-digital converter that streams time tags.

    The acquisition loop calls :meth:`start_stream`, then :meth:`read` repeatedly, then :meth:`stop_stream`.
    """

    kind = "time_tagger"
    limits = {"input_delay_ps": Field(unit="ps", doc="allowed hardware input delays")}

    @property
    def channel_count(self) -> int:
        """Number of input channels. Must not do I/O: read it at connect and cache it."""
        raise NotImplementedError

    @property
    def resolution_ps(self) -> int:
        raise NotImplementedError

    def start_stream(self) -> None:
        raise NotImplementedError

    def read(self, timeout_s: float) -> TagBatch | None:
        """The next batch of tags, waiting at most ``timeout_s``; None if the stream is not running."""
        raise NotImplementedError

    def stop_stream(self) -> None:
        raise NotImplementedError

    def safe_state(self) -> None:
        self.stop_stream()

    @exposed
    def set_input_delay(
        self,
        channel: Annotated[int, Field(min=0, doc="0-based input channel")],
        picoseconds: Annotated[int, Field(unit="ps", limit="input_delay_ps")],
    ) -> None:
        """Set the hardware input delay of one channel."""
        raise NotImplementedError

    @exposed
    def status(self) -> dict:
        """Channels, resolution_ps, input_delays_ps, streaming and the tagger's own counters."""
        raise NotImplementedError


class Laser(Device):
    """A current-driven laser (the SPDC pump). Safe state: output off."""

    kind = "laser"
    limits = {"current_ma": Field(unit="mA", doc="allowed drive current setpoints")}
    required_limits = ("current_ma",)

    @exposed
    def set_current(self, milliamps: Annotated[float, Field(unit="mA", min=0, limit="current_ma")]) -> None:
        """Set the drive current setpoint."""
        raise NotImplementedError

    @exposed
    def set_output(self, on: bool) -> None:
        """Switch the laser output on or off."""
        raise NotImplementedError

    @exposed
    def status(self) -> dict:
        """output, current_setpoint_ma, current_ma, power_mw, temperature_c and any protection trips."""
        raise NotImplementedError

    def safe_state(self) -> None:
        self.set_output(False)


class PolarizationController(Device):
    """A fiber polarization controller with independently settable retarders (paddles or voltage channels)."""

    kind = "polarization_controller"
    limits = {"angle_deg": Field(unit="degrees", doc="allowed paddle angles")}

    @property
    def paddle_count(self) -> int:
        raise NotImplementedError

    @exposed
    def move(
        self,
        paddle: Annotated[int, Field(min=0, doc="0-based paddle index")],
        degrees: Annotated[float, Field(unit="degrees", limit="angle_deg")],
    ) -> None:
        """Move one paddle to an absolute angle and wait until the move completes."""
        raise NotImplementedError

    @exposed
    def home(self) -> None:
        """Home every paddle (needed after power-up before absolute moves are trusted)."""
        raise NotImplementedError

    @exposed
    def positions(self) -> list[float]:
        """Current paddle angles in degrees, one per paddle."""
        raise NotImplementedError

    @exposed
    def status(self) -> dict:
        """positions_deg, homed and what else the controller reports."""
        raise NotImplementedError

    def safe_state(self) -> None:
        """Polarization controllers hold their position; nothing to switch off by default."""


class PhotonDetector(Device):
    """A single-photon detector (SPAD or SNSPD channel). Safe state: disabled (current-biased: bias 0 too)."""

    kind = "photon_detector"
    limits = {"bias_ua": Field(unit="uA", doc="allowed bias currents")}

    @exposed
    def set_bias(self, microamps: Annotated[float, Field(unit="uA", min=0, limit="bias_ua")]) -> None:
        """Set the bias current."""
        raise NotImplementedError

    @exposed
    def set_enabled(self, on: bool) -> None:
        """Enable or disable detection (bias applied and output active)."""
        raise NotImplementedError

    @exposed
    def status(self) -> dict:
        """enabled, bias_ua, count_rate_hz, latched and what else the detector reports."""
        raise NotImplementedError

    def safe_state(self) -> None:
        """Disable detection. Drivers of current-biased detectors also bring the bias to zero."""
        self.set_enabled(False)
