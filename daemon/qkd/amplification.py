"""Privacy amplification: Toeplitz hashing over GF(2), exact, with a fresh seed from ``os.urandom``.

Construction
------------
An ``m x n`` Toeplitz matrix ``T`` is fixed by an ``n + m - 1``-bit seed ``s``: ``T[i, j] = s[i - j + n - 1]``.
The hash of the key ``x`` (``n`` bits) is ``y = T x (mod 2)`` (``m`` bits). The family is 2-universal (the seed
is uniform), which is what the leftover hash lemma behind the finite-key bound needs.

``y[i] = sum_j x[j] s[i + n - 1 - j]`` is coefficient ``n - 1 + i`` of the polynomial product ``X(z) S(z)`` over
GF(2) (the *middle product*). So the hash is one carry-less polynomial multiplication, computed here on packed
64-bit words:

* ``method="clmul"`` (default): ``T`` is cut into square Toeplitz blocks of ``N`` words; each block product
  uses the Karatsuba-style Toeplitz split (three half-size products, i.e. the transposed Karatsuba middle
  product) down to a product-scanning schoolbook base case whose 64x64-bit carry-less products use the CPU's
  ``PCLMULQDQ`` instruction (an LLVM intrinsic called from numba; a portable shift-and-xor multiply when the
  CPU lacks it).
  Exact by construction: every operation is XOR/AND/carry-less multiply in GF(2), nothing is rounded.
* ``method="fft"``: one cyclic float64 convolution (``numpy.fft``, 1 bit per element) of length ``N >= n+m-1``
  (wrap-around lands only on coefficients not read); the integer sums are at most ``n``, rounded and reduced
  mod 2. Exactness is checked a posteriori: every result must lie within 0.25 of an integer, else
  :class:`AmplificationError` (the forward error of the FFT convolution is ~1e-9 at n = 1e6, far below 0.25).
  Slower; kept as an independent exact cross-check.
* :func:`toeplitz_reference`: the plain dense ``O(n m)`` product, for tests and small sizes.

Bits are ``uint8`` arrays of 0/1. The seed must be fresh per block (:func:`new_seed`) and, in the two-party
protocol, sent authenticated from one side to the other; it may be public but never reused.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "AmplificationError",
    "HAVE_PCLMUL",
    "new_seed",
    "toeplitz_hash",
    "toeplitz_hash_fft",
    "toeplitz_reference",
    "pack_bits",
    "unpack_bits",
]


class AmplificationError(ValueError):
    """Bad arguments, or (fft method) a convolution that did not round exactly."""


def _host_has_pclmul() -> bool:
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        return bool(feats.get("pclmul", False))
    except Exception:  # pragma: no cover - exotic llvmlite builds
        return False


HAVE_PCLMUL = _host_has_pclmul() and os.environ.get("QNETD_NO_PCLMUL", "") == ""


@intrinsic
def _clmul_hw(typingctx, a, b):  # pragma: no cover - compiled
    """(lo, hi) words of the 128-bit carry-less product of two uint64 (x86 PCLMULQDQ)."""
    sig = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        vt = ir.VectorType(i64, 2)
        fnty = ir.FunctionType(vt, [vt, vt, ir.IntType(8)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.pclmulqdq")
        va = builder.insert_element(ir.Constant(vt, None), args[0], ir.Constant(i32, 0))
        vb = builder.insert_element(ir.Constant(vt, None), args[1], ir.Constant(i32, 0))
        r = builder.call(fn, [va, vb, ir.Constant(ir.IntType(8), 0)])
        lo = builder.extract_element(r, ir.Constant(i32, 0))
        hi = builder.extract_element(r, ir.Constant(i32, 1))
        return context.make_tuple(builder, signature.return_type, [lo, hi])

    return sig, codegen


@njit(cache=True, nogil=True)
def _clmul_sw(a, b):  # pragma: no cover - jit
    """Portable carry-less 64x64 -> 128 multiply (shift and xor)."""
    lo = np.uint64(0)
    hi = np.uint64(0)
    one = np.uint64(1)
    for i in range(64):
        if (b >> np.uint64(i)) & one:
            lo ^= a << np.uint64(i)
            if i:
                hi ^= a >> np.uint64(64 - i)
    return lo, hi


_clmul = _clmul_hw if HAVE_PCLMUL else _clmul_sw
BASE_WORDS = 32  # schoolbook base case below this many words (16..64 measured within noise; 32 chosen)


@njit(cache=True, nogil=True)
def _tmvp_base(t, x, n, y):  # pragma: no cover - jit
    """y[0:n] = T x for one Toeplitz block of 64n bits (seed t: 2n words, its last bit unused).

    y_i = coefficient i + 64n - 1 of t(z) x(z): product words n-1 .. 2n-1 by product scanning (each output
    word accumulated in registers from the carry-less products whose word indices sum to it), then a 1-bit
    shift."""
    carry = np.uint64(0)
    k = n - 2
    if k >= 0:
        for b in range(0, min(k, n - 1) + 1):
            lo, hi = _clmul(t[k - b], x[b])
            carry ^= hi
    prev = np.uint64(0)
    for k in range(n - 1, 2 * n):
        acc_lo = carry
        acc_hi = np.uint64(0)
        b0 = max(0, k - 2 * n + 1)
        b1 = min(k, n - 1)
        for b in range(b0, b1 + 1):
            lo, hi = _clmul(t[k - b], x[b])
            acc_lo ^= lo
            acc_hi ^= hi
        carry = acc_hi
        if k > n - 1:
            y[k - n] = (prev >> np.uint64(63)) | (acc_lo << np.uint64(1))
        prev = acc_lo


@njit(cache=True, nogil=True)
def _tmvp(t, x, n, y, scratch):  # pragma: no cover - jit
    """y[0:n] = T x over GF(2), T the 64n x 64n Toeplitz matrix of seed t (2n words); Karatsuba-style split.

    With T = [[T1, T0], [T2, T1]] (block seeds at word offsets h, 0, 2h):
    P0 = T1 (x0 + x1), y0 = P0 + (T0 + T1) x1, y1 = P0 + (T2 + T1) x0 -- three half-size products."""
    if n <= BASE_WORDS or n & 1:
        _tmvp_base(t, x, n, y)
        return
    h = n // 2
    sx = scratch[:h]
    p0 = scratch[h: 2 * h]
    st = scratch[2 * h: 4 * h]
    rest = scratch[4 * h:]
    for i in range(h):
        sx[i] = x[i] ^ x[h + i]
    _tmvp(t[h: 3 * h], sx, h, p0, rest)
    for i in range(2 * h):
        st[i] = t[i] ^ t[h + i]
    _tmvp(st, x[h:], h, y[:h], rest)
    for i in range(2 * h):
        st[i] = t[2 * h + i] ^ t[h + i]
    _tmvp(st, x[:h], h, y[h:], rest)
    for i in range(h):
        y[i] ^= p0[i]
        y[h + i] ^= p0[i]


@njit(cache=True, nogil=True)
def _hash_blocks(sp, xw, N, nb, base_off, out):  # pragma: no cover - jit
    """out[0:N] = sum over column blocks b of T_b x_b; block b's seed starts at word base_off - b*N of sp."""
    tmp = np.zeros(N, np.uint64)
    scratch = np.zeros(4 * N + 64, np.uint64)
    for b in range(nb):
        xb = xw[b * N: (b + 1) * N]
        nz = False
        for i in range(N):
            if xb[i] != 0:
                nz = True
                break
        if not nz:
            continue
        o = base_off - b * N
        _tmvp(sp[o: o + 2 * N], xb, N, tmp, scratch)
        for i in range(N):
            out[i] ^= tmp[i]


