"""Compiled (numba, cached) kernels of the live-analysis hot path.

Every kernel has a plain-numpy counterpart in :mod:`daemon.analysis.reference`, which the tests use as the
oracle. Conventions:

* times are int64 picoseconds. The kernels work on a *stream*: one array ``u`` of times sorted ascending (all
  channels merged) with a uint8 channel array ``c``, terminated by a sentinel ``u[n] = INT64_MAX`` so that
  forward scans need no bounds checks. The corrected time of element ``k`` is ``u[k] + dd[c[k]]``: either the
  raw tag buffer itself with the per-channel delays ``dd`` (when the delays of the channels in use differ by at
  most a few ns, so the raw order is the corrected order up to that spread), or a corrected, re-sorted copy
  with ``dd`` all zero (large delay spreads);
* a window ``[lo, hi)`` is half-open in ``Δ = s_right - s_left``; histogram bins are half-open the same way;
* every pair of distinct tags is counted (multi-stop, "all pairs"), as in a g2;
* a pair belongs to the integration interval (row) that holds its *left* tag's corrected time: row ``r`` is
  ``[grid0 + r*interval, grid0 + (r+1)*interval)``; pairs whose left tag has a negative row are not counted.

Pair tables: ``lutf[cj, ck]`` is the index of pair ``(cj, ck)`` (-1: not counted), used when the earlier tag
``j`` is the left one; ``lutr[cj, ck]`` is the index of pair ``(ck, cj)`` for the later tag ``k`` on the left.

Why one merged stream and a "lookback" instead of one two-pointer sweep per pair: in a merged stream the
partner of a tag within a window of a few ns is almost always the immediately preceding tag or none. A first,
branch-free pass picks the tags whose predecessor is within reach (about the share of tags in pairs); only
those are examined. Per-pair two-pointer sweeps instead pay a mispredicted loop exit per tag and scan every
channel once per pair (16 pairs + 16 accidental windows for a BBM92 matrix). The displaced accidental window
(100 ns away: its partners are not near in the stream) uses a ring of time buckets that remembers where the
earlier side's tags were: two stores and one load per tag, an exact count only behind a hit.

Each hot loop is a top-level kernel of its own (the engine calls the ring pass, the exact count of its hits
and the lookback one after the other): numba/LLVM inline callees, and one big function with all their
operands spills the loop-invariant table pointers to the stack and reloads them every iteration.

The kernels are ``nogil``: the analysis can run on a worker thread while the event loop keeps going.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "INT64_MAX",
    "build_stream",
    "histogram_pairs",
    "accidentals_hits",
    "accidentals_ring",
    "lookback_coincidences",
    "lookback_histogram",
    "lower_bound",
    "merge2",
    "probe_window",
    "segment_end",
    "sort_nearly_sorted",
    "sweep_histogram",
]

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


@njit(cache=True, nogil=True)
def build_stream(ts, ch, n, mask, delays, lo, hi, out_s, out_c):  # pragma: no cover - jit
    """Corrected stream of the channels in ``mask`` with ``s = t + delays[c]`` in ``[lo, hi)``.

    ``out_*`` must hold ``n + 1`` entries; a sentinel is written after the last one. Returns
    ``(count, sorted)``: the output is in raw order, sorted unless the channels have different delays.
    Branch-free compaction (every element is written, the count advances only for kept ones), so an
    interleaving of kept and dropped channels costs no mispredictions.
    """
    m = 0
    prev = INT64_MIN
    ok = True
    for i in range(n):
        c = ch[i]
        s = ts[i] + delays[c]
        keep = mask[c] & (s >= lo) & (s < hi)
        out_s[m] = s
        out_c[m] = c
        bad = keep & (s < prev)
        ok = ok & (not bad)
        prev = s if keep else prev
        m += 1 if keep else 0
    out_s[m] = INT64_MAX
    out_c[m] = 0
    return m, ok


@njit(cache=True, nogil=True)
def sort_nearly_sorted(s, c, n, budget):  # pragma: no cover - jit
    """Insertion-sort ``s[:n]`` (carrying ``c``) in place, giving up after ``budget`` element moves.

    A stream merged from channels with nearby delays is displaced only by the delay spread, so the number of
    moves (inversions) is small. Returns True when sorted; False means the budget ran out (the arrays are
    then a permutation, partly sorted) and the caller sorts another way.
    """
    moves = 0
    for i in range(1, n):
        x = s[i]
        if x >= s[i - 1]:
            continue
        y = c[i]
        j = i - 1
        while j >= 0 and s[j] > x:
            s[j + 1] = s[j]
            c[j + 1] = c[j]
            j -= 1
            moves += 1
        s[j + 1] = x
        c[j + 1] = y
        if moves > budget:
            return False
    return True


@njit(cache=True, nogil=True)
def merge2(a_s, a_c, na, b_s, b_c, nb, out_s, out_c):  # pragma: no cover - jit
    """Merge two sorted, sentinel-terminated streams (ties: ``a`` first) without branches on the data.

    ``a_s[na]`` and ``b_s[nb]`` must be the INT64_MAX sentinel; writes a sentinel after ``na + nb`` entries.
    """
    i = 0
    j = 0
    total = na + nb
    for k in range(total):
        x = a_s[i]
        y = b_s[j]
        take_a = x <= y if i < na else False
        out_s[k] = x if take_a else y
        out_c[k] = a_c[i] if take_a else b_c[j]
        i += 1 if take_a else 0
        j += 0 if take_a else 1
    out_s[total] = INT64_MAX
    out_c[total] = 0
    return total


@njit(cache=True, nogil=True)
def segment_end(u, i, i1, lim):  # pragma: no cover - jit
    """First index k in [i, i1] with ``u[k] >= lim`` (u sorted), galloping from i: O(log distance)."""
    if i >= i1 or u[i] >= lim:
        return i
    lo = i  # u[lo] < lim
    step = 1
    while lo + step < i1 and u[lo + step] < lim:
        lo += step
        step *= 2
    hi = lo + step if lo + step < i1 else i1
    lo += 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if u[mid] < lim:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def lookback_coincidences(u, c, dd, i0, i1, lutf, lutr, lo, hi, reach, min_d, spread, grid0, interval, counts,
                          cand):  # pragma: no cover - jit
    """Count pairs in ``[lo, hi)`` whose *later* stream element is ``i`` in ``[i0, i1)``.

    ``u`` is sorted stream time; the corrected time of element ``k`` is ``u[k] + dd[c[k]]`` with
    ``min_d <= dd <= min_d + spread`` over the channels in use (a built, corrected stream passes zeros).
    Each element looks back over earlier elements ``j`` with ``u[i] - u[j] <= reach`` (``reach`` must be at
    least ``max(hi - 1, -lo) + spread``), so every unordered pair of distinct tags is examined exactly once.
    ``counts[row, pair]`` gets +1, ``row`` being the interval of the left tag's corrected time.

    Two phases per interval segment (``u + min_d`` within one interval): a branch-free pass collects the
    elements whose predecessor is within reach (about the pair share of the tags); only those are then
    examined. That avoids a mispredicted branch per tag that has a partner. ``cand`` is an int64 work array
    of at least ``i1 - i0`` entries (reused across calls: no allocation per batch).
    """
    if i0 < 1:
        i0 = 1  # the first element has nothing to look back to
    if i0 >= i1:
        return
    fast = reach < interval and spread < interval
    row = (u[i0] + min_d - grid0) // interval
    i = i0
    while i < i1:
        start = grid0 + row * interval
        end = start + interval
        e = segment_end(u, i, i1, end - min_d)
        if e == i:
            row = (u[i] + min_d - grid0) // interval
            continue
        m = _cand_pass(u, i, e, reach, cand)
        _lookback_pass(u, c, dd, cand, m, lutf, lutr, lo, hi, reach, row, start, end, fast, grid0, interval,
                       counts)
        i = e
        row += 1


@njit(cache=True, nogil=True)
def _cand_pass(u, i, e, reach, cand):  # pragma: no cover - jit
    """Lookback candidates of ``[i, e)`` (``i >= 1``): the elements whose predecessor is within ``reach``.

    Branch-free: every element is written, the count advances only for candidates. Unsigned indices spare
    numba's negative-index fix-ups.
    """
    m = 0
    prev = u[i - 1]
    for k in range(np.uint64(i), np.uint64(e)):
        uk = u[k]
        cand[m] = k
        m += 1 if uk - prev <= reach else 0
        prev = uk
    return m


@njit(cache=True, nogil=True)
def _lookback_pass(u, c, dd, cand, m, lutf, lutr, lo, hi, reach, row, start, end, fast, grid0, interval,
                   counts):  # pragma: no cover - jit
    """Second phase of the lookback: the candidates ``cand[:m]`` look back over the elements within reach."""
    for t in range(m):
        k = cand[t]
        uk = u[k]
        ck = c[k]
        sk = uk + dd[ck]
        j = k - 1
        while j >= 0:
            uj = u[j]
            if uk - uj > reach:
                break
            cj = c[j]
            sj = uj + dd[cj]
            d = sk - sj
            pf = lutf[cj, ck]  # pair (j left, k right)
            pr = lutr[cj, ck]  # pair (k left, j right)
            use_f = pf >= 0  # choose the orientation without a branch on the data
            p = pf if use_f else pr
            delta = d if use_f else -d
            sl = sj if use_f else sk
            if p >= 0 and delta >= lo and delta < hi:
                if fast:
                    r = row - (1 if sl < start else 0) + (1 if sl >= end else 0)
                else:
                    r = (sl - grid0) // interval
                if r >= 0:
                    counts[r, p] += 1
            if pr >= 0 and use_f and -d >= lo and -d < hi:  # both orientations configured (rare)
                if fast:
                    r = row - (1 if sk < start else 0) + (1 if sk >= end else 0)
                else:
                    r = (sk - grid0) // interval
                if r >= 0:
                    counts[r, pr] += 1
            j -= 1


@njit(cache=True, nogil=True)
def accidentals_ring(u, c, dd, i0, i1, soff, toff, ring, sh, whi1, hits):  # pragma: no cover - jit
    """Accidental bucket ring over stream elements ``[i0, i1)``: returns the number of hits written to ``hits``.

    For a displaced window that lies wholly in the past of its later tag (the *tester*): a tester at corrected
    time ``s`` has its partners (*setters*) at ``[s + wlo, s + whi)`` with ``whi <= -spread``, so they come
    before it in the stream (each pair is found once, when its later tag passes, as in the lookback). With a
    positive offset setters are the left tags (``wlo = 1 - ahi``, ``whi = 1 - alo``), else the right tags
    (``wlo = alo``, ``whi = ahi``). Buckets are ``2**sh`` ps with ``2**sh >= whi - wlo``, so a tester's window
    spans at most the two buckets ``b1 - 1`` and ``b1 = (s + whi - 1) >> sh``. A setter in bucket ``b`` marks
    ring slots ``b`` and ``b + 1`` (slot ``x % R`` holds ``x`` when a setter lies in bucket ``x - 1`` or
    ``x``), so a tester tests one slot; a tester whose slot does not hold ``b1`` (the usual case) has no
    partner, a hit (``hits``: its stream index) is counted exactly by :func:`accidentals_hits`.

    ``ring`` has ``3R`` int64 entries (R a power of two) and persists across batches: ``[0, R)`` the ring,
    ``[R, 2R)`` absorbs the stores of non-setters, ``[2R, 3R)`` is never written (INT64_MIN): the tests of
    non-testers. ``soff[c]`` (uint64) is 0 for setter channels, else R; ``toff[c]`` 0 for testers, else 2R --
    branch-free, the only branch is the rare hit. ``R * 2**sh`` must exceed twice
    ``max(|wlo|, |whi|) + 2 * 2**sh + spread``. Unsigned ring indices spare numba's negative-index fix-ups.
    ``hits`` must hold ``i1 - i0`` entries. A top-level kernel of its own (not inlined in the lookback) so that
    its loop keeps all its operands in registers.
    """
    rmask = np.uint64(ring.shape[0] // 3 - 1)
    nh = 0
    for k in range(np.uint64(i0), np.uint64(i1)):
        ck = c[k]
        sk = u[k] + dd[ck]
        b = sk >> sh
        so = soff[ck]
        ring[(np.uint64(b) & rmask) + so] = b
        ring[(np.uint64(b + 1) & rmask) + so] = b + 1
        b1 = (sk + whi1) >> sh
        if ring[(np.uint64(b1) & rmask) + toff[ck]] == b1:
            hits[nh] = k
            nh += 1
    return nh


@njit(cache=True, nogil=True)
def accidentals_hits(u, c, n, dd, hits, nh, min_d, max_d, wlo, whi, setter_left, lutp, grid0, interval,
                     acc):  # pragma: no cover - jit
    """Exact count behind the ring hits of :func:`accidentals_ring`: ``acc[row of the left tag, pair] += 1``.

    The tester ``k`` at ``sk`` pairs with every setter at ``[sk + wlo, sk + whi)``: they lie a little before
    ``k`` in the stream, found by galloping back from ``k`` (O(log distance), not a search of the buffer).
    """
    for t in range(nh):
        k = hits[t]
        ck = c[k]
        sk = u[k] + dd[ck]
        x = sk + wlo - max_d  # first stream index q with u[q] >= x: q <= k since wlo < 0 and dd[ck] <= max_d
        hi_ = k
        step = 1
        lo_ = k - 1
        while lo_ >= 0 and u[lo_] >= x:
            hi_ = lo_
            step *= 2
            lo_ = hi_ - step
        lo_ = lo_ + 1 if lo_ >= 0 else 0  # u[lo_ - 1] < x (or lo_ = 0); u[hi_] >= x
        while lo_ < hi_:
            mid = (lo_ + hi_) >> 1
            if u[mid] < x:
                lo_ = mid + 1
            else:
                hi_ = mid
        q = lo_
        lim = sk + whi - min_d
        while u[q] < lim:
            cq = c[q]
            sq = u[q] + dd[cq]
            if sq >= sk + wlo and sq < sk + whi and q != k:
                if setter_left:
                    kk = lutp[cq, ck]
                    ls = sq
                else:
                    kk = lutp[ck, cq]
                    ls = sk
                if kk >= 0:
                    r = (ls - grid0) // interval
                    if r >= 0:
                        acc[r, kk] += 1
            q += 1


@njit(cache=True, nogil=True)
def lookback_histogram(u, c, dd, i0, i1, a, b, lo, binw, nbins, reach, min_d, spread, grid0, interval,
                       hist):  # pragma: no cover - jit
    """All-pairs histogram of pair ``(a, b)``: ``hist[row, (Δ - lo) // binw] += 1`` for ``lo <= Δ < lo + nbins*binw``.

    Same stream, lookback and two phases as :func:`lookback_coincidences` (``reach >= max(hi-1, -lo) + spread``).
    """
    if i0 < 1:
        i0 = 1
    if i0 >= i1:
        return
    hi = lo + binw * nbins
    fast = reach < interval and spread < interval
    cand = np.empty(i1 - i0 + 1, np.int64)
    row = (u[i0] + min_d - grid0) // interval
    i = i0
    while i < i1:
        start = grid0 + row * interval
        end = start + interval
        e = segment_end(u, i, i1, end - min_d)
        if e == i:
            row = (u[i] + min_d - grid0) // interval
            continue
        m = 0
        for k in range(i, e):
            ck = c[k]
            cand[m] = k
            m += 1 if ((u[k] - u[k - 1] <= reach) & ((ck == a) | (ck == b))) else 0
        for t in range(m):
            k = cand[t]
            uk = u[k]
            ck = c[k]
            sk = uk + dd[ck]
            j = k - 1
            while j >= 0:
                uj = u[j]
                if uk - uj > reach:
                    break
                cj = c[j]
                sj = uj + dd[cj]
                d = sk - sj
                fwd = (cj == a) & (ck == b)  # j left (a), k right (b); else maybe k left, j right
                rev = (ck == a) & (cj == b)
                delta = d if fwd else -d
                sl = sj if fwd else sk
                if (fwd | rev) and delta >= lo and delta < hi:
                    if fast:
                        r = row - (1 if sl < start else 0) + (1 if sl >= end else 0)
                    else:
                        r = (sl - grid0) // interval
                    if r >= 0:
                        hist[r, (delta - lo) // binw] += 1
                j -= 1
        i = e
        row += 1


@njit(cache=True, nogil=True)
def lower_bound(u, n, x):  # pragma: no cover - jit
    """First index k in [0, n] with u[k] >= x (u[:n] sorted)."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if u[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def probe_window(u, c, n, dd, min_d, max_d, i0, i1, s_lo, s_hi, lmask, rmask, lut, lo, hi, sh, grid0, interval,
                 bm, counts):  # pragma: no cover - jit
    """Pairs (left ``i``, right ``q``) with ``lo <= s_q - s_i < hi``, for left tags with ``s_i`` in ``[s_lo, s_hi)``.

    For the displaced (accidental) window, whose partners are not near in the stream. Left candidates are the
    stream elements ``[i0, i1)`` (the kernel checks ``lmask`` and the range). A bitmap of ``2**sh``-ps buckets
    (``2**sh >= hi - lo``) marks where right tags are, block by block; a left tag whose target window touches
    no marked bucket (the usual case) costs two bit tests, a hit is counted exactly by a binary search.
    ``bm`` is an all-zero int64 work array and is left all-zero. The stream must reach (sentinel-terminated)
    every element below ``s_hi - 1 + hi - min_d``.
    """
    nb = bm.shape[0] * 64
    blk = i0
    while blk < i1:
        base = (u[blk] + min_d + lo) >> sh
        ulim = ((base + nb) << sh) - max_d - hi + 1
        e = blk
        while e < i1 and u[e] < ulim:
            e += 1
        if e == blk:  # cannot happen when (nb - 2) << sh exceeds spread + window; defensive
            e = blk + 1
        q0 = lower_bound(u, n, (base << sh) - max_d)
        q1 = lower_bound(u, n, ((base + nb) << sh) - min_d)
        for q in range(q0, q1):
            cq = c[q]
            bit = ((u[q] + dd[cq]) >> sh) - base
            if bit >= 0 and bit < nb:
                bm[bit >> 6] |= np.int64(rmask[cq]) << (bit & 63)
        for i in range(blk, e):
            ci = c[i]
            si = u[i] + dd[ci]
            b0 = ((si + lo) >> sh) - base
            b1 = ((si + hi - 1) >> sh) - base
            if b0 < 0 or b1 >= nb:
                hit = 1
            else:
                hit = ((bm[b0 >> 6] >> (b0 & 63)) | (bm[b1 >> 6] >> (b1 & 63))) & 1
            if hit and lmask[ci] and si >= s_lo and si < s_hi:
                row = (si - grid0) // interval
                if row >= 0:
                    q = lower_bound(u, n, si + lo - max_d)
                    lim = si + hi - min_d
                    while u[q] < lim:
                        cq = c[q]
                        d = u[q] + dd[cq] - si
                        if d >= lo and d < hi and q != i:
                            k = lut[ci, cq]
                            if k >= 0:
                                counts[row, k] += 1
                        q += 1
        for q in range(q0, q1):
            bit = ((u[q] + dd[c[q]]) >> sh) - base
            if bit >= 0 and bit < nb:
                bm[bit >> 6] = 0
        blk = e


@njit(cache=True, nogil=True)
def sweep_histogram(ls, nl, rs, nr, lo, binw, nbins, hist):  # pragma: no cover - jit
    """Whole-array two-pointer histogram of ``rs - ls`` (both sorted): ``hist[(Δ - lo) // binw] += 1``."""
    hi = lo + binw * nbins
    j0 = 0
    for i in range(nl):
        s = ls[i]
        x = s + lo
        while j0 < nr and rs[j0] < x:
            j0 += 1
        x = s + hi
        k = j0
        base = s + lo
        while k < nr and rs[k] < x:
            hist[(rs[k] - base) // binw] += 1
            k += 1


def histogram_pairs(a: np.ndarray, b: np.ndarray, lo: int, binw: int, nbins: int) -> np.ndarray:
    """Whole-array all-pairs histogram of ``b - a`` over ``[lo, lo + nbins*binw)`` (int64 counts)."""
    a = np.ascontiguousarray(a, np.int64)
    b = np.ascontiguousarray(b, np.int64)
    hist = np.zeros(nbins, np.int64)
    sweep_histogram(a, a.shape[0], b, b.shape[0], np.int64(lo), np.int64(binw), np.int64(nbins), hist)
    return hist
