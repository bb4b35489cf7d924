"""Protocol-level simulator of a Single Quantum Eos SNSPD controller: JSON over TCP (protocols.md section 3).

It serves the controller's two TCP ports, so :class:`drivers.singlequantum_eos.SingleQuantumEos` talks to it
exactly as it talks to the real controller:

* **control** (12000 on the real unit; here ``control_port``, 0 = a free port): JSON objects. The client sends
  bare JSON objects (optionally followed by ``\\x17``, ETB); the simulator copes with several objects in one
  packet, with ``}{``-concatenated objects and with objects split across packets. Everything the simulator
  sends is ``\\x17``-terminated; a multi-message reply (``labelProps``) goes out as one ``}{``-concatenated
  block closed by one ``\\x17``, so a client has to handle both framings the vendor's own driver handles.
* **counts** (12345 on the real unit; here ``counts_port``): one line ``timestamp_ms,c1,c2,...,cN\\n`` every
  measurement period, for every connected client.

Channel ``i`` of the controller is bench detector ``detectors[i]`` (:class:`BenchState`). Every accepted
command is applied to the bench with :meth:`BenchState.update_detector`, which also applies SNSPD latching
(enabled with a bias above ``critical_bias_ua`` latches; bias 0 or disabling releases).

Messages (shapes not stated in protocols.md are *assumed*; docs/hardware/singlequantum-eos.md lists which):

* ``{"request":"labelProps","value":"None"}`` -> one message per label, ``{"label": L, "value": {"value": v,
  "bounds": [lo, hi] | null, "units": "uA" | ...}}`` (the per-label shape the vendor's driver parses; the
  inner keys ``value/bounds/units`` are assumed). Labels: ``NumberOfDetectors``, ``BiasCurrent`` (uA, list),
  ``TriggerLevel`` (mV, list), ``DetectorEnable`` (bool), ``InptMeasurementPeriod`` (ms), ``BiasVoltage``
  (mV, list), ``DeviceInfo`` and ``SerialNumber`` (strings; assumed names).
* ``{"request": L}`` for any of these labels -> ``{"label": L, "value": v}`` (documented for ``BiasVoltage``;
  assumed for the others).
* ``{"command":"SetAllBiasCurrents","label":"BiasCurrent","value":[uA...]}``,
  ``{"command":"SetAllTriggerLevels","label":"TriggerLevel","value":[mV...]}``,
  ``{"command":"DetectorEnable","label":"DetectorEnable","value":bool}``,
  ``{"command":"SetMeasurementPeriod","label":"InptMeasurementPeriod","value":ms}``: on success the new value
  is broadcast to every control client as ``{"label": L, "value": v}`` (assumed); a value of the wrong type
  or length, or outside the controller's bounds, changes nothing and broadcasts an error.
* Errors (malformed JSON, unknown request or command, bad value): ``{"label": "Error", "value": "<text>"}``
  broadcast to every control client (protocols.md: a broadcast whose label contains ``Error``). The
  connection stays usable.

Measured quantities:

* ``BiasVoltage`` per channel: 0 mV while disabled or unbiased; ``bias_ua * series_resistance_ohm / 1000``
  (about a mV) while superconducting; ``latched_voltage_mv`` (about 1 V: the bias source at its compliance
  across the resistive nanowire) while latched. This is how latching shows to a driver.
* Counts per channel and period: ``rates_hz[detector] * period`` (the physics engine writes ``rates_hz``),
  forced to 0 when the detector is not counting (disabled or latched), Poisson-drawn (``counts_noise =
  "poisson"``, seeded) or rounded (``"round"``, deterministic, for tests). The timestamp is milliseconds since
  the simulator was built (assumed unit).

Address: :attr:`SimEos.address` is ``"127.0.0.1:<control_port>"`` (what the driver's ``address`` option
takes, and what ``sim://NAME`` resolves to); :attr:`counts_port` / :attr:`counts_address` give the counts
port, which the driver takes as its ``counts_port`` option (:attr:`driver_options` has both). Both ports are
chosen at the first :meth:`start` and kept across :meth:`stop` / :meth:`start` (unplug / replug).

Test controls (any thread): :attr:`received` (decoded client messages), :meth:`broadcast` (any message to
every control client), :meth:`inject` (raw bytes to every control client), :meth:`fragment_writes` (split
output into small delayed writes), :attr:`stall` (ignore every client message: the controller hangs),
:attr:`measurement_period_ms`, :attr:`control_clients`, :attr:`counts_clients`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from typing import Any, ClassVar

import numpy as np

from drivers.jsonstream import ETB, split_objects
from drivers.params import Field
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.tcp import Client, TcpServer

# Label names (the first five are named in protocols.md / the vendor's driver; the identity labels are assumed).
L_NDET = "NumberOfDetectors"
L_BIAS = "BiasCurrent"
L_TRIG = "TriggerLevel"
L_ENABLE = "DetectorEnable"
L_PERIOD = "InptMeasurementPeriod"
L_VOLT = "BiasVoltage"
L_INFO = "DeviceInfo"
L_SERIAL = "SerialNumber"
L_ERROR = "Error"
# Keys inside a labelProps entry (assumed).
P_VALUE, P_BOUNDS, P_UNITS = "value", "bounds", "units"

PERIOD_BOUNDS_MS = (10.0, 10000.0)  # assumed controller range of the measurement period


def split_messages(buf: str) -> tuple[list[tuple[bool, str]], str]:
    """Cut a client byte stream (decoded) into messages.

    Returns ``(items, rest)``: each item is ``(True, json_text)`` for a brace-balanced object or ``(False,
    text)`` for garbage (text outside any object, or an object cut short by ``\\x17``); ``rest`` is an
    incomplete object to keep until more data arrives. ``\\x17`` and whitespace between objects are skipped.
    """
    return split_objects(buf, garbage_ends="{" + ETB + "\n")


class SimEos:
    """Simulated Single Quantum Eos controller (see the module docstring)."""

    model: ClassVar[str] = "singlequantum_eos"
    options: ClassVar[dict[str, Field]] = {
        "detectors": Field(list[int], list(range(8)), doc="bench detector index of each controller channel, in order"),
        "host": Field(str, "127.0.0.1", doc="interface both ports listen on"),
        "control_port": Field(int, 0, min=0, max=65535, doc="JSON control port (real unit: 12000); 0 = a free port"),
        "counts_port": Field(int, 0, min=0, max=65535, doc="counts stream port (real unit: 12345); 0 = a free port"),
        "measurement_period_ms": Field(float, 100.0, unit="ms", min=PERIOD_BOUNDS_MS[0], max=PERIOD_BOUNDS_MS[1],
                                       doc="initial counter integration period"),
        "max_bias_ua": Field(float, 50.0, unit="uA", min=0, doc="controller bias range is [0, max]"),
        "max_trigger_level_mv": Field(float, 1000.0, unit="mV", min=0, doc="trigger level range is [0, max]"),
        "series_resistance_ohm": Field(float, 100.0, unit="ohm", min=0,
                                       doc="bias-line resistance: bias voltage of a superconducting channel"),
        "latched_voltage_mv": Field(float, 1000.0, unit="mV", min=0, doc="bias voltage of a latched channel"),
        "counts_noise": Field(str, "poisson", choices=("poisson", "round"),
                              doc="counts per period: Poisson-drawn or rounded"),
        "seed": Field(int, 0, doc="seed of the Poisson counts"),
        "identity": Field(str, "Single Quantum Eos (simulated)", doc="reported as the DeviceInfo label"),
        "serial": Field(str, "SIM-EOS-0001", doc="reported as the SerialNumber label"),
    }

    def __init__(self, name: str, state: BenchState, options: dict[str, Any] | None = None) -> None:
        opts = {k: f.default for k, f in self.options.items()}
        for key, value in (options or {}).items():
            if key not in self.options:
                raise ValueError(f"SimEos {name}: unknown option {key!r}; allowed: {', '.join(sorted(self.options))}")
            opts[key] = value
        self.name = name
        self.state = state
        self.opts = opts
        self.detectors = [int(d) for d in opts["detectors"]]
        if not self.detectors:
            raise ValueError(f"SimEos {name}: detectors must list at least one bench detector")
        bad = [d for d in self.detectors if not 0 <= d < state.detector_count]
        if bad:
            raise ValueError(f"SimEos {name}: detectors {bad} are not on the bench (0..{state.detector_count - 1})")
        if len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"SimEos {name}: detectors lists a bench detector twice")
        self._period_ms = float(opts["measurement_period_ms"])
        self._rng = np.random.default_rng(int(opts["seed"]))
        self._lock = threading.Lock()  # period, rng, client sets, test controls
        self._clients: set[Client] = set()
        self._counts_conns = 0
        self._t0 = time.monotonic()
        self._fragment: tuple[int, float] | None = None
        self.stall = False
        self.received: deque[Any] = deque(maxlen=1000)
        self._control = TcpServer(self._serve_control, opts["host"], int(opts["control_port"]), f"{name}-control")
        self._counts = TcpServer(self._serve_counts, opts["host"], int(opts["counts_port"]), f"{name}-counts")

    # -- SimInstrument ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen on both ports (the same ports after a stop())."""
        self._control.start()
        try:
            self._counts.start()
        except OSError:
            self._control.stop()
            raise

    def stop(self) -> None:
        """Unplug: close both listeners and every connection. Settings and bench state are kept."""
        self._control.stop()
        self._counts.stop()

    @property
    def running(self) -> bool:
        return self._control.running

    @property
    def address(self) -> str:
        """``host:control_port`` for the driver's ``address`` option (valid once started)."""
        return f"{self._control.host}:{self._port(self._control)}"

    @property
    def counts_port(self) -> int:
        return self._port(self._counts)

    @property
    def counts_address(self) -> str:
        return f"{self._counts.host}:{self._port(self._counts)}"

    @property
    def driver_options(self) -> dict[str, Any]:
        """The driver options that point SingleQuantumEos at this simulator."""
        return {"address": self.address, "counts_port": self.counts_port}

    def _port(self, server: TcpServer) -> int:
        if server.port == 0:
            raise RuntimeError(f"SimEos {self.name}: the port is chosen at start(); start the simulator first")
        return server.port

    # -- test controls ----------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return len(self.detectors)

    @property
    def measurement_period_ms(self) -> float:
        with self._lock:
            return self._period_ms

    @property
    def control_clients(self) -> int:
        with self._lock:
            return len(self._clients)

    @property
    def counts_clients(self) -> int:
        with self._lock:
            return self._counts_conns

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send a message (e.g. an error broadcast) to every control client."""
        self._send_all([message])

    def inject(self, data: bytes) -> None:
        """Send raw bytes to every control client (garbage, partial messages...)."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            self._write(c, data)

    def fragment_writes(self, size: int | None, gap_s: float = 0.002) -> None:
        """Send all control output in pieces of ``size`` bytes, ``gap_s`` apart (None: whole writes)."""
        with self._lock:
            self._fragment = None if size is None else (max(1, int(size)), float(gap_s))

    # -- control port -----------------------------------------------------------------------------------
    def _serve_control(self, conn: socket.socket) -> None:
        client = Client(conn)
        with self._lock:
            self._clients.add(client)
        try:
            buf = ""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data.decode("utf-8", errors="replace")
                items, buf = split_messages(buf)
                for ok, text in items:
                    if self.stall:
                        continue
                    self._handle(client, ok, text)
        finally:
            with self._lock:
                self._clients.discard(client)

    def _handle(self, client: Client, ok: bool, text: str) -> None:
        msg: Any = None
        if ok:
            try:
                msg = json.loads(text)
            except ValueError:
                ok = False
        if not ok or not isinstance(msg, dict):
            self.received.append(text)
            self._error(f"could not parse message: {_clip(text)}")
            return
        self.received.append(msg)
        if "request" in msg:
            self._request(client, msg)
        elif "command" in msg:
            self._command(msg)
        else:
            self._error(f"message has neither 'request' nor 'command': {_clip(text)}")

    def _request(self, client: Client, msg: dict[str, Any]) -> None:
        what = msg["request"]
        props = self._label_props()
        if what == "labelProps":
            self._send(client, [{"label": k, "value": v} for k, v in props.items()], concatenate=True)
        elif isinstance(what, str) and what in props:
            self._send(client, [{"label": what, "value": props[what][P_VALUE]}])
        else:
            self._error(f"unknown request {_clip(json.dumps(what))}")

    def _command(self, msg: dict[str, Any]) -> None:
        cmd = msg["command"]
        value = msg.get("value")
        if cmd == "SetAllBiasCurrents":
            values = self._number_list(cmd, value, 0.0, float(self.opts["max_bias_ua"]), "uA")
            if values is None:
                return
            with self.state.lock:
                for det, v in zip(self.detectors, values):
                    self.state.update_detector(det, bias_ua=v)
            self._send_all([{"label": L_BIAS, "value": values}])
        elif cmd == "SetAllTriggerLevels":
            values = self._number_list(cmd, value, 0.0, float(self.opts["max_trigger_level_mv"]), "mV")
            if values is None:
                return
            with self.state.lock:
                for det, v in zip(self.detectors, values):
                    self.state.update_detector(det, trigger_level_mv=v)
            self._send_all([{"label": L_TRIG, "value": values}])
        elif cmd == "DetectorEnable":
            if not isinstance(value, bool):
                self._error(f"{cmd}: value must be true or false, got {_clip(json.dumps(value))}")
                return
            with self.state.lock:
                for det in self.detectors:
                    self.state.update_detector(det, enabled=value)
            self._send_all([{"label": L_ENABLE, "value": value}])
        elif cmd == "SetMeasurementPeriod":
            lo, hi = PERIOD_BOUNDS_MS
            if not _is_number(value) or not lo <= value <= hi:
                self._error(f"{cmd}: value must be a number of ms in [{lo:g}, {hi:g}], got {_clip(json.dumps(value))}")
                return
            with self._lock:
                self._period_ms = float(value)
            self._send_all([{"label": L_PERIOD, "value": float(value)}])
        else:
            self._error(f"unknown command {_clip(json.dumps(cmd))}")

    def _number_list(self, cmd: str, value: Any, lo: float, hi: float, unit: str) -> list[float] | None:
        n = len(self.detectors)
        if not isinstance(value, list) or len(value) != n or not all(_is_number(v) for v in value):
            self._error(f"{cmd}: value must be a list of {n} numbers, got {_clip(json.dumps(value))}")
            return None
        out = [float(v) for v in value]
        bad = [i for i, v in enumerate(out) if not lo <= v <= hi]
        if bad:
            self._error(f"{cmd}: channel(s) {[i + 1 for i in bad]} out of range [{lo:g}, {hi:g}] {unit}; "
                        "nothing changed")
            return None
        return out

    def _error(self, text: str) -> None:
        self._send_all([{"label": L_ERROR, "value": text}])

    def _label_props(self) -> dict[str, dict[str, Any]]:
        dets = [self.state.detector(d) for d in self.detectors]
        r = float(self.opts["series_resistance_ohm"])
        volts = []
        for d in dets:
            if not d.enabled or d.bias_ua <= 0.0:
                volts.append(0.0)
            elif d.latched:
                volts.append(float(self.opts["latched_voltage_mv"]))
            else:
                volts.append(round(d.bias_ua * r / 1000.0, 4))
        n = len(dets)

        def prop(value: Any, bounds: Any, units: str) -> dict[str, Any]:
            return {P_VALUE: value, P_BOUNDS: bounds, P_UNITS: units}

        return {
            L_NDET: prop(n, [n, n], ""),
            L_BIAS: prop([d.bias_ua for d in dets], [0.0, float(self.opts["max_bias_ua"])], "uA"),
            L_TRIG: prop([d.trigger_level_mv for d in dets], [0.0, float(self.opts["max_trigger_level_mv"])], "mV"),
            L_ENABLE: prop(all(d.enabled for d in dets), None, ""),
            L_PERIOD: prop(self.measurement_period_ms, list(PERIOD_BOUNDS_MS), "ms"),
            L_VOLT: prop(volts, None, "mV"),
            L_INFO: prop(str(self.opts["identity"]), None, ""),
            L_SERIAL: prop(str(self.opts["serial"]), None, ""),
        }

    # -- output -----------------------------------------------------------------------------------------
    def _encode(self, messages: list[dict[str, Any]], concatenate: bool) -> bytes:
        parts = [json.dumps(m) for m in messages]
        text = "".join(parts) + ETB if concatenate else "".join(p + ETB for p in parts)
        return text.encode("utf-8")

    def _send(self, client: Client, messages: list[dict[str, Any]], concatenate: bool = False) -> None:
        self._write(client, self._encode(messages, concatenate))

    def _send_all(self, messages: list[dict[str, Any]]) -> None:
        data = self._encode(messages, False)
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            self._write(c, data)

    def _write(self, client: Client, data: bytes) -> None:
        with self._lock:
            fragment = self._fragment
        client.send(data, fragment)

    # -- counts port ------------------------------------------------------------------------------------
    def _serve_counts(self, conn: socket.socket) -> None:
        with self._lock:
            self._counts_conns += 1
        try:
            next_t = time.monotonic()
            while True:
                period_s = self.measurement_period_ms / 1000.0
                next_t += period_s
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_t = time.monotonic()  # fell behind (suspended): do not burst
                conn.sendall(self.counts_line(period_s).encode("ascii"))
        finally:
            with self._lock:
                self._counts_conns -= 1

    def counts_line(self, period_s: float) -> str:
        """One counts line for a period of ``period_s`` ending now (also handy in tests)."""
        means = []
        for det in self.detectors:
            d = self.state.detector(det)
            rate = float(self.state.rates_hz[det]) if d.counting else 0.0
            means.append(max(0.0, rate) * period_s)
        if self.opts["counts_noise"] == "poisson":
            with self._lock:
                counts = [int(c) for c in self._rng.poisson(means)]
        else:
            counts = [int(round(m)) for m in means]
        t_ms = int(round((time.monotonic() - self._t0) * 1000.0))
        return ",".join([str(t_ms), *map(str, counts)]) + "\n"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


__all__ = ["SimEos", "split_messages"]