@njit(cache=True, nogil=True)
def _extract_bits(acc, first_word, bit0, m):  # pragma: no cover - jit
    """Words holding coefficients bit0 .. bit0+m-1 of a product whose word first_word is acc[0]."""
    nw = (m + 63) // 64
    out = np.zeros(nw, np.uint64)
    off = bit0 - first_word * 64
    q = off // 64
    r = np.uint64(off % 64)
    for w in range(nw):
        v = acc[q + w] >> r
        if r != 0 and q + w + 1 < acc.shape[0]:
            v |= acc[q + w + 1] << np.uint64(64 - (off % 64))
        out[w] = v
    return out


def pack_bits(bits: np.ndarray, words: int | None = None) -> np.ndarray:
    """0/1 uint8 array -> little-endian uint64 words (bit i of the array is bit i%64 of word i//64)."""
    b = np.asarray(bits, dtype=np.uint8)
    nw = (b.size + 63) // 64 if words is None else words
    buf = np.zeros(nw * 8, np.uint8)
    packed = np.packbits(b, bitorder="little")
    buf[: packed.size] = packed
    return buf.view("<u8").astype(np.uint64, copy=False)


def unpack_bits(words: np.ndarray, nbits: int) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(words, dtype="<u8").view(np.uint8), bitorder="little")[:nbits]


