"""The acquisition loop: stream TagBatches from the time tagger and publish ``counts`` per interval.

It reads through the tagger's supervisor, so stream reads share the tagger's worker thread with RPC calls
(in order) and a tagger fault pauses acquisition until the supervisor has reconnected it. Later analysis
stages (coincidences, QKD) consume the same batches.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from daemon.analysis.counts import CountsInterval, IntervalCounter
from daemon.api.errors import DeviceFailure, RpcError
from daemon.api.publish import Publisher
from daemon.supervisor import DeviceSupervisor
from drivers.base import TagBatch

PS_PER_S = 1_000_000_000_000


class Acquisition:
    def __init__(self, tagger: DeviceSupervisor, publisher: Publisher, *, interval_s: float, read_timeout_s: float) -> None:
        self.sup = tagger
        self.pub = publisher
        self.interval_ps = int(round(interval_s * PS_PER_S))
        self.read_timeout_s = read_timeout_s
        self.log = structlog.get_logger("qnetd.acquisition").bind(device=tagger.name)
        self.tags = 0
        self.batches = 0
        self.intervals = 0
        self.overflow_intervals = 0
        self.last_t_end_ps: int | None = None
        self.running = False
        self.wanted = True  # false after acquisition.stop or a stream stopped by the tagger's safe state
        self._resume = asyncio.Event()
        self._resume.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="acquisition")
        return self._task

    def status(self) -> dict[str, Any]:
        return {
            "tagger": self.sup.name,
            "running": self.running,
            "wanted": self.wanted,
            "interval_ps": self.interval_ps,
            "tags": self.tags,
            "batches": self.batches,
            "intervals": self.intervals,
            "overflow_intervals": self.overflow_intervals,
            "t_end_ps": self.last_t_end_ps,
        }

    async def _run(self) -> None:
        while True:
            await self._resume.wait()
            await self.sup.wait_ready()
            try:
                await self._stream()
            except DeviceFailure as e:
                self.log.warning("stream error; restarting the stream", error=e.message)
                await asyncio.sleep(1.0)
            except RpcError as e:  # unavailable / timeout: the supervisor reconnects, we wait for ready
                self.log.warning("stream interrupted", error=e.message)
            finally:
                self.running = False

    async def _stream(self) -> None:
        await self.sup.call("start_stream")
        driver = self.sup.driver
        if driver is None:
            return
        counter = IntervalCounter(driver.channel_count, self.interval_ps)
        self.running = True
        self.log.info("stream started", channels=driver.channel_count, interval_ps=self.interval_ps)
        read_call_timeout = self.read_timeout_s + self.sup.cfg.supervisor.call_timeout_s
        while True:
            batch = await self.sup.call("read", {"timeout_s": self.read_timeout_s}, timeout=read_call_timeout)
            if batch is None:  # stopped underneath us (the tagger's safe state): stay stopped until asked
                self.log.warning("stream stopped by the tagger (safe state); acquisition.start resumes it")
                self._pause()
                return
            if not isinstance(batch, TagBatch):
                raise DeviceFailure(f"{self.sup.name}.read returned {type(batch).__name__}, not a TagBatch")
            self.tags += len(batch)
            self.batches += 1
            self.last_t_end_ps = batch.t_end
            for interval in counter.add(batch):
                self._publish_counts(interval)

    def _publish_counts(self, iv: CountsInterval) -> None:
        self.intervals += 1
        if iv.overflow:
            self.overflow_intervals += 1
            self.log.warning("interval has dropped tags: counts flagged invalid", t_begin_ps=iv.t_begin,
                             missed_events=iv.missed_events)
        self.pub.publish(
            "counts",
            {
                "interval_ps": iv.t_end - iv.t_begin,
                "device": self.sup.name,
                "channels": list(range(len(iv.counts))),
                "counts": iv.counts.tolist(),
                "rates_hz": iv.rates_hz.tolist(),
                "overflow": iv.overflow,
                "missed_events": iv.missed_events,
            },
            t_begin_ps=iv.t_begin,
            t_end_ps=iv.t_end,
        )

    def _pause(self) -> None:
        self.wanted = False
        self._resume.clear()

    def register(self, table: Any) -> None:
        """RPC: acquisition.start / acquisition.stop / acquisition.status."""

        async def start() -> dict:
            """Start (or resume) streaming from the tagger and publishing counts."""
            self.wanted = True
            self._resume.set()
            return self.status()

        async def stop() -> dict:
            """Stop streaming: the tagger's stream is stopped; no counts are published until start."""
            self._pause()
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            await self._stop_stream(self.sup.cfg.supervisor.call_timeout_s)
            self._task = asyncio.create_task(self._run(), name="acquisition")
            return self.status()

        async def status() -> dict:
            """Tagger, running/wanted, tags, batches, intervals published, intervals flagged for overflow."""
            return self.status()

        for fn in (start, stop, status):
            table.add(f"acquisition.{fn.__name__}", fn, group="acquisition")

    async def _stop_stream(self, timeout: float) -> None:
        if self.sup.available:
            try:
                await self.sup.call("stop_stream", timeout=timeout)
                self.log.info("stream stopped")
            except RpcError as e:
                self.log.warning("stop_stream failed", error=e.message)

    async def stop(self, timeout: float) -> None:
        """On daemon shutdown: end the loop (bounded) and stop the tagger's stream."""
        self._pause()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=timeout)
        await self._stop_stream(timeout)
