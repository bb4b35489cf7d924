"""Compiled hot loops of the virtual optical bench (numba ``@njit(cache=True)``), each with a plain reference.

Random numbers. Everything random inside a block comes from one xoshiro256++ stream (Blackman and Vigna,
"Scrambled linear pseudorandom number generators", 2021) whose 256-bit state, an explicit ``uint64[4]``
array, is seeded per (seed, purpose, block) with SplitMix64 (:func:`stream_state`). Normal variates use
Doornik's ZIGNOR ziggurat (128 layers; J. A. Doornik, "An improved ziggurat method to generate normal random
samples", 2005), exponential variates the same construction with 256 layers (Marsaglia and Tsang, 2000).
Hot loops keep the state in registers (~2-4 ns per variate); the scalar ``rng_*`` functions draw the
identical stream one variate at a time. Because the state is explicit, the compiled kernels and the Python
references at the end of this module draw exactly the same numbers in the same order, and the tests compare
them bit for bit.

The block, :func:`simulate_block`. Events are packed into int64 keys ``((t - base) << 3) | channel`` so
that every sort, merge and heap orders by (time, channel) with one integer comparison. Detectors 0-3
(Alice) and 4-7 (Bob) are tagger channels 0-7; each receiver is processed as one stream:

1. pairs: a Poisson process of the pairs that give at least one click, each with a category (which
   detector fires on each side, or none) drawn from an alias table; their photons arrive at emission + arm
   delay + Gaussian detector jitter, one stream per receiver in emission order (:func:`gen_photons`), then
   an insertion sort (O(n + inversions): the jitter only swaps close neighbours);
2. merge the events carried from the previous block and the dark counts, then the detectors: non-paralyzable
   dead time and afterpulsing per detector, up to a horizon beyond which events are carried to the next
   block (:func:`detector_filter`);
3. the tagger: input delay, Gaussian tagger jitter, quantization (:func:`tag_keys`, :func:`sort_tags`),
   its own dead time per channel, with carry (:func:`detector_filter` again, without afterpulses);
4. merge the two receivers' streams.

Carries make the result independent of where blocks end: an event is processed by the block whose horizon it
is below, and every event of the next block lies at or above that horizon (the model sets the horizons).
"""

from __future__ import annotations

import heapq
import math

import numpy as np
from numba import njit

__all__ = [
    "ALIAS_BITS",
    "CH_BITS",
    "JITTER_CLIP",
    "NEVER",
    "alias_draw",
    "alias_table",
    "detector_filter",
    "drift_walk",
    "fill_exponential",
    "fill_normal",
    "fill_uniform",
    "gen_photons",
    "gen_poisson_times",
    "insertion_sort",
    "jitter_bound",
    "merge2",
    "pack",
    "ref_deadtime_filter",
    "ref_detector_filter",
    "ref_gen_photons",
    "ref_gen_poisson_times",
    "ref_simulate_block",
    "ref_tag_times",
    "rng_exponential",
    "rng_next",
    "rng_normal",
    "rng_state",
    "rng_uniform",
    "simulate_block",
    "sort_tags",
    "stream_state",
    "tag_keys",
    "unpack",
]

NEVER = -(1 << 62)  # "last click" of a detector that never clicked: far enough in the past for any dead time
JITTER_CLIP = 8.0  # Gaussian jitter is clipped at 8 sigma (probability 1.2e-15) so delays have a hard bound
_BIG = np.iinfo(np.int64).max

# ========================================================================================================
# Random numbers


def rng_state(entropy: list[int] | tuple[int, ...]) -> np.ndarray:
    """A fresh xoshiro256++ state (uint64[4]) from non-negative integer entropy, through SeedSequence."""
    state = np.random.SeedSequence(list(entropy)).generate_state(4, np.uint64)
    if not state.any():  # the all-zero state is xoshiro's one fixed point (probability 2^-256)
        state[0] = np.uint64(1)
    return state


@njit(cache=True)
def _splitmix(x):
    """SplitMix64 (Steele, Lea and Flood 2014): (output, next state); the finalizer is a bijection."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    z = x
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31)), x


@njit(cache=True)
def stream_state(seed, purpose, k):
    """The xoshiro256++ state of stream (seed, purpose, k), seeded with SplitMix64 as the xoshiro authors
    recommend: h = mix(mix(mix(seed) ^ purpose) ^ k), a bijection of k for a given seed and purpose, then
    four SplitMix64 outputs from h. Cheap (a block needs one): ~100 ns against ~13 us for SeedSequence."""
    h, _ = _splitmix(np.uint64(seed))
    h, _ = _splitmix(h ^ np.uint64(purpose))
    h, _ = _splitmix(h ^ np.uint64(k))
    out = np.empty(4, np.uint64)
    x = h
    for i in range(4):
        out[i], x = _splitmix(x)
    if out[0] == 0 and out[1] == 0 and out[2] == 0 and out[3] == 0:
        out[0] = np.uint64(1)
    return out


@njit(cache=True)
def _xo(s0, s1, s2, s3):
    """One xoshiro256++ step on a state held in locals: (word, s0, s1, s2, s3)."""
    w = (((s0 + s3) << np.uint64(23)) | ((s0 + s3) >> np.uint64(41))) + s0
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << np.uint64(45)) | (s3 >> np.uint64(19))
    return w, s0, s1, s2, s3


@njit(cache=True)
def rng_next(s):
    """Next 64-bit word of the stream whose state is ``s`` (uint64[4], updated in place)."""
    w, s[0], s[1], s[2], s[3] = _xo(s[0], s[1], s[2], s[3])
    return w


_INV53 = 1.0 / 9007199254740992.0  # 2^-53


@njit(cache=True)
def _u53(w):
    """Uniform double in [0, 1) from the top 53 bits of a word."""
    return np.float64(w >> np.uint64(11)) * _INV53


@njit(cache=True)
def rng_uniform(s):
    """Uniform double in [0, 1)."""
    return _u53(rng_next(s))


def _ziggurat_tables(f, finv, c: int, r: float, v: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer edges X[0..c] (X[0] = v/f(r) is the base layer's pseudo-width, X[1] = r, X[c] = 0), the ratios
    X[i+1]/X[i] and f(X[i]) of a ziggurat of c equal-area layers for the decreasing density shape f."""
    x = np.zeros(c + 1)
    x[0] = v / f(r)
    x[1] = r
    for i in range(2, c):
        x[i] = finv(v / x[i - 1] + f(x[i - 1]))
    x[c] = 0.0
    return x, x[1:] / x[:-1], np.array([f(t) for t in x])


