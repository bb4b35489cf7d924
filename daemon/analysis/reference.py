"""Plain-numpy reference implementations: the test oracle (and the benchmark baseline) of the numba kernels.

Everything here works on a whole stream at once, vectorised with ``searchsorted`` (coincidences) and
``repeat`` + ``bincount`` (histograms), with no state carried between chunks. The semantics are those stated
in :mod:`daemon.analysis.coincidences`; :class:`ReferenceAnalysis` reproduces the streaming engine's output
(intervals, counts, accidentals, histograms, overflow flags) from the list of batches it was fed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drivers.base import TagBatch, TagFlags

__all__ = [
    "ReferenceAnalysis",
    "RefInterval",
    "corrected",
    "histogram",
    "histogram_by_interval",
    "pair_count",
    "pair_counts_by_interval",
    "window",
]


def window(window_ps: int) -> tuple[int, int]:
    lo = -(int(window_ps) // 2)
    return lo, lo + int(window_ps)


def corrected(ts: np.ndarray, ch: np.ndarray, channel: int, delay_ps: int = 0) -> np.ndarray:
    """Sorted corrected times of one channel (raw order is kept: a sorted stream stays sorted)."""
    return ts[ch == channel] + np.int64(delay_ps)


def _per_left(a: np.ndarray, b: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.searchsorted(b, a + np.int64(hi), "left") - np.searchsorted(b, a + np.int64(lo), "left")


def pair_count(a: np.ndarray, b: np.ndarray, lo: int, hi: int) -> int:
    """Pairs with ``a_i + lo <= b_j < a_i + hi`` (a, b sorted int64)."""
    return int(_per_left(a, b, lo, hi).sum())


def _by_interval(a: np.ndarray, per: np.ndarray, t0: int, interval: int, n: int) -> np.ndarray:
    edges = t0 + interval * np.arange(n + 1, dtype=np.int64)
    idx = np.searchsorted(a, edges, "left")
    cs = np.concatenate(([0], np.cumsum(per, dtype=np.int64)))
    return cs[idx[1:]] - cs[idx[:-1]]


def pair_counts_by_interval(a: np.ndarray, b: np.ndarray, lo: int, hi: int, t0: int, interval: int,
                            n: int) -> np.ndarray:
    """Pair counts per interval ``[t0 + k*I, t0 + (k+1)*I)`` of the left time, k < n."""
    return _by_interval(a, _per_left(a, b, lo, hi), t0, interval, n)


def _pair_deltas(a: np.ndarray, b: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(left index, Δ) of every pair in ``[lo, hi)``: searchsorted + repeat (memory O(pairs))."""
    j0 = np.searchsorted(b, a + np.int64(lo), "left")
    j1 = np.searchsorted(b, a + np.int64(hi), "left")
    n = j1 - j0
    total = int(n.sum())
    left = np.repeat(np.arange(a.shape[0]), n)
    starts = np.repeat(j0 - (np.cumsum(n) - n), n)
    j = np.arange(total) + starts
    return left, b[j] - a[left]


