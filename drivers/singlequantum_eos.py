"""Driver for the Single Quantum Eos SNSPD controller: JSON over TCP (protocols.md section 3).

The controller has two TCP ports: **control** (12000: JSON requests and commands, replies and broadcasts) and
**counts** (12345: a line ``timestamp,c1,...,cN`` per measurement period). This driver is the code that runs
in the lab; CI runs it unchanged against :class:`drivers.sim.instruments.eos.SimEos`. The exchanges, and
which reply shapes are assumed rather than documented, are described in docs/hardware/singlequantum-eos.md.

Wire behaviour:

* The driver sends bare JSON objects, one ``sendall`` each, as the vendor's own driver does (no terminator;
  ``SEND_TERMINATOR`` changes that in one place).
* It reads ``\\x17``-separated and ``}{``-concatenated JSON objects, across partial packets
  (:class:`JsonFramer`).
* Reads use ``{"request":"labelProps","value":"None"}`` (every label with value, bounds, units) and
  ``{"request":"BiasVoltage"}``. A command (``SetAllBiasCurrents``, ``SetAllTriggerLevels``,
  ``DetectorEnable``, ``SetMeasurementPeriod``) is followed by a ``labelProps`` read-back: the controller
  handles messages in order, so the read-back shows whether the command took effect, whether or not the
  controller echoes the label. An error broadcast (``label`` containing ``Error``) that arrives while an
  exchange is waiting becomes :class:`DeviceError` naming the wire command; so does a malformed reply, or a
  read-back that disagrees with what was set. Error broadcasts that arrived between exchanges are logged and
  reported in :meth:`status` (``controller_errors``), not blamed on the next command.
* Every exchange has a deadline (``timeout_s``): no reply in time raises ``TimeoutError``; a closed
  connection raises ``ConnectionError``. Both are ``OSError``: the daemon marks the device faulted and
  reconnects a fresh instance.

Latching: a latched nanowire is resistive, so its bias voltage is large (hundreds of mV to ~1 V) while a
superconducting one shows a few mV; ``latched[i]`` is ``enabled and bias_voltage_mv[i] > latch_threshold_mv``
(counts also drop to ~0). Recovery cycles the bias of the latched channels to 0, waits ``latch_settle_s``,
restores the setpoint and checks again, at most ``latch_retry_limit`` times; see :meth:`recover_latched` and
:meth:`status`.

Calls are blocking and meant for one thread (the daemon's worker thread for this device); a lock serializes
them anyway.
"""

from __future__ import annotations

import codecs
import json
import math
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any

from drivers import net
from drivers.base import DeviceError, PhotonDetector, exposed
from drivers.jsonstream import split_objects
from drivers.params import REQUIRED, Field, ParamError

CONTROL_PORT = 12000
COUNTS_PORT = 12345
SEND_TERMINATOR = ""  # appended to every message the driver sends (the vendor's driver sends none)
MAX_PENDING = 1 << 20  # bytes of an unterminated reply before it is declared malformed
ERROR_GRACE_S = 0.25  # after an error broadcast, how long to wait for the rest of the reply (keeps the stream in step)

# Labels. NumberOfDetectors, BiasCurrent, TriggerLevel, DetectorEnable, InptMeasurementPeriod and BiasVoltage are
# the vendor's names; DeviceInfo / SerialNumber are assumed and optional.
L_NDET = "NumberOfDetectors"
L_BIAS = "BiasCurrent"
L_TRIG = "TriggerLevel"
L_ENABLE = "DetectorEnable"
L_PERIOD = "InptMeasurementPeriod"
L_VOLT = "BiasVoltage"
IDENTITY_LABELS = ("DeviceInfo", "SerialNumber")
REQUIRED_LABELS = (L_NDET, L_BIAS, L_TRIG, L_ENABLE, L_PERIOD)
# Keys inside a labelProps entry (assumed shape {"value": v, "bounds": [lo, hi], "units": "uA"}).
P_VALUE, P_BOUNDS, P_UNITS = "value", "bounds", "units"

