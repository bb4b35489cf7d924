"""Machinery shared by the vendor stand-ins: the physical side of a simulated tagger, and a USB bus.

:class:`SimInputs` is what a stand-in's "hardware" sees: a block source (the optical bench's
:class:`~drivers.sim.bench.model.BenchModel` or :class:`~drivers.sim.tagstream.PoissonPairSource`) read
through a :class:`~drivers.sim.tagstream.BlockStream`, a device clock, and per-input delays. Stand-ins turn
what it hands out into their vendor's data format (Swabian event buffers, quTAG tick rings).

Delays: block sources only delay tags (a delay moves a tag later), and a stand-in must also model negative
input delays. So every input gets a fixed extra delay of ``latency_ps`` inside the source, and the device
clock runs ``latency_ps`` behind the source's: an input delay ``d`` becomes the source delay
``base + latency_ps + d``, which is >= 0 for every ``d >= -latency_ps``. Relative timing is exact; the
only visible effect is that tags are handed out ``latency_ps`` of source time later, like a real tagger's
processing latency. ``base`` is whatever delay the source already had (the bench's configured
``input_delays_ps``); the stand-in adds to it and never loses it.

Clock: device time starts at 0 when the hardware object is made ("power-up") and advances with the wall
clock at ``speed`` simulated seconds per second; with ``speed = 0`` it advances only when a test calls
:meth:`SimInputs.advance`, or by ``step_ps`` each time the vendor API reads data (deterministic and fast).

A vendor library is process-global state (the devices on the USB bus, the DLL's connection), so the
stand-ins keep a module-level :class:`Bus`; this is the one place this code base has module-level mutable
state, on purpose, because the thing being imitated has it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.sim.tagstream import BlockStream

__all__ = ["PS_PER_S", "Bus", "Chunk", "SimInputs"]

PS_PER_S = 1_000_000_000_000
MAX_SOURCE_DELAY_PS = 1_000_000_000_000  # what the bench accepts (BenchModel.set_input_delay)


@dataclass(frozen=True)
class Chunk:
    """Tags the inputs produced in device time ``[begin, end)``.

    ``timestamps`` int64 ps (device time, sorted), ``channels`` uint8 source channels (0-based);
    ``dropped`` > 0 if the source's own rate limit dropped tags in this range (a tagger overflow);
    ``skipped`` is ``(a, b)`` if the stand-in did not simulate device time ``[a, b)`` at all (see
    :attr:`SimInputs.max_catchup_ps`).
    """

    begin: int
    end: int
    timestamps: np.ndarray
    channels: np.ndarray
    dropped: int = 0
    skipped: tuple[int, int] | None = None


class SimInputs:
    """A block source seen through a tagger's inputs: device clock, per-input delays, plugged state."""

    #: Device time a single read may have to simulate at most. After a longer pause (a stream nobody read
    #: for minutes of simulated time) the stand-in skips all but the last ``max_catchup_ps`` and reports
    #: the skipped span (Chunk.skipped) so the vendor layer can flag it: the data there were not simulated.
    max_catchup_ps = 10 * PS_PER_S

    def __init__(self, source: Any, *, channel_count: int | None = None, speed: float = 0.0, step_ps: int = 0,
                 latency_ps: int = 0) -> None:
        if speed < 0 or step_ps < 0 or latency_ps < 0:
            raise ValueError("speed, step_ps and latency_ps must be >= 0")
        self.source = source
        self.source_channels = int(source.channel_count)
        self.channel_count = int(channel_count if channel_count is not None else self.source_channels)
        self.speed = float(speed)
        self.step_ps = int(step_ps)
        self.lock = threading.RLock()
        self._stream = BlockStream(source)
        base = _source_delays(source)
        self._base: list[int] | None = None if base is None else [int(d) for d in base]
        self.latency_ps = int(latency_ps) if self._base is not None else 0
        self.delays_ps = [0] * self.channel_count  # per input, 0-based
        if self._base is not None and self.latency_ps:
            for ch in range(min(self.source_channels, self.channel_count)):
                _set_source_delay(source, ch, self._base[ch] + self.latency_ps)
        self._manual = 0
        self._wall0 = time.monotonic()
        self._emitted = 0  # device time up to which tags were handed out (or skipped)
        self.plugged = True

    # -- clock -------------------------------------------------------------------------------------------
    def now_ps(self) -> int:
        t = self._manual
        if self.speed > 0:
            t += int((time.monotonic() - self._wall0) * self.speed * PS_PER_S)
        return t

    def advance(self, picoseconds: int) -> None:
        """Move the device clock forward (tests; with speed > 0 it moves on its own as well)."""
        if picoseconds < 0:
            raise ValueError("time only runs forward")
        with self.lock:
            self._manual += int(picoseconds)

    def step(self) -> None:
        """One read by the vendor API: with speed 0 and step_ps > 0 the clock moves by step_ps."""
        if self.speed == 0 and self.step_ps:
            with self.lock:
                self._manual += self.step_ps

    @property
    def emitted_ps(self) -> int:
        return self._emitted

    # -- tags --------------------------------------------------------------------------------------------
    def take(self) -> Chunk:
        """All tags from the last take (or discard) up to now, in device time."""
        with self.lock:
            now = self.now_ps()
            begin = self._emitted
            if now <= begin:
                return Chunk(begin, begin, np.empty(0, np.int64), np.empty(0, np.uint8))
            skipped = None
            if now - begin > self.max_catchup_ps:
                resume = now - self.max_catchup_ps
                self._stream.skip_to(resume + self.latency_ps)
                skipped = (begin, resume)
                begin = resume
            ts, ch, overflow, dropped = self._stream.take(now + self.latency_ps)
            if self.latency_ps:
                ts = ts - self.latency_ps
            self._emitted = now
            if len(ts) and ts[0] < begin:  # jitter at the very start: no tag precedes the device's time origin
                cut = int(np.searchsorted(ts, begin))
                ts, ch = ts[cut:], ch[cut:]
            keep = ch < self.channel_count
            if not keep.all():
                ts, ch = ts[keep], ch[keep]
            return Chunk(skipped[0] if skipped else begin, now, ts, ch, int(dropped) if overflow else 0, skipped)

    def discard(self) -> None:
        """Let device time pass without generating tags (nothing is listening)."""
        with self.lock:
            now = self.now_ps()
            if now > self._emitted:
                self._stream.skip_to(now + self.latency_ps)
                self._emitted = now

    # -- delays ------------------------------------------------------------------------------------------
    @property
    def delay_range_ps(self) -> tuple[int, int]:
        """Input delays this stand-in can model: [-latency_ps, ...] (only [0, 0] if the source has none)."""
        if self._base is None:
            return (0, 0)
        return (-self.latency_ps, MAX_SOURCE_DELAY_PS - self.latency_ps - max(self._base, default=0))

    def set_delay(self, channel: int, picoseconds: int) -> None:
        """Delay one input (0-based) by ``picoseconds``; effective for tags generated from now on."""
        lo, hi = self.delay_range_ps
        if not lo <= picoseconds <= hi:
            raise ValueError(f"input delay {picoseconds} ps is outside the modelled range [{lo}, {hi}] ps")
        with self.lock:
            self.delays_ps[channel] = int(picoseconds)
            if self._base is not None and channel < self.source_channels:
                _set_source_delay(self.source, channel, self._base[channel] + self.latency_ps + int(picoseconds))


