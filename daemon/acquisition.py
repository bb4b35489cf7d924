"""The acquisition loop: stream TagBatches from the time tagger, publish ``counts`` per interval, feed the
analysis pipeline (coincidences, histograms, ``qkd.<link>``) and optionally record the stream to PTU.

It reads through the tagger's supervisor, so stream reads share the tagger's worker thread with RPC calls
(in order) and a tagger fault pauses acquisition until the supervisor has reconnected it. Analysis and
recording run in their own thread (one, so batches stay in order) while the next batch is being read: the
event loop only moves batches and publishes.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Annotated, Any, Callable

import structlog

from daemon.analysis.counts import CountsInterval, IntervalCounter
from daemon.api.errors import DeviceFailure, RpcError
from daemon.api.publish import Publisher
from daemon.supervisor import DeviceSupervisor
from daemon.worker import Worker
from drivers.base import TagBatch
from drivers.params import Field

RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.ptu")

PS_PER_S = 1_000_000_000_000


class Acquisition:
    def __init__(self, tagger: DeviceSupervisor, publisher: Publisher, *, interval_s: float, read_timeout_s: float,
                 pipeline: Any = None, record_dir: str = "") -> None:
        self.sup = tagger
        self.pipeline = pipeline  # daemon.analysis.pipeline.AnalysisPipeline or None
        self.record_dir = record_dir
        self._recorder: Any = None
        self._recording: dict[str, Any] | None = None
        self._last_recording: dict[str, Any] | None = None  # summary of the last closed recording
        self._control = asyncio.Lock()  # serializes acquisition.stop and the recording RPCs
        self._analysis = Worker("analysis")
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
        # called in the event loop with (topic, fields, t_begin_ps, t_end_ps) of every analysis message
        # (daemon/control reads qkd.<link> here); an exception in one is logged, never stops acquisition
        self.listeners: list[Callable[[str, dict[str, Any], int, int], None]] = []
        # fed every batch in the analysis thread, after the pipeline: objects with reset() (a new stream) and
        # feed(batch) -> messages to publish (daemon/qkd: the key pipeline's sifting)
        self.consumers: list[Any] = []

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
            "analysis": self.pipeline is not None,
            "recording": dict(self._recording) if self._recording else None,
            "last_recording": self._last_recording,
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
            except Exception:  # noqa: BLE001 - an analysis bug must not end acquisition for good
                self.log.exception("acquisition error; restarting the stream in 1 s")
                await asyncio.sleep(1.0)
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
        if self.pipeline is not None:
            await self._analysis.call(self.pipeline.reset, 60.0)  # a new stream: tagger time is not contiguous
        for consumer in self.consumers:
            await self._analysis.call(consumer.reset, 60.0)
        pending: asyncio.Future[Any] | None = None
        try:
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
                if self.pipeline is not None or self._recorder is not None or self.consumers:
                    if pending is not None:
                        self._publish_analysis(await pending)  # the previous batch, analysed while we read
                    pending = asyncio.ensure_future(self._analysis.call(lambda b=batch: self._analyse(b), 60.0))
        finally:
            if pending is not None:
                try:
                    self._publish_analysis(await pending)
                except Exception as e:  # noqa: BLE001 - the stream is ending anyway
                    self.log.warning("analysis of the last batch failed", error=str(e))

    def _analyse(self, batch: TagBatch) -> list[Any]:
        """In the analysis thread: record, then analyse one batch; returns the messages to publish."""
        if self._recorder is not None:
            try:
                self._recorder.write(batch)
                self._recording["tags"] += len(batch)
            except Exception as e:  # noqa: BLE001 - a full disk must not stop the analysis
                self._recording["error"] = f"{type(e).__name__}: {e}"
                self.log.error("recording failed; stopped", error=self._recording["error"])
                self._close_recorder()
        out = self.pipeline.feed(batch) if self.pipeline is not None else []
        for consumer in self.consumers:
            try:
                out += consumer.feed(batch)
            except Exception:  # noqa: BLE001 - a key-pipeline bug must not stop counts and analysis
                self.log.exception("batch consumer failed", consumer=type(consumer).__name__)
        return out

    def _publish_analysis(self, messages: list[Any]) -> None:
        for topic, fields, arrays, t_begin, t_end in messages:
            self.pub.publish(topic, fields, arrays, t_begin_ps=t_begin, t_end_ps=t_end)
            for listener in self.listeners:
                try:
                    listener(topic, fields, t_begin, t_end)
                except Exception:  # noqa: BLE001
                    self.log.exception("analysis listener failed", topic=topic)

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
            async with self._control:  # one loop at any time, however many stops arrive together
                self._pause()
                if self._task is not None:
                    self._task.cancel()
                    await asyncio.gather(self._task, return_exceptions=True)
                await self._stop_stream(self.sup.cfg.supervisor.call_timeout_s)
                self._task = asyncio.create_task(self._run(), name="acquisition")
            return self.status()

        async def status() -> dict:
            """Tagger, running/wanted, tags, batches, intervals published, intervals flagged for overflow,
            recording."""
            return self.status()

        async def record_start(file_name: Annotated[str, Field(
                doc="a file name (no directories) ending in .ptu, created in acquisition.record_dir")]) -> dict:
            """Record the live tag stream to a PicoQuant PTU file (T2), from the next batch on."""
            async with self._control:
                return await self._record_start(file_name)

        async def record_stop() -> dict:
            """Stop recording and close the file; returns what was written (or the last recording's summary,
            with its error, if it already ended)."""
            async with self._control:
                summary = await self._analysis.call(self._close_recorder, 60.0)
            return summary or dict(self._last_recording or {})

        for fn in (start, stop, status, record_start, record_stop):
            table.add(f"acquisition.{fn.__name__}", fn, group="acquisition")

    async def _record_start(self, file_name: str) -> dict:
        from daemon.api.errors import Busy, DeviceUnavailable, InvalidParams

        if not self.record_dir:
            raise InvalidParams("recording is disabled: set acquisition.record_dir in the config",
                                data={"param": "file_name", "allowed": "nothing until acquisition.record_dir is set"})
        if not RECORD_NAME.fullmatch(file_name):
            raise InvalidParams(f"file_name {file_name!r} must be a plain name ending in .ptu (letters, digits, . _ -)",
                                data={"param": "file_name", "allowed": "a plain file name ending in .ptu"})
        if self._recorder is not None:
            raise Busy(f"already recording to {self._recording['path']}; acquisition.record_stop first")
        driver = self.sup.driver
        if driver is None:
            raise self.sup.unavailable()
        path = Path(self.record_dir) / file_name
        if path.exists():
            raise InvalidParams(f"{path} exists; recordings are never overwritten",
                                data={"param": "file_name", "allowed": "a name not used in acquisition.record_dir"})

        def open_recorder() -> None:
            from drivers.ptu.recorder import PtuRecorder

            Path(self.record_dir).mkdir(parents=True, exist_ok=True)
            self._recorder = PtuRecorder(path, channel_count=driver.channel_count,
                                         resolution_ps=max(1, int(driver.resolution_ps)),
                                         comment=f"qnetd recording of {self.sup.name}")
            self._recording = {"path": str(path), "started": time.time(), "tags": 0, "error": None}

        try:
            await self._analysis.call(open_recorder, 30.0)
        except (OSError, ValueError) as e:
            raise DeviceUnavailable(f"cannot record to {path}: {e}") from None
        self.log.info("recording started", path=str(path))
        return dict(self._recording)

    def _close_recorder(self) -> dict:
        """In the analysis thread: close the PTU file (idempotent); returns the recording summary."""
        rec, self._recorder = self._recorder, None
        summary = dict(self._recording or {})
        if rec is not None:
            try:
                summary["file"] = rec.close()
            except Exception as e:  # noqa: BLE001
                summary["error"] = f"{type(e).__name__}: {e}"
            self.log.info("recording stopped", **{k: v for k, v in summary.items() if k != "file"})
            self._last_recording = summary
        self._recording = None
        return summary

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
        try:
            await self._analysis.call(self._close_recorder, timeout)
        except Exception as e:  # noqa: BLE001
            self.log.error("recording not closed cleanly", error=str(e))
        self._analysis.close()
