"""BBM92 sifting from time tags or from coincidence events, with squashing of multi-clicks.

Detection events
----------------
Each side has four detectors, H, V (Z basis) and D, A (X basis); bit 0 for H/D, 1 for V/A. A side's clicks in
one event form a 4-bit mask (H=1, V=2, D=4, A=8).

From time tags (:func:`coincidence_events`): Bob's times are shifted by ``delay_ps``; the merged stream is cut
into clusters greedily -- a cluster starts at the first tag not yet used and takes every tag (either side)
with ``t < t_start + window_ps``. A cluster with clicks on both sides is a coincidence; its Alice and Bob masks
are the OR of their clicks in it. A cluster with clicks on one side only is a single (not a coincidence).

Squashing (multi-clicks get a random bit, never discarded -- the squashing-model requirement):

* one click: its basis and bit;
* both detectors of one basis (H+V or D+A): that basis, a uniformly random bit;
* clicks in both bases: a uniformly random basis and a uniformly random bit.

The random bits and bases come from ``os.urandom`` (they must be unknown to an eavesdropper).

Sifting: a coincidence whose two bases agree gives a bit pair; Bob's bit is flipped per basis as the Bell
state requires: phi+ (none), phi- (X), psi+ (Z), psi- (Z and X). Everything is vectorized (a numba pass for
the clusters, numpy lookup tables for the squash and sift).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = [
    "BELL_FLIPS",
    "SiftResult",
    "TaggerMap",
    "coincidence_events",
    "sift_events",
    "sift_tags",
    "sift_reference",
]

# (flip Bob's Z bit, flip Bob's X bit): |phi+> correlated in Z and X, |phi-> = (HH - VV)/sqrt2 anticorrelated in
# X, |psi+> = (HV + VH)/sqrt2 anticorrelated in Z, correlated in X, |psi-> anticorrelated in both.
BELL_FLIPS: dict[str, tuple[int, int]] = {"phi+": (0, 0), "phi-": (0, 1), "psi+": (1, 0), "psi-": (1, 1)}

H, V, D, A = 1, 2, 4, 8
Z_BASIS, X_BASIS, RANDOM_BASIS, NO_CLICK = 0, 1, 2, 3
RANDOM_BIT = 2


def _tables() -> tuple[np.ndarray, np.ndarray]:
    basis = np.empty(16, np.uint8)
    bit = np.empty(16, np.uint8)
    for m in range(16):
        z, x = m & (H | V), m & (D | A)
        if m == 0:
            basis[m], bit[m] = NO_CLICK, 0
        elif z and x:
            basis[m], bit[m] = RANDOM_BASIS, RANDOM_BIT
        elif z:
            basis[m], bit[m] = Z_BASIS, {H: 0, V: 1}.get(z, RANDOM_BIT)
        else:
            basis[m], bit[m] = X_BASIS, {D: 0, A: 1}.get(x, RANDOM_BIT)
    return basis, bit


BASIS_TABLE, BIT_TABLE = _tables()


@dataclass(frozen=True)
class TaggerMap:
    """Tagger channels of Alice's and Bob's detectors, in the order (H, V, D, A)."""

    alice: tuple[int, int, int, int]
    bob: tuple[int, int, int, int]
    window_ps: int = 1000
    delay_ps: int = 0  # added to Bob's tag times

    def __post_init__(self) -> None:
        chans = list(self.alice) + list(self.bob)
        if len(self.alice) != 4 or len(self.bob) != 4 or len(set(chans)) != 8:
            raise ValueError("need four distinct channels per side (H, V, D, A), eight in all")
        if not all(0 <= c < 256 for c in chans):
            raise ValueError("channels must be 0..255")
        if self.window_ps <= 0:
            raise ValueError("window_ps must be positive")

    def lut(self) -> np.ndarray:
        """channel -> code: 0 unused, 1..4 Alice H,V,D,A, 5..8 Bob H,V,D,A."""
        lut = np.zeros(256, np.uint8)
        for i, c in enumerate(self.alice):
            lut[c] = 1 + i
        for i, c in enumerate(self.bob):
            lut[c] = 5 + i
        return lut


@dataclass
class SiftResult:
    """Sifted bit pairs per basis (0/1 uint8, Bob's already flipped for the Bell state) and event counts."""

    alice_z: np.ndarray
    bob_z: np.ndarray
    alice_x: np.ndarray
    bob_x: np.ndarray
    coincidences: int
    basis_mismatch: int
    multi_alice: int  # events with more than one click on Alice's side
    multi_bob: int
    cross_basis: int  # events where a side clicked in both bases (random basis assigned)

    @property
    def sifted(self) -> int:
        return int(self.alice_z.size + self.alice_x.size)

    def counts(self) -> dict:
        return {"coincidences": self.coincidences, "sifted_z": int(self.alice_z.size),
                "sifted_x": int(self.alice_x.size), "basis_mismatch": self.basis_mismatch,
                "multi_alice": self.multi_alice, "multi_bob": self.multi_bob, "cross_basis": self.cross_basis}


@njit(cache=True, nogil=True)
def _clusters(t, code, window, out_a, out_b, out_t):  # pragma: no cover - jit
    n = t.shape[0]
    ne = 0
    i = 0
    while i < n:
        c = code[i]
        if c == 0:
            i += 1
            continue
        t0 = t[i]
        ma = 0
        mb = 0
        while i < n and t[i] - t0 < window:
            c = code[i]
            if c >= 5:
                mb |= 1 << (c - 5)
            elif c >= 1:
                ma |= 1 << (c - 1)
            i += 1
        if ma != 0 and mb != 0:
            out_a[ne] = ma
            out_b[ne] = mb
            out_t[ne] = t0
            ne += 1
    return ne


def coincidence_events(times: np.ndarray, channels: np.ndarray, tmap: TaggerMap
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alice_mask, bob_mask, time) of every coincidence cluster in a tag stream (times int64 ps, sorted)."""
    t = np.asarray(times, dtype=np.int64)
    ch = np.asarray(channels, dtype=np.uint8)
    if t.shape != ch.shape:
        raise ValueError("times and channels differ in length")
    code = tmap.lut()[ch]
    if tmap.delay_ps:
        t = t + np.where(code >= 5, np.int64(tmap.delay_ps), np.int64(0))
    if t.size > 1 and (np.diff(t) < 0).any():
        order = np.argsort(t, kind="stable")
        t, code = t[order], code[order]
    out_a = np.empty(t.size, np.uint8)
    out_b = np.empty(t.size, np.uint8)
    out_t = np.empty(t.size, np.int64)
    ne = _clusters(t, code, np.int64(tmap.window_ps), out_a, out_b, out_t)
    return out_a[:ne].copy(), out_b[:ne].copy(), out_t[:ne].copy()


def _random_bits(count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(1, np.uint8)
    return np.unpackbits(np.frombuffer(os.urandom((count + 7) // 8), np.uint8))[:count]


# random bits a mask needs: 0 (single click), 1 (two clicks in one basis), 2 (clicks in both bases)
NEED_TABLE = np.array([0 if BASIS_TABLE[m] == NO_CLICK else (2 if BASIS_TABLE[m] == RANDOM_BASIS else
                                                               (1 if BIT_TABLE[m] == RANDOM_BIT else 0))
                       for m in range(16)], np.uint8)
POP_TABLE = np.array([bin(m).count("1") for m in range(16)], np.uint8)


@njit(cache=True, nogil=True)
def _count_needs(ma, mb, need, pop, stats):  # pragma: no cover - jit
    """Random bits the squash needs; stats[0..3] = bad masks, multi Alice, multi Bob, cross-basis events."""
    total = 0
    for i in range(ma.shape[0]):
        a = ma[i]
        b = mb[i]
        if a == 0 or b == 0 or a > 15 or b > 15:
            stats[0] += 1
            continue
        na = need[a]
        nb = need[b]
        total += na + nb
        stats[1] += pop[a] > 1
        stats[2] += pop[b] > 1
        stats[3] += (na == 2) | (nb == 2)
    return total


@njit(cache=True, nogil=True)
def _squash_sift(ma, mb, btab, xtab, rnd, fz, fx, az, bz, ax, bx, counts):  # pragma: no cover - jit
    """One pass: squash both sides (random basis/bit from rnd where the tables say 2), keep equal bases."""
    r = 0
    nz = 0
    nx = 0
    for i in range(ma.shape[0]):
        a = ma[i]
        b = mb[i]
        ba = btab[a]
        xa = xtab[a]
        if ba == 2:
            ba = rnd[r]
            r += 1
        if xa == 2:
            xa = rnd[r]
            r += 1
        bb = btab[b]
        xb = xtab[b]
        if bb == 2:
            bb = rnd[r]
            r += 1
        if xb == 2:
            xb = rnd[r]
            r += 1
        if ba == bb:
            if ba == 0:
                az[nz] = xa
                bz[nz] = xb ^ fz
                nz += 1
            else:
                ax[nx] = xa
                bx[nx] = xb ^ fx
                nx += 1
    counts[0] = nz
    counts[1] = nx


def sift_events(alice_mask: np.ndarray, bob_mask: np.ndarray, bell_state: str = "phi+") -> SiftResult:
    """Squash and sift coincidence events given as 4-bit detector masks per side."""
    if bell_state not in BELL_FLIPS:
        raise ValueError(f"unknown Bell state {bell_state!r} (one of {sorted(BELL_FLIPS)})")
    ma = np.ascontiguousarray(alice_mask, dtype=np.uint8)
    mb = np.ascontiguousarray(bob_mask, dtype=np.uint8)
    if ma.shape != mb.shape or ma.ndim != 1:
        raise ValueError("alice and bob masks must be 1-D arrays of one length")
    stats = np.zeros(4, np.int64)
    need = _count_needs(ma, mb, NEED_TABLE, POP_TABLE, stats)
    if stats[0]:
        raise ValueError("masks must be 1..15 (a coincidence has a click on each side)")
    rnd = _random_bits(int(need))
    fz, fx = BELL_FLIPS[bell_state]
    n = ma.size
    az, bz, ax, bx = (np.empty(n, np.uint8) for _ in range(4))
    counts = np.zeros(2, np.int64)
    _squash_sift(ma, mb, BASIS_TABLE, BIT_TABLE, rnd, np.uint8(fz), np.uint8(fx), az, bz, ax, bx, counts)
    nz, nx = int(counts[0]), int(counts[1])
    return SiftResult(alice_z=az[:nz].copy(), bob_z=bz[:nz].copy(), alice_x=ax[:nx].copy(), bob_x=bx[:nx].copy(),
                      coincidences=n, basis_mismatch=n - nz - nx, multi_alice=int(stats[1]),
                      multi_bob=int(stats[2]), cross_basis=int(stats[3]))


def sift_tags(times: np.ndarray, channels: np.ndarray, tmap: TaggerMap, bell_state: str = "phi+") -> SiftResult:
    """Coincidence clusters of a tag stream, squashed and sifted."""
    ma, mb, _ = coincidence_events(times, channels, tmap)
    return sift_events(ma, mb, bell_state)


def sift_reference(alice_mask, bob_mask, bell_state: str = "phi+", rand=None) -> SiftResult:
    """Plain per-event Python sift (test oracle and benchmark reference). ``rand()`` gives random bits."""
    import random as _random

    r = rand or (lambda: _random.SystemRandom().getrandbits(1))
    fz, fx = BELL_FLIPS[bell_state]
    out = {0: ([], []), 1: ([], [])}
    mism = multi_a = multi_b = cross = 0

    def squash(m):
        zc, xc = m & 3, m & 12
        if zc and xc:
            return r(), r(), True
        if zc:
            return 0, (0 if zc == 1 else 1 if zc == 2 else r()), False
        return 1, (0 if xc == 4 else 1 if xc == 8 else r()), False

    for a, b in zip(alice_mask, bob_mask):
        a, b = int(a), int(b)
        multi_a += bin(a).count("1") > 1
        multi_b += bin(b).count("1") > 1
        basis_a, bit_a, ca = squash(a)
        basis_b, bit_b, cb = squash(b)
        cross += ca or cb
        if basis_a != basis_b:
            mism += 1
            continue
        out[basis_a][0].append(bit_a)
        out[basis_a][1].append(bit_b ^ (fz if basis_a == 0 else fx))
    u8 = lambda v: np.array(v, np.uint8)  # noqa: E731
    return SiftResult(u8(out[0][0]), u8(out[0][1]), u8(out[1][0]), u8(out[1][1]), len(alice_mask), mism,
                      multi_a, multi_b, cross)
