"""A TimeTagger that plays a PicoQuant PTU file: at recorded speed (or any factor), or as fast as read.

Entry point ``ptu.replay``. Options: ``path``, ``speed`` (file seconds per wall-clock second; 0 = as fast as the
reader takes batches), ``loop``, ``batch_ms`` (file time per batch at most), ``sync_channel`` / ``marker_channel``
(HydraHarp-type T2 SYNC events and marker bits as channels, or dropped), ``channels`` (0 = from the file).

Batches and their promises
--------------------------
Tagger time starts at 0 with the file and advances only while streaming (a stopped replay pauses the file).
Each batch covers ``[t_begin, t_end)`` with ``t_end`` a true watermark: T3 records are ordered by sync count,
so only tags before ``floor(last sync count * period)`` are final; T2 records are time-ordered by the hardware,
so tags before the last decoded time are. Tags are sorted within what is emitted. A tag that would fall before
an already-promised ``t_end`` (a file out of order beyond that, or after a decreased input delay) is dropped,
counted in ``missed_events`` and the batch flagged MISSED_EVENTS -- the stream contract is never broken.

Files written by :class:`drivers.ptu.recorder.PtuRecorder` carry the intervals where the live stream had an
overflow, missed events or a gap (tags ``qnetd_FlagBegin_ps``/``qnetd_FlagEnd_ps``); batches overlapping them
are flagged OVERFLOW again on replay. At the end of the file the last batch ends at the file's span (the
recorded span, or the last tag + 1 ps); then the stream stops (``read`` returns None) unless ``loop``, which
replays the file again shifted by the span, so time stays monotonic.

A corrupt or truncated file fails ``connect`` (or the ``read`` that reaches the bad record) with a
:class:`~drivers.ptu.decoder.PtuError` naming the byte offset; the daemon then reports the device faulted.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

import numpy as np

from drivers.base import DeviceError, TagBatch, TagFlags, TimeTagger
from drivers.params import REQUIRED, Field, ParamError
from drivers.ptu.decoder import FAM_PICOHARP, PtuReader, header_summary

__all__ = ["PtuReplayTagger"]

PS_PER_S = 1_000_000_000_000


class PtuReplayTagger(TimeTagger):
    """Replays a PTU file as a live tag stream (see the module docstring)."""

    options = {
        "path": Field(str, doc="the .ptu file to play"),
        "speed": Field(float, 1.0, min=0, max=1e6, doc="file seconds per wall-clock second; 0 = as fast as read"),
        "loop": Field(bool, False, doc="start over at the end (time keeps increasing by the file's span)"),
        "batch_ms": Field(float, 20.0, unit="ms", min=0.001, max=60_000, doc="file time per batch at most"),
        "sync_channel": Field(int, -1, min=-1, max=255,
                              doc="HydraHarp-type T2 SYNC events as this channel; -1 = dropped"),
        "marker_channel": Field(int, -1, min=-1, max=252,
                                doc="marker bit k as channel marker_channel + k; -1 = markers skipped"),
        "channels": Field(int, 0, min=0, max=256, doc="channel count reported; 0 = from the file"),
        "chunk_records": Field(int, 1 << 20, min=1024, max=1 << 26, doc="records decoded per step (memory bound)"),
    }

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> list[ParamError]:
        errors = []
        if not opts.get("path"):
            errors.append(ParamError("path", "is empty", "the path of a .ptu file"))
        return errors

    def __init__(self, name: str, options: dict[str, Any], log: Any = None) -> None:
        opts = {k: f.default for k, f in self.options.items() if f.default is not REQUIRED}
        opts.update(options)
        super().__init__(name, opts, log)
        self._lock = threading.Lock()
        self._reader: PtuReader | None = None
        self._streaming = False
        self._delays = np.zeros(256, np.int64)
        self._stats = {"tags": 0, "batches": 0, "dropped_out_of_order": 0, "loops": 0}

    # -- lifecycle ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        reader = PtuReader(self.opts["path"])
        self._reader = reader
        h = reader.header
        self._is_t3 = h.is_t3
        self._period_fs = h.global_resolution_fs
        self._flags = self._flag_intervals()
        span_tag = h.get("qnetd_Span_ps")
        acq_ms = h.get("MeasDesc_AcquisitionTime")
        self._span_hint = int(span_tag) if isinstance(span_tag, int) and span_tag > 0 else (
            int(acq_ms) * 1_000_000_000 if isinstance(acq_ms, int) and acq_ms > 0 else 0)
        self._rewind()
        self._decoder.decode_tags(np.empty(0, np.uint32))  # compile or load the kernel now, not at the first read
        self._rewind()
        self._loop_offset = 0
        self._emitted = 0
        self._finished = False
        self._stats = {"tags": 0, "batches": 0, "dropped_out_of_order": 0, "loops": 0}
        self.log.info("PTU replay connected", path=self.opts["path"], **header_summary(h))

    def _flag_intervals(self) -> np.ndarray:
        h = self._reader.header
        begins, ends = h.get("qnetd_FlagBegin_ps"), h.get("qnetd_FlagEnd_ps")
        count = h.get("qnetd_FlagCount", 0) or 0
        if not isinstance(begins, dict) or not isinstance(ends, dict):
            return np.empty((0, 2), np.int64)
        if not isinstance(count, int):
            return np.empty((0, 2), np.int64)
        rows = [(begins[i], ends[i]) for i in range(min(count, len(begins))) if i in begins and i in ends]
        rows = [(int(b), int(e)) for b, e in rows if isinstance(b, int) and isinstance(e, int)]
        return np.array(rows, np.int64).reshape(-1, 2)

    def _rewind(self) -> None:
        self._decoder = self._reader.decoder()
        self._pos = 0
        self._pend_t = np.empty(0, np.int64)
        self._pend_c = np.empty(0, np.uint8)
        self._horizon = 0  # file time (ps, before the loop offset) before which every tag has been decoded
        self._last_time = -1
        self._eof = False

    def close(self) -> None:
        self._streaming = False
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def describe(self) -> dict[str, Any]:
        if self._reader is None:
            return {"vendor": "qnetd", "model": "PTU replay", "path": self.opts.get("path")}
        h = self._reader.header
        return {"vendor": "PicoQuant file replay", "model": str(h.get("HW_Type") or h.record_type.name),
                "serial": str(h.get("HW_SerialNo") or ""), "path": self.opts["path"], **header_summary(h)}

    @property
    def channel_count(self) -> int:
        if self.opts.get("channels"):
            return int(self.opts["channels"])
        if self._reader is None:
            return 1
        h = self._reader.header
        n = h.get("qnetd_Channels")
        if not isinstance(n, int) or n <= 0:
            hw = h.get("HW_InpChannels")
            if isinstance(hw, int) and hw > 0:
                n = hw - 1 if h.record_type.family != FAM_PICOHARP else hw
            else:
                n = 4 if h.record_type.family == FAM_PICOHARP else 8
        mk = self.opts["marker_channel"]
        extra = [self.opts["sync_channel"] + 1, mk + 4 if mk >= 0 else 0]
        return int(min(256, max([n, *extra])))

    @property
    def resolution_ps(self) -> int:
        return self._reader.header.resolution_ps if self._reader is not None else 1

    # -- streaming ----------------------------------------------------------------------------------------
    def _require(self) -> PtuReader:
        if self._reader is None:
            raise ConnectionError(f"PTU replay {self.name} is not connected")
        return self._reader

    def start_stream(self) -> None:
        self._require()
        if self._streaming:
            return
        self._wall0 = time.monotonic()
        self._file0 = self._emitted  # the file clock resumes where it stopped
        self._streaming = True

    def stop_stream(self) -> None:
        self._streaming = False

    def _now(self) -> int:
        speed = self.opts["speed"]
        return self._file0 + int((time.monotonic() - self._wall0) * speed * PS_PER_S)

    def _decode_more(self) -> None:
        """Decode the next chunk of records into the pending tags and advance the decoded horizon."""
        r = self._reader
        n = r.number_of_records
        if self._pos < n:
            stop = min(n, self._pos + int(self.opts["chunk_records"]))
            t, c, last, ok = self._decoder.decode_tags(r.records(self._pos, stop), int(self.opts["sync_channel"]),
                                                       int(self.opts["marker_channel"]), self._delays)
            self._pos = stop
            if last >= 0:
                if self._is_t3:  # every later record has at least this sync count
                    q, rem = divmod(last, 1000)
                    horizon = q * self._period_fs + (rem * self._period_fs) // 1000
                else:  # T2 records are time-ordered
                    horizon = self._decoder.header.global_resolution_fs
                    horizon = (last // 1000) * horizon + ((last % 1000) * horizon) // 1000
                self._horizon = max(self._horizon, horizon + int(self._delays.min()))
            if t.shape[0]:
                self._last_time = max(self._last_time, int(t.max()) if not ok else int(t[-1]))
                if self._pend_t.shape[0]:
                    ok = ok and int(t[0]) >= int(self._pend_t[-1])
                    t = np.concatenate((self._pend_t, t))
                    c = np.concatenate((self._pend_c, c))
                if not ok:
                    order = np.argsort(t, kind="stable")
                    t, c = t[order], c[order]
                self._pend_t, self._pend_c = t, c
        if self._pos >= n:
            self._eof = True
            self._horizon = max(self._horizon, self._span_ps())

    def _span_ps(self) -> int:
        return max(self._span_hint, self._last_time + 1, 0)

    def read(self, timeout_s: float) -> TagBatch | None:
        with self._lock:
            if not self._streaming or self._reader is None:
                return None
            if self._finished:
                self._streaming = False
                return None
            batch_ps = max(1, int(self.opts["batch_ms"] * 1e9))
            begin = self._emitted
            want = begin + batch_ps
            if self.opts["speed"] > 0:
                wait_s = (want - self._now()) / (self.opts["speed"] * PS_PER_S)
                if wait_s > 0:
                    time.sleep(min(wait_s, timeout_s))
                want = min(want, self._now())
                if want <= begin:
                    return TagBatch.empty(begin, begin)
            file_want = want - self._loop_offset
            while not self._eof and self._horizon < file_want:
                self._decode_more()
            end_file = min(file_want, self._horizon)
            at_end = self._eof and end_file >= self._span_ps()
            if at_end:
                end_file = self._span_ps()
            end = end_file + self._loop_offset
            if end <= begin and not at_end:
                return TagBatch.empty(begin, begin)
            cut = int(np.searchsorted(self._pend_t, end_file, side="left"))
            ts = self._pend_t[:cut] + self._loop_offset
            ch = self._pend_c[:cut]
            self._pend_t, self._pend_c = self._pend_t[cut:], self._pend_c[cut:]
            missed = 0
            low = int(np.searchsorted(ts, begin, side="left"))
            if low:  # before an earlier promise: out of order beyond what the format guarantees
                missed = low
                ts, ch = ts[low:], ch[low:]
                self._stats["dropped_out_of_order"] += low
            flags = TagFlags.MISSED_EVENTS if missed else TagFlags.NONE
            if self._flags.shape[0]:
                fb, fe = self._flags[:, 0] + self._loop_offset, self._flags[:, 1] + self._loop_offset
                if np.any((fb < max(end, begin + 1)) & (fe > begin)):
                    flags |= TagFlags.OVERFLOW
            end = max(end, begin)
            batch = TagBatch(np.ascontiguousarray(ts), np.ascontiguousarray(ch), begin, end, flags, missed)
            self._emitted = end
            self._stats["tags"] += len(batch)
            self._stats["batches"] += 1
            if at_end:
                if self.opts["loop"]:
                    self._loop_offset += self._span_ps()
                    self._stats["loops"] += 1
                    self._rewind()
                else:
                    self._finished = True
                    self.log.info("PTU replay reached the end of the file", tags=self._stats["tags"])
            return batch

    # -- control --------------------------------------------------------------------------------------------
    def set_input_delay(self, channel: Annotated[int, Field(min=0)], picoseconds: Annotated[int, Field(unit="ps")]
                        ) -> None:
        """Software input delay (>= 0 ps) for tags decoded from now on."""
        self._require()
        if not 0 <= channel < 256:
            raise DeviceError(f"channel {channel} does not exist (0..255)", "set_input_delay")
        if picoseconds < 0:
            raise DeviceError("the PTU replay supports only non-negative input delays", "set_input_delay")
        with self._lock:
            self._delays[channel] = int(picoseconds)

    def status(self) -> dict:
        r = self._require()
        return {
            "channels": self.channel_count,
            "resolution_ps": self.resolution_ps,
            "input_delays_ps": [int(d) for d in self._delays[: self.channel_count]],
            "streaming": self._streaming,
            "finished": self._finished,
            "time_ps": int(self._emitted),
            "path": self.opts["path"],
            "records": r.number_of_records,
            "records_decoded": int(self._pos),
            "record_type": r.header.record_type.name,
            "span_ps": self._span_ps() if self._eof else None,
            **self._stats,
        }

