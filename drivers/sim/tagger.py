"""In-process simulated time taggers.

:class:`PacedSimTagger` turns any block source (drivers/sim/tagstream.py) into a TimeTagger driver, paced
against the wall clock at ``speed`` x real time, or as fast as the reader takes batches (``speed = 0``).
The stream is deterministic for a seed and config whatever the batch sizes, because sources generate
fixed blocks of simulated time. :class:`SimTimeTagger` (entry point ``sim.tagger``) feeds it Poisson
background plus correlated pairs; the optical bench's tagger (``sim.bench_tagger``) feeds it physics.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from drivers.base import DeviceError, TagBatch, TagFlags, TimeTagger
from drivers.params import Field, ParamError
from drivers.sim.faults import SimFaults
from drivers.sim.tagstream import BlockSource, BlockStream, PoissonPairSource

PS_PER_S = 1_000_000_000_000

PACING_OPTIONS: dict[str, Field] = {
    "speed": Field(float, 1.0, min=0, max=1e6, doc="simulated seconds per wall-clock second; 0 = as fast as read"),
    "batch_ms": Field(float, 20.0, unit="ms", min=0.01, max=10_000, doc="simulated time per batch at most"),
}


class PacedSimTagger(SimFaults, TimeTagger):
    """Base of simulated taggers: pacing, batching and overflow flags over a BlockSource.

    Subclasses implement :meth:`make_source` (called at connect) and the ``channel_count`` /
    ``resolution_ps`` properties. Tagger time starts at 0 at connect and runs on while the stream is
    stopped (a restarted stream resumes at the current simulated time, as a hardware tagger's clock does).
    """

    options: dict[str, Field] = {**PACING_OPTIONS, **SimFaults.fault_options}

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        super().__init__(name, options, log)
        self._lock = threading.Lock()
        self._streaming = False
        self._connected = False
        self._stats = {"tags": 0, "batches": 0, "dropped": 0}

    def make_source(self) -> BlockSource:
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------------------
    def connect(self) -> None:
        self.simulate_connect()
        self.source = self.make_source()
        self._stream = BlockStream(self.source)
        self._wall0 = time.monotonic()
        self._emitted = 0
        self._connected = True
        self.log.info("simulated tagger connected", channels=self.channel_count, speed=self.opts["speed"])

    def close(self) -> None:
        self._streaming = False
        self._connected = False

    # -- streaming --------------------------------------------------------------------------------------
    def _sim_now(self) -> int:
        speed = self.opts["speed"]
        if speed == 0:
            return self._emitted  # the clock runs only as fast as the reader asks
        return int((time.monotonic() - self._wall0) * speed * PS_PER_S)

    def start_stream(self) -> None:
        self.require_connected()
        if self._streaming:
            return
        now = self._sim_now()
        if now > self._emitted:
            self._stream.skip_to(now)
            self._emitted = now
        self._streaming = True

    def stop_stream(self) -> None:
        self._streaming = False

    def read(self, timeout_s: float) -> TagBatch | None:
        if not self._streaming:
            return None
        o = self.opts
        batch_ps = int(o["batch_ms"] * 1e9)
        begin = self._emitted
        if o["speed"] == 0:
            end = begin + batch_ps
        else:
            want = begin + batch_ps
            wait_s = (want - self._sim_now()) / (o["speed"] * PS_PER_S)
            if wait_s > 0:
                time.sleep(min(wait_s, timeout_s))
            end = min(want, self._sim_now())
            if end <= begin:
                return TagBatch.empty(begin, begin)
        with self._lock:
            ts, ch, overflow, dropped = self._stream.take(end)
        self._emitted = end
        flags = TagFlags.OVERFLOW if overflow else TagFlags.NONE
        self._stats["tags"] += len(ts)
        self._stats["batches"] += 1
        self._stats["dropped"] += dropped
        return TagBatch(ts, ch, begin, end, flags, dropped)

    def require_connected(self) -> None:
        if not self._connected:
            raise ConnectionError(f"simulated tagger {self.name} is not connected")

    def status(self) -> dict:
        self.require_connected()
        return {
            "channels": self.channel_count,
            "resolution_ps": self.resolution_ps,
            "streaming": self._streaming,
            "time_ps": int(self._emitted),
            **self._stats,
        }


class SimTimeTagger(PacedSimTagger):
    """Simulated time tagger: Poisson singles plus correlated pairs with jitter (no optics behind it)."""

    options = {
        "channels": Field(int, 8, min=1, max=256, doc="number of input channels"),
        "background_hz": Field(float, 2000.0, unit="Hz", min=0, doc="uncorrelated count rate per channel"),
        "pair_rate_hz": Field(float, 40000.0, unit="Hz", min=0, doc="rate of detected pairs, all pair channels"),
        "pair_channels": Field(
            list[list[int]],
            [[0, 4], [1, 5], [2, 6], [3, 7]],
            doc="channel pairs [a, b] that pairs are spread over uniformly",
        ),
        "jitter_ps": Field(float, 30.0, unit="ps", min=0, max=1e6, doc="Gaussian timing jitter (sigma) per tag"),
        "delays_ps": Field(list[int], [], unit="ps", min=0, doc="fixed delay per channel (empty: all 0)"),
        "resolution_ps": Field(int, 1, unit="ps", min=1, max=1_000_000, doc="timestamps are floored to this"),
        "seed": Field(int, 1, min=0, doc="random seed; the same seed and config give the same tags"),
        "max_rate_hz": Field(
            float, 0.0, unit="Hz", min=0,
            doc="sustained tag rate beyond which tags are dropped and the batch flagged overflow (0: none)",
        ),
        **PacedSimTagger.options,
    }
    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        errors = []
        n = opts["channels"]
        if opts["delays_ps"] and len(opts["delays_ps"]) != n:
            errors.append(ParamError("delays_ps", f"has {len(opts['delays_ps'])} entries for {n} channels",
                                     f"empty or {n} delays"))
        for i, pair in enumerate(opts["pair_channels"]):
            if len(pair) != 2 or not all(0 <= c < n for c in pair):
                errors.append(ParamError(f"pair_channels[{i}]", f"{pair!r} is not a pair of channels",
                                         f"[a, b] with 0 <= a, b < {n}"))
        return errors

    def make_source(self) -> PoissonPairSource:
        o = self.opts
        n = o["channels"]
        return PoissonPairSource(
            channel_count=n,
            singles_hz=[o["background_hz"]] * n,
            pair_rate_hz=o["pair_rate_hz"],
            pair_channels=o["pair_channels"],
            jitter_ps=o["jitter_ps"],
            delays_ps=list(o["delays_ps"]) or [0] * n,
            resolution_ps=o["resolution_ps"],
            seed=o["seed"],
            max_rate_hz=o["max_rate_hz"],
        )

    def describe(self) -> dict[str, Any]:
        return {"vendor": "qnetd", "model": "in-process simulated tagger", "serial": f"seed-{self.opts['seed']}"}

    @property
    def channel_count(self) -> int:
        return self.opts["channels"]

    @property
    def resolution_ps(self) -> int:
        return self.opts["resolution_ps"]

    def set_input_delay(self, channel: int, picoseconds: int) -> None:
        self.require_connected()
        if channel >= self.channel_count:
            raise DeviceError(f"channel {channel} does not exist (0..{self.channel_count - 1})", "set_input_delay")
        if picoseconds < 0:
            raise DeviceError("the simulated tagger supports only non-negative input delays", "set_input_delay")
        with self._lock:
            # takes effect for blocks generated from now on; a delay only moves tags later, so lead_ps holds
            delays = self.source.delays_ps.copy()
            delays[channel] = picoseconds
            self.source.delays_ps = delays

    def status(self) -> dict:
        return {**super().status(), "input_delays_ps": [int(d) for d in self.source.delays_ps]}