def histogram(a: np.ndarray, b: np.ndarray, lo: int, bin_ps: int, n_bins: int, block: int = 1 << 20) -> np.ndarray:
    """All-pairs histogram of ``b - a`` in ``n_bins`` half-open bins of ``bin_ps`` from ``lo`` (int64)."""
    hi = lo + bin_ps * n_bins
    out = np.zeros(n_bins, np.int64)
    for s in range(0, a.shape[0], block):
        _, d = _pair_deltas(a[s:s + block], b, lo, hi)
        out += np.bincount((d - lo) // bin_ps, minlength=n_bins).astype(np.int64)
    return out


def histogram_by_interval(a: np.ndarray, b: np.ndarray, lo: int, bin_ps: int, n_bins: int, t0: int, interval: int,
                          n: int) -> np.ndarray:
    """``[n, n_bins]`` histograms, one per interval of the left time."""
    hi = lo + bin_ps * n_bins
    left, d = _pair_deltas(a, b, lo, hi)
    k = (a[left] - t0) // interval
    keep = (k >= 0) & (k < n)
    flat = k[keep] * n_bins + (d[keep] - lo) // bin_ps
    return np.bincount(flat, minlength=n * n_bins).astype(np.int64)[: n * n_bins].reshape(n, n_bins)


@dataclass(frozen=True)
class RefInterval:
    t_begin: int
    t_end: int
    counts: np.ndarray
    accidentals: np.ndarray | None
    histograms: tuple[np.ndarray, ...]
    overflow: bool
    missed_events: int


class ReferenceAnalysis:
    """Whole-stream oracle of :class:`daemon.analysis.coincidences.CoincidenceEngine`.

    ``pairs``: [(a, b)]; ``histograms``: [(a, b, lo_ps, bin_ps, n_bins)]; ``delays``: {channel: ps}.
    """

    def __init__(self, pairs, window_ps: int, accidental_offset_ps: int, delays: dict[int, int], interval_ps: int,
                 histograms=()) -> None:
        self.pairs = [tuple(p) for p in pairs]
        self.lo, self.hi = window(window_ps)
        self.off = int(accidental_offset_ps)
        self.delays = {int(k): int(v) for k, v in delays.items()}
        self.interval = int(interval_ps)
        self.histograms = [tuple(h) for h in histograms]

    def d(self, c: int) -> int:
        return self.delays.get(int(c), 0)

    def run(self, batches: list[TagBatch]) -> list[RefInterval]:
        if not batches:
            return []
        t0 = int(batches[0].t_begin)
        w = int(batches[-1].t_end)
        ts = np.concatenate([b.timestamps for b in batches])
        ch = np.concatenate([b.channels for b in batches])
        chans = sorted({c for p in self.pairs for c in p} | {c for h in self.histograms for c in h[:2]})
        ext = []
        if self.pairs:
            ext.append((self.lo, self.hi))
            if self.off:
                ext.append((self.lo + self.off, self.hi + self.off))
        ext += [(h[2], h[2] + h[3] * h[4]) for h in self.histograms]
        if chans:
            lo_min = min(e[0] for e in ext)
            hi_max = max(e[1] for e in ext)
            min_d = min(self.d(c) for c in chans)
            max_d = max(self.d(c) for c in chans)
            p = w + min_d - max(0, hi_max - 1)
            span_lo = min(0, lo_min) - max_d
            span_hi = max(0, hi_max - 1) - min_d
        else:
            p, span_lo, span_hi = w, 0, 0
        n = max(0, (max(p, t0) - t0) // self.interval)
        I = self.interval
        counts = np.zeros((n, len(self.pairs)), np.int64)
        accs = np.zeros((n, len(self.pairs)), np.int64)
        for i, (a, b) in enumerate(self.pairs):
            A, B = corrected(ts, ch, a, self.d(a)), corrected(ts, ch, b, self.d(b))
            counts[:, i] = pair_counts_by_interval(A, B, self.lo, self.hi, t0, I, n)
            if self.off:
                accs[:, i] = pair_counts_by_interval(A, B, self.lo + self.off, self.hi + self.off, t0, I, n)
        hists = []
        for a, b, lo, bw, nb in self.histograms:
            A, B = corrected(ts, ch, a, self.d(a)), corrected(ts, ch, b, self.d(b))
            hists.append(histogram_by_interval(A, B, lo, bw, nb, t0, I, n))
        # bad raw ranges: flagged batches and gaps between batches
        bad = []
        seen = t0
        for b in batches:
            if b.t_begin > seen:
                bad.append([seen, int(b.t_begin), 0, False])
            if b.flags & (TagFlags.OVERFLOW | TagFlags.MISSED_EVENTS) or b.missed_events > 0:
                bad.append([int(b.t_begin), max(int(b.t_end), int(b.t_begin) + 1), int(b.missed_events), False])
            seen = max(seen, int(b.t_end))
        out = []
        for k in range(n):
            tk, tk1 = t0 + k * I, t0 + (k + 1) * I
            rb, re = tk + span_lo, tk1 + span_hi
            over = False
            missed = 0
            for item in bad:
                if item[0] < re and item[1] > rb:
                    over = True
                    if not item[3]:
                        missed += item[2]
                        item[3] = True
            out.append(RefInterval(tk, tk1, counts[k], accs[k] if (self.off and self.pairs) else None,
                                   tuple(h[k] for h in hists), over, missed))
        return out
