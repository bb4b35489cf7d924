"""Delay calibration: find the relative delay of channel pairs from their correlation histogram.

Coarse-to-fine search, per pair ``(a, b)``:

1. one all-pairs histogram of ``Δ = s_b - s_a`` over ``±coarse_range_ps`` in *fine* bins (``fine_bin_ps``); the
   sweep costs the same for 200 or 20 000 bins (cost is set by the pairs, not the bins), so the fine histogram
   of the whole coarse range is collected in a single pass over the data;
2. coarse search: the fine bins summed into ``coarse_bin_ps`` bins; the peak is the largest coarse bin, the
   background the median coarse bin (robust against the peak);
3. fine analysis within ``±fine_range_ps`` of the coarse peak: background-subtracted peak height, FWHM by
   linear interpolation of the half-maximum crossings, centroid and RMS width over ``±max(2 FWHM, 3 bins)``.

The result per pair: ``offset_ps`` (the centroid, rounded to whole ps: the peak sits at Δ = offset), the new
delay of ``b`` that moves the peak to Δ = 0 (``delay_b - offset``, propagated along chains of pairs),
``peak_width_ps`` (FWHM), ``sigma_ps``, ``signal_to_background`` (peak bin above background / background per
fine bin; null if the background is 0), ``peak_counts``, ``background_per_bin``, ``significance``
(``signal / sqrt(signal + background)`` in the centroid window) and ``found`` (significance >= 5 and at least
10 signal counts). Delays stay int64 ps.

:func:`find_delay` works on whole arrays; :class:`CalibrationRun` collects the histograms from a live stream
(its own coincidence engine, fed the same batches as the analysis) for ``duration`` of tagger time and reports
progress through a callback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from daemon.analysis.coincidences import CoincidenceEngine, EngineSpec, HistogramSpec
from daemon.analysis.histograms import correlate
from drivers.base import TagBatch

__all__ = ["CalibrationRun", "CalibrationSettings", "analyse_histogram", "find_delay", "propagate_delays"]

MAX_BINS = 2_000_000


@dataclass(frozen=True)
class CalibrationSettings:
    coarse_range_ps: int = 100_000
    coarse_bin_ps: int = 1000
    fine_bin_ps: int = 10
    fine_range_ps: int = 5000
    min_significance: float = 5.0
    min_counts: int = 10

    def check(self) -> list[str]:
        """Problems with these settings, as messages naming the parameter (empty: fine)."""
        errs = []
        for name in ("coarse_range_ps", "coarse_bin_ps", "fine_bin_ps", "fine_range_ps"):
            if getattr(self, name) <= 0:
                errs.append(f"{name} must be positive")
        if errs:
            return errs
        if self.coarse_bin_ps % self.fine_bin_ps:
            errs.append(f"coarse_bin_ps ({self.coarse_bin_ps}) must be a multiple of fine_bin_ps ({self.fine_bin_ps})")
        if (2 * self.coarse_range_ps) % self.coarse_bin_ps:
            errs.append(f"2*coarse_range_ps ({2 * self.coarse_range_ps}) must be a multiple of coarse_bin_ps "
                        f"({self.coarse_bin_ps})")
        if 2 * self.coarse_range_ps // self.fine_bin_ps > MAX_BINS:
            errs.append(f"2*coarse_range_ps / fine_bin_ps = {2 * self.coarse_range_ps // self.fine_bin_ps} bins; "
                        f"at most {MAX_BINS}")
        return errs

    @property
    def lo_ps(self) -> int:
        return -self.coarse_range_ps

    @property
    def n_bins(self) -> int:
        return 2 * self.coarse_range_ps // self.fine_bin_ps


def analyse_histogram(hist: np.ndarray, lo_ps: int, settings: CalibrationSettings) -> dict[str, Any]:
    """Coarse peak search and fine peak analysis of one fine histogram.

    ``hist`` has bins of ``settings.fine_bin_ps`` starting at ``lo_ps``.
    """
    h = np.asarray(hist, np.int64)
    fb = settings.fine_bin_ps
    factor = settings.coarse_bin_ps // fb
    n = h.shape[0] - h.shape[0] % factor
    coarse = h[:n].reshape(-1, factor).sum(axis=1)
    out: dict[str, Any] = {"found": False, "total_pairs": int(h.sum())}
    if coarse.size == 0 or coarse.max() <= 0:
        out["reason"] = "no pairs in the histogram range"
        return out
    kc = int(np.argmax(coarse))
    bg_coarse = float(np.median(coarse))
    bg = bg_coarse / factor  # background per fine bin
    centers = lo_ps + fb * np.arange(h.shape[0], dtype=np.float64) + (fb - 1) / 2.0
    c_center = lo_ps + (kc + 0.5) * settings.coarse_bin_ps
    out["coarse_peak_ps"] = int(round(c_center))
    sel = np.flatnonzero(np.abs(centers - c_center) <= settings.fine_range_ps)
    region = h[sel].astype(np.float64)
    kf = int(sel[int(np.argmax(region))])
    height = float(h[kf]) - bg
    if height <= 0:
        out["reason"] = "no peak above the background"
        return out
    half = bg + height / 2.0
    # FWHM: walk out from the peak to the half-maximum crossings, interpolating linearly
    left = kf
    while left > 0 and h[left - 1] >= half:
        left -= 1
    xl = centers[left] - fb * ((h[left] - half) / (h[left] - h[left - 1])) if left > 0 and h[left] != h[left - 1] \
        else centers[left] - fb / 2.0
    right = kf
    while right < h.shape[0] - 1 and h[right + 1] >= half:
        right += 1
    xr = centers[right] + fb * ((h[right] - half) / (h[right] - h[right + 1])) \
        if right < h.shape[0] - 1 and h[right] != h[right + 1] else centers[right] + fb / 2.0
    fwhm = float(xr - xl)
    half_win = max(2.0 * fwhm, 3.0 * fb)
    win = np.flatnonzero(np.abs(centers - centers[kf]) <= half_win)
    net = np.clip(h[win] - bg, 0.0, None)
    signal = float((h[win] - bg).sum())
    background = bg * win.size
    if net.sum() <= 0:
        out["reason"] = "no peak above the background"
        return out
    mean = float((net * centers[win]).sum() / net.sum())
    sigma = float(math.sqrt((net * (centers[win] - mean) ** 2).sum() / net.sum()))
    significance = signal / math.sqrt(max(signal + background, 1.0))
    found = significance >= settings.min_significance and signal >= settings.min_counts
    out.update(
        found=bool(found),
        offset_ps=int(round(mean)),
        peak_width_ps=fwhm,
        sigma_ps=sigma,
        peak_counts=signal,
        background_per_bin=bg,
        signal_to_background=(height / bg) if bg > 0 else None,
        significance=significance,
    )
    if not found:
        out["reason"] = (f"peak not significant (significance {significance:.1f} < {settings.min_significance}, "
                         f"signal {signal:.0f} counts)")
    return out


def find_delay(t_a: np.ndarray, t_b: np.ndarray,
               settings: CalibrationSettings = CalibrationSettings()) -> dict[str, Any]:
    """Offline calibration of one pair from whole sorted arrays of (already delay-corrected) times."""
    errs = settings.check()
    if errs:
        raise ValueError("; ".join(errs))
    hist = correlate(t_a, t_b, settings.lo_ps, settings.fine_bin_ps, settings.n_bins)
    return analyse_histogram(hist, settings.lo_ps, settings)


def propagate_delays(pairs: list[tuple[int, int]], offsets: dict[tuple[int, int], int],
                     delays: dict[int, int]) -> dict[int, int]:
    """New delays so that every measured peak moves to Δ = 0, adjusting the *second* channel of each pair.

    ``offsets[(a, b)]`` was measured with ``delays``; if ``a`` itself moves (it is the ``b`` of another pair), ``b``
    moves with it. Pairs without an offset (peak not found) leave their channel alone. Raises ValueError if a
    channel would be adjusted by two pairs or the pairs form a cycle (no reference channel).
    """
    seconds = [b for _, b in pairs]
    dup = sorted({b for b in seconds if seconds.count(b) > 1})
    if dup:
        raise ValueError(f"channel(s) {dup} are the second channel of several pairs: their delay would be set twice")
    parent = {b: a for a, b in pairs}
    for start in parent:
        seen = {start}
        ch = start
        while ch in parent:
            ch = parent[ch]
            if ch in seen:
                raise ValueError(f"the pairs form a cycle through channel {ch}: no channel is fixed as the reference")
            seen.add(ch)
    shifts: dict[int, int] = {}

    def shift(ch: int) -> int:
        if ch in shifts:
            return shifts[ch]
        a = parent.get(ch)
        s = 0 if a is None or (a, ch) not in offsets else shift(a) - int(offsets[(a, ch)])
        shifts[ch] = s
        return s

    new = {int(k): int(v) for k, v in delays.items()}
    for _, b in pairs:
        s = shift(b)
        if s or b in new:
            new[b] = int(delays.get(b, 0)) + s
    return new


class CalibrationRun:
    """Collects calibration histograms from a live stream for ``duration_ps`` of tagger time.

    Feed it the analysis' batches (:meth:`feed` returns True once done); :attr:`result` then holds the per-pair
    analysis and the proposed delays. ``progress(fields)`` is called at most every 5% of the duration.
    """

    def __init__(self, pairs: list[tuple[int, int]], delays: dict[int, int], duration_ps: int,
                 settings: CalibrationSettings = CalibrationSettings(),
                 progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        errs = settings.check()
        if errs:
            raise ValueError("; ".join(errs))
        if not pairs:
            raise ValueError("no pairs to calibrate")
        if duration_ps <= 0:
            raise ValueError("duration must be positive")
        for a, b in pairs:
            if a == b:
                raise ValueError(f"pair ({a}, {b}): the two channels must differ")
        propagate_delays(list(pairs), {p: 0 for p in pairs}, delays)  # checks duplicates and cycles up front
        self.pairs = [tuple(p) for p in pairs]
        self.delays = dict(delays)
        self.duration_ps = int(duration_ps)
        self.settings = settings
        self.progress = progress
        specs = tuple(HistogramSpec(f"cal{i}", a, b, settings.fine_bin_ps, settings.lo_ps, settings.n_bins)
                      for i, (a, b) in enumerate(self.pairs))
        self.engine = CoincidenceEngine(EngineSpec((), 1, 0, self.delays, self.duration_ps, specs))
        self.done = False
        self.result: dict[str, Any] | None = None
        self._last_reported = -1.0
        self.cancelled = False

    @property
    def fraction(self) -> float:
        e = self.engine
        if not e.started:
            return 0.0
        return min(1.0, max(0.0, (e.horizon_ps - e.t0) / self.duration_ps))

    def cancel(self) -> None:
        self.cancelled = True
        self.done = True

    def feed(self, batch: TagBatch) -> bool:
        if self.done:
            return True
        try:
            intervals = self.engine.feed(batch)
        except ValueError:  # stream restarted: start the collection again on the new stream
            self.engine.reset()
            intervals = self.engine.feed(batch)
        frac = self.fraction
        if self.progress is not None and (frac - self._last_reported >= 0.05 or intervals) and not intervals:
            self._last_reported = frac
            self.progress({"phase": "collecting", "fraction": frac, "pairs": [list(p) for p in self.pairs]})
        if intervals:
            self.result = self._analyse(intervals[0])
            self.done = True
            if self.progress is not None:
                self.progress({"phase": "done", "fraction": 1.0, "pairs": [list(p) for p in self.pairs],
                               "found": [r["found"] for r in self.result["pairs"]]})
        return self.done

    def _analyse(self, iv) -> dict[str, Any]:
        s = self.settings
        per_pair = []
        offsets = {}
        for (a, b), hist in zip(self.pairs, iv.histograms):
            r = analyse_histogram(hist, s.lo_ps, s)
            r["pair"] = [a, b]
            if r["found"]:
                offsets[(a, b)] = r["offset_ps"]
            per_pair.append(r)
        new = propagate_delays(self.pairs, offsets, self.delays)
        for r in per_pair:
            a, b = r["pair"]
            r["delay_ps"] = int(new.get(b, 0)) if r["found"] else None
            r["previous_delay_ps"] = int(self.delays.get(b, 0))
        return {
            "pairs": per_pair,
            "delays_ps": {int(k): int(v) for k, v in new.items()},
            "duration_ps": self.duration_ps,
            "overflow": bool(iv.overflow),
            "all_found": all(r["found"] for r in per_pair),
            "settings": {"coarse_range_ps": s.coarse_range_ps, "coarse_bin_ps": s.coarse_bin_ps,
                         "fine_bin_ps": s.fine_bin_ps, "fine_range_ps": s.fine_range_ps},
        }
