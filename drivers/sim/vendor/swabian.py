"""Stand-in of the Swabian Instruments Time Tagger Python API (``Swabian.TimeTagger`` / ``TimeTagger``).

The vendor library cannot run here (no hardware, no licence: ``createTimeTaggerVirtual()`` raises
``RuntimeError: No license file found or no Time Tagger connected``), so drivers.swabian is tested against
this module, which the driver imports instead when its option ``api_module = "drivers.sim.vendor.swabian"``.
It is built from the documented behaviour (/work/shared/protocols.md 4.1, /work/shared/timetags.md 1, the
vendor's examples and its "Time-tag streaming" page); it is not vendor code.

What it models, with the same names, signatures and return types:

* ``createTimeTagger(serial="", resolution=Resolution.Standard)`` / ``freeTimeTagger(t)``; RuntimeError when
  no (or no matching) device is plugged in or the device is already open; ``scanTimeTagger()``.
* a tagger: ``getSerial``, ``getModel``, ``getChannelList(type)``, ``setTriggerLevel(ch, volts)``,
  ``setInputDelay(ch, ps)`` / ``setDeadtime(ch, ps)`` (integer picoseconds: a float is a TypeError),
  ``getInputDelay``, ``getDeadtime``, ``getTriggerLevel``, ``setTestSignal``, ``sync``,
  ``getOverflows`` / ``clearOverflows`` / ``getOverflowsAndClear``. Physical inputs are numbered from 1;
  falling edges are the negative numbers.
* ``TimeTagStream(tagger, n_max_events, channels)``: starts on creation; ``start``/``stop``/``isRunning``/
  ``clear``/``getCounts``; ``getData()`` returns a ``TimeTagStreamBuffer`` and clears the stream's buffer
  (each tag is returned once). A buffer holds at most ``n_max_events`` events: events arriving after it is
  full are discarded, so ``size == n_max_events`` means events were probably lost.
* ``TimeTagStreamBuffer``: ``getTimestamps()`` int64 ps, ``getChannels()`` int32, ``getEventTypes()`` uint8
  (0 TimeTag, 1 Error, 2 OverflowBegin, 3 OverflowEnd, 4 MissedEvents), ``getMissedEvents()`` uint16,
  attributes ``size`` and ``hasOverflows``, and ``tStart`` / ``tGetData`` (device time of the start of the
  buffer and of the getData call). **tStart/tGetData are from memory of the vendor API reference, not from
  a stored primary source**; the driver works without them (``use_buffer_times = false``), and
  :attr:`SwabianHardware.buffer_times` switches them off here so both paths are tested.
* time: int64 ps from device start-up, wrapping like an int64 after about 106.75 days (to -2^63, counting
  up); :attr:`SwabianHardware.start_time_ps` sets the device's uptime at power-up so a test reaches the wrap.
* overflows: while the tagger overflows, its tags are lost; the stream carries an OverflowBegin event where
  the loss starts, an OverflowEnd where it ends, then MissedEvents events (per input, the lost count as
  uint16, split over several events above 65535). A source that drops tags (the bench's ``max_rate_hz``)
  produces the same, with all missed events booked on the stream's first input (the source does not say
  which channels lost tags).

What it does not model: trigger levels, dead times and the test signal are recorded, not applied (the
bench's detectors and tagger have their own dead time); falling edges carry no tags; no conditional filter,
virtual channels, event divider or other measurements; input delays are limited to
``[-latency_ps, ~1 s]`` (a stand-in choice, not the vendor's range); no licence checks.

Where the data come from: each device (:class:`SwabianHardware`) reads a block source (the optical bench or
a PoissonPairSource; input k is the source's channel k - 1). Put it on the stand-in USB bus with
:func:`plug`, or pass a block source (or a SwabianHardware) in place of the serial number to
``createTimeTagger``: the simulated testbed does that with ``serial = "sim://bench"``, which the daemon
turns into its running bench.

Test controls on SwabianHardware: ``advance(ps)``, ``unplug()`` / ``replug()`` (every call on an open
tagger or stream then raises RuntimeError), ``inject_overflow(duration_ps)``,
``inject_missed_events(channel, count)``, ``inject_error()``, ``calls`` (what the driver called),
``buffer_times``, ``start_time_ps``; and ``BUS`` / :func:`unplug_all` for cleanup.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from drivers.sim.vendor._hardware import Bus, SimInputs

__all__ = [
    "BUS", "ChannelEdge", "Resolution", "SwabianHardware", "TagType", "TimeTagStream", "TimeTagStreamBuffer",
    "TimeTagger", "createTimeTagger", "freeTimeTagger", "getVersion", "plug", "scanTimeTagger", "unplug_all",
]

_U64 = 1 << 64
MAX_MISSED_PER_EVENT = 0xFFFF  # the uint16 field of a tag


class TagType(enum.IntEnum):
    TimeTag = 0
    Error = 1
    OverflowBegin = 2
    OverflowEnd = 3
    MissedEvents = 4


class ChannelEdge(enum.IntEnum):
    All = 0
    Rising = 1
    Falling = 2


class Resolution(enum.IntEnum):
    Standard = 0
    HighResA = 1
    HighResB = 2
    HighResC = 3


BUS = Bus()


def getVersion() -> str:
    return "stand-in (drivers.sim.vendor.swabian)"


class _Events:
    """A sorted chunk of stream events, columns as in the vendor's tag format."""

    __slots__ = ("ch", "me", "t", "ty")

    def __init__(self, t: np.ndarray, ch: np.ndarray, ty: np.ndarray, me: np.ndarray) -> None:
        self.t, self.ch, self.ty, self.me = t, ch, ty, me

    @classmethod
    def empty(cls) -> _Events:
        return cls(np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.uint8), np.empty(0, np.uint16))

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def select(self, mask: np.ndarray | slice) -> _Events:
        return _Events(self.t[mask], self.ch[mask], self.ty[mask], self.me[mask])

    @staticmethod
    def concat(parts: list[_Events]) -> _Events:
        parts = [p for p in parts if len(p)]
        if not parts:
            return _Events.empty()
        if len(parts) == 1:
            return parts[0]
        return _Events(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("t", "ch", "ty", "me")))


