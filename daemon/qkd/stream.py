"""Streaming BBM92 sifting over TagBatches: coincidence clusters across batch boundaries, per-channel delays.

The tags of a link's eight channels get their corrected time ``s = t + delays_ps[c]`` (the analysis pipeline's
delays, read again for every batch so delay tracking takes effect at once). With raw watermark ``W`` (the
batch's ``t_end``, a promise for every channel) every tag with ``s < H = W + min d`` is known. The corrected
stream is cut greedily into clusters exactly like :func:`daemon.qkd.sifting.coincidence_events` (a cluster
starts at the first unused tag and takes every tag with ``s < s_start + window``); a cluster is only closed
when ``s_start + window <= H``, else its tags are carried to the next batch. So the clusters, and therefore
the sifted bits, do not depend on how the stream is cut into batches (tested against the whole-stream oracle).

A gap between batches, tagger time going backwards or a change of delays drops the carried tags (the clusters
straddling that point are lost, never completed with wrong data). A batch flagged OVERFLOW / MISSED_EVENTS
gives no events at all: squashing needs every click, and a lost click could turn a double click into a
single one. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from daemon.qkd.sifting import SiftResult, TaggerMap, sift_events

__all__ = ["StreamSifter", "SiftCounters"]


@njit(cache=True, nogil=True)
def _clusters_until(s, code, window, horizon, out_a, out_b):  # pragma: no cover - jit
    """Greedy clusters of the sorted corrected stream ``s`` closed before ``horizon``.

    Returns (events, index of the first tag not consumed)."""
    n = s.shape[0]
    ne = 0
    i = 0
    while i < n:
        t0 = s[i]
        if t0 + window > horizon:
            break
        if i + 1 == n or s[i + 1] - t0 >= window:  # a lone tag: one side only, never an event
            i += 1
            continue
        ma = 0
        mb = 0
        while i < n and s[i] - t0 < window:
            c = code[i]
            if c >= 5:
                mb |= 1 << (c - 5)
            else:
                ma |= 1 << (c - 1)
            i += 1
        if ma != 0 and mb != 0:
            out_a[ne] = ma
            out_b[ne] = mb
            ne += 1
    return ne, i


@njit(cache=True, nogil=True)
def _split(t, ch, code_lut, delay_lut, group_lut, out_s, out_c, counts):  # pragma: no cover - jit
    """The link's tags, corrected, into one sorted run per delay group (same delay: order kept)."""
    for i in range(t.shape[0]):
        c = ch[i]
        code = code_lut[c]
        if code == 0:
            continue
        g = group_lut[c]
        k = counts[g]
        out_s[g, k] = t[i] + delay_lut[c]
        out_c[g, k] = code
        counts[g] = k + 1


@njit(cache=True, nogil=True)
def _merge(carry_s, carry_c, grp_s, grp_c, counts, out_s, out_c):  # pragma: no cover - jit
    """Merge the sorted carry and the sorted group runs. One or two delay groups (the usual case: Alice's and
    Bob's fibers) merge with scalar cursors; more groups use a scan of the heads (k <= 9)."""
    ng = counts.shape[0]
    nc = carry_s.shape[0]
    big = np.iinfo(np.int64).max
    if ng <= 2:
        na = counts[0]
        nb = counts[1] if ng == 2 else 0
        i = 0
        j = 0
        m = 0
        k = 0
        total = nc + na + nb
        vc = carry_s[0] if nc > 0 else big
        va = grp_s[0, 0] if na > 0 else big
        vb = grp_s[1, 0] if nb > 0 else big
        while k < total:
            if va <= vb and va <= vc:
                out_s[k] = va
                out_c[k] = grp_c[0, i]
                i += 1
                va = grp_s[0, i] if i < na else big
            elif vb <= vc:
                out_s[k] = vb
                out_c[k] = grp_c[1, j]
                j += 1
                vb = grp_s[1, j] if j < nb else big
            else:
                out_s[k] = vc
                out_c[k] = carry_c[m]
                m += 1
                vc = carry_s[m] if m < nc else big
            k += 1
        return total
    pos = np.zeros(ng, np.int64)
    ci = 0
    total = nc
    for g in range(ng):
        total += counts[g]
    for k in range(total):
        best = carry_s[ci] if ci < nc else big
        src = -1
        for g in range(ng):
            if pos[g] < counts[g]:
                v = grp_s[g, pos[g]]
                if v < best:
                    best = v
                    src = g
        if src < 0:
            out_s[k] = carry_s[ci]
            out_c[k] = carry_c[ci]
            ci += 1
        else:
            out_s[k] = best
            out_c[k] = grp_c[src, pos[src]]
            pos[src] += 1
    return total