def new_seed(n: int, m: int) -> np.ndarray:
    """A fresh uniform Toeplitz seed of ``n + m - 1`` bits from ``os.urandom`` (0/1 uint8)."""
    if n <= 0 or m <= 0:
        raise AmplificationError("n and m must be positive")
    nbits = n + m - 1
    raw = np.frombuffer(os.urandom((nbits + 7) // 8), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:nbits].copy()


def _check(key: np.ndarray, seed: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    x = np.asarray(key)
    s = np.asarray(seed)
    if x.ndim != 1 or s.ndim != 1:
        raise AmplificationError("key and seed must be 1-D bit arrays")
    n = x.size
    if n == 0 or m <= 0:
        raise AmplificationError("need n > 0 input bits and m > 0 output bits")
    if m > n:
        raise AmplificationError(f"output length m={m} exceeds the input length n={n}")
    if s.size != n + m - 1:
        raise AmplificationError(f"seed has {s.size} bits; the Toeplitz matrix needs n + m - 1 = {n + m - 1}")
    if x.dtype != np.uint8:
        x = x.astype(np.uint8)
    if s.dtype != np.uint8:
        s = s.astype(np.uint8)
    if (x > 1).any() or (s > 1).any():
        raise AmplificationError("key and seed must hold bits (0 or 1)")
    return x, s, n


def _square_words(m_words: int) -> int:
    """Square block size N = U * 2**k >= m_words with BASE_WORDS/2 < U <= BASE_WORDS (little padding)."""
    k = 0
    while -(-m_words // (1 << k)) > BASE_WORDS:
        k += 1
    return -(-m_words // (1 << k)) << k


def toeplitz_hash(key: np.ndarray, seed: np.ndarray, m: int, method: str = "clmul") -> np.ndarray:
    """``T(seed) @ key mod 2`` as ``m`` bits (0/1 uint8). ``len(seed)`` must be ``len(key) + m - 1``."""
    if method == "fft":
        return toeplitz_hash_fft(key, seed, m)
    if method == "reference":
        return toeplitz_reference(key, seed, m)
    if method != "clmul":
        raise AmplificationError(f"unknown method {method!r} (clmul, fft, reference)")
    x, s, n = _check(key, seed, m)
    # T (m x n) is cut into nb square Toeplitz blocks of N words (64N bits) side by side; rows >= m and
    # columns >= n are padding (x zero there, outputs dropped). Column block b: T[i, bB + j] =
    # s[i - j + n - 1 - bB] = t_b[i - j + B - 1] with t_b[k] = s[k + n - B - bB] (B = 64N bits); s is padded
    # with zeros in front (P0 bits, chosen so every t_b starts on a word boundary) and at the end.
    N = _square_words((m + 63) // 64)
    B = 64 * N
    nb = -(-n // B)
    p0 = max(0, nb * B - n)
    p0 += (-(n + p0)) % 64
    total = p0 + n + B  # highest seed index read: p0 + n - B + 2B - 1
    sp_bits = np.zeros(-(-total // 64) * 64, np.uint8)
    sp_bits[p0: p0 + s.size] = s
    sp = pack_bits(sp_bits)
    xw = pack_bits(x, nb * N)
    base_off = (p0 + n - B) // 64
    out = np.zeros(N, np.uint64)
    _hash_blocks(sp, xw, N, nb, base_off, out)
    return unpack_bits(out, m)


def _fft_size(n: int) -> int:
    """Smallest 2**a * 3**b >= n (sizes numpy's pocketfft handles fast)."""
    best = 1 << max(0, (n - 1).bit_length())
    p3 = 1
    while p3 < best:
        v = p3
        while v < n:
            v *= 2
        best = min(best, v)
        p3 *= 3
    return best


def toeplitz_hash_fft(key: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """Same hash by one cyclic float64 FFT convolution, with an a-posteriori exactness check."""
    x, s, n = _check(key, seed, m)
    L = n + m - 1
    N = _fft_size(L)  # cyclic length >= n+m-1: the wrapped terms fall on coefficients < n-1, never read
    X = np.fft.rfft(x.astype(np.float64), N)
    S = np.fft.rfft(s.astype(np.float64), N)
    c = np.fft.irfft(X * S, N)[n - 1: n - 1 + m]
    r = np.rint(c)
    dev = float(np.max(np.abs(c - r))) if m else 0.0
    if dev >= 0.25:  # pragma: no cover - would need n far beyond 1e9
        raise AmplificationError(f"FFT convolution not exact (max deviation {dev:.3g}); split the block")
    return (r.astype(np.int64) & 1).astype(np.uint8)


def toeplitz_reference(key: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """Plain dense ``O(n m)`` product (numpy integer matrix), the test oracle."""
    x, s, n = _check(key, seed, m)
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    T = s[i - j + n - 1]
    return ((T.astype(np.int64) @ x.astype(np.int64)) & 1).astype(np.uint8)
