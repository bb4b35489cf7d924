"""Streaming coincidence engine: coincidences, accidentals and correlation histograms over TagBatches.

Semantics (the oracle :class:`daemon.analysis.reference.ReferenceAnalysis` computes the same on a whole stream)
-------------------------------------------------------------------------------------------------------------

* **Corrected time.** A tag of channel ``c`` at raw time ``t`` has corrected time ``s = t + delays_ps[c]``
  (int64 ps; delays may be negative; never float).
* **Pairs.** A coincidence pair ``(a, b)`` counts every pair of tags (multi-stop) with ``a`` on the *left* and
  ``b`` on the *right* whose difference ``Δ = s_b - s_a`` lies in the half-open window ``[lo, hi)``, with
  ``lo = -(window_ps // 2)`` and ``hi = lo + window_ps``: exactly ``window_ps`` integer values of Δ.
  Accidentals count the same window displaced by ``accidental_offset_ps`` (0 disables them).
* **Histograms.** Bin ``k`` of a histogram counts pairs with ``lo_ps + k*bin_ps <= Δ < lo_ps + (k+1)*bin_ps``.
* **Intervals.** Integration intervals are ``[t0 + k*I, t0 + (k+1)*I)`` of corrected time, ``t0`` being the
  ``t_begin`` of the first batch; a pair belongs to the interval holding its *left* tag's corrected time.
  Pairs whose left tag lies before ``t0`` are not counted.
* **Watermark.** A batch's ``t_end`` is the tagger's promise for *all* its channels (an idle channel never
  stalls the others). With raw watermark ``W`` every tag with ``s < H = W + min d`` is known (``min``/``max d``
  over the channels the engine uses). An interval is emitted once ``E = H - max(0, hi_max - 1)`` has reached
  its end (``hi_max``: the largest window end of any consumer): all its pairs are then counted.
* **Carried state.** Between batches the engine keeps the raw tags that later pairs can still involve: a tail
  of about ``max|delay| + window`` (or the accidental offset, if larger), the accidental ring, and the pending
  intervals' counters. Memory is bounded by that tail plus one batch.
* **Validity.** Interval ``k`` draws tags from raw time ``[T_k + min(0, lo_min) - max d,
  T_{k+1} + max(0, hi_max - 1) - min d)``. It is flagged ``overflow`` (invalid: counts are a lower bound) if
  that span overlaps a batch flagged OVERFLOW or MISSED_EVENTS or with ``missed_events > 0``, or a gap
  between batches. A batch's ``missed_events`` are reported in the first interval whose span it overlaps.
  Before the first batch nothing is missing (the stream starts there).

Algorithm (details in :mod:`daemon.analysis.kernels` and docs/analysis.md): the tags of the channels in use
form one merged stream -- the raw buffer itself, with the delays applied inside the kernels, when the delays of
those channels differ by at most ``RAW_SPREAD_MAX_PS``; else a corrected copy per batch (branch-free
extraction, a near-sorted fix-up, or a merge of delay groups). Coincidences and histograms use a two-phase
lookback on it: every tag is processed once, as the later tag of its pairs, when it arrives. Accidentals use a
ring of time buckets (one branch-free pass over the new tags, then an exact count behind its rare hits) when
the displaced window lies wholly in the past of its later tag, else a separate bitmap probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from daemon.analysis import kernels as K
from drivers.base import TagBatch, TagFlags

__all__ = [
    "CoincidenceEngine",
    "EngineSpec",
    "HistogramSpec",
    "IntervalResult",
    "window_bounds",
]

NCH = 256  # channels are uint8
GROUP_GAP_PS = 2000  # channels whose delays differ by more than this are merged as separate groups
RAW_SPREAD_MAX_PS = 4096  # up to this delay spread the kernels work on the raw buffer (no corrected copy)
SORT_BUDGET_SLACK = 1024  # insertion fix-up gives up after 2 moves per tag + this (then: merge delay groups)
BITMAP_WORDS = 1 << 14  # accidental probe: 2**20 buckets per block (128 KiB)


def window_bounds(window_ps: int) -> tuple[int, int]:
    """``[lo, hi)`` in Δ = s_right - s_left of a coincidence window of ``window_ps`` (full width)."""
    lo = -(int(window_ps) // 2)
    return lo, lo + int(window_ps)


@dataclass(frozen=True)
class HistogramSpec:
    """One correlation histogram of pair (a left, b right): ``n_bins`` bins of ``bin_ps`` from ``lo_ps``."""

    name: str
    a: int
    b: int
    bin_ps: int
    lo_ps: int
    n_bins: int

    @property
    def hi_ps(self) -> int:
        return self.lo_ps + self.bin_ps * self.n_bins

    def edges(self) -> np.ndarray:
        return self.lo_ps + self.bin_ps * np.arange(self.n_bins + 1, dtype=np.int64)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine counts. ``delays_ps`` maps channel -> int ps (missing: 0)."""

    pairs: tuple[tuple[int, int], ...] = ()
    window_ps: int = 1000
    accidental_offset_ps: int = 0
    delays_ps: dict[int, int] = field(default_factory=dict)
    interval_ps: int = 1_000_000_000_000
    histograms: tuple[HistogramSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.window_ps <= 0:
            raise ValueError("window_ps must be positive")
        if self.interval_ps <= 0:
            raise ValueError("interval_ps must be positive")
        for a, b in self.pairs:
            if not (0 <= a < NCH and 0 <= b < NCH):
                raise ValueError(f"pair ({a}, {b}): channels must be 0..255")
            if a == b:
                raise ValueError(f"pair ({a}, {b}): the two channels must differ")
        for h in self.histograms:
            if h.bin_ps <= 0 or h.n_bins <= 0:
                raise ValueError(f"histogram {h.name}: bin_ps and n_bins must be positive")
            if not (0 <= h.a < NCH and 0 <= h.b < NCH) or h.a == h.b:
                raise ValueError(f"histogram {h.name}: two different channels 0..255")
        for c, d in self.delays_ps.items():
            if not 0 <= int(c) < NCH:
                raise ValueError(f"delay for channel {c}: channels must be 0..255")
            if isinstance(d, (bool, float)) or not isinstance(d, (int, np.integer)):
                raise TypeError(f"delay for channel {c} must be an integer number of ps, got {d!r}")

    def delay_array(self) -> np.ndarray:
        d = np.zeros(NCH, np.int64)
        for c, v in self.delays_ps.items():
            d[int(c)] = int(v)
        return d

    def coincidence_window(self) -> tuple[int, int]:
        return window_bounds(self.window_ps)

    def accidental_window(self) -> tuple[int, int] | None:
        if not self.accidental_offset_ps or not self.pairs:
            return None
        lo, hi = self.coincidence_window()
        return lo + self.accidental_offset_ps, hi + self.accidental_offset_ps

    def channels(self) -> list[int]:
        """Channels any consumer uses."""
        return sorted({c for p in self.pairs for c in p} | {c for h in self.histograms for c in (h.a, h.b)})

    def windows(self) -> list[tuple[int, int]]:
        """Every window of every consumer (coincidence, accidental, histogram ranges)."""
        out = []
        if self.pairs:
            out.append(self.coincidence_window())
        acc = self.accidental_window()
        if acc is not None:
            out.append(acc)
        out += [(h.lo_ps, h.hi_ps) for h in self.histograms]
        return out


@dataclass(frozen=True)
class IntervalResult:
    """One completed integration interval (corrected left time ``[t_begin, t_end)``)."""

    index: int
    t_begin: int
    t_end: int
    counts: np.ndarray  # int64 per pair (EngineSpec.pairs order)
    accidentals: np.ndarray | None  # int64 per pair; None without an accidental offset
    histograms: tuple[np.ndarray, ...]  # int64 per histogram (EngineSpec.histograms order)
    overflow: bool
    missed_events: int


def _reach(lo: int, hi: int) -> int:
    return max(hi - 1, -lo, 0)


class _Scratch:
    """Reused work arrays (no fresh allocation and page faults per batch)."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype: type) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.shape[0] < n:
            a = np.empty(max(n, 1024, int(n * 1.25)), dtype)
            self._arrays[name] = a
        return a

    def clear(self) -> None:
        self._arrays.clear()


class CoincidenceEngine:
    """Streaming coincidences/accidentals/histograms: feed batches in time order, get completed intervals.

    Synchronous and single-threaded (its kernels release the GIL). After a stream restart (tagger time not
    contiguous) call :meth:`reset`; a batch that starts before the previous one ended raises ValueError.
    """

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        d = spec.delay_array()
        self._delays = d
        self._pairs = list(spec.pairs)
        npairs = len(self._pairs)
        self._lutf = np.full((NCH, NCH), -1, np.int32)  # [earlier, later] -> pair (earlier, later)
        self._lutr = np.full((NCH, NCH), -1, np.int32)  # [earlier, later] -> pair (later, earlier)
        self._lutp = np.full((NCH, NCH), -1, np.int32)  # [left, right] -> pair
        for i, (a, b) in enumerate(self._pairs):
            if self._lutp[a, b] < 0:
                self._lutp[a, b] = i
                self._lutf[a, b] = i
                self._lutr[b, a] = i
        self._dup = [(i, int(self._lutp[a, b])) for i, (a, b) in enumerate(self._pairs) if self._lutp[a, b] != i]
        chans = spec.channels()
        self._mask = np.zeros(NCH, np.bool_)
        self._mask[chans] = True
        self._cw = spec.coincidence_window()
        self._aw = spec.accidental_window()
        windows = spec.windows()
        self._empty = not chans
        if self._empty:
            self._min_d = self._max_d = 0
            self._lo_min, self._hi_max = 0, 1
        else:
            self._min_d = int(d[chans].min())
            self._max_d = int(d[chans].max())
            self._lo_min = min(w[0] for w in windows)
            self._hi_max = max(w[1] for w in windows)
        self._reach_c = _reach(*self._cw)
        self._reach_h = [_reach(h.lo_ps, h.hi_ps) for h in spec.histograms]
        self._reach = max([self._reach_c if self._pairs else 0, *self._reach_h, 0])
        self._probe_lo = min(0, self._aw[0]) if self._aw is not None else 0
        self._spread = self._max_d - self._min_d
        # small delay spread: kernels read the raw buffer and apply delays themselves (no copy, no sort);
        # else they read a corrected, sorted copy (built per batch, merged from delay groups if needed)
        self._raw_mode = self._spread <= RAW_SPREAD_MAX_PS
        self._zero_delays = np.zeros(NCH, np.int64)
        # accidentals: a bucket ring (a pass of its own over the new tags) when the displaced window lies wholly on
        # one side of its later tag (|offset| beyond half a window plus the delay spread the kernels see); else a
        # probe pass
        self._acc_mode = None
        self._acc_reach = 0
        if self._aw is not None:
            alo, ahi = self._aw
            eff_spread = self._spread if self._raw_mode else 0
            w = ahi - alo
            shift = max(6, int(w - 1).bit_length())
            self._acc_shift = shift
            lmask = np.zeros(NCH, np.bool_)
            rmask = np.zeros(NCH, np.bool_)
            for a, b in self._pairs:
                lmask[a] = True
                rmask[b] = True
            if alo > eff_spread or ahi <= -eff_spread:
                self._acc_mode = "ring"
                self._setter_left = alo > eff_spread
                if self._setter_left:  # testers are right tags, setters the left tags in their past
                    self._wlo, self._whi = 1 - ahi, 1 - alo
                    setm, testm = lmask, rmask
                else:
                    self._wlo, self._whi = alo, ahi
                    setm, testm = rmask, lmask
                span = max(abs(self._wlo), abs(self._whi)) + 2 * (1 << shift) + 2 * eff_spread
                rn = 64
                while rn * (1 << shift) <= 2 * span:
                    rn *= 2
                self._ring_slots = rn
                self._setm = np.where(setm, 0, rn).astype(np.uint64)  # ring slot offsets: setters store for real,
                self._testm = np.where(testm, 0, 2 * rn).astype(np.uint64)  # testers test for real
                self._acc_reach = -self._wlo  # in corrected time: how far back a tester's setters lie
            else:
                self._acc_mode = "probe"
                self._bitmap = np.zeros(BITMAP_WORDS, np.int64)
                self._lmask, self._rmask = lmask, rmask
        order = sorted(chans, key=lambda c: int(d[c]))
        groups: list[list[int]] = []
        for c in order:
            if groups and int(d[c]) - int(d[groups[-1][-1]]) <= GROUP_GAP_PS:
                groups[-1].append(c)
            else:
                groups.append([c])
        self._groups = []
        for g in groups:
            m = np.zeros(NCH, np.bool_)
            m[g] = True
            self._groups.append(m)
        self._use_groups = False
        self._npairs = npairs
        self._scratch = _Scratch()
        self.tags = 0
        self.batches = 0
        self.intervals = 0
        self.overflow_intervals = 0
        self.reset()

    # ---------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the stream: the next batch starts a new interval grid (use after a stream restart)."""
        self._t0: int | None = None
        self._Q = 0  # lookback: stream elements with corrected time < Q have been processed as the later tag
        self._E = 0  # probe and emission horizon (corrected)
        self._W = 0
        self._seen = 0
        self._kbase = 0
        self._store_t = np.full(1, K.INT64_MAX, np.int64)  # reused storage of the raw buffer
        self._store_c = np.zeros(1, np.uint8)
        self._ts = self._store_t  # raw buffer (a view of the store), sentinel-terminated
        self._ch = self._store_c
        self._n = 0
        self._bad: list[list[int]] = []  # [begin, end, missed_events, attributed]
        self._pend_counts = np.zeros((0, self._npairs), np.int64)
        self._pend_acc = np.zeros((0, self._npairs), np.int64)
        self._pend_hist = [np.zeros((0, h.n_bins), np.int64) for h in self.spec.histograms]
        self._scratch.clear()
        if self._acc_mode == "ring":
            self._ring = np.full(3 * self._ring_slots, np.iinfo(np.int64).min, np.int64)

    @property
    def started(self) -> bool:
        return self._t0 is not None

    @property
    def t0(self) -> int | None:
        return self._t0

    @property
    def horizon_ps(self) -> int | None:
        """Corrected time up to which intervals are complete (None before the first batch)."""
        return None if self._t0 is None else self._E

    @property
    def watermark_ps(self) -> int | None:
        return None if self._t0 is None else self._W

    @property
    def buffered_tags(self) -> int:
        return self._n

    # ---------------------------------------------------------------------------------------------------
    def _raw_cut(self) -> int:
        """Raw time from which buffered tags can still be involved in a pair not yet counted."""
        probe = self._E + self._probe_lo - self._max_d
        back = max(self._reach, self._acc_reach)
        if self._raw_mode:
            return min(self._W - back - self._spread, probe)
        return min(self._Q - back - self._max_d, probe)

    def feed(self, batch: TagBatch) -> list[IntervalResult]:
        """Account one batch; return the intervals it completed, oldest first."""
        tb, te = int(batch.t_begin), int(batch.t_end)
        if self._t0 is None:
            self._t0 = self._E = self._W = self._seen = tb
            self._Q = tb + min(0, self._min_d)  # built stream: every tag goes once through the lookback
            self._kbase = 0
        elif tb < self._W:
            raise ValueError(f"batch starts at {tb} ps, before the previous batch ended ({self._W} ps): tagger "
                             "time went backwards; reset() the engine after a stream restart")
        if tb > self._seen:
            self._bad.append([self._seen, tb, 0, 0])  # a gap: tags there were never seen
        missed = int(batch.missed_events)
        if batch.flags & (TagFlags.OVERFLOW | TagFlags.MISSED_EVENTS) or missed > 0:
            self._bad.append([tb, max(te, tb + 1), missed, 0])
        self._seen = max(self._seen, te)
        self._W = te
        self.batches += 1
        n = len(batch)
        if n:
            self.tags += n
            self._append(batch.timestamps, batch.channels)
        if self._empty:
            self._E = self._Q = self._W
        else:
            h = self._W + self._min_d
            q_new = max(self._Q, h)
            e_new = max(self._E, h - max(0, self._hi_max - 1))
            self._process(h, q_new, e_new, self._n - n)
            self._Q, self._E = q_new, e_new
        out = self._emit()
        self._trim()
        return out

    def _append(self, ts: np.ndarray, ch: np.ndarray) -> None:
        """Carried tail + new batch, contiguous and sentinel-terminated, in a reused store (no page faults)."""
        n0, n1 = self._n, ts.shape[0]
        need = n0 + n1 + 1
        cap = self._store_t.shape[0]
        if need > cap or (cap > (1 << 20) and cap > 8 * need):
            cap = max(need + need // 2, 1024)
            st, sc = np.empty(cap, np.int64), np.empty(cap, np.uint8)
            st[:n0] = self._ts[:n0]
            sc[:n0] = self._ch[:n0]
            self._store_t, self._store_c = st, sc
        else:
            st, sc = self._store_t, self._store_c
            if n0:
                st[:n0] = self._ts[:n0]  # the tail moves to the front (numpy handles the overlap)
                sc[:n0] = self._ch[:n0]
        st[n0:n0 + n1] = ts
        sc[n0:n0 + n1] = ch
        st[n0 + n1] = K.INT64_MAX
        sc[n0 + n1] = 0
        self._ts, self._ch, self._n = st[:need], sc[:need], n0 + n1

    def _trim(self) -> None:
        if not self._n:
            return
        if self._empty:
            cut = self._n
        else:
            cut = int(np.searchsorted(self._ts[:self._n], self._raw_cut(), side="left"))
        if cut:
            self._ts = self._ts[cut:]
            self._ch = self._ch[cut:]
            self._n -= cut

    # ---------------------------------------------------------------------------------------------------
    def _built_stream(self, lb: int, h: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Corrected, sorted stream of the channels in use with corrected time in [lb, h)."""
        n = self._n
        u = self._scratch.get("u", n + 1, np.int64)
        c = self._scratch.get("c", n + 1, np.uint8)
        if not self._use_groups:
            m, ok = K.build_stream(self._ts, self._ch, n, self._mask, self._delays, np.int64(lb), np.int64(h), u, c)
            if ok or K.sort_nearly_sorted(u, c, m, 2 * m + SORT_BUDGET_SLACK):
                return u, c, m
            self._use_groups = len(self._groups) > 1  # delays far apart: merge per delay group from now on
            if not self._use_groups:
                _argsort(u, c, m)
                return u, c, m
        parts = []
        for gi, gmask in enumerate(self._groups):
            gu = self._scratch.get(f"gu{gi}", n + 1, np.int64)
            gc = self._scratch.get(f"gc{gi}", n + 1, np.uint8)
            m, ok = K.build_stream(self._ts, self._ch, n, gmask, self._delays, np.int64(lb), np.int64(h), gu, gc)
            if not ok and not K.sort_nearly_sorted(gu, gc, m, 2 * m + SORT_BUDGET_SLACK):
                _argsort(gu, gc, m)
            parts.append((gu, gc, m))
        acc_u, acc_c, acc_n = parts[0]
        for k, (gu, gc, m) in enumerate(parts[1:]):
            ou = self._scratch.get(f"mu{k % 2}", n + 1, np.int64)
            oc = self._scratch.get(f"mc{k % 2}", n + 1, np.uint8)
            acc_n = K.merge2(acc_u, acc_c, acc_n, gu, gc, m, ou, oc)
            acc_u, acc_c = ou, oc
        return acc_u, acc_c, acc_n

    def _ensure_rows(self, k_last: int) -> None:
        need = k_last - self._kbase + 1
        have = self._pend_counts.shape[0]
        if need <= have:
            return
        grow = max(need - have, 4)

        def ext(a: np.ndarray) -> np.ndarray:
            return np.concatenate((a, np.zeros((grow, a.shape[1]), np.int64)))

        self._pend_counts = ext(self._pend_counts)
        self._pend_acc = ext(self._pend_acc)
        self._pend_hist = [ext(x) for x in self._pend_hist]

    def _process(self, h: int, q_new: int, e_new: int, first_new: int) -> None:
        t0, iv = self._t0, self.spec.interval_ps
        last_left = (self._W - 1 + self._max_d) if self._raw_mode else (h - 1)
        self._ensure_rows((last_left - t0) // iv)
        if not self._n:
            return
        grid0 = np.int64(t0 + self._kbase * iv)
        if self._raw_mode:
            u, c, n = self._ts, self._ch, self._n
            dd, min_d, max_d, spread = self._delays, self._min_d, self._max_d, self._spread
            i0, i1 = first_new, n  # lookback: each tag once, as the later tag of its pairs, when it arrives
        else:
            u, c, n = self._built_stream(min(self._Q - max(self._reach, self._acc_reach), self._E + self._probe_lo), h)
            dd, min_d, max_d, spread = self._zero_delays, 0, 0, 0
            i0, i1 = (int(x) for x in np.searchsorted(u[:n], [self._Q, q_new], side="left"))
        if not n:
            return
        if self._pairs and i1 > i0:
            cand = self._scratch.get("cand", i1 - i0 + 1, np.int64)
            K.lookback_coincidences(u, c, dd, i0, i1, self._lutf, self._lutr, np.int64(self._cw[0]),
                                    np.int64(self._cw[1]), np.int64(self._reach_c + spread), np.int64(min_d),
                                    np.int64(spread), grid0, np.int64(iv), self._pend_counts, cand)
            if self._acc_mode == "ring":
                hits = self._scratch.get("hits", i1 - i0 + 1, np.int64)
                nh = K.accidentals_ring(u, c, dd, i0, i1, self._setm, self._testm, self._ring, self._acc_shift,
                                        np.int64(self._whi - 1), hits)
                if nh:
                    K.accidentals_hits(u, c, n, dd, hits, nh, np.int64(min_d), np.int64(max_d), np.int64(self._wlo),
                                       np.int64(self._whi), self._setter_left, self._lutp, grid0, np.int64(iv),
                                       self._pend_acc)
        for hs, reach, pend in zip(self.spec.histograms, self._reach_h, self._pend_hist):
            if i1 > i0:
                K.lookback_histogram(u, c, dd, i0, i1, hs.a, hs.b, np.int64(hs.lo_ps), np.int64(hs.bin_ps), hs.n_bins,
                                     np.int64(reach + spread), np.int64(min_d), np.int64(spread), grid0, np.int64(iv),
                                     pend)
        if self._acc_mode == "probe" and e_new > self._E:
            alo, ahi = self._aw
            j0, j1 = (int(x) for x in np.searchsorted(u[:n], [self._E - max_d, e_new - min_d], side="left"))
            if j1 > j0:
                K.probe_window(u, c, n, dd, np.int64(min_d), np.int64(max_d), j0, j1, np.int64(self._E),
                               np.int64(e_new), self._lmask, self._rmask, self._lutp, np.int64(alo), np.int64(ahi),
                               self._acc_shift, grid0, np.int64(iv), self._bitmap, self._pend_acc)

    def _emit(self) -> list[IntervalResult]:
        t0, iv = self._t0, self.spec.interval_ps
        k_done = (self._E - t0) // iv
        out: list[IntervalResult] = []
        if k_done <= self._kbase:
            return out
        self._ensure_rows(k_done - 1)
        span_b = min(0, self._lo_min) - self._max_d
        span_e = max(0, self._hi_max - 1) - self._min_d
        for k in range(self._kbase, k_done):
            r = k - self._kbase
            tk, tk1 = t0 + k * iv, t0 + (k + 1) * iv
            rb, re = tk + span_b, tk1 + span_e
            overflow = False
            missed = 0
            for bad in self._bad:
                if bad[0] < re and bad[1] > rb:
                    overflow = True
                    if not bad[3]:
                        missed += bad[2]
                        bad[3] = 1
            counts = self._pend_counts[r].copy()
            acc = self._pend_acc[r].copy() if self._aw is not None else None
            for i, j in self._dup:  # the same pair configured twice: the same counts
                counts[i] = counts[j]
                if acc is not None:
                    acc[i] = acc[j]
            hists = tuple(x[r].copy() for x in self._pend_hist)
            out.append(IntervalResult(k, tk, tk1, counts, acc, hists, overflow, missed))
            self.intervals += 1
            self.overflow_intervals += overflow
        m = k_done - self._kbase
        self._pend_counts = self._pend_counts[m:]
        self._pend_acc = self._pend_acc[m:]
        self._pend_hist = [x[m:] for x in self._pend_hist]
        self._kbase = k_done
        next_begin = t0 + k_done * iv + span_b
        self._bad = [b for b in self._bad if b[1] > next_begin]
        return out


def _argsort(u: np.ndarray, c: np.ndarray, n: int) -> None:
    order = np.argsort(u[:n], kind="stable")
    u[:n] = u[:n][order]
    c[:n] = c[:n][order]