class SwabianHardware:
    """One simulated Time Tagger on the stand-in USB bus, reading a block source.

    ``speed``/``step_ps``: see drivers/sim/vendor/_hardware.py (0 and 0: the clock moves only by
    :meth:`advance`). ``latency_ps``: the most negative input delay modelled.
    """

    def __init__(self, source: Any, *, serial: str = "1910000SIM", model: str = "Time Tagger Ultra",
                 channels: int | None = None, speed: float = 0.0, step_ps: int = 0,
                 latency_ps: int = 100_000_000, start_time_ps: int = 0, buffer_times: bool = True) -> None:
        self.inputs = SimInputs(source, channel_count=channels, speed=speed, step_ps=step_ps, latency_ps=latency_ps)
        self.serial = serial
        self.model = model
        self.start_time_ps = int(start_time_ps)
        self.buffer_times = buffer_times
        self.calls: list[tuple[str, tuple]] = []
        self.trigger_levels_v: dict[int, float] = {}
        self.deadtimes_ps: dict[int, int] = {}
        self.input_delays_ps: dict[int, int] = {}
        self.test_signal: set[int] = set()
        self.overflows = 0  # tags lost in overflows since clearOverflows
        self.lost_by_truncation = 0  # events discarded because a stream buffer was full
        self._lock = threading.RLock()
        self._streams: list[TimeTagStream] = []
        self._open: TimeTagger | None = None
        self._overflow: tuple[int, int] | None = None  # injected [start, end) device time
        self._overflow_missed: np.ndarray | None = None
        self._pending: list[_Events] = []  # injected events not yet delivered

    # -- test controls -------------------------------------------------------------------------------------
    def advance(self, picoseconds: int) -> None:
        self.inputs.advance(picoseconds)

    def unplug(self) -> None:
        """Pull the USB cable: open taggers and streams raise RuntimeError; createTimeTagger finds nothing."""
        with self._lock:
            self.inputs.plugged = False

    def replug(self) -> None:
        with self._lock:
            self.inputs.plugged = True
            self.inputs.discard()  # what happened while unplugged is gone
            if self._open is not None:  # the old handle stays dead: the driver must create a new one
                self._open._dead = True
                self._open = None
                self._streams.clear()

    def inject_overflow(self, duration_ps: int) -> None:
        """Overflow from now for duration_ps of device time: tags there are lost and reported as such."""
        with self._lock:
            start = self.inputs.emitted_ps
            start = max(start, self.inputs.now_ps())
            self._overflow = (start, start + int(duration_ps))
            self._overflow_missed = np.zeros(self.inputs.channel_count + 1, np.int64)

    def inject_missed_events(self, channel: int, count: int) -> None:
        """A MissedEvents event on input ``channel`` (1-based) at the current time."""
        with self._lock:
            t = self.inputs.now_ps()
            self._pending.append(_missed_events(t, {int(channel): int(count)}))

    def inject_error(self) -> None:
        """An Error event at the current time (the vendor's "something went wrong in the data path")."""
        with self._lock:
            t = self.inputs.now_ps()
            self._pending.append(_Events(np.array([t], np.int64), np.zeros(1, np.int32),
                                         np.array([TagType.Error], np.uint8), np.zeros(1, np.uint16)))

    # -- device time -----------------------------------------------------------------------------------
    def device_time(self, t: int | np.ndarray) -> Any:
        """Internal time -> what the tagger reports: ps since power-up, wrapping like an int64."""
        off = np.uint64(self.start_time_ps % _U64)
        if isinstance(t, np.ndarray):
            return (t.astype(np.int64).view(np.uint64) + off).view(np.int64)
        v = (int(t) + self.start_time_ps) % _U64
        return v - _U64 if v >= 1 << 63 else v

    # -- data path -------------------------------------------------------------------------------------
    def require(self, what: str) -> None:
        if not self.inputs.plugged:
            raise RuntimeError(f"{what}: Time Tagger {self.serial} is not connected (USB link lost)")

    def pump(self) -> None:
        """Move device time to now and hand the new events to every running stream."""
        with self._lock:
            running = [s for s in self._streams if s._running]
            if not running or not self.inputs.plugged:
                self.inputs.discard()
                return
            chunk = self.inputs.take()
            ev = self._events(chunk)
            for s in running:
                s._append(ev)

    def _events(self, chunk: Any) -> _Events:
        ts = chunk.timestamps
        ch = chunk.channels.astype(np.int32) + 1  # input k is source channel k - 1
        n = len(ts)
        ev = _Events(ts, ch, np.zeros(n, np.uint8), np.zeros(n, np.uint16))
        extra: list[_Events] = []
        if self._overflow is not None:
            a, b = self._overflow
            lost = (ev.t >= a) & (ev.t < b)
            if lost.any():
                self._overflow_missed += np.bincount(ev.ch[lost], minlength=len(self._overflow_missed))
                self.overflows += int(lost.sum())
                ev = ev.select(~lost)
            if chunk.begin <= a < chunk.end:
                extra.append(_marker(a, TagType.OverflowBegin))
            if chunk.begin <= b - 1 < chunk.end:
                extra.append(_marker(b - 1, TagType.OverflowEnd))
                counts = {int(c): int(k) for c, k in enumerate(self._overflow_missed) if k}
                extra.append(_missed_events(b - 1, counts))
                self._overflow = None
        first = 1
        if self._streams:
            phys = [c for c in self._streams[0]._channels if c > 0]
            first = min(phys) if phys else 1
        for a, b, dropped in ([(chunk.begin, chunk.end, chunk.dropped)] if chunk.dropped else []) + (
                [(chunk.skipped[0], chunk.skipped[1], 0)] if chunk.skipped else []):
            self.overflows += dropped
            extra += [_marker(a, TagType.OverflowBegin), _marker(b - 1, TagType.OverflowEnd)]
            if dropped:
                extra.append(_missed_events(b - 1, {first: dropped}))
        if self._pending:
            for p in self._pending:  # injected at "now" of the call: clamp into this chunk
                p.t[:] = np.clip(p.t, chunk.begin, max(chunk.begin, chunk.end - 1))
            extra += self._pending
            self._pending = []
        if extra:
            ev = _Events.concat([ev, *extra])
            order = np.argsort(ev.t, kind="stable")
            ev = ev.select(order)
        ev.t = self.device_time(ev.t)
        return ev

    # -- API bookkeeping -------------------------------------------------------------------------------
    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))