BIAS_TOLERANCE_UA = 0.05  # read-back must match the setpoint within this (plus 0.5 %) ...
TRIGGER_TOLERANCE_MV = 0.5
PERIOD_TOLERANCE_MS = 0.5


# --------------------------------------------------------------------------------------------------------
# framing


@dataclass(frozen=True)
class Malformed:
    """A piece of the stream that is not a JSON object."""

    text: str


class JsonFramer:
    """Incremental reader of the controller's output: JSON objects separated by ``\\x17`` and/or concatenated
    (``}{``), in arbitrary packet boundaries.

    :meth:`feed` returns the complete items so far: dicts (or other JSON values), or :class:`Malformed` for
    text outside an object, an object cut short by ``\\x17``, or a brace-balanced object that is not valid
    JSON. An object still open at the end of the data is kept for the next feed.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""

    @property
    def pending(self) -> str:
        """The incomplete tail held back (for error messages)."""
        return self._buf

    def feed(self, data: bytes) -> list[Any]:
        items, self._buf = split_objects(self._buf + self._decoder.decode(data))
        out: list[Any] = []
        for is_object, text in items:
            try:
                out.append(json.loads(text) if is_object else Malformed(text))
            except ValueError:
                out.append(Malformed(text))
        return out


def parse_address(address: str, default_port: int = CONTROL_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``tcp://host:port`` -> (host, port). ValueError if invalid."""
    return net.parse_address(address, default_port)


# --------------------------------------------------------------------------------------------------------
# readings


@dataclass(frozen=True)
class Reading:
    """The controller's settings (from labelProps) and, when requested, a fresh bias-voltage measurement."""

    channels: int
    bias_ua: list[float]
    trigger_level_mv: list[float]
    enabled: bool
    period_ms: float
    bias_voltage_mv: list[float] | None
    props: dict[str, dict[str, Any]]