# Normal: shape exp(-x^2/2), 128 layers (Doornik's ZIGNOR constants)
_NZ_R = 3.442619855899
_NZ_X, _NZ_RATIO, _NZ_F = _ziggurat_tables(lambda x: math.exp(-0.5 * x * x), lambda y: math.sqrt(-2.0 * math.log(y)),
                                           128, _NZ_R, 9.91256303526217e-3)
# Exponential: shape exp(-x), 256 layers (Marsaglia and Tsang's constants)
_EZ_R = 7.69711747013104972
_EZ_X, _EZ_RATIO, _EZ_F = _ziggurat_tables(lambda x: math.exp(-x), lambda y: -math.log(y), 256, _EZ_R,
                                           3.949659822581572e-3)


@njit(cache=True)
def _normal_slow(s, w):
    """ZIGNOR after word ``w`` missed its layer's inner rectangle: wedge or tail, drawing more from ``s``."""
    while True:
        i = np.int64(w & np.uint64(127))
        u = 2.0 * _u53(w) - 1.0
        if abs(u) < _NZ_RATIO[i]:
            return u * _NZ_X[i]
        if i == 0:  # base layer: the tail beyond R (Marsaglia's method)
            while True:
                x = math.log(1.0 - rng_uniform(s)) / _NZ_R
                y = math.log(1.0 - rng_uniform(s))
                if -2.0 * y >= x * x:
                    break
            return x - _NZ_R if u < 0.0 else _NZ_R - x
        x = u * _NZ_X[i]
        # uniform height in the layer [f(X[i]), f(X[i+1])] below the curve f(x)?
        if _NZ_F[i + 1] + rng_uniform(s) * (_NZ_F[i] - _NZ_F[i + 1]) < math.exp(-0.5 * x * x):
            return x
        w = rng_next(s)


@njit(cache=True)
def _exponential_slow(s, w):
    """The exponential ziggurat after word ``w`` missed its inner rectangle."""
    while True:
        i = np.int64(w & np.uint64(255))
        u = _u53(w)
        if u < _EZ_RATIO[i]:
            return u * _EZ_X[i]
        if i == 0:  # base layer: the tail beyond R is R + Exp(1) (memoryless)
            return _EZ_R - math.log(1.0 - rng_uniform(s))
        x = u * _EZ_X[i]
        if _EZ_F[i + 1] + rng_uniform(s) * (_EZ_F[i] - _EZ_F[i + 1]) < math.exp(-x):
            return x
        w = rng_next(s)


@njit(cache=True)
def rng_normal(s):
    """Standard normal variate. The low 7 bits of a word pick the layer, the top 53 the abscissa."""
    w = rng_next(s)
    i = np.int64(w & np.uint64(127))
    u = 2.0 * _u53(w) - 1.0
    if abs(u) < _NZ_RATIO[i]:
        return u * _NZ_X[i]
    return _normal_slow(s, w)


@njit(cache=True)
def rng_exponential(s):
    """Standard exponential variate (mean 1). The low 8 bits of a word pick the layer, the top 53 the abscissa."""
    w = rng_next(s)
    i = np.int64(w & np.uint64(255))
    u = _u53(w)
    if u < _EZ_RATIO[i]:
        return u * _EZ_X[i]
    return _exponential_slow(s, w)


@njit(cache=True)
def fill_uniform(s, out):
    """Fill ``out`` with uniform [0, 1) doubles (the same stream as repeated :func:`rng_uniform`)."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    for k in range(out.shape[0]):
        w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        out[k] = _u53(w)
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3


@njit(cache=True)
def fill_normal(s, out):
    """Fill ``out`` with standard normals (the same stream as repeated :func:`rng_normal`)."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    for k in range(out.shape[0]):
        w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        i = np.int64(w & np.uint64(127))
        u = 2.0 * _u53(w) - 1.0
        if abs(u) < _NZ_RATIO[i]:
            out[k] = u * _NZ_X[i]
        else:  # rare (~1.2%): hand the state to the array-based slow path and back
            s[0], s[1], s[2], s[3] = s0, s1, s2, s3
            out[k] = _normal_slow(s, w)
            s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3