def _marker(t: int, ty: TagType) -> _Events:
    return _Events(np.array([t], np.int64), np.zeros(1, np.int32), np.array([ty], np.uint8), np.zeros(1, np.uint16))


def _missed_events(t: int, counts: dict[int, int]) -> _Events:
    chans, missed = [], []
    for ch, k in sorted(counts.items()):
        while k > 0:
            chans.append(ch)
            missed.append(min(k, MAX_MISSED_PER_EVENT))
            k -= MAX_MISSED_PER_EVENT
    n = len(chans)
    return _Events(np.full(n, t, np.int64), np.array(chans, np.int32), np.full(n, TagType.MissedEvents, np.uint8),
                   np.array(missed, np.uint16))


def plug(device: Any) -> SwabianHardware:
    """Plug a SwabianHardware into the stand-in bus, or attach one over a block source (once per source,
    running in real time: speed 1)."""
    if isinstance(device, SwabianHardware):
        return BUS.plug(device)
    return BUS.attach(device, lambda src: SwabianHardware(src, speed=1.0))  # a bench runs in real time


def unplug_all() -> None:
    """Empty the stand-in bus (test cleanup)."""
    BUS.clear()


def scanTimeTagger() -> list[str]:
    return [d.serial for d in BUS.devices()]


def createTimeTagger(serial: Any = "", resolution: Resolution = Resolution.Standard) -> TimeTagger:
    """Open a tagger by serial ("" = the first one found). The stand-in also takes a SwabianHardware or a
    block source in place of the serial (the simulated testbed's ``serial = "sim://bench"``)."""
    if isinstance(serial, str):
        found = [d for d in BUS.devices() if serial in ("", d.serial)]
        if not found:
            what = f"with serial {serial!r} " if serial else ""
            raise RuntimeError(f"No Time Tagger {what}found (stand-in bus: {scanTimeTagger() or 'empty'})")
        hw = found[0]
    else:
        hw = plug(serial)
        if not hw.inputs.plugged:
            raise RuntimeError(f"No Time Tagger with serial {hw.serial!r} found")
    with hw._lock:
        if hw._open is not None:
            raise RuntimeError(f"The Time Tagger {hw.serial} is already in use")
        t = TimeTagger(hw, Resolution(resolution))
        hw._open = t
        hw._record("createTimeTagger", serial if isinstance(serial, str) else "<device>", int(resolution))
    return t


