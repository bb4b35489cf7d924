"""Cascade error reconciliation as a two-party protocol with parallel binary searches.

Alice's key is the reference; Bob corrects his key to hers. Alice is a *parity oracle*: she reveals the parities
Bob asks for and nothing else; Bob runs every search. The two sides are separate objects (:class:`CascadeAlice`,
:class:`CascadeBob`) that only exchange :class:`~daemon.qkd.channel.Message` objects.

Main passes. Pass ``p`` orders the key by the affine permutation ``order_p(j) = (a_p*j + c_p) mod n``
(``gcd(a_p, n) = 1``; ``a_p, c_p`` drawn from a shared public seed) and cuts it into blocks of ``2**L_p``
positions (the last block may be short). Inside a block the binary search descends a dyadic tree: node
``(p, l, i)`` covers positions ``[i*2**l, (i+1)*2**l)`` (clipped at ``n``). Block sizes follow the QBER estimate
(``schedule``: first ~0.7/Q, second 16x (32x from 4 %), third 64x the second).

Checks. Then come *subset checks*: pass ``p`` is a public pseudo-random subset of the key (each bit in with
probability 1/2: splitmix64 of a per-pass key from the seed and the word index), one parity each. A residual
error pattern has odd parity on a uniformly random subset with probability exactly 1/2, so ``final_checks`` clean
checks leave a residual with probability ~2**-final_checks. A check's parity is one AND per 64-bit word of the
packed key; an odd check is searched like a pass over the identity order restricted to the subset (empty
children are skipped for free).

What makes it efficient (f close to 1):

* every parity Alice ever revealed is kept (main passes: a dense table per pass and level; checks: a hash
  table), both for the node asked and for its sibling (parent parity xor left parity). A later search that passes
  through a known node costs nothing; after every correction Bob re-checks *all* passes at once (the Cascade
  effect), for free;
* the last top-level block parity of every main pass after the first is inferred from the total parity (known
  from pass 0) and is not sent;
* a main pass is opened once the earlier ones are (nearly) settled (``open_ratio``), checks only once nothing is
  odd (no wasted search of an error an earlier pass would have found), but Alice sends all top-level parities in
  her first message: they do not depend on Bob's corrections, so this costs no extra leak and saves a round trip
  a pass;
* all binary searches of all open passes advance together: one round trip moves every search one level down.

Speed: both sides keep the key packed in the order of every main pass (``W``), so any node parity is one XOR per
64 bits; Bob updates those copies on every correction. The kernels avoid helper calls that take arrays (numba
updates a reference count per array argument).

Termination: Bob asks for more checks until ``final_checks`` checks have never been odd; then he sends
``cascade.done``. Verification (:mod:`daemon.qkd.verification`) follows.

Messages (see docs/qkd-reconciliation.md): ``cascade.start`` (A->B: seed, n, qber, levels, checks; disclosed:
top-level parities), ``cascade.query`` (B->A: array q of packed nodes ``p << 40 | l << 32 | i``; arrays p, l, i
are accepted too), ``cascade.parities`` (A->B: disclosed answers), ``cascade.more`` (B->A: count),
``cascade.checks`` (A->B: disclosed check parities), ``cascade.done`` (B->A: corrections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from .channel import Message

__all__ = ["CascadeParams", "CascadeAlice", "CascadeBob", "schedule", "pass_params", "binary_entropy"]

MAX_N = 1 << 26


def binary_entropy(q: float) -> float:
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1 - q) * math.log2(1 - q)


@dataclass(frozen=True)
class CascadeParams:
    """Tuning (public; Alice's schedule travels in ``cascade.start``, the rest is each side's own business).

    Defaults from measured sweeps (docs/qkd-reconciliation.md): a first block ~0.7/Q, a second 16x larger (32x from
    4 % QBER), a third 128x the second (if below n/2), then subset checks. Larger blocks lower the leak (fewer parities spent on error pairs an earlier pass
    could not see) but lengthen the pass-0/pass-1 cascade chains, i.e. cost round trips."""

    alpha: float = 0.7        # first block ~ alpha / Q, rounded to a power of two (in log2)
    second: float = 16.0      # second block = second * first (rounded to a power of two) ...
    second_high: float = 32.0  # ... or this factor from QBER high_qber on
    high_qber: float = 0.04
    growth: int = 7           # log2 of the block-size factor between main passes after the second
    final_checks: int = 20    # clean random-subset checks required before "done"
    check_batch: int = 8      # extra checks asked per round when more are needed
    open_ratio: float = 0.5   # open the next main pass once at most open_ratio * (its block count) searches run
    checks_at_once: int = 1   # checks opened together once the main passes are settled


def schedule(n: int, qber: float, params: CascadeParams = CascadeParams()) -> list[int]:
    """Top levels (log2 block size) of the main passes for ``n`` bits at estimated ``qber``."""
    q = min(max(qber, 1e-4), 0.2)
    top = max(1, math.ceil(math.log2(n)) - 1)
    l1 = max(1, min(top, round(math.log2(params.alpha / q))))
    levels = [l1]
    factor = params.second_high if q >= params.high_qber else params.second
    l2 = min(top, l1 + max(1, round(math.log2(factor))))
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


@njit(cache=True, nogil=True, inline="always")
def _mix(z):
    """splitmix64 finaliser (a bijection of uint64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _mask_word(mk, w, n):
    """Word ``w`` of the public random subset with key ``mk`` (bits at or beyond ``n`` cleared)."""
    m = _mix(mk + np.uint64(w + 1) * np.uint64(0x9E3779B97F4A7C15))
    rem = n - (w << 6)
    if rem < 64:
        m &= (np.uint64(1) << np.uint64(rem)) - np.uint64(1)
    return m


@njit(cache=True, nogil=True, inline="always")
def _span_mask(w, lo, hi):
    """Bits of word ``w`` whose index lies in [lo, hi)."""
    base = w << 6
    m = ~np.uint64(0)
    if lo > base:
        m &= ~np.uint64(0) << np.uint64(lo - base)
    if hi < base + 64:
        m &= (np.uint64(1) << np.uint64(hi - base)) - np.uint64(1)
    return m


@njit(cache=True, nogil=True, inline="always")
def _fold(acc):
    acc ^= acc >> np.uint64(32)
    acc ^= acc >> np.uint64(16)
    acc ^= acc >> np.uint64(8)
    acc ^= acc >> np.uint64(4)
    acc ^= acc >> np.uint64(2)
    acc ^= acc >> np.uint64(1)
    return np.uint8(acc & np.uint64(1))


@njit(cache=True, nogil=True, inline="always")
def _subset_parity(words, n, mk, lo, hi):
    """Parity of the key bits with index in [lo, hi) that belong to the subset ``mk``: one AND per word."""
    hi = min(hi, n)
    if lo >= hi:
        return np.uint8(0)
    acc = np.uint64(0)
    for w in range(lo >> 6, ((hi - 1) >> 6) + 1):
        acc ^= words[w] & _mask_word(mk, w, n) & _span_mask(w, lo, hi)
    return _fold(acc)


@njit(cache=True, nogil=True, inline="always")
def _subset_empty(n, mk, lo, hi):
    hi = min(hi, n)
    if lo >= hi:
        return True
    for w in range(lo >> 6, ((hi - 1) >> 6) + 1):
        if _mask_word(mk, w, n) & _span_mask(w, lo, hi):
            return False
    return True


@njit(cache=True, nogil=True, inline="always")
def _member(mk, b, n):
    return (_mask_word(mk, b >> 6, n) >> np.uint64(b & 63)) & np.uint64(1)


@njit(cache=True, nogil=True, inline="always")
def _wparity(W, p, lo, hi):
    """Parity of bits [lo, hi) of the packed row ``W[p]`` (indexed in place: a row view would cost a reference
    count update per call)."""
    if lo >= hi:
        return np.uint8(0)
    w0 = lo >> 6
    w1 = (hi - 1) >> 6
    if w0 == w1:
        return _fold(W[p, w0] & _span_mask(w0, lo, hi))
    acc = W[p, w0] & _span_mask(w0, lo, hi) ^ W[p, w1] & _span_mask(w1, lo, hi)
    for k in range(w0 + 1, w1):
        acc ^= W[p, k]
    return _fold(acc)


@njit(cache=True, nogil=True)
def _permute_pack(bits, n, a, c, out):
    """Pack the key in the order of an affine pass: bit j of ``out`` is key bit (a*j + c) mod n."""
    idx = c
    for w in range(out.size):
        acc = np.uint64(0)
        for k in range(min(64, n - (w << 6))):
            acc |= np.uint64(bits[idx]) << np.uint64(k)
            idx += a
            if idx >= n:
                idx -= n
        out[w] = acc


@njit(cache=True, nogil=True)
def _all_top_parities(W, words, n, P, pmk, p0, p1, out):
    """Top-level parities of passes p0..p1-1 into ``out`` (flat, at the pass offsets): an affine pass from its
    packed copy (one XOR per word), a subset pass (check) one AND per word of the packed key."""
    pL = P[3]
    pk = P[4]
    ptoff = P[5]
    pnb = P[6]
    for p in range(p0, p1):
        o = ptoff[p]
        if pk[p]:
            out[o] = _subset_parity(words, n, pmk[p], 0, n)
            continue
        k = np.int64(1) << pL[p]
        for t in range(pnb[p]):
            out[o + t] = _wparity(W, p, t * k, min(n, (t + 1) * k))


@njit(cache=True, nogil=True)
def _answer(W, words, n, P, pmk, qp, ql, qi, out):
    """Alice's parities of the nodes (qp, ql, qi) into ``out``; raises on a malformed query. (Written out, not
    through helpers taking arrays: numba updates reference counts per array argument, ~10 ns each.)"""
    pL = P[3]
    pk = P[4]
    npass = P.shape[1]
    for q in range(qp.size):
        p = np.int64(qp[q])
        lv = np.int64(ql[q])
        i = np.int64(qi[q])
        if p < 0 or p >= npass or lv < 0 or lv >= pL[p]:
            raise ValueError("query outside the passes")
        if i < 0 or i > (n - 1) >> lv:
            raise ValueError("query outside the key")
        lo = i << lv
        hi = lo + (np.int64(1) << lv)
        if pk[p]:
            out[q] = _subset_parity(words, n, pmk[p], lo, hi)
        else:
            out[q] = _wparity(W, p, lo, min(hi, n))


@njit(cache=True, nogil=True)
def _answer_packed(W, words, n, P, pmk, qk, out):
    """The same for packed nodes ``p << 40 | l << 32 | i`` (uint64)."""
    pL = P[3]
    pk = P[4]
    npass = P.shape[1]
    for q in range(qk.size):
        k = qk[q]
        p = np.int64(k >> np.uint64(40))
        lv = np.int64((k >> np.uint64(32)) & np.uint64(255))
        i = np.int64(k & np.uint64(0xFFFFFFFF))
        if p >= npass or lv >= pL[p]:
            raise ValueError("query outside the passes")
        if i > (n - 1) >> lv:
            raise ValueError("query outside the key")
        lo = i << lv
        hi = lo + (np.int64(1) << lv)
        if pk[p]:
            out[q] = _subset_parity(words, n, pmk[p], lo, hi)
        else:
            out[q] = _wparity(W, p, lo, min(hi, n))


@njit(cache=True, nogil=True, inline="always")
def _key(p, lv, i):
    return (p << 32) | (lv << 27) | i


@njit(cache=True, nogil=True, inline="always")
def _slot(key, mask):
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((h >> np.uint64(20)) & np.uint64(mask))


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")
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
def _bob_round(bits, words, W, n, P, pmk, pfailed, st, T, D, LO, keys, vals, hcount, S, answers):
    """One step of Bob: apply Alice's answers, run every search as far as known parities allow, correct, cascade,
    open passes when the open ones are settled, and emit the next queries.

    ``st`` = [n_searches, n_queries, n_open, n_pass, waves, corrections, 1000 * open_ratio, n_main,
    checks_at_once]; updated in place. ``P`` holds the pass rows (a, c, a^-1, L, kind, top offset, blocks), ``T``
    the top-level rows (Alice's parity, Bob's parity, 1 + the live search of the block or 0, spare), ``S`` the search
    rows (pass, level, index; query -> search, Bob's parity of the queried node; packed query; -; -; flips); ``D`` /
    ``LO`` the known parities of the main passes below the top (offset of (pass, level)), ``keys``/``vals`` those of
    the checks. Few arguments: numba's dispatch costs ~0.3 us each. Returns the number of queries written to S[5]
    (packed ``p << 40 | l << 32 | i``)."""
    pa = P[0]
    pc = P[1]
    pinv = P[2]
    pL = P[3]
    pk = P[4]
    ptoff = P[5]
    pnb = P[6]
    atop = T[0]
    btop = T[1]
    tsearch = T[2]
    s_p = S[0]
    s_l = S[1]
    s_i = S[2]
    q_s = S[3]
    q_bl = S[4]
    qp = S[5]
    flips = S[8]
    ns = st[0]
    nq = st[1]
    n_open = st[2]
    n_pass = st[3]
    stamp = st[4]
    open_at = st[6]
    n_main = st[7]
    at_once = st[8]
    # 1. answers to the previous queries: record left and sibling, move the search down one level
    for q in range(nq):
        s = q_s[q]
        p = s_p[s]
        lv = s_l[s]
        i = s_i[s]
        ans = np.int64(answers[q])
        if pk[p]:
            par = _ht_get(keys, vals, _key(p, lv, i)) if lv < pL[p] else np.int64(atop[ptoff[p] + i])
            _ht_put(keys, vals, hcount, _key(p, lv - 1, 2 * i), ans)
            _ht_put(keys, vals, hcount, _key(p, lv - 1, 2 * i + 1), par ^ ans)
        else:
            par = np.int64(D[LO[p, lv] + i]) if lv < pL[p] else np.int64(atop[ptoff[p] + i])
            o = LO[p, lv - 1] + 2 * i
            D[o] = ans
            D[o + 1] = par ^ ans
        if ans != q_bl[q]:
            s_i[s] = 2 * i
        else:
            s_i[s] = 2 * i + 1
        s_l[s] = lv - 1
    live = ns  # searches with s_l >= 0 (dead ones stay in place until the compaction at the end of the round)
    d0 = 0
    while True:
        # 2. descend the searches through known nodes (after the first wave only the new ones: a search blocked at
        #    an unknown node stays blocked until Alice answers); a search at level 0 names a wrong bit
        nf = 0
        for s in range(d0, ns):
            p = s_p[s]
            lv = s_l[s]
            i = s_i[s]
            if lv < 0:
                continue
            while True:
                if lv == 0:
                    flips[nf] = (pa[p] * i + pc[p]) % n
                    nf += 1
                    tsearch[ptoff[p] + (i >> pL[p])] = 0
                    live -= 1
                    lv = -1
                    break
                half = np.int64(1) << (lv - 1)
                lo_l = 2 * i * half
                lo_r = lo_l + half
                if pk[p]:  # a check: children may be empty (no subset member), known parities hashed
                    if _subset_empty(n, pmk[p], lo_r, lo_r + half) or _subset_empty(n, pmk[p], lo_l, lo_r):
                        # one child empty: the other is the node itself
                        par = _ht_get(keys, vals, _key(p, lv, i)) if lv < pL[p] else np.int64(atop[ptoff[p] + i])
                        i = 2 * i if _subset_empty(n, pmk[p], lo_r, lo_r + half) else 2 * i + 1
                        lv -= 1
                        _ht_put(keys, vals, hcount, _key(p, lv, i), par)
                        continue
                    kl = _ht_get(keys, vals, _key(p, lv - 1, 2 * i))
                    if kl < 0:
                        break
                    bl = np.int64(_subset_parity(words, n, pmk[p], lo_l, lo_r))
                else:
                    if lo_r >= n:  # right child empty: left = the node itself
                        par = np.int64(D[LO[p, lv] + i]) if lv < pL[p] else np.int64(atop[ptoff[p] + i])
                        D[LO[p, lv - 1] + 2 * i] = par
                        lv -= 1
                        i = 2 * i
                        continue
                    kl = np.int64(D[LO[p, lv - 1] + 2 * i])
                    if kl < 0:
                        break
                    bl = np.int64(_wparity(W, p, lo_l, lo_r))
                lv -= 1
                i = 2 * i if bl != kl else 2 * i + 1
            s_l[s] = lv
            s_i[s] = i
        if nf == 0:
            if n_open >= n_pass or live > (open_at * pnb[n_open] // 1000 if n_open < n_main else 0):
                break  # (checks open only once nothing is odd any more)
            # the open passes are (nearly) settled: open the next pass (checks: several at once)
            opened = 0
            ns0 = ns
            while n_open < n_pass and (opened == 0 or (n_open >= n_main and opened < at_once)):
                p = n_open
                n_open += 1
                opened += 1
                o = ptoff[p]
                if pk[p]:  # checks do not track Bob's parity before they open
                    btop[o] = _subset_parity(words, n, pmk[p], 0, n)
                for t in range(pnb[p]):
                    if btop[o + t] != atop[o + t]:
                        s_p[ns] = p
                        s_l[ns] = pL[p]
                        s_i[ns] = t
                        tsearch[o + t] = ns + 1
                        pfailed[p] = 1
                        ns += 1
                        live += 1
            if ns == ns0 and live > 0:
                break  # nothing new: the live searches go on
            d0 = ns0
            continue
        # 3. correct (once per bit) and toggle the top-level block of that bit in every pass
        fl = np.sort(flips[:nf])
        stamp += 1
        prev = -1
        for f in range(nf):
            b = fl[f]
            if b == prev:
                continue
            prev = b
            bits[b] ^= 1
            words[b >> 6] ^= np.uint64(1) << np.uint64(b & 63)
            st[5] += 1
            for p in range(n_pass):
                if pk[p]:
                    if p >= n_open or not _member(pmk[p], b, n):
                        continue
                    tb = np.int64(0)
                else:
                    pos = (pinv[p] * ((b - pc[p]) % n)) % n
                    W[p, pos >> 6] ^= np.uint64(1) << np.uint64(pos & 63)
                    tb = pos >> pL[p]
                btop[ptoff[p] + tb] ^= 1
        # 4. the live search (if any) of every block a correction touched: still odd at its node? else drop it.
        # 5. then a new search in every touched block that is odd and has none (tsearch[t] = search + 1, or 0)
        d0 = ns
        for step in range(2):
            prev = -1
            for f in range(nf):
                b = fl[f]
                if b == prev:
                    continue
                prev = b
                for p in range(n_open):
                    if pk[p]:
                        if not _member(pmk[p], b, n):
                            continue
                        tb = np.int64(0)
                    else:
                        tb = ((pinv[p] * ((b - pc[p]) % n)) % n) >> pL[p]
                    t = ptoff[p] + tb
                    if step == 0:
                        s = tsearch[t] - 1
                        if s < 0:
                            continue
                        lv = s_l[s]
                        lo = s_i[s] << lv
                        hi = lo + (np.int64(1) << lv)
                        i = s_i[s]
                        if pk[p]:
                            bp = np.int64(_subset_parity(words, n, pmk[p], lo, hi))
                            par = _ht_get(keys, vals, _key(p, lv, i)) if lv < pL[p] else np.int64(atop[ptoff[p] + i])
                        else:
                            bp = np.int64(_wparity(W, p, lo, min(hi, n)))
                            par = np.int64(D[LO[p, lv] + i]) if lv < pL[p] else np.int64(atop[ptoff[p] + i])
                        if bp == par:
                            s_l[s] = -2
                            tsearch[t] = 0
                            live -= 1
                    elif tsearch[t] == 0 and btop[t] != atop[t]:
                        s_p[ns] = p
                        s_l[ns] = pL[p]
                        s_i[ns] = tb
                        tsearch[t] = ns + 1
                        pfailed[p] = 1
                        ns += 1
                        live += 1
    # compact: drop finished and dropped searches, keep tsearch pointing at the live ones
    m = 0
    for s in range(ns):
        if s_l[s] >= 0:
            p = s_p[s]
            s_p[m] = p
            s_l[m] = s_l[s]
            s_i[m] = s_i[s]
            tsearch[ptoff[p] + (s_i[m] >> (pL[p] - s_l[m]))] = m + 1
            m += 1
    ns = m
    # 6. queries: the left child of every pending search
    for s in range(ns):
        p = s_p[s]
        lv = s_l[s]
        i = s_i[s]
        half = np.int64(1) << (lv - 1)
        lo = 2 * i * half
        qp[s] = (p << 40) | ((lv - 1) << 32) | (2 * i)  # packed node: one array on the wire
        q_s[s] = s
        if pk[p]:
            q_bl[s] = _subset_parity(words, n, pmk[p], lo, lo + half)
        else:
            q_bl[s] = _wparity(W, p, lo, min(lo + half, n))
    st[0] = ns
    st[1] = ns
    st[2] = n_open
    st[4] = stamp
    return ns


# --------------------------------------------------------------------------------------------------- parties


class _Passes:
    """The public pass structure both sides derive from the seed: affine main passes, then subset checks."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.pa = np.zeros(0, np.int64)
        self.pc = np.zeros(0, np.int64)
        self.pinv = np.zeros(0, np.int64)
        self.pL = np.zeros(0, np.int64)
        self.pk = np.zeros(0, np.int64)
        self.pmk = np.zeros(0, np.uint64)
        self.pnb = np.zeros(0, np.int64)
        self.ptoff = np.zeros(0, np.int64)
        self.n_main = 0

    def add(self, levels: list[int], checks: int = 0) -> None:
        """Append affine passes with top levels ``levels``, then ``checks`` subset checks."""
        p0 = self.pa.size
        n = self.n
        rows = []  # (a, c, ainv, L, kind, mask key, blocks)
        for j, lv in enumerate(levels):
            a, c, ainv = pass_params(self.seed, p0 + j, n)
            rows.append((a, c, ainv, int(lv), 0, 0, (n + (1 << int(lv)) - 1) >> int(lv)))
        top = max(1, math.ceil(math.log2(n)))
        for j in range(len(levels), len(levels) + checks):
            rows.append((1, 0, 1, top, 1, subset_key(self.seed, p0 + j), 1))
        if not rows:
            return
        col = list(zip(*rows))
        nb = np.array(col[6], np.int64)
        start = int(self.ptoff[-1] + self.pnb[-1]) if p0 else 0
        self.pa = np.concatenate([self.pa, np.array(col[0], np.int64)])
        self.pc = np.concatenate([self.pc, np.array(col[1], np.int64)])
        self.pinv = np.concatenate([self.pinv, np.array(col[2], np.int64)])
        self.pL = np.concatenate([self.pL, np.array(col[3], np.int64)])
        self.pk = np.concatenate([self.pk, np.array(col[4], np.int64)])
        self.pmk = np.concatenate([self.pmk, np.array(col[5], np.uint64)])
        self.ptoff = np.concatenate([self.ptoff, start + np.concatenate([[0], np.cumsum(nb)[:-1]]).astype(np.int64)])
        self.pnb = np.concatenate([self.pnb, nb])
        self.P = np.ascontiguousarray(np.stack([self.pa, self.pc, self.pinv, self.pL, self.pk, self.ptoff, self.pnb]))

    @property
    def count(self) -> int:
        return int(self.pa.size)

    @property
    def n_top(self) -> int:
        return int(self.ptoff[-1] + self.pnb[-1]) if self.count else 0

    def pack(self, bits: np.ndarray) -> np.ndarray:
        """The key packed in the order of every affine pass (one uint64 row per pass)."""
        nw = (self.n + 63) >> 6
        W = np.zeros((max(1, self.n_main), nw), np.uint64)
        for p in range(self.n_main):
            _permute_pack(bits, self.n, int(self.pa[p]), int(self.pc[p]), W[p])
        return W

    def tops(self, W: np.ndarray, words: np.ndarray, p0: int) -> np.ndarray:
        """Top-level parities of passes p0.. of the key (packed per pass: ``W``, packed plainly: ``words``)."""
        out = np.zeros(self.n_top, np.uint8)
        _all_top_parities(W, words, self.n, self.P, self.pmk, p0, self.count, out)
        return out[self.ptoff[p0]:] if p0 < self.count else out[:0]

    def sent_mask(self, p0: int) -> np.ndarray:
        """Which top parities of passes p0.. travel: all of pass 0 and of every check; every later affine pass
        omits its last block (the total parity, known from pass 0, gives it)."""
        keep = np.ones(self.n_top - (int(self.ptoff[p0]) if p0 < self.count else self.n_top), bool)
        base = int(self.ptoff[p0]) if p0 < self.count else 0
        for p in range(max(p0, 1), self.count):
            if not self.pk[p]:
                keep[int(self.ptoff[p] + self.pnb[p]) - 1 - base] = False
        return keep


def subset_key(seed: int, p: int) -> int:
    """Public 64-bit key of the random subset of check pass ``p`` (each bit in with probability 1/2)."""
    return int(np.random.default_rng([seed, p, 1]).integers(0, 2**63, dtype=np.int64))


def _pack(bits: np.ndarray) -> np.ndarray:
    packed = np.packbits(bits, bitorder="little")
    pad = (-packed.size) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros(pad, np.uint8)])
    return packed.view("<u8").astype(np.uint64)


class CascadeAlice:
    """Alice's side: holds her key, reveals the parities Bob asks for. Reads nothing but messages."""

    def __init__(self, key: np.ndarray, qber: float, seed: int, params: CascadeParams = CascadeParams()) -> None:
        self._bits = np.ascontiguousarray(key, dtype=np.uint8).copy()
        n = self._bits.size
        if not 2 <= n <= MAX_N:
            raise ValueError(f"block of {n} bits: must be 2..{MAX_N}")
        self._words = _pack(self._bits)
        self.n = n
        self.qber = float(qber)
        self.seed = int(seed)
        self.params = params
        self.passes = _Passes(n, self.seed)
        self.done = False
        self.disclosed = 0

    def _tops(self, p0: int) -> np.ndarray:
        pp = self.passes
        return pp.tops(self._W, self._words, p0)[pp.sent_mask(p0)]

    def start(self) -> Message:
        levels = schedule(self.n, self.qber, self.params)
        n_checks = self.params.final_checks
        self.passes.add(levels, n_checks)
        self.passes.n_main = len(levels)
        self._W = self.passes.pack(self._bits)
        bits = self._tops(0)
        self.disclosed += bits.size
        return Message("cascade.start", {"n": self.n, "seed": self.seed, "qber": self.qber, "levels": levels,
                                         "checks": n_checks}, disclosed=bits)

    def on_message(self, msg: Message) -> Message | None:
        if msg.kind == "cascade.query":
            pp = self.passes
            if "q" in msg.arrays:  # packed nodes
                qk = msg.arrays["q"]
                if qk.dtype != np.uint64 or qk.ndim != 1:
                    raise ValueError("cascade.query: q must be a uint64 vector")
                ans = np.empty(qk.size, np.uint8)
                _answer_packed(self._W, self._words, self.n, pp.P, pp.pmk, qk, ans)
            else:  # separate arrays p, l, i
                try:
                    qp, ql, qi = msg.arrays["p"], msg.arrays["l"], msg.arrays["i"]
                except KeyError as e:
                    raise ValueError(f"cascade.query without array {e}") from None
                if not qp.ndim == ql.ndim == qi.ndim == 1 or not qp.size == ql.size == qi.size:
                    raise ValueError("cascade.query: arrays of different shapes")
                ans = np.empty(qp.size, np.uint8)
                _answer(self._W, self._words, self.n, pp.P, pp.pmk, qp, ql, qi, ans)
            self.disclosed += ans.size
            return Message("cascade.parities", disclosed=ans)
        if msg.kind == "cascade.more":
            count = int(msg.meta["count"])
            if not 0 < count <= 64 or self.passes.count + count > 4096:
                raise ValueError(f"cascade.more: bad count {count}")
            p0 = self.passes.count
            self.passes.add([], count)
            bits = self._tops(p0)
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
        self._asked = 0  # checks requested by the last cascade.more, not yet received

    def start(self) -> None:
        return None

    # -- state helpers
    def _grow_tops(self, tops_sent: np.ndarray, p0: int) -> None:
        pp = self.passes
        old = self._T.shape[1]
        grow = pp.n_top - old
        keep = pp.sent_mask(p0)
        if tops_sent.size != int(np.count_nonzero(keep)):
            raise ValueError(f"expected {int(np.count_nonzero(keep))} parities, got {tops_sent.size}")
        new = np.zeros(grow, np.int64)
        new[keep] = tops_sent
        if p0 == 0:
            self._total = int(np.bitwise_xor.reduce(new[:int(pp.pnb[0])]))
        for p in range(max(p0, 1), pp.count):  # inferred last blocks
            if not pp.pk[p]:
                o, nb = int(pp.ptoff[p]) - old, int(pp.pnb[p])
                new[o + nb - 1] = self._total ^ int(np.bitwise_xor.reduce(new[o:o + nb - 1]))
        T = np.zeros((4, pp.n_top), np.int64)
        T[:, :old] = self._T
        T[0, old:] = new
        T[1, old:] = pp.tops(self._W, self._words, p0)
        self._T = T
        self._pfailed = np.concatenate([self._pfailed, np.zeros(pp.count - self._pfailed.size, np.int64)])
        if self._S.shape[1] < pp.n_top:
            S = np.zeros((9, pp.n_top + 64), np.int64)
            S[:, :self._S.shape[1]] = self._S
            self._S = S

    def _ensure_table(self, extra: int) -> None:
        need = 2 * (int(self._hcount[0]) + extra) + 64
        if need > self._keys.size:
            cap = 1 << max(10, math.ceil(math.log2(need)))
            self._keys, self._vals = _ht_rehash(self._keys, self._vals, cap)

    def on_message(self, msg: Message) -> Message | None:
        if self.done:
            raise ValueError(f"CascadeBob: message {msg.kind!r} after done")
        if msg.kind == "cascade.start":
            if self.passes is not None:
                raise ValueError("CascadeBob: second cascade.start")
            m = msg.meta
            if int(m["n"]) != self.n:
                raise ValueError(f"Alice's block has {m['n']} bits, Bob's {self.n}")
            levels = [int(x) for x in m["levels"]]
            top = max(1, math.ceil(math.log2(self.n)))
            checks = int(m["checks"])
            if any(not 1 <= lv <= top for lv in levels) or not 0 <= checks <= 4096 or len(levels) > 64:
                raise ValueError(f"cascade.start: bad schedule {levels}, {checks} checks")
            self._words = _pack(self._bits)
            self.passes = _Passes(self.n, int(m["seed"]))
            self.passes.n_main = len(levels)
            self.passes.add(levels, checks)
            self._W = self.passes.pack(self._bits)
            self._T = np.zeros((4, 0), np.int64)
            self._S = np.zeros((9, 0), np.int64)
            self._pfailed = np.zeros(0, np.int64)
            # known parities below the top level: affine passes in a dense table per (pass, level), checks (few
            # searches, ~log2 n levels each) in a hash table
            self._LO = np.zeros((max(1, len(levels)), 64), np.int64)
            off = 0
            for p, lv in enumerate(levels):
                for lvl in range(lv):
                    self._LO[p, lvl] = off
                    off += (self.n + (1 << lvl) - 1) >> lvl
            self._D = np.full(off, -1, np.int8)
            self._keys = np.full(1 << 12, -1, np.int64)
            self._vals = np.zeros(1 << 12, np.int8)
            self._hcount = np.zeros(1, np.int64)
            self._st = np.zeros(9, np.int64)
            self._st[6] = round(1000 * self.params.open_ratio)
            self._st[7] = len(levels)
            self._st[8] = max(1, self.params.checks_at_once)
            self._grow_tops(msg.disclosed if msg.disclosed is not None else np.zeros(0, np.uint8), 0)
            self._st[3] = self.passes.count
            return self._step(np.zeros(0, np.uint8))
        if self.passes is None:
            raise ValueError(f"CascadeBob: {msg.kind!r} before cascade.start")
        if msg.kind == "cascade.parities":
            return self._step(msg.disclosed if msg.disclosed is not None else np.zeros(0, np.uint8))
        if msg.kind == "cascade.checks":
            if self._st[1] or not self._asked or int(msg.meta["count"]) != self._asked:
                raise ValueError("CascadeBob: unexpected cascade.checks")
            self._asked = 0
            p0 = self.passes.count
            self.passes.add([], int(msg.meta["count"]))
            self._grow_tops(msg.disclosed if msg.disclosed is not None else np.zeros(0, np.uint8), p0)
            self._st[3] = self.passes.count
            return self._step(np.zeros(0, np.uint8))
        raise ValueError(f"CascadeBob: unexpected message {msg.kind!r}")

    def _step(self, answers: np.ndarray) -> Message:
        if answers.size != self._st[1]:
            raise ValueError(f"expected {self._st[1]} parities, got {answers.size}")
        pp = self.passes
        if self._st[2] >= pp.n_main:  # hash entries: open checks only, one search each, < 64 levels
            self._ensure_table(70 * pp.count)
        self.rounds += 1
        nq = _bob_round(self._bits, self._words, self._W, self.n, pp.P, pp.pmk, self._pfailed, self._st, self._T,
                        self._D, self._LO, self._keys, self._vals, self._hcount, self._S, answers)
        self.corrections = int(self._st[5])
        if nq:
            S = self._S
            return Message("cascade.query", arrays={"q": S[5, :nq].astype(np.uint64)})
        clean = int(np.count_nonzero(self._pfailed[pp.n_main:] == 0))
        if clean < self.params.final_checks:
            count = min(64, max(self.params.check_batch, self.params.final_checks - clean))
            self._asked = count
            return Message("cascade.more", {"count": count})
        self.done = True
        return Message("cascade.done", {"corrections": self.corrections})

    @property
    def key(self) -> np.ndarray:
        return self._bits