@njit(cache=True)
def fill_exponential(s, out):
    """Fill ``out`` with standard exponentials (the same stream as repeated :func:`rng_exponential`)."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    for k in range(out.shape[0]):
        w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        i = np.int64(w & np.uint64(255))
        u = _u53(w)
        if u < _EZ_RATIO[i]:
            out[k] = u * _EZ_X[i]
        else:
            s[0], s[1], s[2], s[3] = s0, s1, s2, s3
            out[k] = _exponential_slow(s, w)
            s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3


@njit(cache=True)
def _jitter(sigma, z):
    """Integer-ps jitter sigma*z, z clipped at JITTER_CLIP, rounded half up."""
    if z > JITTER_CLIP:
        z = JITTER_CLIP
    elif z < -JITTER_CLIP:
        z = -JITTER_CLIP
    return np.int64(math.floor(sigma * z + 0.5))


def jitter_bound(sigma: float) -> int:
    """Hard bound on |jitter| (ps) for standard deviation ``sigma``: what :func:`_jitter` can return."""
    return int(math.floor(sigma * JITTER_CLIP + 0.5)) if sigma > 0 else 0


ALIAS_BITS = 5  # alias tables have 2**ALIAS_BITS slots: up to 32 categories
_ALIAS_SHIFT = 64 - ALIAS_BITS
_ALIAS_ONE = 1 << _ALIAS_SHIFT  # thresholds are fractions of 2**59


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table with 2**ALIAS_BITS slots for the discrete distribution ``p`` (normalized here;
    at most 32 categories): (threshold int64, alias int64).

    One 64-bit word draws a category: slot i = the top ALIAS_BITS bits, r = the other 59; category i if
    r < threshold[i], else alias[i] (see :func:`alias_draw`). Slots beyond len(p) hold zero-probability
    categories that always defer to their alias.
    """
    p = np.asarray(p, float)
    k = 1 << ALIAS_BITS
    if len(p) > k:
        raise ValueError(f"alias_table: at most {k} categories")
    q = np.zeros(k)
    q[: len(p)] = np.clip(p, 0.0, None)
    return _alias_build(q)


@njit(cache=True)
def _alias_build(q):
    k = q.shape[0]
    thr = np.full(k, _ALIAS_ONE, np.int64)
    alias = np.arange(k).astype(np.int64)
    total = q.sum()
    if total <= 0:
        return thr, alias
    scaled = q * (k / total)
    small = np.empty(k, np.int64)
    large = np.empty(k, np.int64)
    ns = 0
    nl = 0
    for i in range(k):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        nl -= 1
        s_ = small[ns]
        l_ = large[nl]
        thr[s_] = np.int64(scaled[s_] * _ALIAS_ONE)
        alias[s_] = l_
        scaled[l_] = scaled[l_] + scaled[s_] - 1.0
        if scaled[l_] < 1.0:
            small[ns] = l_
            ns += 1
        else:
            large[nl] = l_
            nl += 1
    return thr, alias  # what is left keeps threshold one (1 up to rounding) and itself as alias


@njit(cache=True)
def alias_draw(w, thr, alias):
    """Category for the 64-bit word ``w`` (branch-free: a mispredicted branch costs more than the draw)."""
    i = np.int64(w >> np.uint64(_ALIAS_SHIFT))
    r = np.int64(w & np.uint64(_ALIAS_ONE - 1))
    m = (r - thr[i]) >> 63  # -1 if r < thr[i] else 0
    a = alias[i]
    return a ^ ((i ^ a) & m)


# ========================================================================================================
# The fibers' polarization drift


@njit(cache=True)
def drift_walk(s, u_a, u_b, steps, sig_a, sig_b):
    """``steps`` steps of the random walk U <- exp(-i theta n.sigma/2) U on both arms' SU(2) matrices (in place):
    theta ~ N(0, sig^2) with sig = sqrt(2 D dt), n uniform on the sphere (a normalized normal 3-vector).
    Per step 8 normals: Alice's theta and n, then Bob's. Each product is re-projected onto SU(2)."""
    z = np.empty(8, np.float64)
    for _ in range(steps):
        fill_normal(s, z)
        for arm in range(2):
            u = u_a if arm == 0 else u_b
            sig = sig_a if arm == 0 else sig_b
            if sig <= 0.0:
                continue
            theta = z[4 * arm] * sig
            nx, ny, nz = z[4 * arm + 1], z[4 * arm + 2], z[4 * arm + 3]
            norm = math.sqrt(nx * nx + ny * ny + nz * nz)
            if norm == 0.0:
                continue
            c = math.cos(0.5 * theta)
            sn = math.sin(0.5 * theta) / norm
            # R = c I - i sn (nx X + ny Y + nz Z) = [[c - i sn nz, -i sn nx - sn ny], [-i sn nx + sn ny, c + i sn nz]]
            r00 = complex(c, -sn * nz)
            r01 = complex(-sn * ny, -sn * nx)
            r10 = complex(sn * ny, -sn * nx)
            r11 = complex(c, sn * nz)
            a = r00 * u[0, 0] + r01 * u[1, 0]
            b = r10 * u[0, 0] + r11 * u[1, 0]
            k = math.sqrt(a.real * a.real + a.imag * a.imag + b.real * b.real + b.imag * b.imag)
            a /= k
            b /= k
            u[0, 0] = a
            u[1, 0] = b
            u[0, 1] = -b.conjugate()
            u[1, 1] = a.conjugate()


# ========================================================================================================
# Helpers


@njit(cache=True)
def _grow(a, n):
    """A copy of a[:n] in a buffer twice as large (amortized O(1) append)."""
    b = np.empty(max(16, 2 * a.shape[0]), a.dtype)
    b[:n] = a[:n]
    return b


@njit(cache=True)
def insertion_sort(a):
    """Sort ``a`` in place; O(n + inversions), so linear for jitter-perturbed sorted sequences."""
    for i in range(1, a.shape[0]):
        v = a[i]
        if a[i - 1] <= v:
            continue
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


