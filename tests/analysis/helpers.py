"""Shared helpers of the analysis tests: slicing a stream into batches, brute-force oracles."""

from __future__ import annotations

import numpy as np

from drivers.base import TagBatch, TagFlags


def make_batches(ts: np.ndarray, ch: np.ndarray, bounds: list[int], flags: list[int] | None = None,
                 missed: list[int] | None = None) -> list[TagBatch]:
    """Split a sorted stream at ``bounds`` (t_begin of the first batch, cut points, t_end of the last).

    ``flags[i]`` 1 = OVERFLOW, 2 = MISSED_EVENTS; a bound that repeats makes an empty batch; a pair of bounds
    ``(a, b)`` with a > previous end is a gap (use :func:`with_gap`)."""
    out = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        lo, hi = np.searchsorted(ts, a, side="left"), np.searchsorted(ts, b, side="left")
        f = TagFlags(flags[i]) if flags else TagFlags.NONE
        m = missed[i] if missed else 0
        out.append(TagBatch(ts[lo:hi].copy(), ch[lo:hi].copy(), int(a), int(b), f, m))
    return out


def brute_pairs(ts, ch, a, b, da, db, lo, hi, t0, interval, n) -> np.ndarray:
    """Pairs (left a, right b) with lo <= Δ < hi per interval of the left corrected time: an O(N^2) double loop."""
    out = np.zeros(n, np.int64)
    A = [int(t) + da for t, c in zip(ts, ch) if c == a]
    B = [int(t) + db for t, c in zip(ts, ch) if c == b]
    for x in A:
        k = (x - t0) // interval
        if not 0 <= k < n:
            continue
        for y in B:
            if lo <= y - x < hi:
                out[k] += 1
    return out


def brute_hist(ts, ch, a, b, da, db, lo, binw, nbins, t0, interval, n) -> np.ndarray:
    out = np.zeros((n, nbins), np.int64)
    A = [int(t) + da for t, c in zip(ts, ch) if c == a]
    B = [int(t) + db for t, c in zip(ts, ch) if c == b]
    for x in A:
        k = (x - t0) // interval
        if not 0 <= k < n:
            continue
        for y in B:
            d = y - x
            if lo <= d < lo + binw * nbins:
                out[k, (d - lo) // binw] += 1
    return out