def _source_delays(source: Any) -> list[int] | None:
    """The per-channel delays a source already applies, or None if it cannot delay channels."""
    if hasattr(source, "input_delays_ps") and hasattr(source, "set_input_delay"):  # BenchModel
        return list(source.input_delays_ps)
    if hasattr(source, "delays_ps"):  # PoissonPairSource
        d = np.asarray(source.delays_ps, np.int64)
        if len(d) == 0:
            d = np.zeros(int(source.channel_count), np.int64)
            source.delays_ps = d
        return [int(x) for x in d]
    return None


def _set_source_delay(source: Any, channel: int, picoseconds: int) -> None:
    if hasattr(source, "set_input_delay"):
        source.set_input_delay(channel, int(picoseconds))
    else:
        delays = np.asarray(source.delays_ps, np.int64).copy()
        delays[channel] = int(picoseconds)
        source.delays_ps = delays


class Bus:
    """The stand-in's view of the USB bus: hardware objects that are plugged in, found by serial.

    ``attach(source, make)`` returns the hardware built over a block source, building it once per source
    (a reconnecting driver finds the same hardware, with its clock and delays, like a real device).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: list[Any] = []
        self._by_source: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def plug(self, device: Any) -> Any:
        with self._lock:
            if device not in self._devices:
                self._devices.append(device)
        device.inputs.plugged = True
        return device

    def remove(self, device: Any) -> None:
        with self._lock:
            if device in self._devices:
                self._devices.remove(device)

    def clear(self) -> None:
        with self._lock:
            self._devices.clear()

    def devices(self) -> list[Any]:
        """Hardware that is plugged in, in plug order."""
        with self._lock:
            return [d for d in self._devices if d.inputs.plugged]

    def attach(self, source: Any, make: Callable[[Any], Any]) -> Any:
        with self._lock:
            dev = self._by_source.get(source)
            if dev is None:
                dev = make(source)
                self._by_source[source] = dev
            if dev not in self._devices:
                self._devices.append(dev)
        return dev