@njit(cache=True)
def _insert_few(big, few, few_after_ties):
    """Merge a short sorted array into a long one: a binary search per short element and block copies."""
    out = np.empty(big.shape[0] + few.shape[0], np.int64)
    src = 0
    dst = 0
    for v in few:
        if few_after_ties:
            p = np.searchsorted(big, v, side="right")
        else:
            p = np.searchsorted(big, v, side="left")
        m = p - src
        out[dst:dst + m] = big[src:p]
        dst += m
        src = p
        out[dst] = v
        dst += 1
    out[dst:] = big[src:]
    return out


@njit(cache=True)
def merge2(a, b):
    """Merge two sorted int64 arrays (``a`` first on ties); returns ``a`` or ``b`` itself if the other is empty.

    Branch-free (copies with a sentinel, then a select per element): interleaved streams would mispredict
    about every other branch of the textbook merge.
    """
    na = a.shape[0]
    nb = b.shape[0]
    if nb == 0:
        return a
    if na == 0:
        return b
    if 16 * nb < na or 16 * na < nb:  # a few events (dark counts, carries) into many: binary search, copies
        few_second = 16 * nb < na
        return _insert_few(a if few_second else b, b if few_second else a, few_second)
    aa = np.empty(na + 1, np.int64)
    aa[:na] = a
    aa[na] = _BIG
    bb = np.empty(nb + 1, np.int64)
    bb[:nb] = b
    bb[nb] = _BIG
    out = np.empty(na + nb, np.int64)
    i = 0
    j = 0
    for k in range(na + nb):
        va = aa[i]
        vb = bb[j]
        take_b = vb < va
        out[k] = vb if take_b else va
        j += take_b
        i += not take_b
    return out


# ========================================================================================================
# Packed keys: one int64 per event, ((t - base) << CH_BITS) | channel, so that sorting, merging and heap
# order compare a single integer and order by (time, channel). ``base`` is set per block below every time
# the block handles (block start - 2^40 ps), so keys stay positive and far from overflow.

CH_BITS = 3  # detectors 0-7 (4 per side)
_CH_MASK = (1 << CH_BITS) - 1
BASE_MARGIN = 1 << 40  # ps below the block start


@njit(cache=True)
def pack(t, c, base):
    """Keys of absolute times ``t`` (int64 ps) on channels ``c``."""
    out = np.empty(t.shape[0], np.int64)
    for i in range(t.shape[0]):
        out[i] = ((t[i] - base) << CH_BITS) | c[i]
    return out


@njit(cache=True)
def unpack(keys, base):
    """(absolute times int64, channels uint8) of keys."""
    n = keys.shape[0]
    t = np.empty(n, np.int64)
    c = np.empty(n, np.uint8)
    for i in range(n):
        t[i] = (keys[i] >> CH_BITS) + base
        c[i] = keys[i] & _CH_MASK
    return t, c


# ========================================================================================================
# 1. Pair events and Poisson processes


@njit(cache=True)
def _poisson_run(s, out, n, t, scale, end, start):
    """Continue a Poisson process from offset t (float ps) until ``end`` or until ``out`` is full (one
    exponential gap per event). Returns (n, t, done). The ziggurat's fast path is written out here so the
    generator state stays in registers."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    done = False
    while n < out.shape[0]:
        w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        i = np.int64(w & np.uint64(255))
        u = _u53(w)
        if u < _EZ_RATIO[i]:
            x = u * _EZ_X[i]
        else:
            s[0], s[1], s[2], s[3] = s0, s1, s2, s3
            x = _exponential_slow(s, w)
            s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
        t += x * scale
        if t >= end:
            done = True
            break
        out[n] = start + np.int64(t)
        n += 1
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3
    return n, t, done


@njit(cache=True)
def gen_poisson_times(s, start, length, rate_per_ps):
    """Sorted event times (int64 ps, floored) of a Poisson process of rate ``rate_per_ps`` on
    [start, start + length): cumulated exponential gaps (the count is Poisson by construction)."""
    if rate_per_ps <= 0.0 or length <= 0:
        return np.empty(0, np.int64)
    mean = rate_per_ps * length
    times = np.empty(np.int64(mean + 8.0 * math.sqrt(mean) + 16.0), np.int64)
    n = np.int64(0)
    t = 0.0
    while True:
        n, t, done = _poisson_run(s, times, n, t, 1.0 / rate_per_ps, np.float64(length), start)
        if done:
            return times[:n]
        times = _grow(times, n)  # rare: more events than mean + 8 sigma


# ========================================================================================================
# 2. Pairs and their photons
#
# The big per-block arrays live in a workspace the caller keeps from block to block (``alice``, ``bob`` and
# two more): allocating ~1 MB arrays afresh every block costs more in page faults than the physics. A kernel
# that finds a buffer too small replaces it by a larger one and returns it.


@njit(cache=True)
def _photon_run(s, t, scale, end, rel0, thr, alias, cat_a, cat_b, delay_ps, sigma_ps, alice, na, bob, nb):
    """Pair events from offset t until ``end`` or until a buffer is full. Per event: its exponential gap, one
    word for its category, a normal for Alice's photon if it clicks, then one for Bob's. Returns
    (t, na, nb, done). Written out so the generator state stays in registers."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    done = False
    while na < alice.shape[0] and nb < bob.shape[0]:
        w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        i = np.int64(w & np.uint64(255))
        u = _u53(w)
        if u < _EZ_RATIO[i]:
            x = u * _EZ_X[i]
        else:
            s[0], s[1], s[2], s[3] = s0, s1, s2, s3
            x = _exponential_slow(s, w)
            s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
        t += x * scale
        if t >= end:
            done = True
            break
        rel = rel0 + np.int64(t)  # emission time - base
        w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        c = alias_draw(w, thr, alias)
        a = cat_a[c]
        if a >= 0:
            w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
            j = np.int64(w & np.uint64(127))
            v = 2.0 * _u53(w) - 1.0
            if abs(v) < _NZ_RATIO[j]:
                z = v * _NZ_X[j]
            else:
                s[0], s[1], s[2], s[3] = s0, s1, s2, s3
                z = _normal_slow(s, w)
                s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
            alice[na] = ((rel + delay_ps[a] + _jitter(sigma_ps[a], z)) << CH_BITS) | a
            na += 1
        b = cat_b[c]
        if b >= 0:
            d = 4 + b
            w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
            j = np.int64(w & np.uint64(127))
            v = 2.0 * _u53(w) - 1.0
            if abs(v) < _NZ_RATIO[j]:
                z = v * _NZ_X[j]
            else:
                s[0], s[1], s[2], s[3] = s0, s1, s2, s3
                z = _normal_slow(s, w)
                s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
            bob[nb] = ((rel + delay_ps[d] + _jitter(sigma_ps[d], z)) << CH_BITS) | d
            nb += 1
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3
    return t, na, nb, done