@dataclass
class SiftCounters:
    """Running totals of one sifter (published with each block, reported by keys.status)."""

    tags: int = 0
    batches: int = 0
    coincidences: int = 0
    sifted_z: int = 0
    sifted_x: int = 0
    basis_mismatch: int = 0
    multi_alice: int = 0
    multi_bob: int = 0
    cross_basis: int = 0
    dropped_carries: int = 0  # carried tags dropped at an overflow, gap, time reversal or delay change
    broken_batches: int = 0  # batches flagged OVERFLOW / MISSED_EVENTS: their events are not sifted

    def add(self, r: SiftResult) -> None:
        self.coincidences += r.coincidences
        self.sifted_z += int(r.alice_z.size)
        self.sifted_x += int(r.alice_x.size)
        self.basis_mismatch += r.basis_mismatch
        self.multi_alice += r.multi_alice
        self.multi_bob += r.multi_bob
        self.cross_basis += r.cross_basis


class StreamSifter:
    """Sifts a tag stream batch by batch for one link (``tmap``: Alice's and Bob's H, V, D, A channels)."""

    def __init__(self, alice: tuple[int, ...], bob: tuple[int, ...], window_ps: int, bell_state: str = "phi+",
                 delays_ps: dict[int, int] | None = None) -> None:
        self.tmap = TaggerMap(tuple(alice), tuple(bob), window_ps=int(window_ps))  # validates the channels
        self.bell_state = bell_state
        self._lut = self.tmap.lut()
        self._chans = np.array(list(alice) + list(bob), dtype=np.int64)
        self.counters = SiftCounters()
        self._delays: tuple[int, ...] = (0,) * 8
        self._set_delays(delays_ps or {})
        self._s = np.empty(0, np.int64)  # carried corrected times (sorted) and codes
        self._c = np.empty(0, np.uint8)
        self._last_end: int | None = None

    @property
    def window_ps(self) -> int:
        return self.tmap.window_ps

    @property
    def carried(self) -> int:
        return int(self._s.size)

    def _set_delays(self, delays_ps: dict[int, int]) -> bool:
        new = tuple(int(delays_ps.get(int(c), 0)) for c in self._chans)
        changed = new != self._delays
        if not changed and hasattr(self, "_group_lut"):
            return False
        self._delays = new
        d = np.zeros(256, np.int64)
        d[self._chans] = new
        self._delay_lut = d
        groups = sorted(set(new))
        g = np.zeros(256, np.int64)
        for c, dv in zip(self._chans, new):
            g[c] = groups.index(dv)
        self._group_lut = g
        self._ngroups = len(groups)
        return changed

    def reset(self) -> None:
        """Forget the carried tags (a new stream: tagger time is not contiguous)."""
        if self._s.size:
            self.counters.dropped_carries += 1
        self._s = np.empty(0, np.int64)
        self._c = np.empty(0, np.uint8)
        self._last_end = None

    def feed(self, timestamps: np.ndarray, channels: np.ndarray, t_begin: int, t_end: int, *, broken: bool = False,
             delays_ps: dict[int, int] | None = None) -> SiftResult:
        """Sift one batch. ``broken``: the batch lost tags (OVERFLOW / MISSED_EVENTS): none of its events
        is sifted and the carry is dropped. ``delays_ps``: the current per-channel delays (a change drops the carry)."""
        self.counters.batches += 1
        if delays_ps is not None and self._set_delays(delays_ps):
            self.reset()
        if self._last_end is not None and t_begin != self._last_end:
            self.reset()  # a gap or a reversal: never close a cluster across it
        if broken:  # the tagger lost tags in this batch: its events are not trusted (squashing needs every click)
            self.reset()
            self.counters.broken_batches += 1
            self._last_end = int(t_end)
            return sift_events(np.empty(0, np.uint8), np.empty(0, np.uint8), self.bell_state)
        n = int(timestamps.shape[0])
        grp_s = np.empty((self._ngroups, n), np.int64)
        grp_c = np.empty((self._ngroups, n), np.uint8)
        counts = np.zeros(self._ngroups, np.int64)
        _split(timestamps, channels, self._lut, self._delay_lut, self._group_lut, grp_s, grp_c, counts)
        self.counters.tags += int(counts.sum())
        total = self._s.size + int(counts.sum())
        s = np.empty(total, np.int64)
        c = np.empty(total, np.uint8)
        _merge(self._s, self._c, grp_s, grp_c, counts, s, c)
        horizon = int(t_end) + min(self._delays)
        out_a = np.empty(s.size, np.uint8)
        out_b = np.empty(s.size, np.uint8)
        ne, used = _clusters_until(s, c, np.int64(self.tmap.window_ps), np.int64(horizon), out_a, out_b)
        self._s = s[used:].copy()
        self._c = c[used:].copy()
        self._last_end = int(t_end)
        result = sift_events(out_a[:ne], out_b[:ne], self.bell_state)
        self.counters.add(result)
        return result
