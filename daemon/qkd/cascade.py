"""Cascade error reconciliation as a two-party protocol with parallel binary searches.

Alice's key is the reference; Bob corrects his key to hers. Alice is a *parity oracle*: she reveals the parities
Bob asks for and nothing else; Bob runs every search. The two sides are separate objects (:class:`CascadeAlice`,
:class:`CascadeBob`) that only exchange :class:`~daemon.qkd.channel.Message` objects.

Passes. Pass ``p`` orders the key by the affine permutation ``order_p(j) = (a_p*j + c_p) mod n`` (``gcd(a_p, n)
= 1``; ``a_p, c_p`` drawn from a shared public seed) and cuts it into blocks of ``2**L_p`` positions (the last
block may be short). Inside a block the binary search descends a dyadic tree: node ``(p, l, i)`` covers positions
``[i*2**l, (i+1)*2**l)`` (clipped at ``n``). The main passes have block sizes tuned to the QBER estimate
(``schedule``); then come *checks*: passes with two blocks (``L = ceil(log2 n) - 1``), BICONF-style random
halves, revealed one parity each.

What makes it efficient (f close to 1):

* every parity Alice ever revealed is kept (a hash table of tree nodes), both for the node asked and for its
  sibling (parent parity xor left parity). A later search that passes through a known node costs nothing; after
  every correction Bob re-checks *all* passes at once (the Cascade effect), for free;
* the last top-level block parity of every pass after the first, and block 1 of every check, is inferred from
  the total parity (known from pass 0) and is not sent;
* pass ``p+1`` is opened only when passes ``0..p`` hold no odd block any more (no wasted search of an error an
  earlier pass would have found), but Alice sends all main-pass and check top-level parities in her first
  message: they do not depend on Bob's corrections, so this costs no extra leak and saves a round trip a pass;
* all binary searches of all open passes advance together: one round trip moves every search one level down.

Termination: Bob asks for more checks until ``final_checks`` checks have never shown an odd half (each clean
check halves the chance a residual error pattern goes unnoticed); then he sends ``cascade.done``. Verification
(:mod:`daemon.qkd.verification`) follows.

Messages (see docs/qkd-reconciliation.md): ``cascade.start`` (A->B: seed, n, qber, schedule; disclosed: top-level
parities), ``cascade.query`` (B->A: arrays p, l, i), ``cascade.parities`` (A->B: disclosed answers),
``cascade.more`` (B->A: count), ``cascade.checks`` (A->B: disclosed check parities), ``cascade.done`` (B->A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from .channel import Message

__all__ = ["CascadeParams", "CascadeAlice", "CascadeBob", "schedule", "pass_params", "binary_entropy"]

MAX_N = 1 << 26
_EMPTY = np.int64(-1)


def binary_entropy(q: float) -> float:
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1 - q) * math.log2(1 - q)


@dataclass(frozen=True)
class CascadeParams:
    """Tuning of the block sizes (public; Alice's choice travels in ``cascade.start``)."""

    alpha: float = 0.7        # first block ~ alpha / Q, rounded to a power of two (in log2)
    growth: int = 5           # log2 of the block-size factor between main passes after the second
    second: float = 8.0       # second block ~ second * first ... (factor, rounded to a power of two)
    final_checks: int = 20    # clean random-half checks required before "done"
    check_batch: int = 8      # extra checks asked per round when more are needed


def schedule(n: int, qber: float, params: CascadeParams = CascadeParams()) -> list[int]:
    """Top levels (log2 block size) of the main passes for ``n`` bits at estimated ``qber``."""
    q = min(max(qber, 1e-4), 0.2)
    top = max(1, math.ceil(math.log2(n)) - 1)
    l1 = max(1, min(top, round(math.log2(params.alpha / q))))
    levels = [l1]
    l2 = min(top, l1 + max(1, round(math.log2(params.second))))
    if l2 < top:
        levels.append(l2)
        lv = l2 + params.growth
        while lv < top:
            levels.append(lv)
            lv += params.growth
    return levels


def pass_params(seed: int, p: int, n: int) -> tuple[int, int, int]:
    """(a, c, a^-1 mod n) of pass ``p``: the public affine permutation derived from the shared seed."""
    rng = np.random.default_rng([seed, p])
    while True:
        a = int(rng.integers(1, n)) if n > 2 else 1
        if math.gcd(a, n) == 1:
            break
    c = int(rng.integers(0, n))
    return a, c, pow(a, -1, n)


# --------------------------------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True)
def _range_parity(bits, n, a, c, lo, hi):
    idx = (a * lo + c) % n
    s = np.uint8(0)
    for _ in range(lo, hi):
        s ^= bits[idx]
        idx += a
        if idx >= n:
            idx -= n
    return s


@njit(cache=True, nogil=True)
def _top_parities(bits, n, a, c, L):
    """Parity of every top-level block of the pass (a, c, L): one streaming sweep over the key."""
    k = np.int64(1) << L
    nb = (n + k - 1) >> L
    out = np.zeros(nb, np.uint8)
    idx = c
    for b in range(nb):
        s = np.uint8(0)
        hi = min(n, (b + 1) * k)
        for _ in range(b * k, hi):
            s ^= bits[idx]
            idx += a
            if idx >= n:
                idx -= n
        out[b] = s
    return out


@njit(cache=True, nogil=True)
def _sweep_big(bits, n, pos, step, L, out):
    for b in range(n):
        out[pos >> L] ^= bits[b]
        pos += step
        if pos >= n:
            pos -= n


@njit(cache=True, nogil=True)
def _sweep_half(bits, n, pos, step, K):
    """Parity of the bits whose position is below K; four independent position chains (no loop-carried
    latency on one chain)."""
    q = n >> 2
    p0 = pos
    p1 = (pos + step * q) % n
    p2 = (pos + step * 2 * q) % n
    p3 = (pos + step * 3 * q) % n
    a0 = np.uint8(0)
    a1 = np.uint8(0)
    a2 = np.uint8(0)
    a3 = np.uint8(0)
    for b in range(q):
        a0 ^= bits[b] & np.uint8(p0 < K)
        a1 ^= bits[b + q] & np.uint8(p1 < K)
        a2 ^= bits[b + 2 * q] & np.uint8(p2 < K)
        a3 ^= bits[b + 3 * q] & np.uint8(p3 < K)
        p0 += step
        p1 += step
        p2 += step
        p3 += step
        p0 -= n * (p0 >= n)
        p1 -= n * (p1 >= n)
        p2 -= n * (p2 >= n)
        p3 -= n * (p3 >= n)
    acc = a0 ^ a1 ^ a2 ^ a3
    for b in range(4 * q, n):
        acc ^= bits[b] & np.uint8(p3 < K)
        p3 += step
        p3 -= n * (p3 >= n)
    return acc


@njit(cache=True, nogil=True)
def _all_top_parities(bits, n, pinv, pc, pL, ptoff, p0, p1, out):
    """Top-level parities of passes p0..p1-1 into ``out`` (flat, at ``ptoff``), each by one sequential sweep over
    the key: the position of bit b in pass p advances by a_p^-1 (mod n) from bit to bit. Two-block passes
    (checks) take a branch-free path and infer block 1 from the total parity."""
    tot = np.uint8(0)
    for b in range(n):
        tot ^= bits[b]
    for p in range(p0, p1):
        pos = (pinv[p] * ((n - pc[p]) % n)) % n  # position of bit 0
        nb = (n + (np.int64(1) << pL[p]) - 1) >> pL[p]
        o = ptoff[p]
        out[o:o + nb] = 0
        if nb == 2:
            h = _sweep_half(bits, n, pos, pinv[p], np.int64(1) << pL[p])
            out[o] = h
            out[o + 1] = h ^ tot
        else:
            _sweep_big(bits, n, pos, pinv[p], pL[p], out[o:o + nb])


@njit(cache=True, nogil=True)
def _answer(bits, n, pa, pc, pL, qp, ql, qi):
    """Alice's parities of the nodes (qp, ql, qi); raises on a malformed query."""
    m = qp.size
    out = np.empty(m, np.uint8)
    for q in range(m):
        p = qp[q]
        lv = ql[q]
        i = qi[q]
        if p < 0 or p >= pa.size or lv < 0 or lv >= pL[p]:
            raise ValueError("query outside the passes")
        lo = i << lv
        if lo >= n or i < 0:
            raise ValueError("query outside the key")
        hi = min(n, lo + (np.int64(1) << lv))
        out[q] = _range_parity(bits, n, pa[p], pc[p], lo, hi)
    return out


@njit(cache=True, nogil=True, inline="always")
def _key(p, lv, i):
    return (p << 32) | (lv << 27) | i


@njit(cache=True, nogil=True, inline="always")
def _slot(key, mask):
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((h >> np.uint64(20)) & np.uint64(mask))


@njit(cache=True, nogil=True)
def _ht_get(keys, vals, key):
    mask = keys.size - 1
    s = _slot(key, mask)
    while True:
        k = keys[s]
        if k == key:
            return np.int64(vals[s])
        if k == -1:
            return np.int64(-1)
        s = (s + 1) & mask


@njit(cache=True, nogil=True)
def _ht_put(keys, vals, count, key, val):
    mask = keys.size - 1
    s = _slot(key, mask)
    while True:
        k = keys[s]
        if k == key:
            vals[s] = val
            return
        if k == -1:
            keys[s] = key
            vals[s] = val
            count[0] += 1
            return
        s = (s + 1) & mask


@njit(cache=True, nogil=True)
def _ht_rehash(keys, vals, new_cap):
    nk = np.full(new_cap, -1, np.int64)
    nv = np.zeros(new_cap, np.int8)
    cnt = np.zeros(1, np.int64)
    for s in range(keys.size):
        if keys[s] != -1:
            _ht_put(nk, nv, cnt, keys[s], vals[s])
    return nk, nv


@njit(cache=True, nogil=True)
def _alice_known(p, lv, i, pL, ptoff, atop, keys, vals):
    if lv == pL[p]:
        return np.int64(atop[ptoff[p] + i])
    return _ht_get(keys, vals, _key(p, lv, i))


@njit(cache=True, nogil=True)
def _bob_round(bits, n, pa, pc, pinv, pL, ptoff, pnb, pfailed, st, atop, btop, tsearch, tstamp, keys, vals,
               hcount, s_p, s_l, s_i, q_s, q_bl, answers, qp, ql, qi, flips):
    """One step of Bob: apply Alice's answers, run every search as far as known parities allow, correct, cascade,
    open passes when the open ones are settled, and emit the next queries.

    ``st`` = [n_searches, n_queries, n_open, n_pass, stamp, corrections]; updated in place. Returns the number of
    queries written to (qp, ql, qi)."""
    ns = st[0]
    nq = st[1]
    n_open = st[2]
    n_pass = st[3]
    stamp = st[4]
    # 1. answers to the previous queries: record left and sibling, move the search down one level
    for q in range(nq):
        s = q_s[q]
        p = s_p[s]
        lv = s_l[s]
        i = s_i[s]
        par = _alice_known(p, lv, i, pL, ptoff, atop, keys, vals)
        ans = np.int64(answers[q])
        _ht_put(keys, vals, hcount, _key(p, lv - 1, 2 * i), ans)
        _ht_put(keys, vals, hcount, _key(p, lv - 1, 2 * i + 1), par ^ ans)
        if ans != q_bl[q]:
            s_i[s] = 2 * i
        else:
            s_i[s] = 2 * i + 1
        s_l[s] = lv - 1
    while True:
        # 2. descend every search through known nodes; a search at level 0 names a wrong bit
        nf = 0
        for s in range(ns):
            p = s_p[s]
            lv = s_l[s]
            i = s_i[s]
            if lv < 0:
                continue
            a = pa[p]
            c = pc[p]
            while True:
                if lv == 0:
                    flips[nf] = (a * i + c) % n
                    nf += 1
                    lv = -1
                    break
                half = np.int64(1) << (lv - 1)
                lo_r = (2 * i + 1) * half
                if lo_r >= n:  # right child empty: the left child is the node itself
                    par = _alice_known(p, lv, i, pL, ptoff, atop, keys, vals)
                    _ht_put(keys, vals, hcount, _key(p, lv - 1, 2 * i), par)
                    lv -= 1
                    i = 2 * i
                    continue
                kl = _ht_get(keys, vals, _key(p, lv - 1, 2 * i))
                if kl < 0:
                    break
                bl = np.int64(_range_parity(bits, n, a, c, lo_r - half, lo_r))
                lv -= 1
                i = 2 * i if bl != kl else 2 * i + 1
            s_l[s] = lv
            s_i[s] = i
        if nf == 0:
            # compact out finished searches
            m = 0
            for s in range(ns):
                if s_l[s] >= 0:
                    s_p[m] = s_p[s]
                    s_l[m] = s_l[s]
                    s_i[m] = s_i[s]
                    m += 1
            ns = m
            if ns > 0 or n_open >= n_pass:
                break
            # everything open is settled: open the next pass
            p = n_open
            n_open += 1
            o = ptoff[p]
            for t in range(pnb[p]):
                if btop[o + t] != atop[o + t]:
                    s_p[ns] = p
                    s_l[ns] = pL[p]
                    s_i[ns] = t
                    pfailed[p] = 1
                    ns += 1
            continue
        # 3. correct (once per bit) and toggle the top-level block of that bit in every open pass
        fl = np.sort(flips[:nf])
        stamp += 1
        prev = -1
        for f in range(nf):
            b = fl[f]
            if b == prev:
                continue
            prev = b
            bits[b] ^= 1
            st[5] += 1
            for p in range(n_pass):
                pos = (pinv[p] * ((b - pc[p]) % n)) % n
                t = ptoff[p] + (pos >> pL[p])
                btop[t] ^= 1
                tstamp[t] = stamp
        # 4. searches whose block was touched: still odd at their node? otherwise drop them
        for s in range(ns):
            p = s_p[s]
            lv = s_l[s]
            if lv < 0:
                continue
            t = ptoff[p] + (s_i[s] >> (pL[p] - lv))
            if tstamp[t] != stamp:
                continue
            lo = s_i[s] << lv
            hi = min(n, lo + (np.int64(1) << lv))
            bp = np.int64(_range_parity(bits, n, pa[p], pc[p], lo, hi))
            if bp == _alice_known(p, lv, s_i[s], pL, ptoff, atop, keys, vals):
                s_l[s] = -2
        m = 0
        for s in range(ns):
            if s_l[s] >= 0:
                s_p[m] = s_p[s]
                s_l[m] = s_l[s]
                s_i[m] = s_i[s]
                m += 1
        ns = m
        # 5. new searches in odd blocks without one (only touched blocks can have changed); tsearch == stamp + 1
        #    marks "holds a live search" for this iteration
        for s in range(ns):
            p = s_p[s]
            tsearch[ptoff[p] + (s_i[s] >> (pL[p] - s_l[s]))] = stamp + 1  # mark "has a search" for this stamp
        for f in range(nf):
            b = fl[f]
            if f > 0 and b == fl[f - 1]:
                continue
            for p in range(n_open):
                pos = (pinv[p] * ((b - pc[p]) % n)) % n
                tb = pos >> pL[p]
                t = ptoff[p] + tb
                if tsearch[t] != stamp + 1 and btop[t] != atop[t]:
                    tsearch[t] = stamp + 1
                    s_p[ns] = p
                    s_l[ns] = pL[p]
                    s_i[ns] = tb
                    pfailed[p] = 1
                    ns += 1
        stamp += 1
    # 6. queries: the left child of every pending search
    for s in range(ns):
        p = s_p[s]
        lv = s_l[s]
        i = s_i[s]
        half = np.int64(1) << (lv - 1)
        lo = 2 * i * half
        qp[s] = p
        ql[s] = lv - 1
        qi[s] = 2 * i
        q_s[s] = s
        q_bl[s] = _range_parity(bits, n, pa[s_p[s]], pc[s_p[s]], lo, lo + half)
    st[0] = ns
    st[1] = ns
    st[2] = n_open
    st[4] = stamp
    return ns


# --------------------------------------------------------------------------------------------------- parties


class _Passes:
    """The public pass structure both sides derive from the seed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.pa = np.zeros(0, np.int64)
        self.pc = np.zeros(0, np.int64)
        self.pinv = np.zeros(0, np.int64)
        self.pL = np.zeros(0, np.int64)
        self.pnb = np.zeros(0, np.int64)
        self.ptoff = np.zeros(0, np.int64)
        self.n_main = 0

    def add(self, levels: list[int]) -> None:
        p0 = self.pa.size
        params = [pass_params(self.seed, p0 + j, self.n) for j in range(len(levels))]
        L = np.asarray(levels, np.int64)
        nb = (self.n + (np.int64(1) << L) - 1) >> L
        start = int(self.ptoff[-1] + self.pnb[-1]) if p0 else 0
        self.pa = np.concatenate([self.pa, np.array([x[0] for x in params], np.int64)])
        self.pc = np.concatenate([self.pc, np.array([x[1] for x in params], np.int64)])
        self.pinv = np.concatenate([self.pinv, np.array([x[2] for x in params], np.int64)])
        self.pL = np.concatenate([self.pL, L])
        self.ptoff = np.concatenate([self.ptoff, start + np.concatenate([[0], np.cumsum(nb)[:-1]]).astype(np.int64)])
        self.pnb = np.concatenate([self.pnb, nb])

    @property
    def count(self) -> int:
        return int(self.pa.size)

    @property
    def n_top(self) -> int:
        return int(self.ptoff[-1] + self.pnb[-1]) if self.count else 0

    def tops(self, bits: np.ndarray, p0: int) -> list[np.ndarray]:
        """Top-level parities of passes p0.. of ``bits`` (one array per pass)."""
        out = np.zeros(self.n_top, np.uint8)
        _all_top_parities(bits, self.n, self.pinv, self.pc, self.pL, self.ptoff, p0, self.count, out)
        return [out[self.ptoff[p]:self.ptoff[p] + self.pnb[p]] for p in range(p0, self.count)]

    def check_level(self) -> int:
        return max(0, math.ceil(math.log2(self.n)) - 1)


def _sent_tops(tops: list[np.ndarray], first_pass: int) -> np.ndarray:
    """Top parities as sent: all of pass 0, all but the last block of every later pass."""
    parts = [t if p == 0 else t[:-1] for p, t in enumerate(tops, start=first_pass)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


class CascadeAlice:
    """Alice's side: holds her key, reveals the parities Bob asks for. Reads nothing but messages."""

    def __init__(self, key: np.ndarray, qber: float, seed: int, params: CascadeParams = CascadeParams()) -> None:
        self._bits = np.ascontiguousarray(key, dtype=np.uint8).copy()
        n = self._bits.size
        if not 2 <= n <= MAX_N:
            raise ValueError(f"block of {n} bits: must be 2..{MAX_N}")
        self.n = n
        self.qber = float(qber)
        self.seed = int(seed)
        self.params = params
        self.passes = _Passes(n, self.seed)
        self.done = False
        self.disclosed = 0

    def start(self) -> Message:
        levels = schedule(self.n, self.qber, self.params)
        n_checks = self.params.final_checks
        self.passes.add(levels + [self.passes.check_level()] * n_checks)
        bits = _sent_tops(self.passes.tops(self._bits, 0), 0)
        self.disclosed += bits.size
        return Message("cascade.start", {"n": self.n, "seed": self.seed, "qber": self.qber, "levels": levels,
                                         "checks": n_checks}, disclosed=bits)

    def on_message(self, msg: Message) -> Message | None:
        if msg.kind == "cascade.query":
            pp = self.passes
            ans = _answer(self._bits, self.n, pp.pa, pp.pc, pp.pL, msg.arrays["p"].astype(np.int64),
                          msg.arrays["l"].astype(np.int64), msg.arrays["i"].astype(np.int64))
            self.disclosed += ans.size
            return Message("cascade.parities", disclosed=ans)
        if msg.kind == "cascade.more":
            count = int(msg.meta["count"])
            if not 0 < count <= 64 or self.passes.count + count > 4096:
                raise ValueError(f"cascade.more: bad count {count}")
            p0 = self.passes.count
            self.passes.add([self.passes.check_level()] * count)
            bits = _sent_tops(self.passes.tops(self._bits, p0), p0)
            self.disclosed += bits.size
            return Message("cascade.checks", {"count": count}, disclosed=bits)
        if msg.kind == "cascade.done":
            self.done = True
            return None
        raise ValueError(f"CascadeAlice: unexpected message {msg.kind!r}")

    @property
    def key(self) -> np.ndarray:
        return self._bits


class CascadeBob:
    """Bob's side: holds his key, drives every search, corrects his key towards Alice's."""

    def __init__(self, key: np.ndarray, params: CascadeParams = CascadeParams()) -> None:
        self._bits = np.ascontiguousarray(key, dtype=np.uint8).copy()
        self.n = self._bits.size
        self.params = params
        self.done = False
        self.passes: _Passes | None = None
        self.corrections = 0
        self.rounds = 0

    def start(self) -> None:
        return None

    # -- state helpers
    def _grow_tops(self, tops_sent: np.ndarray, p0: int) -> None:
        pp = self.passes
        new = np.zeros(pp.n_top - self._atop.size, np.int8)
        self._atop = np.concatenate([self._atop, new])
        self._btop = np.concatenate([self._btop, new.copy()])
        self._tsearch = np.concatenate([self._tsearch, np.zeros(new.size, np.int64)])
        self._tstamp = np.concatenate([self._tstamp, np.zeros(new.size, np.int64)])
        self._pfailed = np.concatenate([self._pfailed, np.zeros(pp.count - self._pfailed.size, np.int64)])
        off = 0
        for p in range(p0, pp.count):
            o, nb = int(pp.ptoff[p]), int(pp.pnb[p])
            if p == 0:
                self._atop[o:o + nb] = tops_sent[off:off + nb]
                off += nb
                self._total = int(np.bitwise_xor.reduce(self._atop[o:o + nb]))
            else:
                self._atop[o:o + nb - 1] = tops_sent[off:off + nb - 1]
                off += nb - 1
                self._atop[o + nb - 1] = self._total ^ int(np.bitwise_xor.reduce(self._atop[o:o + nb - 1]))
        if off != tops_sent.size:
            raise ValueError(f"expected {off} parities, got {tops_sent.size}")
        for p, bt in enumerate(pp.tops(self._bits, p0), start=p0):
            self._btop[pp.ptoff[p]:pp.ptoff[p] + pp.pnb[p]] = bt
        cap = self._s_p.size
        if cap < pp.n_top:
            for name in ("_s_p", "_s_l", "_s_i", "_q_s", "_q_bl", "_qp", "_ql", "_qi", "_flips"):
                setattr(self, name, np.zeros(pp.n_top, np.int64))

    def _ensure_table(self, extra: int) -> None:
        need = 2 * (int(self._hcount[0]) + extra) + 64
        if need > self._keys.size:
            cap = 1 << max(10, math.ceil(math.log2(need)))
            self._keys, self._vals = _ht_rehash(self._keys, self._vals, cap)

    def on_message(self, msg: Message) -> Message | None:
        if msg.kind == "cascade.start":
            m = msg.meta
            if int(m["n"]) != self.n:
                raise ValueError(f"Alice's block has {m['n']} bits, Bob's {self.n}")
            self.passes = _Passes(self.n, int(m["seed"]))
            self.passes.n_main = len(m["levels"])
            self.passes.add(list(m["levels"]) + [self.passes.check_level()] * int(m["checks"]))
            self._atop = np.zeros(0, np.int8)
            self._btop = np.zeros(0, np.int8)
            self._tsearch = np.zeros(0, np.int64)
            self._tstamp = np.zeros(0, np.int64)
            self._pfailed = np.zeros(0, np.int64)
            self._s_p = np.zeros(0, np.int64)
            self._keys = np.full(1 << 12, -1, np.int64)
            self._vals = np.zeros(1 << 12, np.int8)
            self._hcount = np.zeros(1, np.int64)
            self._st = np.zeros(6, np.int64)
            self._grow_tops(msg.disclosed if msg.disclosed is not None else np.zeros(0, np.uint8), 0)
            self._st[3] = self.passes.count
            return self._step(np.zeros(0, np.uint8))
        if msg.kind == "cascade.parities":
            return self._step(msg.disclosed if msg.disclosed is not None else np.zeros(0, np.uint8))
        if msg.kind == "cascade.checks":
            p0 = self.passes.count
            self.passes.add([self.passes.check_level()] * int(msg.meta["count"]))
            self._grow_tops(msg.disclosed, p0)
            self._st[3] = self.passes.count
            return self._step(np.zeros(0, np.uint8))
        raise ValueError(f"CascadeBob: unexpected message {msg.kind!r}")

    def _step(self, answers: np.ndarray) -> Message:
        if answers.size != self._st[1]:
            raise ValueError(f"expected {self._st[1]} parities, got {answers.size}")
        self._ensure_table(2 * answers.size + 64 * self.passes.count)
        pp = self.passes
        self.rounds += 1
        nq = _bob_round(self._bits, self.n, pp.pa, pp.pc, pp.pinv, pp.pL, pp.ptoff, pp.pnb, self._pfailed, self._st,
                        self._atop, self._btop, self._tsearch, self._tstamp, self._keys, self._vals, self._hcount,
                        self._s_p, self._s_l, self._s_i, self._q_s, self._q_bl, answers.astype(np.int64),
                        self._qp, self._ql, self._qi, self._flips)
        self.corrections = int(self._st[5])
        if nq:
            return Message("cascade.query", arrays={"p": self._qp[:nq].astype(np.uint16),
                                                    "l": self._ql[:nq].astype(np.uint8),
                                                    "i": self._qi[:nq].astype(np.uint32)})
        clean = int(np.count_nonzero(self._pfailed[pp.n_main:] == 0))
        if clean < self.params.final_checks:
            count = min(64, max(self.params.check_batch, self.params.final_checks - clean))
            return Message("cascade.more", {"count": count})
        self.done = True
        return Message("cascade.done", {"corrections": self.corrections})

    @property
    def key(self) -> np.ndarray:
        return self._bits