@njit(cache=True)
def gen_photons(s, t0, block_ps, rate_per_ps, thr, alias, cat_a, cat_b, delay_ps, sigma_ps, base, alice, bob):
    """The photons that click, per receiver, as keys written to the workspace buffers ``alice`` and ``bob``,
    each in emission order: nearly sorted (the detector jitter only swaps close neighbours).
    Returns (alice, n_alice, bob, n_bob): the buffers (replaced by larger ones if they filled) and counts.

    Pair events with at least one click form a Poisson process of rate ``rate_per_ps`` on
    [t0, t0 + block_ps); each has a category c from the alias table: ``cat_a[c]``/``cat_b[c]`` is Alice's
    detector (0..3) / Bob's (detector 4 + b), or -1 if that photon gives no click. Arrival = emission +
    delay_ps[d] + jitter(sigma_ps[d]). Draws, per event: its gap, its category word, the normal of Alice's
    photon if it clicks, then Bob's.
    """
    na = nb = np.int64(0)
    if rate_per_ps <= 0.0 or block_ps <= 0:
        return alice, na, bob, nb
    t = 0.0
    while True:
        t, na, nb, done = _photon_run(s, t, 1.0 / rate_per_ps, np.float64(block_ps), t0 - base, thr, alias,
                                      cat_a, cat_b, delay_ps, sigma_ps, alice, na, bob, nb)
        if done:
            return alice, na, bob, nb
        if na == alice.shape[0]:
            alice = _grow(alice, na)
        if nb == bob.shape[0]:
            bob = _grow(bob, nb)


# ========================================================================================================
# 3. Detectors: non-paralyzable dead time and afterpulsing


@njit(cache=True)
def _heap_push(h, n, v):
    """Push v onto the binary min-heap h[:n] (the caller guarantees n < h.shape[0])."""
    i = n
    h[i] = v
    while i > 0:
        p = (i - 1) >> 1
        if h[p] <= h[i]:
            break
        h[p], h[i] = h[i], h[p]
        i = p


