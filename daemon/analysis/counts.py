"""Singles per channel over fixed intervals of tagger time.

Intervals are ``[t0 + k*I, t0 + (k+1)*I)`` with ``t0`` the start of the first batch. An interval is emitted
once a batch's ``t_end`` (the tagger's promise that no earlier tag follows) has passed its end, so results
never depend on how the stream was chunked. An interval that overlaps a batch with an overflow flag is
marked ``overflow``: its counts are a lower bound, not data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drivers.base import TagBatch


@dataclass(frozen=True)
class CountsInterval:
    t_begin: int
    t_end: int
    counts: np.ndarray  # int64 per channel
    overflow: bool
    missed_events: int

    @property
    def rates_hz(self) -> np.ndarray:
        return self.counts / ((self.t_end - self.t_begin) * 1e-12)


class IntervalCounter:
    def __init__(self, channels: int, interval_ps: int) -> None:
        if interval_ps <= 0:
            raise ValueError("interval_ps must be positive")
        self.channels = channels
        self.interval_ps = int(interval_ps)
        self.reset()

    def reset(self) -> None:
        """Forget the current interval (after a stream restart: tagger time is not contiguous any more)."""
        self._start: int | None = None
        self._acc = np.zeros(self.channels, np.int64)
        self._overflow = False
        self._missed = 0
        self._seen_until: int | None = None

    def add(self, batch: TagBatch) -> list[CountsInterval]:
        """Account one batch; return the intervals it completed, oldest first."""
        if self._start is None:
            self._start = batch.t_begin
            self._seen_until = batch.t_begin
        out: list[CountsInterval] = []
        # a gap before this batch: tags there were never seen, so every interval it touches is not valid data
        gap = (self._seen_until, batch.t_begin) if batch.t_begin > self._seen_until else None
        ts, ch = batch.timestamps, batch.channels
        lo = 0
        self._missed += batch.missed_events  # reported once, in the interval where the batch starts
        while True:
            end = self._start + self.interval_ps
            hi = int(np.searchsorted(ts, end, side="left"))
            if hi > lo:
                self._acc += np.bincount(ch[lo:hi], minlength=self.channels)[: self.channels]
            if batch.overflow and batch.t_end > self._start and batch.t_begin < end:
                self._overflow = True  # every interval the overflowing batch overlaps
            if gap is not None and gap[0] < end and gap[1] > self._start:
                self._overflow = True
            lo = hi
            if batch.t_end < end:
                break
            out.append(CountsInterval(self._start, end, self._acc.copy(), self._overflow or self._missed > 0,
                                      self._missed))
            self._start = end
            self._acc[:] = 0
            self._overflow = False
            self._missed = 0
        self._seen_until = max(self._seen_until, batch.t_end)
        return out