def freeTimeTagger(tagger: TimeTagger) -> bool:
    hw = tagger._hw
    with hw._lock:
        for s in list(hw._streams):
            if s._tagger is tagger:
                s._running = False
                hw._streams.remove(s)
        if hw._open is tagger:
            hw._open = None
        tagger._dead = True
        hw._record("freeTimeTagger")
    return True


def _int_ps(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}: expected an integer number of picoseconds, got {type(value).__name__}")
    return int(value)


class TimeTagger:
    """An open Time Tagger (what createTimeTagger returns)."""

    def __init__(self, hw: SwabianHardware, resolution: Resolution) -> None:
        self._hw = hw
        self._resolution = resolution
        self._dead = False

    def _check(self, what: str) -> SwabianHardware:
        if self._dead:
            raise RuntimeError(f"{what}: this Time Tagger object was freed or its device was re-plugged")
        self._hw.require(what)
        return self._hw

    def _channel(self, channel: Any, what: str) -> int:
        hw = self._hw
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
            raise TypeError(f"{what}: channel must be an integer")
        if not 1 <= abs(int(channel)) <= hw.inputs.channel_count:
            raise ValueError(f"{what}: channel {channel} does not exist on this {hw.model}")
        return int(channel)

    def getSerial(self) -> str:
        return self._check("getSerial").serial

    def getModel(self) -> str:
        return self._check("getModel").model

    def getChannelList(self, type: ChannelEdge = ChannelEdge.All) -> list[int]:
        hw = self._check("getChannelList")
        n = hw.inputs.channel_count
        rising, falling = list(range(1, n + 1)), [-c for c in range(1, n + 1)]
        if type == ChannelEdge.Rising:
            return rising
        if type == ChannelEdge.Falling:
            return falling
        return rising + falling

    def setTriggerLevel(self, channel: int, voltage: float) -> None:
        hw = self._check("setTriggerLevel")
        ch = self._channel(channel, "setTriggerLevel")
        hw.trigger_levels_v[abs(ch)] = float(voltage)
        hw._record("setTriggerLevel", ch, float(voltage))

    def getTriggerLevel(self, channel: int) -> float:
        hw = self._check("getTriggerLevel")
        return hw.trigger_levels_v.get(abs(self._channel(channel, "getTriggerLevel")), 0.5)

    def setInputDelay(self, channel: int, delay: int) -> None:
        hw = self._check("setInputDelay")
        ch = self._channel(channel, "setInputDelay")
        ps = _int_ps(delay, "setInputDelay")
        if ch > 0:
            hw.inputs.set_delay(ch - 1, ps)  # ValueError outside the modelled range
        hw.input_delays_ps[ch] = ps
        hw._record("setInputDelay", ch, ps)

    def getInputDelay(self, channel: int) -> int:
        hw = self._check("getInputDelay")
        return hw.input_delays_ps.get(self._channel(channel, "getInputDelay"), 0)

    def setDeadtime(self, channel: int, deadtime: int) -> int:
        hw = self._check("setDeadtime")
        ch = self._channel(channel, "setDeadtime")
        ps = _int_ps(deadtime, "setDeadtime")
        if ps < 0:
            raise ValueError("setDeadtime: the dead time must not be negative")
        hw.deadtimes_ps[ch] = ps
        hw._record("setDeadtime", ch, ps)
        return ps

    def getDeadtime(self, channel: int) -> int:
        hw = self._check("getDeadtime")
        return hw.deadtimes_ps.get(self._channel(channel, "getDeadtime"), 2000)

    def setTestSignal(self, channels: int | Iterable[int], state: bool) -> None:
        hw = self._check("setTestSignal")
        chans = [channels] if isinstance(channels, (int, np.integer)) else list(channels)
        for c in chans:
            (hw.test_signal.add if state else hw.test_signal.discard)(self._channel(c, "setTestSignal"))
        hw._record("setTestSignal", tuple(chans), bool(state))

    def sync(self) -> None:
        self._check("sync")._record("sync")

    def getOverflows(self) -> int:
        return int(self._check("getOverflows").overflows)

    def clearOverflows(self) -> None:
        self._check("clearOverflows").overflows = 0

    def getOverflowsAndClear(self) -> int:
        hw = self._check("getOverflowsAndClear")
        n, hw.overflows = hw.overflows, 0
        return int(n)