@njit(cache=True)
def _heap_pop(h, n):
    """Pop the minimum of the binary min-heap h[:n]."""
    top = h[0]
    n -= 1
    h[0] = h[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and h[c + 1] < h[c]:
            c += 1
        if h[i] <= h[c]:
            break
        h[i], h[c] = h[c], h[i]
        i = c
    return top


@njit(cache=True)
def _horizon_keys(horizon, base):
    """A key is at or beyond channel c's horizon iff key >= hk[c]."""
    hk = np.empty(horizon.shape[0], np.int64)
    for c in range(horizon.shape[0]):
        hk[c] = (horizon[c] - base) << CH_BITS
    return hk


@njit(cache=True)
def _filter_run(s, main, n, i, extra, j, out, no, carry, nc, heap, nh, rel_last, dead_ps, p_ap, tau_ap_ps, hk,
                counting):
    """The loop of :func:`detector_filter` until all sources are exhausted or a buffer is full (no
    reallocation inside keeps the loop tight). Sources, merged in key order: main[i:n], extra[j:] (a few
    carried events and dark counts) and the heap of pending afterpulses; main runs in a tight inner loop up
    to the next event of the other two. Returns (i, j, no, nc, nh)."""
    nx = extra.shape[0]
    cap_out = out.shape[0]
    cap_carry = carry.shape[0]
    cap_heap = heap.shape[0]
    while i < n or j < nx or nh > 0:
        if no == cap_out or nc == cap_carry or nh == cap_heap:
            break
        barrier = extra[j] if j < nx else _BIG
        if nh > 0 and heap[0] < barrier:
            barrier = heap[0]
        if i < n and main[i] <= barrier:
            key = main[i]
            i += 1
        elif j < nx and (nh == 0 or extra[j] <= heap[0]):
            key = extra[j]
            j += 1
        else:
            key = _heap_pop(heap, nh)
            nh -= 1
        while True:  # key, then main's keys up to the barrier while nothing new is pending
            c = key & _CH_MASK
            if counting[c]:  # else: disabled or latched, no click and nothing pending
                t = key >> CH_BITS
                if key >= hk[c]:
                    carry[nc] = key
                    nc += 1
                elif t - rel_last[c] >= dead_ps[c]:
                    out[no] = key
                    no += 1
                    rel_last[c] = t
                    if p_ap[c] > 0.0 and rng_uniform(s) < p_ap[c]:
                        t_ap = t + dead_ps[c] + np.int64(rng_exponential(s) * tau_ap_ps[c])
                        _heap_push(heap, nh, (t_ap << CH_BITS) | c)
                        nh += 1
                        break  # the barrier may have moved
            if i >= n or main[i] > barrier or no == cap_out or nc == cap_carry:
                break
            key = main[i]
            i += 1
    return i, j, no, nc, nh


@njit(cache=True)
def detector_filter(s, main, n, extra, base, last, dead_ps, p_ap, tau_ap_ps, horizon, counting, out):
    """Detectors over their incident events in key order: ``main[:n]`` (sorted photons) and ``extra`` (sorted,
    short: carried events and dark counts). Also the tagger's dead time (with ``p_ap`` all 0).

    Per channel c (skipped entirely unless ``counting[c]``): non-paralyzable dead time ``dead_ps[c]`` (an event
    registers iff t - last click >= dead_ps[c]); each click spawns, with probability ``p_ap[c]`` (one uniform
    per click, only if p_ap[c] > 0), an afterpulse at ``t + dead_ps[c] + Exp(tau_ap_ps[c])`` (one exponential,
    floored to ps), itself an event: the dead time applies and it may spawn further afterpulses. Events at or
    beyond their channel's ``horizon`` are carried unprocessed. ``last`` (absolute ps) is updated in place.
    Returns (out, n_out, carry): clicks in the buffer ``out`` (replaced by a larger one if it filled), and the
    carry, both sorted keys.
    """
    hk = _horizon_keys(horizon, base)
    rel_last = last - base
    carry = np.empty(16, np.int64)
    heap = np.empty(16, np.int64)
    i = j = no = nc = nh = np.int64(0)  # typed, not literal: one compiled signature of _filter_run
    while True:
        i, j, no, nc, nh = _filter_run(s, main, n, i, extra, j, out, no, carry, nc, heap, nh, rel_last, dead_ps,
                                       p_ap, tau_ap_ps, hk, counting)
        if i >= n and j >= extra.shape[0] and nh == 0:
            break
        if no == out.shape[0]:
            out = _grow(out, no)
        if nc == carry.shape[0]:
            carry = _grow(carry, nc)
        if nh == heap.shape[0]:
            heap = _grow(heap, nh)
    for c in range(last.shape[0]):
        last[c] = rel_last[c] + base
    return out, no, carry[:nc].copy()


# ========================================================================================================
# 4. Tagger


@njit(cache=True)
def tag_keys(s, keys, n, base, input_delay_ps, sigma_ps, resolution_ps):
    """Click keys -> tag keys, in place on keys[:n]: t_tag = floor((t + input_delay[c] + jitter) / resolution)
    * resolution. One normal per click (drawn even if sigma is 0). The result is nearly sorted if the
    channels' input delays are close (the jitter swaps close neighbours); see :func:`sort_tags`."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    for i in range(n):
        w, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        j = np.int64(w & np.uint64(127))
        v = 2.0 * _u53(w) - 1.0
        if abs(v) < _NZ_RATIO[j]:
            z = v * _NZ_X[j]
        else:
            s[0], s[1], s[2], s[3] = s0, s1, s2, s3
            z = _normal_slow(s, w)
            s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
        key = keys[i]
        c = key & _CH_MASK
        t = (key >> CH_BITS) + base + input_delay_ps[c] + _jitter(sigma_ps, z)
        if resolution_ps != 1:
            t = (t // resolution_ps) * resolution_ps
        keys[i] = ((t - base) << CH_BITS) | c
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3


@njit(cache=True)
def sort_tags(keys, n, n_channels, spread_small, scratch):
    """Sort tag keys[:n] in place. Each channel's tags are nearly sorted; across channels, input delays
    displace them. ``spread_small``: the delays are close, insertion sort is linear. Otherwise: split by
    channel (stable) into ``scratch``, insertion sort each, merge the channels back (a branch-free minimum over
    their heads). Same result either way. Returns scratch (replaced by a larger one if it was too small)."""
    if spread_small:
        insertion_sort(keys[:n])
        return scratch
    if scratch.shape[0] < n:
        scratch = np.empty(n, np.int64)
    counts = np.zeros(n_channels + 1, np.int64)
    for i in range(n):
        counts[(keys[i] & _CH_MASK) + 1] += 1
    for c in range(n_channels):
        counts[c + 1] += counts[c]
    pos = counts[:n_channels].copy()
    for i in range(n):
        c = keys[i] & _CH_MASK
        scratch[pos[c]] = keys[i]
        pos[c] += 1
    for c in range(n_channels):
        insertion_sort(scratch[counts[c]:counts[c + 1]])
    head = np.empty(n_channels, np.int64)
    for c in range(n_channels):
        pos[c] = counts[c]
        head[c] = scratch[pos[c]] if pos[c] < counts[c + 1] else _BIG
    for k in range(n):
        m = head[0]
        for c in range(1, n_channels):
            m = head[c] if head[c] < m else m
        keys[k] = m
        c = m & _CH_MASK
        pos[c] += 1
        head[c] = scratch[pos[c]] if pos[c] < counts[c + 1] else _BIG
    return scratch


# ========================================================================================================
# The whole block


@njit(cache=True)
def _side(s, photons, n, work, lo, hi, t0, block_ps, base, arm_delay_ps, dark_rate_per_ps, counting, det_dead_ps,
          ap_prob, ap_tau_ps, det_last, det_horizon, det_carry, input_delay_ps, tt_sigma_ps, resolution_ps,
          tt_dead_ps, tag_horizon, tag_last, tag_carry, spread_small, clicks_n):
    """Detectors lo..hi-1 of one receiver and their tagger channels, over photon keys photons[:n] in
    emission order; ``work`` is a second buffer. Returns (out, n_out, other buffer, det carry, tag carry):
    the tags are out[:n_out]."""
    insertion_sort(photons[:n])
    extra = det_carry
    for d in range(lo, hi):
        t = gen_poisson_times(s, t0 + arm_delay_ps[d], block_ps, dark_rate_per_ps[d])
        k = np.empty(t.shape[0], np.int64)
        for i in range(t.shape[0]):
            k[i] = ((t[i] - base) << CH_BITS) | d
        extra = merge2(extra, k)
    work, n_clicks, det_carry_out = detector_filter(s, photons, n, extra, base, det_last, det_dead_ps, ap_prob,
                                                    ap_tau_ps, det_horizon, counting, work)
    for i in range(n_clicks):
        clicks_n[work[i] & _CH_MASK] += 1
    tag_keys(s, work, n_clicks, base, input_delay_ps, tt_sigma_ps, resolution_ps)
    photons = sort_tags(work, n_clicks, hi, spread_small, photons)
    no_ap = np.zeros(ap_prob.shape[0])
    photons, n_out, tag_carry_out = detector_filter(s, work, n_clicks, tag_carry, base, tag_last, tt_dead_ps, no_ap,
                                                    no_ap, tag_horizon, counting, photons)
    return photons, n_out, work, det_carry_out, tag_carry_out


@njit(cache=True)
def _merge_unpack(a, na, b, nb, base):
    """(times, channels) of the sorted keys a[:na] and b[:nb] merged: branch-free, with a sentinel after
    each (the buffers are grown by one if needed)."""
    if a.shape[0] <= na:
        a = _grow(a, na)
    if b.shape[0] <= nb:
        b = _grow(b, nb)
    a[na] = _BIG
    b[nb] = _BIG
    n = na + nb
    ts = np.empty(n, np.int64)
    ch = np.empty(n, np.uint8)
    i = 0
    j = 0
    for k in range(n):
        va = a[i]
        vb = b[j]
        take_b = vb < va
        key = vb if take_b else va
        j += take_b
        i += not take_b
        ts[k] = (key >> CH_BITS) + base
        ch[k] = key & _CH_MASK
    return ts, ch, a, b


@njit(cache=True)
def simulate_block(s, t0, block_ps, pair_rate_per_ps, thr, alias, cat_a, cat_b,
                   arm_delay_ps, det_sigma_ps, det_horizon, dark_rate_per_ps, counting,
                   det_dead_ps, ap_prob, ap_tau_ps, det_last, det_carry_t, det_carry_c,
                   input_delay_ps, tt_sigma_ps, resolution_ps, tt_dead_ps, tag_horizon, tag_last,
                   tag_carry_t, tag_carry_c, spread_small, w0, w1, w2, w3):
    """One block of the bench: detectors 0-3 (Alice) and 4-7 (Bob) feed tagger channels 0-7.

    Per-channel arrays have 8 entries. ``det_last``/``tag_last`` (absolute ps) are updated in place.
    Carries are (absolute times, channels), sorted by (time, channel). ``spread_small[side]`` chooses the
    tag sort (see :func:`sort_tags`). ``w0``-``w3`` are the caller's workspace buffers (int64, any size).
    Returns (timestamps, channels, clicks_per_detector, det_carry_t, det_carry_c, tag_carry_t, tag_carry_c,
    w0, w1, w2, w3); the tags sorted by (time, channel); the buffers to keep for the next block.
    Random draws, in order: per pair event its gap, its category and its photons' jitters; then Alice's side
    (dark counts of detectors 0-3, afterpulses, tagger jitters) and Bob's.
    """
    base = t0 - BASE_MARGIN
    w0, na, w2, nb = gen_photons(s, t0, block_ps, pair_rate_per_ps, thr, alias, cat_a, cat_b, arm_delay_ps,
                                 det_sigma_ps, base, w0, w2)
    dc = pack(det_carry_t, det_carry_c, base)
    tc = pack(tag_carry_t, tag_carry_c, base)
    clicks_n = np.zeros(8, np.int64)
    dca = dcb = tca = tcb = np.empty(0, np.int64)
    for side in range(2):  # a loop, not two calls with literal bounds: one compiled _side
        lo = 4 * side
        main, n_main, work = (w0, na, w1) if side == 0 else (w2, nb, w3)
        main, n_main, work, dco, tco = _side(s, main, n_main, work, lo, lo + 4, t0, block_ps, base, arm_delay_ps,
                                             dark_rate_per_ps, counting, det_dead_ps, ap_prob, ap_tau_ps, det_last,
                                             det_horizon, _of_side(dc, side), input_delay_ps, tt_sigma_ps,
                                             resolution_ps, tt_dead_ps, tag_horizon, tag_last, _of_side(tc, side),
                                             spread_small[side], clicks_n)
        if side == 0:
            w0, na, w1, dca, tca = main, n_main, work, dco, tco
        else:
            w2, nb, w3, dcb, tcb = main, n_main, work, dco, tco
    ts, ch, w0, w2 = _merge_unpack(w0, na, w2, nb, base)
    dct, dcc = unpack(merge2(dca, dcb), base)
    tct, tcc = unpack(merge2(tca, tcb), base)
    return ts, ch, clicks_n, dct, dcc, tct, tcc, w0, w1, w2, w3


@njit(cache=True)
def _of_side(keys, side):
    """The keys of channels 4*side .. 4*side+3 (order kept)."""
    out = np.empty(keys.shape[0], np.int64)
    n = 0
    for i in range(keys.shape[0]):
        if (keys[i] & _CH_MASK) >> 2 == side:
            out[n] = keys[i]
            n += 1
    return out[:n]


# ========================================================================================================
# Plain references: Python loops, heapq and numpy sorts on (time, channel) tuples; the same random draws
# through the scalar rng_* functions. Slow, obviously correct, the tests' oracles for the kernels above.


def _ref_jitter(sigma, z):
    z = min(max(z, -JITTER_CLIP), JITTER_CLIP)
    return math.floor(sigma * z + 0.5)


def ref_gen_poisson_times(s, start, length, rate_per_ps):
    if rate_per_ps <= 0.0 or length <= 0:
        return np.empty(0, np.int64)
    times, t = [], 0.0
    while True:
        t += rng_exponential(s) * (1.0 / rate_per_ps)
        if t >= length:
            return np.array(times, np.int64)
        times.append(start + int(t))


def ref_gen_photons(s, t0, block_ps, rate_per_ps, thr, alias, cat_a, cat_b, delay_ps, sigma_ps):
    """(Alice's, Bob's) photons as lists of (absolute time, detector) in emission order."""
    sides: tuple[list, list] = ([], [])
    if rate_per_ps <= 0.0 or block_ps <= 0:
        return sides
    t = 0.0
    while True:
        t += rng_exponential(s) * (1.0 / rate_per_ps)
        if t >= block_ps:
            return sides
        emitted = t0 + int(t)
        w = int(rng_next(s))
        i, r = w >> _ALIAS_SHIFT, w & (_ALIAS_ONE - 1)
        c = i if r < thr[i] else int(alias[i])
        for d in ((int(cat_a[c]),) if cat_a[c] >= 0 else ()) + ((4 + int(cat_b[c]),) if cat_b[c] >= 0 else ()):
            sides[d // 4].append((emitted + int(delay_ps[d]) + _ref_jitter(sigma_ps[d], rng_normal(s)), d))


def ref_detector_filter(s, events, last, dead_ps, p_ap, tau_ap_ps, horizon):
    """events: sorted (t, c) tuples; last: dict/array per channel (updated). Returns (clicks, carry) lists."""
    pending = list(events)
    heapq.heapify(pending)
    out, carry = [], []
    while pending:
        t, c = heapq.heappop(pending)
        if t >= horizon[c]:
            carry.append((t, c))
        elif t - last[c] >= dead_ps[c]:
            out.append((t, c))
            last[c] = t
            if p_ap[c] > 0.0 and rng_uniform(s) < p_ap[c]:
                heapq.heappush(pending, (t + int(dead_ps[c]) + int(rng_exponential(s) * tau_ap_ps[c]), c))
    return out, carry


def ref_deadtime_filter(events, last, dead_ps, horizon):
    out, carry = [], []
    for t, c in events:
        if t >= horizon[c]:
            carry.append((t, c))
        elif t - last[c] >= dead_ps[c]:
            out.append((t, c))
            last[c] = t
    return out, carry


def ref_tag_times(s, clicks, input_delay_ps, sigma_ps, resolution_ps):
    z = [rng_normal(s) for _ in range(len(clicks))]
    return [(((t + int(input_delay_ps[c]) + _ref_jitter(sigma_ps, zk)) // resolution_ps) * resolution_ps, c)
            for (t, c), zk in zip(clicks, z)]


def ref_simulate_block(s, t0, block_ps, pair_rate_per_ps, thr, alias, cat_a, cat_b,
                       arm_delay_ps, det_sigma_ps, det_horizon, dark_rate_per_ps, counting,
                       det_dead_ps, ap_prob, ap_tau_ps, det_last, det_carry_t, det_carry_c,
                       input_delay_ps, tt_sigma_ps, resolution_ps, tt_dead_ps, tag_horizon, tag_last,
                       tag_carry_t, tag_carry_c, spread_small, w0=None, w1=None, w2=None, w3=None):
    """:func:`simulate_block` written with (time, channel) tuples, heapq and sorted() (no workspace)."""
    sides = ref_gen_photons(s, t0, block_ps, pair_rate_per_ps, thr, alias, cat_a, cat_b, arm_delay_ps, det_sigma_ps)
    dcarry = list(zip(det_carry_t.tolist(), det_carry_c.tolist()))
    tcarry = list(zip(tag_carry_t.tolist(), tag_carry_c.tolist()))
    clicks_n = np.zeros(8, np.int64)
    outs, dcs, tcs = [], [], []
    last_d = [int(x) for x in det_last]
    last_t = [int(x) for x in tag_last]
    for side in range(2):
        chans = range(4 * side, 4 * side + 4)
        darks = []
        for d in chans:
            darks += [(int(t), d) for t in ref_gen_poisson_times(s, int(t0 + arm_delay_ps[d]), block_ps,
                                                                 dark_rate_per_ps[d])]
        events = sorted(sides[side] + darks + [e for e in dcarry if e[1] in chans])
        events = [e for e in events if counting[e[1]]]
        tc = [e for e in tcarry if e[1] in chans and counting[e[1]]]
        clicks, dco = ref_detector_filter(s, events, last_d, det_dead_ps, ap_prob, ap_tau_ps, det_horizon)
        for _, c in clicks:
            clicks_n[c] += 1
        tags = sorted(ref_tag_times(s, clicks, input_delay_ps, tt_sigma_ps, int(resolution_ps)) + tc)
        kept, tco = ref_deadtime_filter(tags, last_t, tt_dead_ps, tag_horizon)
        outs += kept
        dcs += dco
        tcs += tco
    det_last[:] = last_d
    tag_last[:] = last_t

    def arrays(pairs):
        pairs = sorted(pairs)
        return np.array([t for t, _ in pairs], np.int64), np.array([c for _, c in pairs], np.uint8)

    ts, ch = arrays(outs)
    return (ts, ch, clicks_n, *arrays(dcs), *arrays(tcs))