def _numbers(value: Any, n: int | None, what: str, command: str) -> list[float]:
    if (not isinstance(value, list) or (n is not None and len(value) != n)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        want = f"a list of {n} numbers" if n is not None else "a list of numbers"
        raise DeviceError(f"malformed reply: {what} should be {want}, got {_clip(repr(value))}", command)
    return [float(v) for v in value]


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _close_enough(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol + 0.005 * abs(y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------------
# the driver


class SingleQuantumEos(PhotonDetector):
    """Single Quantum Eos SNSPD controller (all channels of one controller as one device).

    Bias and trigger settings are per channel; ``set_bias`` sets every channel to the same current,
    ``set_bias_currents`` one value per channel (both under the daemon's ``bias_ua`` limit).
    """

    options = {
        "address": Field(str, doc="control port: host[:port] (port 12000 if omitted); sim://NAME in the simulated "
                                  "testbed"),
        "counts_port": Field(int, COUNTS_PORT, min=0, max=65535,
                             doc="counts stream port on the same host; 0: do not open it (count_rate_hz is null)"),
        "timeout_s": Field(float, 2.0, unit="s", min=0.05, max=60, doc="deadline of every exchange and of connecting"),
        "channels": Field(int, 0, min=0, max=64,
                          doc="expected number of channels; 0: whatever the controller reports (NumberOfDetectors)"),
        "nominal_bias_ua": Field(None, None, unit="uA",
                                 doc="operating bias (one number or one per channel) that set_enabled(true) restores "
                                     "on channels whose bias is 0, e.g. after safe_state; null: enabling leaves the "
                                     "bias as is"),
        "latch_recovery": Field(bool, True, doc="status() cycles the bias of latched channels automatically"),
        "latch_retry_limit": Field(int, 3, min=0, max=100, doc="bias cycles per latch episode before giving up"),
        "latch_settle_s": Field(float, 0.2, unit="s", min=0, max=10,
                                doc="wait after bias 0 and again after restoring it, in a latch recovery cycle"),
        "latch_threshold_mv": Field(float, 200.0, unit="mV", min=0,
                                    doc="a channel whose bias voltage exceeds this is latched (resistive)"),
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        errors: list[ParamError] = []
        address = opts.get("address")
        if isinstance(address, str) and not address.startswith("sim://"):
            try:
                parse_address(address)
            except ValueError as e:
                errors.append(ParamError("address", str(e), "host, host:port or [ipv6]:port"))
        nominal = opts.get("nominal_bias_ua")
        if nominal is not None:
            items = nominal if isinstance(nominal, list) else [nominal]
            ok = bool(items) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                     and v >= 0 for v in items)
            if not ok:
                errors.append(ParamError("nominal_bias_ua", f"invalid value {nominal!r}",
                                         "a number >= 0 or a list of numbers >= 0 (in uA)"))
            elif isinstance(nominal, list) and opts.get("channels") and len(nominal) != opts["channels"]:
                errors.append(ParamError("nominal_bias_ua",
                                         f"has {len(nominal)} values but channels = {opts['channels']}",
                                         "one value per channel"))
        return errors

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        opts = {k: (f.default if f.default is not REQUIRED else None) for k, f in self.options.items()}
        opts.update(options)
        super().__init__(name, opts, log)
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._framer = JsonFramer()
        self._queue: deque[Any] = deque()
        self._counts_sock: socket.socket | None = None
        self._counts_buf = b""
        self._counts_last: tuple[float, list[float]] | None = None  # latest line: (timestamp, counts)
        self._counts_at: float | None = None  # when it arrived (monotonic)
        self._n = 0
        self._identity: dict[str, Any] = {}
        self._bounds: dict[str, Any] = {}
        self._stale_errors: deque[str] = deque(maxlen=10)
        self._attempts: dict[int, int] = {}  # latch episode: channel -> bias cycles so far
        self._gave_up: set[int] = set()

    # -- connection -------------------------------------------------------------------------------------
    @property
    def timeout(self) -> float:
        return float(self.opts["timeout_s"])

    def connect(self) -> None:
        address = self.opts["address"]
        if not isinstance(address, str) or address.startswith("sim://"):
            raise ConnectionError(f"address {address!r} is not a host:port (a sim:// address must be resolved by "
                                  "the daemon's [simulation])")
        host, port = parse_address(address)
        with self._lock:
            self._sock = net.connect(host, port, self.timeout)
            reading = self._read("labelProps", voltage=False)
            n = reading.channels
            want = int(self.opts["channels"] or 0)
            if want and want != n:
                raise DeviceError(f"the controller reports {n} channels (NumberOfDetectors) but the config says "
                                  f"channels = {want}", "labelProps")
            self._n = n
            self._nominal()  # length check against the real channel count
            self._identity = {k: reading.props[k].get(P_VALUE) for k in IDENTITY_LABELS if k in reading.props}
            self._bounds = {k: reading.props[k].get(P_BOUNDS) for k in (L_BIAS, L_TRIG, L_PERIOD)}
            counts_port = int(self.opts["counts_port"])
            if counts_port:
                self._counts_sock = socket.create_connection((host, counts_port), timeout=self.timeout)
        self.log.info("connected", host=host, port=port, channels=n, counts_port=counts_port or None)

    def close(self) -> None:
        # no lock: closing from another thread must also unblock a call stuck in recv()
        for attr in ("_sock", "_counts_sock"):
            s = getattr(self, attr)
            setattr(self, attr, None)
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vendor": "Single Quantum", "model": "Eos", "channels": self._n,
                               "address": self.opts["address"]}
        if "DeviceInfo" in self._identity:
            out["info"] = self._identity["DeviceInfo"]
        if "SerialNumber" in self._identity:
            out["serial"] = self._identity["SerialNumber"]
        out["bounds"] = {"bias_ua": self._bounds.get(L_BIAS), "trigger_level_mv": self._bounds.get(L_TRIG),
                         "measurement_period_ms": self._bounds.get(L_PERIOD)}
        return out

    @property
    def channel_count(self) -> int:
        return self._n

    # -- low level --------------------------------------------------------------------------------------
    def _link(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionError(f"{self.name}: not connected")
        return self._sock

    def _recv_into_queue(self, sock: socket.socket, timeout: float | None) -> bool:
        """Read once (waiting up to ``timeout``; None: only what is already there) and frame what came.
        False if nothing came."""
        data = net.recv_some(sock, timeout)
        if data is None:
            return False
        if not data:
            raise ConnectionError(f"{self.name}: the controller closed the control connection")
        self._queue.extend(self._framer.feed(data))
        return True

    def _drain(self) -> None:
        """Consume what arrived between exchanges: stale error broadcasts are logged, the rest dropped."""
        sock = self._link()
        while self._recv_into_queue(sock, None):
            pass
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, dict) and _is_error(item):
                text = f"{item.get('label')}: {item.get('value')}"
                self._stale_errors.append(text)
                self.log.warning("controller error broadcast", error=text)

    def _send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + SEND_TERMINATOR).encode("utf-8")
        sock = self._link()
        sock.settimeout(self.timeout)
        sock.sendall(data)

    def _exchange(self, command: str, messages: list[dict[str, Any]], *, props: bool,
                  want: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Send ``messages`` (plus a labelProps request if ``props``) and collect the replies.

        Returns (labelProps entries by label, plain values by label for the labels in ``want``). An error
        broadcast or a malformed item while waiting raises DeviceError naming ``command`` (after a short
        grace for the rest of the reply, so the next exchange starts in step). No reply by the deadline:
        TimeoutError.
        """
        with self._lock:
            self._drain()
            for m in messages:
                self._send(m)
            if props:
                self._send({"request": "labelProps", "value": "None"})
            got_props: dict[str, dict[str, Any]] = {}
            got: dict[str, Any] = {}
            problem: str | None = None
            deadline = time.monotonic() + self.timeout

            def complete() -> bool:
                return (not props or all(k in got_props for k in REQUIRED_LABELS)) and all(k in got for k in want)

            while True:
                if complete() and not self._queue:
                    # also take what is already buffered (the rest of a labelProps burst, e.g. identity labels)
                    if time.monotonic() > deadline or not self._recv_into_queue(self._link(), None):
                        break
                    continue
                if not self._queue:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        if problem is not None:
                            break
                        missing = [k for k in REQUIRED_LABELS if props and k not in got_props] + \
                                  [k for k in want if k not in got]
                        raise TimeoutError(f"{self.name}: {command}: no complete reply within {self.timeout:g} s "
                                           f"(missing {', '.join(missing)})")
                    self._recv_into_queue(self._link(), left)
                    continue
                item = self._queue.popleft()
                if isinstance(item, Malformed):
                    problem = problem or f"malformed reply {_clip(item.text)!r}"
                elif not isinstance(item, dict):
                    problem = problem or f"malformed reply {_clip(json.dumps(item))} (not a JSON object)"
                elif _is_error(item):
                    problem = problem or f"controller error: {item.get('value')}"
                else:
                    label = item.get("label")
                    if not isinstance(label, str):
                        continue  # not a label message: nothing we asked for
                    value = item.get("value")
                    if isinstance(value, dict):
                        if P_VALUE not in value:
                            problem = problem or f"malformed reply: labelProps entry {label} has no {P_VALUE!r}"
                        else:
                            got_props[label] = value
                    elif label in want:
                        got[label] = value
                if problem is not None:
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
            if problem is not None:
                raise DeviceError(problem, command)
            return got_props, got

    def _read(self, command: str, *, voltage: bool, messages: list[dict[str, Any]] | None = None) -> Reading:
        """Settings via labelProps (after ``messages``, if any) and, with ``voltage``, a BiasVoltage request."""
        msgs = list(messages or [])
        if voltage:
            msgs.append({"request": L_VOLT})
        props, plain = self._exchange(command, msgs, props=True, want=(L_VOLT,) if voltage else ())
        ndet = props[L_NDET].get(P_VALUE)
        if isinstance(ndet, bool) or not isinstance(ndet, int) or ndet < 1:
            raise DeviceError(f"malformed reply: {L_NDET} should be a positive integer, got {ndet!r}", command)
        if self._n and ndet != self._n:
            raise DeviceError(f"the controller now reports {ndet} channels instead of {self._n}", command)
        enabled = props[L_ENABLE].get(P_VALUE)
        if not isinstance(enabled, bool):
            raise DeviceError(f"malformed reply: {L_ENABLE} should be true/false, got {enabled!r}", command)
        period = props[L_PERIOD].get(P_VALUE)
        if isinstance(period, bool) or not isinstance(period, (int, float)) or not period > 0:
            raise DeviceError(f"malformed reply: {L_PERIOD} should be a positive number of ms, got {period!r}", command)
        return Reading(
            channels=ndet,
            bias_ua=_numbers(props[L_BIAS].get(P_VALUE), ndet, L_BIAS, command),
            trigger_level_mv=_numbers(props[L_TRIG].get(P_VALUE), ndet, L_TRIG, command),
            enabled=enabled,
            period_ms=float(period),
            bias_voltage_mv=_numbers(plain[L_VOLT], ndet, L_VOLT, command) if voltage else None,
            props=props,
        )

    def _command(self, command: str, label: str, value: Any) -> Reading:
        """Send one command and read the settings back (the read-back is checked by the caller)."""
        return self._read(command, voltage=False, messages=[{"command": command, "label": label, "value": value}])

    def _set_bias_list(self, values: list[float]) -> Reading:
        values = [float(v) for v in values]
        r = self._command("SetAllBiasCurrents", L_BIAS, values)
        if not _close_enough(r.bias_ua, values, BIAS_TOLERANCE_UA):
            raise DeviceError(f"the controller reports bias {r.bias_ua} uA after setting {values} uA",
                              "SetAllBiasCurrents")
        return r

    def _per_channel(self, values: Any, what: str, command: str) -> list[float]:
        if not isinstance(values, list) or len(values) != self._n:
            raise DeviceError(f"expected {self._n} values (one per channel), got {_clip(repr(values))}", command)
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DeviceError(f"{what} must be finite numbers, got {v!r}", command)
            out.append(float(v))
        return out

    def _nominal(self) -> list[float] | None:
        nominal = self.opts.get("nominal_bias_ua")
        if nominal is None:
            return None
        if isinstance(nominal, list):
            if len(nominal) != self._n:
                raise DeviceError(f"nominal_bias_ua has {len(nominal)} values but the controller has {self._n} "
                                  "channels",
                                  "labelProps")
            return [float(v) for v in nominal]
        return [float(nominal)] * self._n

    def _new_episode(self) -> None:
        self._attempts.clear()
        self._gave_up.clear()

    # -- the PhotonDetector interface -------------------------------------------------------------------
    def set_bias(self, microamps: float) -> None:
        """Set the bias current of every channel (uA)."""
        with self._lock:
            if isinstance(microamps, bool) or not isinstance(microamps, (int, float)) or not math.isfinite(microamps):
                raise DeviceError(f"bias must be a finite number, got {microamps!r}", "SetAllBiasCurrents")
            self._new_episode()
            self._set_bias_list([float(microamps)] * self._n)

    @exposed
    def set_bias_currents(
        self, microamps: Annotated[list[float], Field(unit="uA", min=0, limit="bias_ua", doc="one value per channel")],
    ) -> None:
        """Set the bias current of each channel (uA, one value per channel, in channel order)."""
        with self._lock:
            values = self._per_channel(microamps, "bias currents", "SetAllBiasCurrents")
            self._new_episode()
            self._set_bias_list(values)

    def set_enabled(self, on: bool) -> None:
        """Enable or disable the detectors (DetectorEnable). With ``nominal_bias_ua`` configured, enabling first
        restores that bias on channels whose bias is 0 (after safe_state)."""
        with self._lock:
            if not isinstance(on, bool):
                raise DeviceError(f"expected true or false, got {on!r}", "DetectorEnable")
            self._new_episode()
            nominal = self._nominal()
            if on and nominal is not None:
                r = self._read("labelProps", voltage=False)
                target = [nom if b == 0.0 else b for b, nom in zip(r.bias_ua, nominal)]
                if target != r.bias_ua:
                    self.log.info("restoring nominal bias before enabling", bias_ua=target)
                    self._set_bias_list(target)
            r = self._command("DetectorEnable", L_ENABLE, bool(on))
            if r.enabled != bool(on):
                raise DeviceError(f"the controller reports DetectorEnable = {r.enabled} after setting {bool(on)}",
                                  "DetectorEnable")

    @exposed
    def set_trigger_levels(
        self, millivolts: Annotated[list[float], Field(unit="mV", doc="one value per channel")],
    ) -> None:
        """Set the trigger (discriminator) level of each channel (mV, one value per channel)."""
        with self._lock:
            values = self._per_channel(millivolts, "trigger levels", "SetAllTriggerLevels")
            r = self._command("SetAllTriggerLevels", L_TRIG, values)
            if not _close_enough(r.trigger_level_mv, values, TRIGGER_TOLERANCE_MV):
                raise DeviceError(f"the controller reports trigger levels {r.trigger_level_mv} mV after setting "
                                  f"{values} mV", "SetAllTriggerLevels")

    @exposed
    def set_measurement_period(
        self, milliseconds: Annotated[float, Field(unit="ms", min=1, doc="counter integration period")],
    ) -> None:
        """Set the integration period of the counts stream (ms)."""
        with self._lock:
            if (isinstance(milliseconds, bool) or not isinstance(milliseconds, (int, float))
                    or not math.isfinite(milliseconds)):
                raise DeviceError(f"expected a number of ms, got {milliseconds!r}", "SetMeasurementPeriod")
            r = self._command("SetMeasurementPeriod", L_PERIOD, float(milliseconds))
            if abs(r.period_ms - milliseconds) > PERIOD_TOLERANCE_MS:
                raise DeviceError(f"the controller reports {r.period_ms} ms after setting {milliseconds} ms",
                                  "SetMeasurementPeriod")

    def status(self) -> dict:
        """enabled, bias_ua, trigger_level_mv, bias_voltage_mv, latched (per channel, from the bias voltage),
        count_rate_hz (per channel, from the counts stream; null without it), measurement_period_ms, and the
        latch-recovery bookkeeping. With latch_recovery on, a latched channel gets one bias cycle per call, at
        most latch_retry_limit per episode; the call that exhausts them raises a device error saying the
        channel stays latched (later calls report it under latch_recovery.gave_up)."""
        with self._lock:
            r = self._read("BiasVoltage", voltage=True)
            latched = self._latched(r)
            actions: list[dict[str, Any]] = []
            if self.opts["latch_recovery"]:
                r, latched = self._auto_recover(r, latched, actions)
            counts = self._counts(r.period_ms)
            out: dict[str, Any] = {
                "channels": r.channels,
                "enabled": r.enabled,
                "bias_ua": r.bias_ua,
                "trigger_level_mv": r.trigger_level_mv,
                "bias_voltage_mv": r.bias_voltage_mv,
                "latched": latched,
                "measurement_period_ms": r.period_ms,
                "count_rate_hz": None,
                "counts": None,
                "counts_timestamp": None,
                "latch_recovery": {
                    "enabled": bool(self.opts["latch_recovery"]),
                    "attempts": [self._attempts.get(i, 0) for i in range(r.channels)],
                    "gave_up": sorted(self._gave_up),
                    "actions": actions,
                },
                "controller_errors": list(self._stale_errors),
            }
            if counts is not None:
                ts, values = counts
                out["counts_timestamp"] = ts
                out["counts"] = values
                out["count_rate_hz"] = [v * 1000.0 / r.period_ms for v in values]
            return out

    @exposed
    def recover_latched(self) -> dict:
        """Cycle the bias of every latched channel (bias 0, wait latch_settle_s, restore the setpoint, wait,
        check), up to latch_retry_limit cycles. Returns latched (channels found latched), attempts, recovered,
        restored_bias_ua. Raises a device error if a channel is still latched after the last cycle."""
        with self._lock:
            self._new_episode()
            r = self._read("BiasVoltage", voltage=True)
            latched_now = [i for i, x in enumerate(self._latched(r)) if x]
            report: dict[str, Any] = {"latched": latched_now, "attempts": 0, "recovered": [],
                                      "still_latched": [], "restored_bias_ua": r.bias_ua}
            if not latched_now:
                return report
            limit = int(self.opts["latch_retry_limit"])
            still = list(latched_now)
            setpoints = r.bias_ua
            for attempt in range(1, limit + 1):
                r = self._cycle(still, setpoints)
                report["attempts"] = attempt
                flags = self._latched(r)
                still = [i for i in still if flags[i]]
                if not still:
                    break
            report["recovered"] = [i for i in latched_now if i not in still]
            report["still_latched"] = still
            self.log.info("latch recovery", **{k: v for k, v in report.items() if k != "restored_bias_ua"})
            if still:
                for i in still:
                    self._attempts[i] = limit
                    self._gave_up.add(i)
                raise DeviceError(self._stays_latched_text(still, setpoints, limit), "recover_latched")
            return report

    def safe_state(self) -> None:
        """DetectorEnable false, then every bias to 0 (both attempted; the first failure is raised)."""
        with self._lock:
            self._new_episode()
            first: BaseException | None = None
            try:
                r = self._command("DetectorEnable", L_ENABLE, False)
                if r.enabled:
                    raise DeviceError("the controller still reports DetectorEnable = true", "DetectorEnable")
            except DeviceError as e:
                first = e
            try:
                self._set_bias_list([0.0] * self._n)
            except DeviceError as e:
                first = first or e
            if first is not None:
                raise first

    # -- latching ---------------------------------------------------------------------------------------
    def _latched(self, r: Reading) -> list[bool]:
        thr = float(self.opts["latch_threshold_mv"])
        volts = r.bias_voltage_mv or [0.0] * r.channels
        return [bool(r.enabled and v > thr) for v in volts]

    def _cycle(self, channels: list[int], setpoints: list[float]) -> Reading:
        """One recovery cycle: bias of ``channels`` to 0, settle, every channel back to ``setpoints``, settle,
        read the bias voltages."""
        settle = float(self.opts["latch_settle_s"])
        zeroed = [0.0 if i in channels else b for i, b in enumerate(setpoints)]
        self.log.warning("latched channels: cycling bias", channels=channels, settle_s=settle)
        self._set_bias_list(zeroed)
        time.sleep(settle)
        self._set_bias_list(setpoints)
        time.sleep(settle)
        return self._read("BiasVoltage", voltage=True)

    def _auto_recover(self, r: Reading, latched: list[bool],
                      actions: list[dict[str, Any]]) -> tuple[Reading, list[bool]]:
        for i in list(self._attempts):
            if not latched[i]:  # the episode of this channel is over
                self._attempts.pop(i, None)
                self._gave_up.discard(i)
        for i in list(self._gave_up):
            if not latched[i]:
                self._gave_up.discard(i)
        limit = int(self.opts["latch_retry_limit"])
        todo = [i for i, x in enumerate(latched) if x and i not in self._gave_up]
        if not todo:
            return r, latched
        if limit == 0:
            self._gave_up.update(todo)
            raise DeviceError(self._stays_latched_text(todo, r.bias_ua, 0), "status")
        setpoints = r.bias_ua
        for i in todo:
            self._attempts[i] = self._attempts.get(i, 0) + 1
        r = self._cycle(todo, setpoints)
        latched = self._latched(r)
        cleared = [i for i in todo if not latched[i]]
        still = [i for i in todo if latched[i]]
        actions.append({"channels": todo, "attempts": [self._attempts[i] for i in todo], "cleared": cleared,
                        "restored_bias_ua": setpoints})
        for i in cleared:
            self._attempts.pop(i, None)
        exhausted = [i for i in still if self._attempts[i] >= limit]
        if exhausted:
            self._gave_up.update(exhausted)
            raise DeviceError(self._stays_latched_text(exhausted, setpoints, limit), "status")
        return r, latched

    def _stays_latched_text(self, channels: list[int], setpoints: list[float], attempts: int) -> str:
        biases = ", ".join(f"{setpoints[i]:g}" for i in channels)
        if attempts == 0:
            return (f"channel(s) {channels} latched (bias {biases} uA); automatic recovery is off "
                    "(latch_retry_limit = 0): lower the bias or call recover_latched")
        return (f"channel(s) {channels} still latched after {attempts} recovery attempt(s) (bias cycled to 0 and "
                f"restored to {biases} uA); the bias is probably above the latching current: lower it")

    # -- counts stream ----------------------------------------------------------------------------------
    def _counts(self, period_ms: float) -> tuple[float, list[float]] | None:
        """The latest counts line (timestamp, counts per channel), or None without a counts stream.

        Drains what arrived; if nothing new arrived and the last line is older than two periods, waits up to
        timeout_s for the next one (TimeoutError if none: the stream is dead)."""
        sock = self._counts_sock
        if sock is None:
            return None
        while self._counts_read(sock, None):
            pass
        now = time.monotonic()
        fresh_for = 2.0 * period_ms / 1000.0 + 0.05
        if self._counts_last is None or self._counts_at is None or now - self._counts_at > fresh_for:
            deadline = now + self.timeout
            before = self._counts_at
            while self._counts_at is None or self._counts_at == before:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no counts line within {self.timeout:g} s on the counts port")
                self._counts_read(sock, left)
        assert self._counts_last is not None
        return self._counts_last[0], self._counts_last[1]

    def _counts_read(self, sock: socket.socket, timeout: float | None) -> bool:
        """Read once (waiting up to ``timeout``; None: only what is there); keep the last complete line.
        False if nothing came."""
        data = net.recv_some(sock, timeout)
        if data is None:
            return False
        if not data:
            raise ConnectionError(f"{self.name}: the controller closed the counts connection")
        self._counts_buf += data
        *lines, self._counts_buf = self._counts_buf.split(b"\n")
        if len(self._counts_buf) > MAX_PENDING:
            self._counts_buf = b""
            raise DeviceError("malformed counts stream: no line end", "counts")
        complete = [ln.strip() for ln in lines if ln.strip()]
        if complete:
            self._counts_last = self._parse_counts(complete[-1])
            self._counts_at = time.monotonic()
        return True

    def _parse_counts(self, line: bytes) -> tuple[float, list[float]]:
        try:
            fields = [float(x) for x in line.decode("ascii").split(",")]
        except (UnicodeDecodeError, ValueError):
            raise DeviceError(f"malformed counts line {_clip(repr(line))}", "counts") from None
        if len(fields) != self._n + 1 or not all(math.isfinite(x) for x in fields):
            raise DeviceError(f"counts line has {len(fields) - 1} channels, expected {self._n}: {_clip(repr(line))}",
                              "counts")
        return fields[0], fields[1:]


def _is_error(item: dict[str, Any]) -> bool:
    label = item.get("label")
    return isinstance(label, str) and "Error" in label


__all__ = ["JsonFramer", "Malformed", "SingleQuantumEos", "parse_address"]
