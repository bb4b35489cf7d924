"""Protocol-level simulator of an ID Quantique ID900 Time Controller together with its DataLinkTarget service.

It serves the three kinds of ZeroMQ socket the real system has, so :class:`drivers.idq_id900.IDQTimeController`
talks to it unchanged (protocols.md section 4.4; docs/hardware/idq-id900.md says which details are assumed):

* **SCPI** (REP, ``scpi_port``; 5555 on the real unit): one program message per request, answered with one
  reply. The parser is :class:`drivers.sim.instruments.scpi.ScpiInstrument` (case-insensitive, short/long
  forms, ``;`` chaining with relative headers, unit suffixes with SI prefixes, so ``REC:DUR 3000 GTB`` is 3 s).
  Queries answer with their value (times as ``<n>TB``, voltages as ``<v>V``; assumed), settings with an empty
  reply, a failed message with ``Error: <code>,"<text>;<detail>"`` (assumed style: see the driver's
  ``is_scpi_error``).
* **DLT control** (REP, ``dlt_port``; 6060 on the real PC): command lines (``start-stream --address A --channel N
  --stream-port P [--with-ref-index] [--id ID]``, ``start-save ... --filename F``, ``stop --id ID``, ``list``,
  ``status --id ID``) answered with JSON; failures as ``{"error": {"description": ...}}``, with the manual's
  wording for an unknown option (``unrecognised option '--xyz'``).
* **Timestamp streams** (PAIR, bound on the requested ``--stream-port``): per sub-acquisition and input, one
  message of little-endian ``(uint64 timestamp, uint64 ref_index)`` records (``uint64`` timestamps only without
  ``--with-ref-index``), split into several messages above ``max_message_records``; a sub-acquisition without
  tags sends nothing; an empty message ends the stream (``stop``).

What it models
--------------
Blocks and links: ``INPUt#`` (enable, threshold, edge, counter), ``DELAy#`` (``LINK`` to an input, ``VALUe`` in ps),
``RAW#`` (``STOP:LINK`` to a ``DELA#`` or ``INPU#``, ``REF:LINK``, ``SEND``, ``ERRors?``, ``ERRors:CLEar``) and the
``RECord`` generator (``ENABle``, ``TRIGger:ARM:MODE``, ``NUMber`` INF or n, ``PWIDth``/``DURation``, ``PPERiod``,
``PLAY``, ``STOP``, ``STAGe?``). Only ``RAW#:REF:LINK NONE`` is modelled: timestamps are ps since the start of the
current sub-acquisition, and the reference index is the sub-acquisition number since ``REC:PLAY`` (modulo
``2**ref_index_bits``). Sub-acquisitions run in wall-clock time scaled by ``speed``; tags in the dead time
``PPER - PWID`` are not recorded. A threshold above ``pulse_amplitude_v`` (in magnitude) silences an input.

Input ``n`` sees the tags of bench tagger channel ``bench_channels[n-1]`` (-1: nothing connected). The tags
come from a :class:`~drivers.sim.tagstream.BlockStream` over either the physical bench (``source = "bench"``: a
:class:`~drivers.sim.bench.model.BenchModel` built from ``default_config(seed=seed)``; with ``bench_state =
"shared"`` it reads and writes the :class:`BenchState` the daemon passes, so the pump, paddles and detectors
of the other simulated instruments change what this tagger sees) or a seeded
:class:`~drivers.sim.tagstream.PoissonPairSource` (``source = "poisson"``).

Data loss, as the real system reports it: more than ``max_rate_hz`` timestamps per second in a
sub-acquisition (the manual's 10 M/s), tags the bench tagger dropped, or :meth:`lose_data` drop tags and count
up ``RAW#:ERRors?``; a stream client too slow to take its messages (backlog above ``max_backlog_records``) loses
them and the DLT ``status`` gets an ``errors`` entry.

Test controls (any thread): :meth:`lose_data`, :meth:`send_raw` (arbitrary bytes on a stream), :meth:`end_stream`
(an empty message), :attr:`stall_scpi` / :attr:`stall_dlt` (requests are not answered: a hung service),
:attr:`reply_hook` (``f(line) -> str | None`` replaces SCPI replies, for malformed answers), :attr:`dlt_hook`
(the same for DLT commands), :attr:`record_sent` (keep every sent record as ground truth in :attr:`sent`),
:attr:`received_scpi`, :attr:`received_dlt`, :attr:`subacquisitions`, :meth:`acquisition_ids`.
:meth:`stop` unplugs (every socket closed, DLT acquisitions lost, settings kept); :meth:`start` binds the same
SCPI and DLT ports again.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import zmq

from drivers.params import Field
from drivers.sim.bench.state import BenchState
from drivers.sim.instruments.scpi import Call, ScpiError, ScpiInstrument, boolean, choice, number
from drivers.sim.tagstream import BlockStream, PoissonPairSource

__all__ = ["SimID900"]

PS_PER_S = 1_000_000_000_000
STREAM_RECORD = np.dtype([("timestamp", "<u8"), ("ref_index", "<u8")])  # the driver's layout (assumed on the wire)
MIN_GAP_PS = 40_000
THRESHOLD_RANGE_V = (-2.0, 2.0)  # assumed input threshold range
DELAY_RANGE_PS = (0, 1_000_000_000)  # assumed DELA block range
INTEGRATION_RANGE_MS = (1, 1_000_000)


def _error_answer(text: str) -> dict[str, Any]:
    return {"error": {"description": text}}


@dataclass
class _Acquisition:
    """One open DLT acquisition."""

    id: str
    channel: int
    with_ref: bool
    sock: Any = None  # PAIR socket (start-stream)
    path: str | None = None  # start-save
    port: int = 0
    acquisitions_count: int = 0
    timestamps_count: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    last_rx: float = field(default_factory=time.monotonic)
    backlog: deque = field(default_factory=deque)
    backlog_records: int = 0

    def status(self) -> dict[str, Any]:
        return {"acquisitions_count": self.acquisitions_count, "errors": list(self.errors),
                "inactivity": round(time.monotonic() - self.last_rx, 6), "timestamps_count": self.timestamps_count}


class _TcScpi(ScpiInstrument):
    """The SCPI command set of the Time Controller (parser only: served over ZeroMQ by SimID900)."""

    def __init__(self, sim: SimID900) -> None:
        super().__init__(f"{sim.name}-scpi", {"port": 0})
        self.sim = sim

    def identity(self) -> str:
        return str(self.sim.opts["identity"])

    def reset(self) -> None:
        self.sim._reset_settings()


class SimID900:
    """Simulated ID900 Time Controller + DataLinkTarget (see the module docstring)."""

    model: ClassVar[str] = "idq_id900"
    options: ClassVar[dict[str, Field]] = {
        "host": Field(str, "127.0.0.1", doc="interface the SCPI, DLT and stream sockets bind"),
        "scpi_port": Field(int, 0, min=0, max=65535, doc="SCPI REP port (real unit: 5555); 0 = a free port"),
        "dlt_port": Field(int, 0, min=0, max=65535, doc="DLT control REP port (real service: 6060); 0 = a free port"),
        "inputs": Field(int, 4, min=1, max=8, doc="number of inputs (ID900: 4)"),
        "bench_channels": Field(list[int], [0, 1, 2, 3], min=-1, max=255,
                                doc="bench tagger channel wired to input 1, 2, ...; -1 = nothing connected"),
        "source": Field(str, "bench", choices=("bench", "poisson"),
                        doc="tags from the physical bench model or from a seeded Poisson pair source"),
        "bench_state": Field(str, "shared", choices=("shared", "own"),
                             doc="bench source: read and write the daemon's BenchState (pump, paddles, detectors "
                                 "of the other simulators act on this tagger) or keep a private one"),
        "seed": Field(int, 1, min=0, doc="seed of the source"),
        "singles_hz": Field(float, 5000.0, unit="Hz", min=0, doc="poisson source: background rate per channel"),
        "pair_rate_hz": Field(float, 20000.0, unit="Hz", min=0, doc="poisson source: correlated pair rate"),
        "pair_channels": Field(list[list[int]], [[0, 1], [2, 3]], doc="poisson source: channel pairs"),
        "jitter_ps": Field(float, 50.0, unit="ps", min=0, doc="poisson source: Gaussian jitter per tag"),
        "speed": Field(float, 1.0, min=0.001, max=1000.0, doc="simulated seconds per wall-clock second"),
        "ref_index_bits": Field(int, 64, min=2, max=64, doc="width of the reference-index counter on the wire"),
        "max_rate_hz": Field(float, 1e7, unit="Hz", min=0,
                             doc="timestamps per second beyond which a sub-acquisition loses tags (0 = no limit)"),
        "max_message_records": Field(int, 1 << 20, min=1, doc="records per stream message at most (larger "
                                                              "sub-acquisitions are split)"),
        "max_backlog_records": Field(int, 1 << 24, min=1, doc="records queued for a slow stream client before "
                                                              "the DLT drops them"),
        "pulse_amplitude_v": Field(float, 1.0, unit="V", min=0, doc="detector pulse height: a larger threshold "
                                                                   "sees nothing"),
        "identity": Field(str, "ID Quantique,ID900 (simulated),SIM-ID900-0001,1.0", doc="the *IDN? reply"),
    }

    def __init__(self, name: str, state: BenchState, options: dict[str, Any] | None = None) -> None:
        opts = {k: f.default for k, f in self.options.items()}
        for key, value in (options or {}).items():
            if key not in self.options:
                raise ValueError(f"SimID900 {name}: unknown option {key!r}; allowed: {', '.join(sorted(self.options))}")
            opts[key] = value
        self.name = name
        self.state = state
        self.opts = opts
        self.n_inputs = int(opts["inputs"])
        chans = [int(c) for c in opts["bench_channels"]]
        if len(chans) != self.n_inputs:
            raise ValueError(f"SimID900 {name}: bench_channels has {len(chans)} entries for {self.n_inputs} inputs")
        self._bench_channels = chans
        self._scpi_port = int(opts["scpi_port"])
        self._dlt_port = int(opts["dlt_port"])
        self._lock = threading.RLock()  # settings and test controls vs the I/O thread
        self._thread: threading.Thread | None = None
        self._stop_evt = threading.Event()
        self._controls: deque[Callable[[], None]] = deque()  # run in the I/O thread (it owns the sockets)
        self._model: Any = None
        self._source: Any = None
        self._stream: BlockStream | None = None
        self._offset = 0  # source time at REC:PLAY
        self._acqs: dict[str, _Acquisition] = {}
        self._save_dir = tempfile.mkdtemp(prefix=f"qnetd-{name}-dlt-")
        # test controls
        self.stall_scpi = False
        self.stall_dlt = False
        self.reply_hook: Callable[[str], str | None] | None = None
        self.dlt_hook: Callable[[str], str | None] | None = None
        self.record_sent = False
        self.sent: dict[int, list[np.ndarray]] = {n: [] for n in range(1, self.n_inputs + 1)}  # input -> device ps
        self.received_scpi: deque[str] = deque(maxlen=2000)
        self.received_dlt: deque[str] = deque(maxlen=2000)
        self.subacquisitions = 0  # generated since the simulator was built
        self._lose: dict[int, int] = {}
        self._scpi = _TcScpi(self)
        self._register_scpi()
        self._reset_settings()

    # -- SimInstrument ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the SCPI and DLT ports (the same ones after a stop()) and serve in a background thread."""
        if self._thread is not None:
            return
        with self._lock:
            # build the tag source now, not in the I/O thread at REC:PLAY, where it would hold up the replies
            # (numba kernels: ~20 s on a fresh machine, then loaded from the cache)
            self._ensure_source()
            if self._model is not None:
                self._model.warm_up()
        self._stop_evt.clear()
        ready = threading.Event()
        problem: list[BaseException] = []
        t = threading.Thread(target=self._run, args=(ready, problem), name=f"sim-{self.name}-id900", daemon=True)
        t.start()
        ready.wait(10.0)
        if problem:
            t.join(2.0)
            raise problem[0]
        self._thread = t

    def stop(self) -> None:
        """Unplug: close every socket (SCPI, DLT, streams); DLT acquisitions are lost, settings are kept."""
        t = self._thread
        if t is None:
            return
        self._stop_evt.set()
        t.join(10.0)
        self._thread = None
        with self._lock:
            self._playing = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def address(self) -> str:
        """``tcp://HOST:<scpi_port>``: the driver's ``address`` option."""
        return f"tcp://{self.opts['host']}:{self._port(self._scpi_port)}"

    @property
    def dlt_address(self) -> str:
        return f"tcp://{self.opts['host']}:{self._port(self._dlt_port)}"

    @property
    def driver_options(self) -> dict[str, Any]:
        """The driver options that point IDQTimeController at this simulator (free stream ports)."""
        return {"address": self.address, "dlt_address": self.dlt_address, "stream_port_base": 0}

    def _port(self, port: int) -> int:
        if port == 0:
            raise RuntimeError(f"SimID900 {self.name}: the ports are chosen at start(); start the simulator first")
        return port

    # -- test controls ----------------------------------------------------------------------------------
    def lose_data(self, subacquisitions: int = 1, inputs: list[int] | None = None) -> None:
        """The next ``subacquisitions`` sub-acquisitions of ``inputs`` (default all, 1-based) lose their tags;
        ``RAW#:ERRors?`` counts one error per lost sub-acquisition."""
        with self._lock:
            for n in inputs or range(1, self.n_inputs + 1):
                self._lose[n] = self._lose.get(n, 0) + int(subacquisitions)

    def send_raw(self, channel: int, payload: bytes) -> None:
        """Send arbitrary bytes on the stream of the acquisition of input ``channel`` (1-based)."""
        self._controls.append(lambda: self._send_on(channel, payload))

    def end_stream(self, channel: int) -> None:
        """Send the empty end-of-stream message on the stream of input ``channel``."""
        self.send_raw(channel, b"")

    def acquisition_ids(self) -> list[str]:
        with self._lock:
            return list(self._acqs)

    @property
    def playing(self) -> bool:
        with self._lock:
            return self._playing

    def settings(self) -> dict[str, Any]:
        """A copy of the block settings (for tests)."""
        with self._lock:
            return {"enabled": list(self._enabled), "threshold_v": list(self._threshold), "edge": list(self._edge),
                    "delay_ps": list(self._delay), "delay_link": list(self._dela_link),
                    "raw_stop": list(self._raw_stop), "raw_ref": list(self._raw_ref), "raw_send": list(self._raw_send),
                    "raw_errors": list(self._raw_errors), "pwid_ps": self._pwid, "pper_ps": self._pper,
                    "rec_num": self._rec_num}

    def sent_times(self, channel: int) -> np.ndarray:
        """Device times (ps since REC:PLAY) of every record sent for input ``channel`` (with record_sent)."""
        with self._lock:
            parts = self.sent[channel]
            return np.concatenate(parts) if parts else np.empty(0, np.int64)

    # -- settings ---------------------------------------------------------------------------------------
    def _reset_settings(self) -> None:
        n = self.n_inputs
        with self._lock:
            self._enabled = [False] * n
            self._threshold = [0.1] * n
            self._edge = ["RISING"] * n
            self._inte_ms = [1000] * n
            self._delay = [0] * n
            self._dela_link = [f"INPU{i + 1}" for i in range(n)]
            self._raw_stop = [f"DELA{i + 1}" for i in range(n)]
            self._raw_ref = ["NONE"] * n
            self._raw_send = [False] * n
            self._raw_errors = [0] * n
            self._rec_enabled = False
            self._rec_mode = "MANUAL"
            self._rec_num = 1
            self._pwid = PS_PER_S
            self._pper = PS_PER_S + MIN_GAP_PS
            self._playing = False
            self._leds = True
            self._carry = [np.empty(0, np.int64) for _ in range(n)]
            self._rate_window: deque = deque(maxlen=64)

    def _register_scpi(self) -> None:
        c = self._scpi.command
        c("INPUt#:ENABle", self._set_enable, lambda call: "ON" if self._enabled[self._inp(call)] else "OFF")
        c("INPUt#:THREshold", self._set_threshold, lambda call: f"{self._threshold[self._inp(call)]:g}V")
        c("INPUt#:EDGE", self._set_edge, lambda call: self._edge[self._inp(call)])
        c("INPUt#:COUNter", query=self._q_counter)
        c("INPUt#:COUNter:INTEgration", self._set_inte, lambda call: str(self._inte_ms[self._inp(call)]))
        c("DELAy#:VALUe", self._set_delay, lambda call: f"{self._delay[self._inp(call)]}TB")
        c("DELAy#:LINK", self._set_dela_link, lambda call: self._dela_link[self._inp(call)])
        c("RAW#:STOP:LINK", self._set_raw_stop, lambda call: self._raw_stop[self._inp(call)])
        c("RAW#:REF:LINK", self._set_raw_ref, lambda call: self._raw_ref[self._inp(call)])
        c("RAW#:SEND", self._set_raw_send, lambda call: "ON" if self._raw_send[self._inp(call)] else "OFF")
        c("RAW#:ERRors", query=lambda call: str(self._raw_errors[self._inp(call)]))
        c("RAW#:ERRors:CLEar", self._clear_raw_errors)
        c("RECord:ENABle", self._set_rec_enable, lambda call: "ON" if self._rec_enabled else "OFF")
        c("RECord:TRIGger:ARM:MODE", self._set_rec_mode, lambda call: self._rec_mode)
        c("RECord:NUMber", self._set_rec_num, lambda call: "INF" if self._rec_num == 0 else str(self._rec_num))
        c("RECord:PWIDth", self._set_pwid, lambda call: f"{self._pwid}TB")
        c("RECord:DURation", self._set_pwid, lambda call: f"{self._pwid}TB")
        c("RECord:PPERiod", self._set_pper, lambda call: f"{self._pper}TB")
        c("RECord:PLAY", self._rec_play)
        c("RECord:STOP", self._rec_stop)
        c("RECord:STAGe", query=lambda call: "PLAYING" if self._playing else "STOPPED")
        c("DEVIce:LEDS", self._set_leds, lambda call: "ON" if self._leds else "OFF")

    def _inp(self, call: Call) -> int:
        return call.suffix(0, range(1, self.n_inputs + 1)) - 1

    def _set_enable(self, call: Call) -> None:
        call.nargs(0, 1)
        self._enabled[self._inp(call)] = boolean(call.args[0]) if call.args else True

    def _set_threshold(self, call: Call) -> None:
        v = number(call.arg(), "V")
        lo, hi = THRESHOLD_RANGE_V
        if not lo <= v <= hi:
            raise ScpiError(-222, f"threshold {v:g} V outside [{lo:g}, {hi:g}] V")
        self._threshold[self._inp(call)] = v

    def _set_edge(self, call: Call) -> None:
        self._edge[self._inp(call)] = choice(call.arg(), ("RISing", "FALLing"))

    def _set_inte(self, call: Call) -> None:
        v = number(call.arg())
        lo, hi = INTEGRATION_RANGE_MS
        if not lo <= v <= hi:
            raise ScpiError(-222, f"integration time {v:g} ms outside [{lo}, {hi}] ms")
        self._inte_ms[self._inp(call)] = int(v)

    def _set_delay(self, call: Call) -> None:
        v = number(call.arg(), "TB")
        lo, hi = DELAY_RANGE_PS
        if not float(v).is_integer() or not lo <= v <= hi:
            raise ScpiError(-222, f"delay {v:g} TB outside [{lo}, {hi}] TB (1 TB = 1 ps)")
        self._delay[self._inp(call)] = int(v)

    def _block(self, call: Call, kinds: tuple[str, ...]) -> str:
        word = call.arg().strip().upper()
        if word == "NONE":
            return word
        for kind in kinds:
            long = {"INPU": "INPUT", "DELA": "DELAY", "GEN": "GEN", "TSCO": "TSCO", "STAR": "START"}[kind]
            for prefix in (long, kind):
                if word.startswith(prefix) and word[len(prefix):].isdigit():
                    idx = int(word[len(prefix):])
                    if not 1 <= idx <= self.n_inputs:
                        raise ScpiError(-224, f"no block {word}")
                    return f"{kind}{idx}"
        raise ScpiError(-224, f"cannot link to {word!r}; allowed: NONE, " + ", ".join(f"{k}#" for k in kinds))

    def _set_dela_link(self, call: Call) -> None:
        self._dela_link[self._inp(call)] = self._block(call, ("INPU",))

    def _set_raw_stop(self, call: Call) -> None:
        self._raw_stop[self._inp(call)] = self._block(call, ("DELA", "INPU", "TSCO"))

    def _set_raw_ref(self, call: Call) -> None:
        self._raw_ref[self._inp(call)] = self._block(call, ("DELA", "INPU", "TSCO", "GEN"))

    def _set_raw_send(self, call: Call) -> None:
        call.nargs(0, 1)
        self._raw_send[self._inp(call)] = boolean(call.args[0]) if call.args else True

    def _clear_raw_errors(self, call: Call) -> None:
        call.nargs(0)
        self._raw_errors[self._inp(call)] = 0

    def _set_rec_enable(self, call: Call) -> None:
        call.nargs(0, 1)
        self._rec_enabled = boolean(call.args[0]) if call.args else True

    def _set_rec_mode(self, call: Call) -> None:
        self._rec_mode = choice(call.arg(), ("MANUal", "AUTOmatic"))

    def _set_rec_num(self, call: Call) -> None:
        word = call.arg().strip().upper()
        if word in ("INF", "INFINITY"):
            self._rec_num = 0
            return
        v = number(word)
        if not float(v).is_integer() or v < 0:
            raise ScpiError(-222, f"record number {word}")
        self._rec_num = int(v)

    def _time_arg(self, call: Call) -> int:
        v = number(call.arg(), "TB")
        if not float(v).is_integer() or v <= 0:
            raise ScpiError(-222, f"{call.header}: {v:g} TB is not a positive whole number of TB")
        return int(v)

    def _set_pwid(self, call: Call) -> None:
        if self._playing:
            raise ScpiError(-221, "stop the record first")
        self._pwid = self._time_arg(call)

    def _set_pper(self, call: Call) -> None:
        if self._playing:
            raise ScpiError(-221, "stop the record first")
        self._pper = self._time_arg(call)

    def _set_leds(self, call: Call) -> None:
        call.nargs(0, 1)
        self._leds = boolean(call.args[0]) if call.args else True

    def _rec_play(self, call: Call) -> None:
        call.nargs(0)
        if not self._rec_enabled:
            raise ScpiError(-221, "RECord is disabled (REC:ENAB ON)")
        if self._pper < self._pwid + MIN_GAP_PS:
            raise ScpiError(-221, f"PPER must exceed PWID by at least {MIN_GAP_PS} TB")
        if self._playing:
            return
        self._ensure_source()
        self._offset = self._stream_time
        self._play_wall = time.monotonic()
        self._k = 0
        self._carry = [np.empty(0, np.int64) for _ in range(self.n_inputs)]
        self._playing = True

    def _rec_stop(self, call: Call) -> None:
        call.nargs(0)
        self._playing = False

    def _q_counter(self, call: Call) -> str:
        i = self._inp(call)
        rate = self._rate_hz(i)
        return str(int(round(rate * self._inte_ms[i] / 1000.0)))

    # -- the tag source ---------------------------------------------------------------------------------
    def _ensure_source(self) -> None:
        if self._stream is not None:
            return
        opts = self.opts
        if opts["source"] == "bench":
            from drivers.sim.bench.config import DETECTORS, default_config
            from drivers.sim.bench.model import BenchModel

            model = BenchModel(default_config(seed=int(opts["seed"])))
            if opts["bench_state"] == "shared" and self.state is not None and self.state.detector_count >= DETECTORS:
                model.state = self.state  # a view onto the daemon's bench: one BenchState, shared by every simulator
            self._model = model
            self._source = model
            channels = model.channel_count
        else:
            channels = max([c for c in self._bench_channels if c >= 0] + [1]) + 1
            pairs = [p for p in opts["pair_channels"] if len(p) == 2 and max(p) < channels]
            self._source = PoissonPairSource(
                channel_count=channels, singles_hz=[float(opts["singles_hz"])] * channels,
                pair_rate_hz=float(opts["pair_rate_hz"]) if pairs else 0.0, pair_channels=pairs or [[0, 0]],
                jitter_ps=float(opts["jitter_ps"]), delays_ps=[0] * channels, resolution_ps=1,
                seed=int(opts["seed"]), block_ps=10_000_000_000)
        lut = np.full(256, -1, np.int64)
        for i, c in enumerate(self._bench_channels):
            if 0 <= c < channels:
                lut[c] = i
        self._input_of = lut
        self._stream = BlockStream(self._source)
        self._stream_time = 0

    def _rate_hz(self, i: int) -> float:
        with self._lock:
            window = list(self._rate_window)
        if window:
            span = sum(w[0] for w in window)
            return float(sum(w[1][i] for w in window)) * PS_PER_S / span if span else 0.0
        c = self._bench_channels[i]
        if c < 0 or not self._enabled[i]:
            return 0.0
        if self.opts["source"] == "bench":
            self._ensure_source()
            singles = self._model.expected_rates()["singles_measured_hz"]
            return float(singles[c]) if c < len(singles) else 0.0
        pairs = [p for p in self.opts["pair_channels"] if len(p) == 2]
        share = sum(1 for p in pairs if c in p) / len(pairs) if pairs else 0.0
        return float(self.opts["singles_hz"]) + float(self.opts["pair_rate_hz"]) * share

    # -- the I/O thread ---------------------------------------------------------------------------------
    def _bind(self, ctx: zmq.Context, port: int) -> tuple[zmq.Socket, int]:
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        host = self.opts["host"]
        if port == 0:
            return sock, sock.bind_to_random_port(f"tcp://{host}")
        deadline = time.monotonic() + 3.0
        while True:  # the previous incarnation's port may take a moment to be released
            try:
                sock.bind(f"tcp://{host}:{port}")
                return sock, port
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    sock.close(linger=0)
                    raise
                time.sleep(0.05)

    def _run(self, ready: threading.Event, problem: list[BaseException]) -> None:
        ctx = zmq.Context()
        self._ctx = ctx
        scpi = dlt = None
        try:
            scpi, self._scpi_port = self._bind(ctx, self._scpi_port)
            dlt, self._dlt_port = self._bind(ctx, self._dlt_port)
        except BaseException as e:  # noqa: BLE001 - reported to start()
            problem.append(e)
            for s in (scpi, dlt):
                if s is not None:
                    s.close(linger=0)
            ctx.term()
            ready.set()
            return
        ready.set()
        try:
            while not self._stop_evt.is_set():
                while self._controls:
                    self._controls.popleft()()
                poller = zmq.Poller()
                if not self.stall_scpi:
                    poller.register(scpi, zmq.POLLIN)
                if not self.stall_dlt:
                    poller.register(dlt, zmq.POLLIN)
                events = dict(poller.poll(self._wait_ms()))
                if scpi in events:
                    self._serve_scpi(scpi)
                if dlt in events:
                    self._serve_dlt(dlt)
                self._advance()
                self._flush_backlogs()
        finally:
            with self._lock:
                for acq in self._acqs.values():
                    self._close_acq(acq, notify=False)
                self._acqs.clear()
                self._playing = False
            scpi.close(linger=0)
            dlt.close(linger=0)
            ctx.term()

    def _wait_ms(self) -> int:
        with self._lock:
            if not self._playing:
                return 20
            due = self._due(self._k)
        return int(min(20.0, max(0.0, (due - time.monotonic()) * 1000.0)))

    def _due(self, k: int) -> float:
        """Wall time at which sub-acquisition k ends."""
        return self._play_wall + (k * self._pper + self._pwid) / (float(self.opts["speed"]) * PS_PER_S)

    def _serve_scpi(self, sock: zmq.Socket) -> None:
        line = b"".join(sock.recv_multipart()).decode("latin-1")
        self.received_scpi.append(line)
        hook = self.reply_hook
        reply = hook(line) if hook is not None else None
        if reply is None:
            with self._lock:
                before = len(self._scpi.errors)
                out = self._scpi.handle_line(line)
                errors = self._scpi.errors[before:]
                if errors:
                    self._scpi.handle_line("*CLS")
            reply = ("Error: " + "; ".join(errors)) if errors else (out or "")
        sock.send_string(reply)

    def _serve_dlt(self, sock: zmq.Socket) -> None:
        line = b"".join(sock.recv_multipart()).decode("utf-8", errors="replace")
        self.received_dlt.append(line)
        hook = self.dlt_hook
        reply = hook(line) if hook is not None else None
        if reply is None:
            try:
                answer = self._dlt_command(line)
            except _DltError as e:
                answer = _error_answer(str(e))
            reply = json.dumps(answer)
        sock.send_string(reply)

    # -- DLT commands -----------------------------------------------------------------------------------
    _DLT_OPTIONS = {
        "start-stream": ({"--id": True, "--address": True, "--channel": True, "--stream-port": True,
                          "--with-ref-index": False}, ("--address", "--channel", "--stream-port")),
        "start-save": ({"--id": True, "--address": True, "--channel": True, "--filename": True, "--format": True,
                        "--with-ref-index": False}, ("--address", "--channel", "--filename")),
        "stop": ({"--id": True}, ("--id",)),
        "status": ({"--id": True}, ("--id",)),
        "list": ({}, ()),
    }

    def _dlt_command(self, line: str) -> Any:
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise _DltError(f"cannot parse command: {e}") from None
        if not words:
            raise _DltError("empty command")
        cmd, rest = words[0], words[1:]
        if cmd not in self._DLT_OPTIONS:
            raise _DltError(f"unknown command '{cmd}'")
        spec, required = self._DLT_OPTIONS[cmd]
        args: dict[str, Any] = {}
        i = 0
        while i < len(rest):
            word = rest[i]
            if word not in spec:
                raise _DltError(f"unrecognised option '{word}'")
            if spec[word]:
                if i + 1 >= len(rest):
                    raise _DltError(f"the required argument for option '{word}' is missing")
                args[word] = rest[i + 1]
                i += 2
            else:
                args[word] = True
                i += 1
        for key in required:
            if key not in args:
                raise _DltError(f"the option '{key}' is required but missing")
        with self._lock:
            if cmd == "list":
                return list(self._acqs)
            if cmd in ("stop", "status"):
                acq = self._acqs.get(args["--id"])
                if acq is None:
                    raise _DltError(f"no acquisition with id '{args['--id']}'")
                if cmd == "status":
                    return acq.status()
                self._close_acq(acq, notify=True)
                del self._acqs[acq.id]
                return {"status": acq.status()}
            return self._open_acq(cmd, args)

    def _open_acq(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        address = args["--address"]
        if address not in (self.opts["host"], "localhost"):
            raise _DltError(f"cannot reach a Time Controller at '{address}'")
        try:
            channel = int(args["--channel"])
        except ValueError:
            raise _DltError(f"the argument ('{args['--channel']}') for option '--channel' is invalid") from None
        if not 1 <= channel <= self.n_inputs:
            raise _DltError(f"channel {channel} does not exist (1-{self.n_inputs})")
        if any(a.channel == channel for a in self._acqs.values()):
            raise _DltError(f"channel {channel} is already acquired")
        with_ref = "--with-ref-index" in args
        if cmd == "start-stream":
            try:
                port = int(args["--stream-port"])
            except ValueError:
                raise _DltError(f"the argument ('{args['--stream-port']}') for option '--stream-port' is invalid") \
                    from None
            if not 0 < port < 65536:
                raise _DltError(f"invalid stream port {port}")
            acq_id = args.get("--id") or f"{address}:{port}"
            if acq_id in self._acqs:
                raise _DltError(f"an acquisition with id '{acq_id}' is already open")
            sock = self._ctx.socket(zmq.PAIR)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.bind(f"tcp://{self.opts['host']}:{port}")
            except zmq.ZMQError as e:
                sock.close(linger=0)
                raise _DltError(f"cannot open stream port {port}: {e}") from None
            self._acqs[acq_id] = _Acquisition(acq_id, channel, with_ref, sock=sock, port=port)
        else:
            path = args["--filename"]
            path = path if os.path.isabs(path) else os.path.join(self._save_dir, path)
            acq_id = args.get("--id") or f"{address}:{channel}:save"
            if acq_id in self._acqs:
                raise _DltError(f"an acquisition with id '{acq_id}' is already open")
            try:
                open(path, "wb").close()
            except OSError as e:
                raise _DltError(f"cannot open '{path}': {e.strerror}") from None
            self._acqs[acq_id] = _Acquisition(acq_id, channel, with_ref, path=path)
        return {"id": acq_id}

    def _close_acq(self, acq: _Acquisition, notify: bool) -> None:
        if acq.sock is not None:
            if notify:
                try:
                    acq.sock.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            acq.sock.close(linger=0)
            acq.sock = None

    def _send_on(self, channel: int, payload: bytes) -> None:
        with self._lock:
            for acq in self._acqs.values():
                if acq.channel == channel and acq.sock is not None:
                    acq.backlog.append(payload)
                    acq.backlog_records += len(payload) // STREAM_RECORD.itemsize
        self._flush_backlogs()

    # -- sub-acquisitions -------------------------------------------------------------------------------
    def _advance(self) -> None:
        """Generate and send every sub-acquisition whose end has passed (catching up if behind)."""
        while True:
            with self._lock:
                if not self._playing or time.monotonic() < self._due(self._k):
                    return
                self._subacquisition(self._k)
                self._k += 1
                self.subacquisitions += 1
                if self._rec_num and self._k >= self._rec_num:
                    self._playing = False

    def _subacquisition(self, k: int) -> None:
        pper, pwid, n = self._pper, self._pwid, self.n_inputs
        w0, w1 = k * pper, (k + 1) * pper
        ts, ch, overflow, _dropped = self._stream.take(self._offset + w1)
        self._stream_time = self._offset + w1
        dev = ts - self._offset
        inp = self._input_of[ch]
        amp = float(self.opts["pulse_amplitude_v"])
        inputs = []
        for i in range(n):
            live = self._enabled[i] and abs(self._threshold[i]) <= amp
            inputs.append(dev[inp == i] if live else np.empty(0, np.int64))
        delayed = []
        for m in range(n):  # DELA blocks: their linked input shifted by VALU, carried across sub-acquisitions
            link = self._dela_link[m]
            src = inputs[int(link[4:]) - 1] if link.startswith("INPU") else np.empty(0, np.int64)
            carry = np.concatenate((self._carry[m], src + self._delay[m]))
            if carry.shape[0] > 1 and np.any(np.diff(carry) < 0):
                carry = np.sort(carry, kind="stable")
            cut = int(np.searchsorted(carry, w1, side="left"))
            delayed.append(carry[:cut])
            self._carry[m] = carry[cut:]
        per_raw: list[np.ndarray] = []
        for r in range(n):
            link = self._raw_stop[r]
            if link.startswith("DELA"):
                t = delayed[int(link[4:]) - 1]
            elif link.startswith("INPU"):
                t = inputs[int(link[4:]) - 1]
            else:
                t = np.empty(0, np.int64)
            t = t[(t >= w0) & (t < w0 + pwid)]  # before w0: a delay was decreased; after PWID: dead time
            per_raw.append(t)
        self._rate_window.append((pwid, [len(inputs[i][(inputs[i] >= w0) & (inputs[i] < w0 + pwid)])
                                         for i in range(n)]))
        # losses: the tagger's rate limit, the bench tagger's own drops, injected losses
        lost = [False] * n
        limit = float(self.opts["max_rate_hz"])
        sending = [r for r in range(n) if self._raw_send[r]]
        if limit > 0 and sending:
            allowed = int(limit * pwid / PS_PER_S)
            total = sum(per_raw[r].shape[0] for r in sending)
            if total > allowed:
                merged = np.sort(np.concatenate([per_raw[r] for r in sending]))
                cutoff = merged[allowed]
                for r in sending:
                    keep = per_raw[r] < cutoff
                    if not keep.all():
                        per_raw[r] = per_raw[r][keep]
                        lost[r] = True
        for r in sending:
            if overflow:
                lost[r] = True
            if self._lose.get(r + 1, 0) > 0:
                self._lose[r + 1] -= 1
                per_raw[r] = per_raw[r][:0]
                lost[r] = True
            if lost[r]:
                self._raw_errors[r] += 1
        # to the DLT
        mask = (1 << int(self.opts["ref_index_bits"])) - 1
        now = time.monotonic()
        for acq in self._acqs.values():
            r = acq.channel - 1
            if not self._raw_send[r]:
                continue
            t = per_raw[r]
            acq.last_rx = now
            if self.record_sent:
                self.sent[acq.channel].append(t.copy())
            if not t.shape[0]:
                acq.acquisitions_count += 1
                continue
            if acq.with_ref:
                rec = np.empty(t.shape[0], STREAM_RECORD)
                rec["timestamp"] = (t - w0).astype(np.uint64)
                rec["ref_index"] = np.uint64(k & mask)
            else:
                rec = (t - w0).astype("<u8")
            if acq.path is not None:
                with open(acq.path, "ab") as fh:
                    fh.write(rec.tobytes())
                acq.timestamps_count += int(rec.shape[0])
                acq.acquisitions_count += 1
                continue
            step = int(self.opts["max_message_records"])
            for s in range(0, rec.shape[0], step):
                chunk = rec[s:s + step]
                if acq.backlog_records + chunk.shape[0] > int(self.opts["max_backlog_records"]):
                    acq.errors.append({"description": "timestamps lost: the stream client does not keep up"})
                    break
                acq.backlog.append(chunk.tobytes())
                acq.backlog_records += chunk.shape[0]
                acq.timestamps_count += int(chunk.shape[0])  # forwarded, then the end is counted
            acq.acquisitions_count += 1

    def _flush_backlogs(self) -> None:
        with self._lock:
            for acq in self._acqs.values():
                while acq.backlog and acq.sock is not None:
                    payload = acq.backlog[0]
                    try:
                        acq.sock.send(payload, zmq.NOBLOCK)
                    except zmq.Again:
                        break  # no peer yet, or its queue is full: keep it for later
                    acq.backlog.popleft()
                    acq.backlog_records -= len(payload) // STREAM_RECORD.itemsize


class _DltError(Exception):
    """A DLT command failed: answered as {"error": {"description": ...}}."""
