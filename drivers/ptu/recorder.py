"""Record a live TagBatch stream to a PicoQuant PTU file (T2 records), for replay with ``ptu.replay``.

Usage (blocking file I/O: call it from a worker thread, not the event loop)::

    rec = PtuRecorder("run.ptu", channel_count=8)       # HydraHarp2T2 records, 1 ps resolution
    for batch in stream:
        rec.write(batch)
    summary = rec.close()                               # patches the header, fsyncs; idempotent

Format: ``HydraHarp2T2`` (default) or ``GenericT2`` records with a global resolution of ``resolution_ps``
(default 1 ps: tagger picoseconds are stored exactly; a coarser resolution floors them). Photon channels must
be 0..63 (6-bit field). Times are stored relative to the first batch's ``t_begin`` (tag ``qnetd_TimeOrigin_ps``),
so a replay starts at once instead of after the tagger's uptime.

What the PTU format cannot say natively is kept in extra header tags, patched at :meth:`close`:

* ``qnetd_Span_ps`` -- the recorded span (last ``t_end`` - origin), so a replay ends where the stream ended;
* ``qnetd_FlagCount``, ``qnetd_FlagBegin_ps[i]``, ``qnetd_FlagEnd_ps[i]`` -- the intervals where the stream had
  an OVERFLOW or MISSED_EVENTS batch, missed events, or a gap between batches (up to ``max_flags`` = 256
  slots; beyond that the last slot is widened to cover the rest, which stays correct but coarser);
* ``qnetd_Channels``, ``qnetd_MissedEvents``;
* ``TTResult_NumberOfRecords`` (0 while recording: readers then take the records the file holds) and
  ``MeasDesc_AcquisitionTime`` (ms).

A file whose recorder never closed (crash) is still readable: header count 0, span and flags missing.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from drivers.base import TagBatch, TagFlags
from drivers.ptu.decoder import RecordType, TagType
from drivers.ptu.encoder import PtuFileWriter, RecordEncoder, standard_tags

__all__ = ["PtuRecorder"]


class PtuRecorder:
    """Writes TagBatches to a PTU file (see the module docstring). Thread-safe; ``write`` after close raises."""

    def __init__(self, path: str | os.PathLike[str], *, channel_count: int | None = None,
                 record_type: RecordType | str = RecordType.HYDRAHARP2_T2, resolution_ps: int = 1,
                 comment: str = "", max_flags: int = 256, extra_tags: list[tuple] | None = None) -> None:
        rt = RecordType[record_type.upper()] if isinstance(record_type, str) else RecordType(record_type)
        if rt not in (RecordType.HYDRAHARP2_T2, RecordType.GENERIC_T2, RecordType.TIMEHARP260P_T2,
                      RecordType.TIMEHARP260N_T2):
            raise ValueError(f"the recorder writes HydraHarp2T2/GenericT2-type records, not {rt.name}")
        if resolution_ps < 1:
            raise ValueError("resolution_ps must be >= 1")
        if channel_count is not None and not 1 <= channel_count <= 64:
            raise ValueError(f"PTU T2 records hold channels 0..63; channel_count {channel_count} does not fit")
        if max_flags < 1:
            raise ValueError("max_flags must be >= 1")
        self.path = str(path)
        self.record_type = rt
        self.resolution_ps = int(resolution_ps)
        self.max_flags = int(max_flags)
        self._lock = threading.Lock()
        tags = standard_tags(rt, resolution_ps * 1e-12, None, 0, (channel_count + 1) if channel_count else None,
                             comment, creator="qnetd recorder")
        tags += [
            ("qnetd_Channels", int(channel_count or 0)),
            ("qnetd_TimeOrigin_ps", 0),
            ("qnetd_Span_ps", 0),
            ("qnetd_MissedEvents", 0),
            ("qnetd_FlagCount", 0),
        ]
        tags += [("qnetd_FlagBegin_ps", 0, TagType.INT8, i) for i in range(self.max_flags)]
        tags += [("qnetd_FlagEnd_ps", 0, TagType.INT8, i) for i in range(self.max_flags)]
        tags += list(extra_tags or [])
        self._writer = PtuFileWriter(self.path, tags)
        self._encoder = RecordEncoder(rt, max_overflow_count=127)  # readable by 32-bit-count readers (ptufile)
        self._origin: int | None = None
        self._t_end: int | None = None
        self._flags: list[list[int]] = []
        self.tags = 0
        self.batches = 0
        self.missed_events = 0
        self.summary: dict[str, Any] | None = None

    def __enter__(self) -> PtuRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._writer.closed

    def _flag(self, begin: int, end: int) -> None:
        if self._flags and begin <= self._flags[-1][1]:
            self._flags[-1][1] = max(self._flags[-1][1], end)
        elif len(self._flags) < self.max_flags:
            self._flags.append([begin, end])
        else:
            self._flags[-1][1] = max(self._flags[-1][1], end)  # out of slots: widen the last one

    def write(self, batch: TagBatch) -> None:
        """Append one batch (batches in time order; a restarted stream continues after the last t_end)."""
        with self._lock:
            if self._writer.closed:
                raise ValueError(f"{self.path}: recorder is closed")
            if self._origin is None:
                self._origin = int(batch.t_begin)
                self._t_end = int(batch.t_begin)
            o = self._origin
            if batch.t_begin > self._t_end:
                self._flag(self._t_end - o, int(batch.t_begin) - o)  # a gap: nothing was seen there
            if len(batch) and int(batch.timestamps[0]) < self._t_end:
                raise ValueError(f"{self.path}: batch starts at {int(batch.timestamps[0])} ps, before the recorded "
                                 f"stream's end {self._t_end} ps (time went backwards: start a new recording)")
            if batch.flags & (TagFlags.OVERFLOW | TagFlags.MISSED_EVENTS) or batch.missed_events:
                self._flag(int(batch.t_begin) - o, max(int(batch.t_end), int(batch.t_begin) + 1) - o)
            self.missed_events += int(batch.missed_events)
            if len(batch):
                ch = batch.channels
                if int(ch.max()) > 63:
                    raise ValueError(f"{self.path}: channel {int(ch.max())} does not fit a PTU T2 record (0..63)")
                units = (batch.timestamps - o) // self.resolution_ps
                self._writer.write(self._encoder.encode(units, None, ch.astype(np.int16)))
            self._t_end = max(self._t_end, int(batch.t_end))
            self.tags += len(batch)
            self.batches += 1

    def flush(self) -> None:
        with self._lock:
            self._writer.flush()

    def close(self) -> dict[str, Any]:
        """Patch the header (record count, span, flags), fsync and close. Returns a summary; idempotent."""
        with self._lock:
            if self._writer.closed:
                return dict(self.summary or {})
            w = self._writer
            span = 0 if self._origin is None else self._t_end - self._origin
            try:
                w.patch("qnetd_TimeOrigin_ps", self._origin or 0)
                w.patch("qnetd_Span_ps", span)
                w.patch("MeasDesc_AcquisitionTime", span // 1_000_000_000)
                w.patch("qnetd_MissedEvents", self.missed_events)
                w.patch("qnetd_FlagCount", len(self._flags))
                for i, (b, e) in enumerate(self._flags):
                    w.patch("qnetd_FlagBegin_ps", b, i)
                    w.patch("qnetd_FlagEnd_ps", e, i)
            finally:
                w.close()
            self.summary = {"path": self.path, "records": w.records, "tags": self.tags, "batches": self.batches,
                            "span_ps": span, "origin_ps": self._origin, "flagged_intervals": len(self._flags),
                            "missed_events": self.missed_events, "record_type": self.record_type.name}
            return dict(self.summary)