class TimeTagStreamBuffer:
    """What TimeTagStream.getData() returns."""

    def __init__(self, ev: _Events, t_start: int, t_get: int, has_overflows: bool) -> None:
        self._ev = ev
        self.size = len(ev)
        self.hasOverflows = bool(has_overflows)
        self.tStart = t_start
        self.tGetData = t_get

    def getTimestamps(self) -> np.ndarray:
        return self._ev.t.copy()

    def getChannels(self) -> np.ndarray:
        return self._ev.ch.copy()

    def getEventTypes(self) -> np.ndarray:
        return self._ev.ty.copy()

    def getMissedEvents(self) -> np.ndarray:
        return self._ev.me.copy()


class _BufferWithoutTimes(TimeTagStreamBuffer):
    def __getattribute__(self, name: str) -> Any:
        if name in ("tStart", "tGetData"):
            raise AttributeError(name)
        return super().__getattribute__(name)


class TimeTagStream:
    """Raw access to the tag stream of the listed channels; starts collecting on creation."""

    def __init__(self, tagger: TimeTagger, n_max_events: int, channels: Iterable[int]) -> None:
        hw = tagger._check("TimeTagStream")
        if isinstance(n_max_events, bool) or not isinstance(n_max_events, (int, np.integer)) or n_max_events < 1:
            raise ValueError("TimeTagStream: n_max_events must be a positive integer")
        self._tagger = tagger
        self._hw = hw
        self._n_max = int(n_max_events)
        self._channels = [tagger._channel(c, "TimeTagStream") for c in channels]
        self._chan_arr = np.array(sorted(set(self._channels)), np.int32)
        self._parts: list[_Events] = []
        self._count = 0
        self._running = False
        self._in_overflow = False
        with hw._lock:
            hw.pump()  # earlier data belongs to earlier streams
            hw._streams.append(self)
            self._running = True
            self._t_start = hw.inputs.emitted_ps
        hw._record("TimeTagStream", self._n_max, tuple(self._channels))

    def _append(self, ev: _Events) -> None:
        keep = (np.isin(ev.ch, self._chan_arr) & ((ev.ty == TagType.TimeTag) | (ev.ty == TagType.MissedEvents))) | (
            (ev.ty != TagType.TimeTag) & (ev.ty != TagType.MissedEvents))
        ev = ev.select(keep)
        room = self._n_max - self._count
        if len(ev) > room:
            self._hw.lost_by_truncation += len(ev) - room
            ev = ev.select(slice(0, room))
        if len(ev):
            self._parts.append(ev)
            self._count += len(ev)

    def _check(self, what: str) -> SwabianHardware:
        return self._tagger._check(what)

    def start(self) -> None:
        hw = self._check("start")
        with hw._lock:
            if not self._running:
                hw.pump()
                self._running = True
                if not self._parts:
                    self._t_start = hw.inputs.emitted_ps

    def startFor(self, capture_duration: int, clear: bool = True) -> None:  # accepted, duration not modelled
        if clear:
            self.clear()
        self.start()

    def stop(self) -> None:
        hw = self._check("stop")
        with hw._lock:
            if self._running:
                hw.pump()
                self._running = False

    def isRunning(self) -> bool:
        self._check("isRunning")
        return self._running

    def clear(self) -> None:
        hw = self._check("clear")
        with hw._lock:
            hw.pump()
            self._parts, self._count = [], 0
            self._t_start = hw.inputs.emitted_ps

    def getCounts(self) -> int:
        hw = self._check("getCounts")
        hw.pump()
        return self._count

    def getData(self) -> TimeTagStreamBuffer:
        hw = self._check("getData")
        with hw._lock:
            if self._running:
                hw.inputs.step()
                hw.pump()
            ev = _Events.concat(self._parts)
            markers = (ev.ty == TagType.OverflowBegin) | (ev.ty == TagType.OverflowEnd)
            has_ovf = self._in_overflow or bool(markers.any())
            idx = np.flatnonzero(markers)
            if idx.size:
                self._in_overflow = bool(ev.ty[idx[-1]] == TagType.OverflowBegin)
            t_end = hw.inputs.emitted_ps
            cls = TimeTagStreamBuffer if hw.buffer_times else _BufferWithoutTimes
            buf = cls(ev, hw.device_time(self._t_start), hw.device_time(t_end), has_ovf)
            self._parts, self._count = [], 0
            self._t_start = t_end
            return buf

    def __del__(self) -> None:  # a measurement detaches from its tagger when garbage-collected
        try:
            self._hw._streams.remove(self)
        except (ValueError, AttributeError):
            pass
