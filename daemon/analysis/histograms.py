"""Correlation histograms (all pairs, a g2) of chosen channel pairs.

Conventions (the same as :func:`pycorrelate.pcorrelate`, which the tests use as an independent oracle):

* the histogram of pair ``(a, b)`` counts every pair of tags, ``a`` the start (left) and ``b`` the stop (right),
  by ``Δ = s_b - s_a`` of corrected times (per-channel delays applied, int64 ps);
* bins are half-open: bin ``k`` is ``[lo + k*bin, lo + (k+1)*bin)``; the edges are ``lo + bin*arange(n+1)``;
* ``pcorrelate(t, u, edges)`` returns *counts divided by the bin width*; :func:`as_pcorrelate` converts ours
  to that form (same float64 division, so the arrays are identical bit for bit).

Configured as ``range_ps`` (half range) around ``center_ps`` with ``bin_ps``: ``lo = center - range`` and
``n_bins = 2*range / bin`` (must be a whole number). The streaming part is the coincidence engine
(:class:`~daemon.analysis.coincidences.CoincidenceEngine`, histogram consumers); :class:`HistogramAccumulator`
adds per-interval or running sums for publishing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.analysis import kernels as K
from daemon.analysis.coincidences import HistogramSpec

__all__ = [
    "HistogramAccumulator",
    "as_pcorrelate",
    "correlate",
    "edges",
    "g2_normalization",
    "spec_from_range",
]


def spec_from_range(name: str, a: int, b: int, bin_ps: int, range_ps: int, center_ps: int = 0) -> HistogramSpec:
    """A histogram over ``[center - range, center + range)`` in bins of ``bin_ps`` (``2*range % bin == 0``)."""
    if bin_ps <= 0 or range_ps <= 0:
        raise ValueError("bin_ps and range_ps must be positive")
    if (2 * range_ps) % bin_ps:
        raise ValueError(f"2*range_ps ({2 * range_ps}) is not a multiple of bin_ps ({bin_ps})")
    return HistogramSpec(name, int(a), int(b), int(bin_ps), int(center_ps - range_ps), int(2 * range_ps // bin_ps))


def edges(lo_ps: int, bin_ps: int, n_bins: int) -> np.ndarray:
    """Bin edges in ps (int64), ``n_bins + 1`` of them."""
    return int(lo_ps) + int(bin_ps) * np.arange(n_bins + 1, dtype=np.int64)


def correlate(t_a: np.ndarray, t_b: np.ndarray, lo_ps: int, bin_ps: int, n_bins: int) -> np.ndarray:
    """Whole-array all-pairs histogram of ``t_b - t_a`` (both sorted int64 ps): int64 counts per bin."""
    if bin_ps <= 0 or n_bins <= 0:
        raise ValueError("bin_ps and n_bins must be positive")
    return K.histogram_pairs(np.asarray(t_a, np.int64), np.asarray(t_b, np.int64), int(lo_ps), int(bin_ps), int(n_bins))


def as_pcorrelate(counts: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """Our counts in pycorrelate's form: counts per unit of lag (``counts / diff(edges)``, float64)."""
    return counts / np.diff(bin_edges)


def g2_normalization(n_a: int, n_b: int, duration_ps: int, bin_ps: int) -> float | None:
    """Expected counts per bin for uncorrelated streams: ``N_a * N_b * bin / T``; divide a histogram by it for g2."""
    if duration_ps <= 0 or n_a == 0 or n_b == 0:
        return None
    return n_a * n_b * bin_ps / duration_ps


@dataclass
class HistogramAccumulator:
    """Sums one histogram over intervals. ``accumulate=False``: each published histogram is one interval's."""

    spec: HistogramSpec
    accumulate: bool = False

    def __post_init__(self) -> None:
        self.total = np.zeros(self.spec.n_bins, np.int64)
        self.intervals = 0
        self.overflow_intervals = 0
        self.t_begin: int | None = None

    def reset(self) -> None:
        self.__post_init__()

    def add(self, counts: np.ndarray, t_begin: int, overflow: bool) -> np.ndarray:
        """Account one interval; return the histogram to publish (this interval's, or the running sum)."""
        if not self.accumulate:
            self.total = counts
            self.intervals = 1
            self.overflow_intervals = int(overflow)
            self.t_begin = t_begin
            return counts
        if self.t_begin is None:
            self.t_begin = t_begin
        self.total = self.total + counts
        self.intervals += 1
        self.overflow_intervals += int(overflow)
        return self.total
