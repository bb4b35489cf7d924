"""ID Quantique ID900 / ID1000 Time Controller: SCPI over ZeroMQ for settings, timestamps from the DataLinkTarget.

This is the lab driver (entry point ``idq.id900``). CI runs it unchanged against the protocol-level simulator
:class:`drivers.sim.instruments.id900.SimID900`. docs/hardware/idq-id900.md describes the options, a lab and a
simulated config, and which wire details are published and which are assumed.

Two services, three kinds of socket
-----------------------------------
* **SCPI** (Time Controller, ``tcp://HOST:5555``; the port is known only from third-party code): one text
  command per ZeroMQ REQ/REP exchange. Case-insensitive, short forms, ``;`` chaining, values with unit suffixes
  (``INPU1:THRE 0.1V``), time base TB = 1 ps (User Manual section 9).
* **DataLinkTarget (DLT)** control (a service on the host PC, ``tcp://127.0.0.1:6060``): a command line per
  REQ/REP exchange (``start-stream --address IP --channel N --stream-port P --with-ref-index``, ``stop --id ID``,
  ``list``, ``status --id ID``), answered with JSON; a failure is ``{"error": {"description": ...}}`` (manual
  section 10).
* **Timestamp streams**: for each streamed input the DLT binds ``--stream-port`` as a ZeroMQ exclusive PAIR and
  sends the input's timestamps; the driver connects a PAIR socket to it.

Why REQ sockets are recreated after a timeout
---------------------------------------------
A REQ socket enforces send/receive alternation. After a request whose reply never came, it is stuck in the
"waiting for a reply" state: the next send raises EFSM, and if the old reply turned up later it would be taken
as the answer to the next request. So on a timeout the socket is closed with linger 0 and a fresh one is made
on the next exchange (ZeroMQ's "lazy pirate" pattern, :class:`ReqChannel`). The timeout itself is raised as
``TimeoutError``: the link is in doubt, the daemon faults the device and reconnects a new driver instance.

How timestamps become one monotonic int64 ps timeline
-----------------------------------------------------
The Time Controller timestamps are *reference-relative*: each is a uint64 count of ps since the last event on
the RAW block's reference, optionally followed by a uint64 reference index (``--with-ref-index``; the file layout
``(timestamp, refIndex)`` is published in IDQ's example ``read_binary_timestamps``). The driver uses the
vendor's "synchronized acquisition" scheme (IDQ example ``merge-stream``): ``RAW#:REF:LINK NONE`` and a RECord
generator running back-to-back sub-acquisitions (``REC:NUM INF``, ``REC:PWID`` = sub-acquisition length,
``REC:PPER`` = PWID + a dead time of at least 40 ns). Timestamps restart at 0 with every sub-acquisition, and
the TC sends each input's data at the end of each sub-acquisition. Then, for a record of sub-acquisition k::

    t_ps = session_base + k * PPER + timestamp

where k is the reference index unwrapped to 64 bits (``ref_index_bits`` narrower counters wrap; the driver
carries one unwrap state per input, vectorised with a cumulative sum: no per-tag Python loop). It is
**assumed** that with ``REF:LINK NONE`` the reference index counts sub-acquisitions from 0 at ``REC:PLAY``.
``session_base`` is the driver's previous ``t_end``, so time stays monotonic across stream restarts.

Watermark: each input's stream is in order, so once a record of sub-acquisition k arrived on an input, that
input has delivered everything before k (exact, whatever the delays or bursts). For a quiet input the DLT
``status`` (polled while a quiet input holds the others back) stands in: ``acquisitions_count`` n registered
sub-acquisition ends, with ``timestamps_count`` no larger than the records received on that input, mean every
sub-acquisition below n is through. The batch ends at the sub-acquisition every input has passed. A batch covers whole
sub-acquisitions ``[session_base + k0*PPER, session_base + k1*PPER)``; a record arriving for an interval already
promised is dropped and counted (``MISSED_EVENTS``). Tags in the dead time between sub-acquisitions are not
recorded by the hardware.

Data loss: before each batch is emitted the driver reads ``RAW#:ERRors?`` of every streamed input, then the DLT
``status`` ``errors`` lists (also polled while inputs are quiet). New errors may belong to any sub-acquisition up
to the one the TC was in when they were read (bounded by the DLT's ``acquisitions_count`` read just after), so
the batch being emitted and every later batch overlapping that range are flagged ``OVERFLOW``: loss is never
attributed to a batch already emitted, and never left unflagged (a loss may flag one batch too many).

Errors: an SCPI error reply, a DLT ``error`` answer, or a reply that does not parse becomes
:class:`~drivers.base.DeviceError` naming the command. A timeout or a closed link is ``TimeoutError`` /
``ConnectionError`` (fault, reconnect).

Every wire detail the sources leave open is in the block "Wire details" below, marked *assumed*, so it can be
adjusted in one place.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import threading
import time
from collections import deque
from typing import Annotated, Any

import numpy as np
import zmq

from drivers.base import DeviceError, TagBatch, TagFlags, TimeTagger, exposed
from drivers.params import REQUIRED, Field, ParamError

__all__ = ["IDQTimeController", "ReqChannel", "STREAM_RECORD", "is_scpi_error", "parse_endpoint", "parse_quantity"]

PS_PER_S = 1_000_000_000_000

# --------------------------------------------------------------------------------------------------------
# Wire details (published unless marked assumed)

SCPI_PORT = 5555  # third-party code only (protocols.md 4.4)
DLT_PORT = 6060  # manual section 10
STREAM_PORT_BASE = 4241  # IDQ's examples stream input n on 4241 + n
# One record of a --with-ref-index stream: little-endian uint64 timestamp (ps since the reference) and uint64
# reference index. Published for binary files; *assumed* identical on the stream.
STREAM_RECORD = np.dtype([("timestamp", "<u8"), ("ref_index", "<u8")])
END_OF_STREAM = b""  # an empty message ends a stream (IDQ's StreamClient stops on it)
MIN_GAP_PS = 40_000  # sub-acquisitions must be separated by at least 40 ns (IDQ example)
# *Assumed*: a failed SCPI command is answered with text starting with "Error" (any case), or with a SCPI-style
# error entry ``-113,"Undefined header"``. Every other reply is the value (queries) or ignored (settings, which
# the driver verifies by reading them back).
_SCPI_ERROR_RE = re.compile(r"^\s*(error\b|[+-]\d+\s*,\s*\")", re.IGNORECASE)
# *Assumed* block wiring sent at connect when ``configure_links`` is on (names from IDQ's examples/manual).
LINK_COMMANDS = ("DELA{n}:LINK INPU{n}", "RAW{n}:STOP:LINK DELA{n}")
REF_LINK = "RAW{n}:REF:LINK NONE"  # required by the timeline reconstruction above


def is_scpi_error(reply: str) -> bool:
    """Does a Time Controller reply report an error? (the assumed format, in one place)"""
    return bool(_SCPI_ERROR_RE.match(reply))


_QUANTITY_RE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")
_TIME_UNITS = {"": 1, "TB": 1, "PS": 1, "KTB": 10**3, "NS": 10**3, "MTB": 10**6, "US": 10**6, "GTB": 10**9,
               "MS": 10**9, "S": 10**12}
_VOLT_UNITS = {"": 1.0, "V": 1.0, "MV": 1e-3, "UV": 1e-6}


def parse_quantity(reply: str, units: dict[str, float | int]) -> float:
    """``"1000TB"``, ``"0.1V"``, ``"12"`` -> the number in base units. ValueError if it does not parse.

    Replies with a unit are accepted for every quantity because IDQ's own helpers strip a ``TB`` suffix
    (``trim_unit``) while other replies are bare integers.
    """
    m = _QUANTITY_RE.match(reply)
    if not m:
        raise ValueError(f"not a number: {reply[:60]!r}")
    unit = m.group(2).upper()
    if unit not in units:
        raise ValueError(f"unexpected unit {m.group(2)!r} in {reply[:60]!r}")
    return float(m.group(1)) * units[unit]


def parse_endpoint(address: str, default_port: int) -> tuple[str, int]:
    """``tcp://HOST:PORT``, ``HOST:PORT`` or ``HOST`` -> (host, port); ValueError if malformed."""
    text = address.strip()
    if text.startswith("tcp://"):
        text = text[6:]
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
        if not sep or port_text is None:
            raise ValueError(f"bad address {address!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host or any(c in host for c in "/ "):
        raise ValueError(f"bad address {address!r}: expected tcp://HOST:PORT, HOST:PORT or HOST")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in address {address!r}")
    return host, int(port_text)


def _endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


# --------------------------------------------------------------------------------------------------------
# REQ/REP exchanges


class ReqChannel:
    """One REQ socket to a REP service, created lazily and recreated after a timeout (see module docstring).

    :meth:`request` sends one message and returns the reply text, or raises ``TimeoutError`` after
    ``timeout_s`` (then the socket is dropped) or ``ConnectionError`` on a ZeroMQ failure.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float, what: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.what = what
        self._sock: zmq.Socket | None = None
        self.recreated = 0  # sockets dropped after a timeout (status)
        self.failed = False  # the last exchange timed out or failed

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self.ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))
            s.setsockopt(zmq.RECONNECT_IVL, 50)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def drop(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(self, text: str) -> str:
        deadline = time.monotonic() + self.timeout_s
        sock = self._socket()
        try:
            sock.send_string(text)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                raise zmq.Again()
            frames = sock.recv_multipart()
        except zmq.Again:
            self.drop()
            self.recreated += 1
            self.failed = True
            raise TimeoutError(f"{self.what} {self.endpoint}: no reply to {text!r} within {self.timeout_s:g} s") \
                from None
        except zmq.ZMQError as e:
            self.drop()
            self.failed = True
            raise ConnectionError(f"{self.what} {self.endpoint}: {text!r} failed: {e}") from None
        self.failed = False
        return b"".join(frames).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------------
# The driver


class IDQTimeController(TimeTagger):
    """ID Quantique ID900 / ID1000 Time Controller (see the module docstring for the protocol)."""

    options = {
        "address": Field(str, doc="Time Controller SCPI endpoint: tcp://HOST:PORT, HOST:PORT or HOST (port 5555)"),
        "dlt_address": Field(str, "", doc="DataLinkTarget control endpoint; empty = tcp://127.0.0.1:6060 (the DLT "
                                          "service runs on this PC)"),
        "channels": Field(list[int], [1, 2, 3, 4], min=1, max=8,
                          doc="Time Controller inputs to stream, in order: TagBatch channel i is input channels[i] "
                              "(ID900: 1-4)"),
        "thresholds_v": Field(list[float], [], unit="V", min=-5.0, max=5.0,
                              doc="input thresholds: empty = leave as set, one value = every input, or one per "
                                  "channel"),
        "edge": Field(str, "", choices=("", "rising", "falling"), doc="input edge; empty = leave as set"),
        "input_delays_ps": Field(list[int], [], unit="ps", min=0,
                                 doc="initial DELA#:VALU per channel (empty = leave as set)"),
        "configure_links": Field(bool, True, doc="at connect, wire DELA#:LINK INPU# and RAW#:STOP:LINK DELA# "
                                                 "(assumed block names) so the streamed input carries its delay"),
        "sub_acquisition_ms": Field(float, 200.0, unit="ms", min=1.0, max=60_000.0,
                                    doc="RECord pulse width: data of every input arrives once per sub-acquisition "
                                        "(IDQ recommends >= 200 ms); sets the batch latency"),
        "sub_acquisition_gap_ns": Field(float, 40.0, unit="ns", min=40.0, max=1e6,
                                        doc="dead time between sub-acquisitions (REC:PPER - REC:PWID); tags in it "
                                            "are not recorded"),
        "ref_index_bits": Field(int, 64, min=2, max=64,
                                doc="width of the reference-index counter on the wire (it is unwrapped; every "
                                    "input must deliver a record at least every 2^(bits-1) sub-acquisitions)"),
        "stream_port_base": Field(int, STREAM_PORT_BASE, min=0, max=65000,
                                  doc="input n streams on this + n (IDQ's examples use 4241); 0 = pick free ports "
                                      "(only when the DLT runs on this PC)"),
        "stream_host": Field(str, "", doc="host the DLT binds the stream ports on; empty = the dlt_address host"),
        "timeout_s": Field(float, 2.0, unit="s", min=0.05, max=60.0,
                           doc="timeout of every SCPI and DLT exchange (keep below the supervisor's call timeout)"),
        "close_stale_acquisitions": Field(bool, True,
                                          doc="at start_stream, stop DLT acquisitions left open (by a crashed "
                                              "session); off if other programs share the DLT"),
        "resolution_ps": Field(int, 1, unit="ps", min=1, max=10_000,
                               doc="reported timestamp resolution (the wire unit TB is 1 ps)"),
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        errors = []
        chans = opts.get("channels") or []
        n = len(chans)
        if not chans:
            errors.append(ParamError("channels", "is empty", "at least one input, e.g. [1, 2, 3, 4]"))
        elif len(set(chans)) != n:
            errors.append(ParamError("channels", "lists an input twice", "distinct inputs"))
        th = opts.get("thresholds_v") or []
        if len(th) not in (0, 1, n):
            errors.append(ParamError("thresholds_v", f"has {len(th)} values for {n} channels",
                                     f"empty, one value or {n} values"))
        dl = opts.get("input_delays_ps") or []
        if len(dl) not in (0, n):
            errors.append(ParamError("input_delays_ps", f"has {len(dl)} values for {n} channels",
                                     f"empty or {n} values"))
        for key, default in (("address", SCPI_PORT), ("dlt_address", DLT_PORT)):
            value = opts.get(key)
            if value and not str(value).startswith("sim://"):  # the daemon resolves sim:// to the simulator
                try:
                    parse_endpoint(value, default)
                except ValueError as e:
                    errors.append(ParamError(key, str(e), "tcp://HOST:PORT, HOST:PORT or HOST"))
        return errors

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        opts = {k: f.default for k, f in self.options.items() if f.default is not REQUIRED}
        opts.update(options)
        super().__init__(name, opts, log)
        self._lock = threading.RLock()
        self._closed = False
        self._ctx: zmq.Context | None = None
        self._scpi: ReqChannel | None = None
        self._dlt: ReqChannel | None = None
        self._inputs = [int(c) for c in opts["channels"]]
        self._identity: dict[str, str] = {}
        self._delays = [0] * len(self._inputs)
        self._pwid = int(round(float(opts["sub_acquisition_ms"]) * 1e9))
        self._pper = self._pwid + max(MIN_GAP_PS, int(round(float(opts["sub_acquisition_gap_ns"]) * 1e3)))
        bits = int(opts["ref_index_bits"])
        self._ref_mask = np.uint64((1 << bits) - 1)
        self._ref_half = 1 << (bits - 1)
        self._streaming = False
        self._t_end = 0  # the last promise made (ps); the next batch starts here
        self._stats = {"tags": 0, "batches": 0, "late_dropped": 0, "overflow_batches": 0, "sessions": 0}
        self._dlt_error_log: deque[str] = deque(maxlen=50)
        self._reset_session()

    # -- addresses ----------------------------------------------------------------------------------------
    def _endpoints(self) -> tuple[str, str, str, str]:
        """(scpi endpoint, TC host, dlt endpoint, stream host)."""
        tc_host, tc_port = parse_endpoint(self.opts["address"], SCPI_PORT)
        dlt_host, dlt_port = parse_endpoint(self.opts["dlt_address"] or f"127.0.0.1:{DLT_PORT}", DLT_PORT)
        stream_host = self.opts["stream_host"] or dlt_host
        return _endpoint(tc_host, tc_port), tc_host, _endpoint(dlt_host, dlt_port), stream_host

    # -- exchanges ----------------------------------------------------------------------------------------
    def _require(self) -> tuple[ReqChannel, ReqChannel]:
        if self._scpi is None or self._dlt is None or self._closed:
            raise ConnectionError(f"ID900 {self.name} is not connected")
        return self._scpi, self._dlt

    def scpi(self, command: str) -> str:
        """One SCPI exchange; the reply (settings usually answer with nothing). DeviceError on an error reply."""
        scpi, _ = self._require()
        reply = scpi.request(command)
        if is_scpi_error(reply):
            raise DeviceError(f"the Time Controller answered {reply.strip()[:200]!r}", command)
        return reply.strip()

    def _query_value(self, command: str, units: dict[str, float | int]) -> float:
        reply = self.scpi(command)
        try:
            return parse_quantity(reply, units)
        except ValueError as e:
            raise DeviceError(f"malformed reply: {e}", command) from None

    def _query_int(self, command: str) -> int:
        value = self._query_value(command, {"": 1})
        if not float(value).is_integer():
            raise DeviceError(f"malformed reply: expected an integer, got {value!r}", command)
        return int(value)

    def dlt(self, command: str) -> Any:
        """One DLT exchange; the decoded JSON answer. DeviceError on ``{"error": ...}`` or a malformed answer."""
        _, dlt = self._require()
        reply = dlt.request(command)
        try:
            answer = json.loads(reply) if reply.strip() else None
        except ValueError:
            raise DeviceError(f"malformed DLT answer (not JSON): {reply[:120]!r}", command) from None
        if isinstance(answer, dict) and "error" in answer:
            err = answer["error"]
            text = err.get("description") if isinstance(err, dict) else err
            raise DeviceError(f"DataLinkTarget error: {text or 'no description'}", command)
        return answer

    def _set_checked(self, command: str, query: str, check: Any, what: str) -> str:
        """Send a setting, read it back, raise DeviceError naming ``command`` unless ``check(reply)``."""
        self.scpi(command)
        reply = self.scpi(query)
        try:
            ok = check(reply)
        except ValueError:
            ok = False
        if not ok:
            raise DeviceError(f"read back {reply[:80]!r} from {query}, expected {what}", command)
        return reply

    # -- lifecycle ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        with self._lock:
            self._closed = False
            scpi_ep, _, dlt_ep, _ = self._endpoints()
            timeout = float(self.opts["timeout_s"])
            self._ctx = zmq.Context()
            self._scpi = ReqChannel(self._ctx, scpi_ep, timeout, "Time Controller SCPI")
            self._dlt = ReqChannel(self._ctx, dlt_ep, timeout, "DataLinkTarget")
            try:
                idn = self.scpi("*IDN?")
            except DeviceError as e:  # *IDN? is standard SCPI but not documented for the TC (assumed)
                self.log.info("Time Controller did not identify itself", error=str(e))
                idn = ""
            fields = [f.strip() for f in idn.split(",")]
            self._identity = {k: v for k, v in zip(("vendor", "model", "serial", "firmware"), fields) if v}
            listed = self.dlt("list")
            if not isinstance(listed, list):
                raise DeviceError(f"malformed DLT answer: expected a list of acquisitions, got {listed!r:.80}",
                                  "list")
            self._configure_inputs()
            self.log.info("ID900 connected", scpi=scpi_ep, dlt=dlt_ep, inputs=self._inputs, **self._identity)

    def _configure_inputs(self) -> None:
        opts = self.opts
        th = list(opts["thresholds_v"])
        if len(th) == 1:
            th = th * len(self._inputs)
        delays = list(opts["input_delays_ps"])
        for i, n in enumerate(self._inputs):
            self._set_checked(f"INPU{n}:ENAB ON", f"INPU{n}:ENAB?", lambda r: r.upper() in ("ON", "1"), "ON")
            if opts["edge"]:
                word = "RISING" if opts["edge"] == "rising" else "FALLING"
                self._set_checked(f"INPU{n}:EDGE {word}", f"INPU{n}:EDGE?",
                                  lambda r, w=word: r.upper().startswith(w[:4]), word)
            if th:
                v = float(th[i])
                self._set_checked(f"INPU{n}:THRE {v:.4f}V", f"INPU{n}:THRE?",
                                  lambda r, v=v: abs(parse_quantity(r, _VOLT_UNITS) - v) <= 1e-3, f"{v:g} V")
            if opts["configure_links"]:
                for template in LINK_COMMANDS:
                    cmd = template.format(n=n)
                    header, target = cmd.split(" ", 1)
                    self._set_checked(cmd, header + "?", lambda r, t=target: r.upper().startswith(t[:4].upper()),
                                      target)
            if delays:
                self._write_delay(i, int(delays[i]))
            else:
                self._delays[i] = int(round(self._query_value(f"DELA{n}:VALU?", _TIME_UNITS)))

    def _write_delay(self, index: int, ps: int) -> None:
        n = self._inputs[index]
        cmd = f"DELA{n}:VALU {int(ps)}"
        self._set_checked(cmd, f"DELA{n}:VALU?", lambda r: int(round(parse_quantity(r, _TIME_UNITS))) == int(ps),
                          f"{int(ps)} ps")
        self._delays[index] = int(ps)

    def close(self) -> None:
        """Stop a running stream if the link still answers (best effort), then release every socket."""
        if not self._lock.acquire(timeout=2.0 * float(self.opts["timeout_s"]) + 1.0):
            # a call is still running in the worker thread (it returns within about timeout_s): it sees _closed
            # and releases the sockets itself; zmq sockets must not be closed from another thread
            self._closed = True
            return
        try:
            healthy = all(ch is not None and not ch.failed for ch in (self._scpi, self._dlt))
            if self._streaming and not self._closed and healthy:
                try:
                    self.stop_stream()
                except Exception as e:  # noqa: BLE001 - closing anyway
                    self.log.info("stopping the stream at close failed", error=f"{type(e).__name__}: {e}")
            self._closed = True
            self._release()
        finally:
            self._lock.release()

    def _release(self) -> None:
        for sock in self._streams.values():
            sock.close(linger=0)
        self._streams = {}
        self._streaming = False
        for ch in (self._scpi, self._dlt):
            if ch is not None:
                ch.drop()
        self._scpi = self._dlt = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def _finish_call(self) -> None:
        """End of a locked call: release everything if close() was requested meanwhile."""
        if self._closed and self._ctx is not None:
            self._release()

    def describe(self) -> dict[str, Any]:
        return {"vendor": self._identity.get("vendor", "ID Quantique"), "model": self._identity.get("model", "ID900"),
                "serial": self._identity.get("serial", ""), "firmware": self._identity.get("firmware", ""),
                "address": self.opts["address"], "dlt_address": self.opts["dlt_address"] or f"127.0.0.1:{DLT_PORT}"}

    @property
    def channel_count(self) -> int:
        return len(self._inputs)

    @property
    def resolution_ps(self) -> int:
        return int(self.opts["resolution_ps"])

    # -- streaming ----------------------------------------------------------------------------------------
    def _reset_session(self) -> None:
        self._streams: dict[int, zmq.Socket] = {}  # TagBatch channel index -> PAIR socket
        self._acq_ids: dict[int, str] = {}
        self._ref_state: dict[int, tuple[np.uint64, int]] = {}  # index -> (last raw ref index, unwrapped)
        self._last_k: dict[int, int] = {}  # index -> newest unwrapped sub-acquisition seen
        self._counts: dict[int, int] = {}  # index -> DLT acquisitions_count at the last poll
        self._ts_counts: dict[int, int] = {}  # index -> DLT timestamps_count at the last poll
        self._received = [0] * len(self._inputs)  # index -> records received on the stream
        self._pend_t: list[np.ndarray] = []
        self._pend_c: list[np.ndarray] = []
        self._done = 0  # sub-acquisitions below this are emitted
        self._base = self._t_end
        self._err_base: dict[int, int] = {}
        self._dlt_err_base: dict[int, int] = {}
        self._new_losses = 0  # errors noted but not yet reported in a batch
        self._taint_until = 0  # sub-acquisitions below this may have lost tags
        now = time.monotonic()
        self._last_progress = now
        self._last_health = now
        self._last_count_poll = now
        self._last_rx = [now] * len(self._inputs)
        period_s = self._pper / PS_PER_S
        self._quiet_s = max(2.0 * period_s, 0.05)
        self._stall_s = max(2.0 * period_s, 0.5)

    def _free_port(self, host: str) -> int:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def start_stream(self) -> None:
        with self._lock:
            try:
                self._require()
                if self._streaming:
                    return
                self._start_stream()
            finally:
                self._finish_call()

    def _start_stream(self) -> None:
        _, tc_host, _, stream_host = self._endpoints()
        self._reset_session()
        self.scpi("REC:STOP")
        self.scpi("REC:TRIG:ARM:MODE MANU")
        self.scpi("REC:ENAB ON")
        self.scpi("REC:NUM INF")
        self.scpi(f"REC:PWID {self._pwid};PPER {self._pper}")
        if self.opts["close_stale_acquisitions"]:
            stale = self.dlt("list")
            if not isinstance(stale, list):
                raise DeviceError(f"malformed DLT answer: expected a list, got {stale!r:.80}", "list")
            for acq in stale:
                self.log.warning("closing a stale DLT acquisition", id=acq)
                self.dlt(f"stop --id {shlex.quote(str(acq))}")
        assert self._ctx is not None
        monitors: dict[int, zmq.Socket] = {}
        try:
            for i, n in enumerate(self._inputs):
                self.scpi(REF_LINK.format(n=n))
                self.scpi(f"RAW{n}:ERR:CLE")
                base = int(self.opts["stream_port_base"])
                port = base + n if base else self._free_port(stream_host)
                sock = self._ctx.socket(zmq.PAIR)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RECONNECT_IVL, 20)
                monitors[i] = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
                sock.connect(_endpoint(stream_host, port))
                self._streams[i] = sock
                answer = self.dlt(f"start-stream --address {shlex.quote(tc_host)} --channel {n} "
                                  f"--stream-port {port} --with-ref-index")
                acq = answer.get("id") if isinstance(answer, dict) else None
                if not isinstance(acq, str) or not acq:
                    raise DeviceError(f"malformed DLT answer: expected {{\"id\": ...}}, got {answer!r:.80}",
                                      "start-stream")
                self._acq_ids[i] = acq
                self.scpi(f"RAW{n}:SEND ON")
            self._wait_connected(monitors, stream_host)
            self.scpi("REC:PLAY")
        except BaseException:
            self._abort_session()
            raise
        finally:
            for i, mon in monitors.items():
                if i in self._streams:
                    self._streams[i].disable_monitor()
                mon.close(linger=0)
        self._streaming = True
        self._stats["sessions"] += 1
        self.log.info("ID900 stream started", inputs=self._inputs, sub_acquisition_ps=self._pwid, period_ps=self._pper)

    def _wait_connected(self, monitors: dict[int, zmq.Socket], host: str) -> None:
        """Wait until every stream socket is connected to the port the DLT bound, so that no input's first
        sub-acquisition waits in the DLT while another input's next one is already read (ZeroMQ connects in the
        background and retries every RECONNECT_IVL)."""
        from zmq.utils.monitor import recv_monitor_message

        deadline = time.monotonic() + float(self.opts["timeout_s"])
        for i, mon in monitors.items():
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not mon.poll(max(1, int(remaining * 1000))):
                    raise TimeoutError(f"the DLT stream of input {self._inputs[i]} on {host} did not accept a "
                                       f"connection within {self.opts['timeout_s']:g} s")
                if recv_monitor_message(mon)["event"] == zmq.EVENT_CONNECTED:
                    break

    def _abort_session(self) -> None:
        """Best-effort undo of a half-started session (the original error is what the caller sees)."""
        for i, acq in list(self._acq_ids.items()):
            try:
                self.dlt(f"stop --id {shlex.quote(acq)}")
            except Exception:  # noqa: BLE001
                break
        for sock in self._streams.values():
            sock.close(linger=0)
        self._streams = {}
        self._acq_ids = {}

    def stop_stream(self) -> None:
        with self._lock:
            try:
                if not self._streaming:
                    return
                self._streaming = False
                problems: list[DeviceError] = []
                try:
                    for cmd in ["REC:STOP"] + [f"RAW{n}:SEND OFF" for n in self._inputs]:
                        try:
                            self.scpi(cmd)
                        except DeviceError as e:
                            problems.append(e)
                    for i, acq in self._acq_ids.items():
                        try:
                            answer = self.dlt(f"stop --id {shlex.quote(acq)}")
                            status = answer.get("status") if isinstance(answer, dict) else None
                            if isinstance(status, dict):
                                for err in status.get("errors") or []:
                                    self._dlt_error_log.append(f"input {self._inputs[i]}: {_describe(err)}")
                        except DeviceError as e:
                            problems.append(e)
                finally:
                    for sock in self._streams.values():
                        sock.close(linger=0)
                    self._streams = {}
                    self._acq_ids = {}
                    self._pend_t, self._pend_c = [], []
                if problems:
                    raise problems[0]
            finally:
                self._finish_call()

    def read(self, timeout_s: float) -> TagBatch | None:
        with self._lock:
            try:
                if not self._streaming or self._closed:
                    return None
                return self._read(max(0.0, float(timeout_s)))
            finally:
                self._finish_call()

    def _read(self, timeout_s: float) -> TagBatch:
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        for sock in self._streams.values():
            poller.register(sock, zmq.POLLIN)
        while True:
            wait = max(0.0, deadline - time.monotonic())
            ready = dict(poller.poll(int(wait * 1000)))
            for i, sock in self._streams.items():
                if sock in ready:
                    self._drain(i, sock)
            now = time.monotonic()
            done = self._watermark(now)
            if done > self._done:
                return self._emit(done)
            if now - self._last_progress >= self._stall_s and now - self._last_health >= self._stall_s:
                self._last_health = now
                self.scpi("REC:STAG?")  # nothing for a while: is the TC still there? (a dead link raises)
            if now - self._last_count_poll >= self._quiet_s and self._held_back(now):
                self._poll_dlt()  # quiet inputs: how far has the DLT got? (a dead DLT raises)
                done = self._watermark(time.monotonic())
                if done > self._done:
                    return self._emit(done)
            if time.monotonic() >= deadline:
                return TagBatch.empty(self._t_end, self._t_end)

    def _drain(self, index: int, sock: zmq.Socket, max_messages: int = 4096) -> None:
        for _ in range(max_messages):
            try:
                msg = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            self._last_progress = now
            self._last_rx[index] = now
            self._ingest(index, msg.buffer)

    def _ingest(self, index: int, data: memoryview) -> None:
        """Decode one stream message of input ``index`` into pending absolute tags (vectorised)."""
        n_in = self._inputs[index]
        what = f"DLT stream of input {n_in}"
        if len(data) == len(END_OF_STREAM):
            raise DeviceError("the DataLinkTarget ended the stream (the acquisition was closed)", what)
        if len(data) % STREAM_RECORD.itemsize:
            raise DeviceError(f"malformed message: {len(data)} bytes is not a whole number of "
                              f"{STREAM_RECORD.itemsize}-byte records", what)
        rec = np.frombuffer(data, STREAM_RECORD)
        self._received[index] += rec.shape[0]
        ts = rec["timestamp"]
        if int(ts.max()) >= self._pper:
            raise DeviceError(f"malformed message: a timestamp of {int(ts.max())} ps exceeds the sub-acquisition "
                              f"period of {self._pper} ps (is RAW{n_in}:REF:LINK NONE?)", what)
        raw = rec["ref_index"] & self._ref_mask
        prev_raw, prev_full = self._ref_state.get(index, (np.uint64(0), 0))
        steps = np.diff(raw, prepend=prev_raw) & self._ref_mask  # uint64 arithmetic wraps: modular differences
        if np.any(steps >= np.uint64(self._ref_half)):
            raise DeviceError("malformed message: the reference index went backwards (or wrapped: check "
                              "ref_index_bits)", what)
        k = prev_full + np.cumsum(steps.astype(np.int64))
        self._ref_state[index] = (raw[-1], int(k[-1]))
        self._last_k[index] = int(k[-1])
        t = self._base + k * self._pper + ts.astype(np.int64)
        self._pend_t.append(t)
        self._pend_c.append(np.full(t.shape[0], index, np.uint8))

    def _channel_done(self, index: int, now: float) -> int:
        """Sub-acquisitions below this are complete on one input.

        An input's stream is in order, so a record of sub-acquisition j means everything before j has arrived
        (exact, whatever the delays or bursts). For an input with nothing to say, the DLT ``status`` of its
        acquisition stands in: ``acquisitions_count`` n (sub-acquisition ends registered) with
        ``timestamps_count`` no more than the records received means every sub-acquisition below n is through
        (assumed: the DLT forwards a sub-acquisition's timestamps before it counts its end). Last resort, if the
        counts never agree: an input silent for ``_stall_s`` is taken to have nothing in flight (below n-1)."""
        done = self._last_k.get(index, 0)
        n = self._counts.get(index)
        if n is not None:
            forwarded = self._ts_counts.get(index)
            if forwarded is not None and self._received[index] >= forwarded:
                done = max(done, n)
            elif now - self._last_rx[index] >= self._stall_s:
                done = max(done, n - 1)
        return done

    def _watermark(self, now: float) -> int:
        """Sub-acquisitions below the returned index are final on every input."""
        return max(self._done, min(self._channel_done(i, now) for i in range(len(self._inputs))))

    def _held_back(self, now: float) -> bool:
        """Is an input that has been silent for a while holding the watermark back (or is everything silent)?"""
        front = max(self._last_k.values(), default=0)
        for i in range(len(self._inputs)):
            if now - self._last_rx[i] >= self._quiet_s and self._channel_done(i, now) < max(front, self._done + 1):
                return True
        return False

    def _dlt_status(self, index: int, acq: str) -> dict:
        command = f"status --id {shlex.quote(acq)}"
        status = self.dlt(command)
        if not isinstance(status, dict):
            raise DeviceError(f"malformed DLT answer: expected an object, got {status!r:.80}", command)
        if status.get("error"):
            raise DeviceError(f"DataLinkTarget acquisition error: {_describe(status['error'])}", command)
        return status

    def _poll_dlt(self) -> None:
        """DLT status of every acquisition: the acquisitions/timestamps counts, and new errors (data loss)."""
        self._last_count_poll = time.monotonic()
        new = 0
        for i, acq in self._acq_ids.items():
            status = self._dlt_status(i, acq)
            errors = status.get("errors") or []
            if not isinstance(errors, list):
                raise DeviceError(f"malformed DLT status: errors is {errors!r:.60}", f"status --id {acq}")
            seen = self._dlt_err_base.get(i, 0)
            for err in errors[seen:]:
                self._dlt_error_log.append(f"input {self._inputs[i]}: {_describe(err)}")
            new += max(0, len(errors) - seen)
            self._dlt_err_base[i] = len(errors)
            self._counts[i] = _int_field(status, "acquisitions_count", f"status --id {acq}")
            if "timestamps_count" in status:
                self._ts_counts[i] = _int_field(status, "timestamps_count", f"status --id {acq}")
        self._note_losses(new)

    def _note_losses(self, new: int) -> None:
        """Errors counted so far may belong to any sub-acquisition up to the one the TC was in when they were
        read: every batch overlapping those is flagged, not only the next one."""
        if new > 0:
            self._new_losses += new
            newest = max([*self._counts.values(), *self._last_k.values(), self._done])
            self._taint_until = max(self._taint_until, newest + 1)

    def _poll_losses(self) -> None:
        """Read the TC's error counters (RAW#:ERRors?), then the DLT's: losses up to now are all noted."""
        new = 0
        for i, n in enumerate(self._inputs):
            count = self._query_int(f"RAW{n}:ERR?")
            new += max(0, count - self._err_base.get(i, 0))
            self._err_base[i] = count
        self._poll_dlt()  # after RAW#:ERR?: its counts bound the sub-acquisition those errors can belong to
        self._note_losses(new)

    def _emit(self, done: int) -> TagBatch:
        self._poll_losses()
        losses, self._new_losses = self._new_losses, 0
        tainted = self._done < self._taint_until
        begin = self._t_end
        end = self._base + done * self._pper
        ts = np.concatenate(self._pend_t) if self._pend_t else np.empty(0, np.int64)
        ch = np.concatenate(self._pend_c) if self._pend_c else np.empty(0, np.uint8)
        keep = ts >= end
        out_t, out_c = ts[~keep], ch[~keep]
        self._pend_t, self._pend_c = ([ts[keep]], [ch[keep]]) if keep.any() else ([], [])
        order = np.argsort(out_t, kind="stable")
        out_t, out_c = out_t[order], out_c[order]
        low = int(np.searchsorted(out_t, begin, side="left"))
        flags = TagFlags.NONE
        if low:  # records for an interval already promised: they arrived too late
            out_t, out_c = out_t[low:], out_c[low:]
            self._stats["late_dropped"] += low
            flags |= TagFlags.MISSED_EVENTS
        if losses or tainted:
            flags |= TagFlags.OVERFLOW
            self._stats["overflow_batches"] += 1
            if losses:
                self.log.warning("ID900 reports lost timestamps: batch flagged OVERFLOW", errors=losses,
                                 t_begin_ps=begin, t_end_ps=end)
        self._done = done
        self._t_end = end
        self._last_progress = time.monotonic()
        self._stats["tags"] += int(out_t.shape[0])
        self._stats["batches"] += 1
        return TagBatch(np.ascontiguousarray(out_t), np.ascontiguousarray(out_c), begin, end, flags, low)

    # -- RPC ------------------------------------------------------------------------------------------------
    @exposed
    def set_input_delay(
        self,
        channel: Annotated[int, Field(min=0, doc="0-based input channel")],
        picoseconds: Annotated[int, Field(unit="ps", limit="input_delay_ps")],
    ) -> None:
        """Set the hardware input delay (DELA#:VALU) of one streamed channel."""
        with self._lock:
            try:
                self._require()
                if not 0 <= channel < len(self._inputs):
                    raise DeviceError(f"channel {channel} does not exist (0..{len(self._inputs) - 1})",
                                      "set_input_delay")
                if picoseconds < 0:
                    raise DeviceError("the delay block takes only non-negative delays", "set_input_delay")
                self._write_delay(channel, int(picoseconds))
            finally:
                self._finish_call()

    @exposed
    def status(self) -> dict:
        """Channels, resolution_ps, input_delays_ps, streaming, input counter readings and stream statistics."""
        with self._lock:
            try:
                self._require()
                counts = [self._query_int(f"INPU{n}:COUN?") for n in self._inputs]
                stage = self.scpi("REC:STAG?")
                return {
                    "channels": len(self._inputs),
                    "inputs": list(self._inputs),
                    "resolution_ps": self.resolution_ps,
                    "input_delays_ps": list(self._delays),
                    "streaming": self._streaming,
                    "record_stage": stage,
                    "input_counts": counts,
                    "sub_acquisition_ps": self._pwid,
                    "period_ps": self._pper,
                    "t_end_ps": self._t_end,
                    "dlt_errors": list(self._dlt_error_log),
                    "req_sockets_recreated": (self._scpi.recreated if self._scpi else 0)
                    + (self._dlt.recreated if self._dlt else 0),
                    **self._stats,
                }
            finally:
                self._finish_call()


def _describe(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("description", err))
    return str(err)


def _int_field(obj: dict, key: str, command: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise DeviceError(f"malformed DLT status: {key} is {value!r:.40}", command)
    return int(value)
