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
  product) down to a schoolbook base case of at most :data:`BASE_WORDS` words. The seed is placed so that every
  block is word-aligned (``T[i, j] = u[i - j + 64N]``: no bit shifts anywhere). The base case runs on one of
  the kernels of :data:`KERNELS`, picked at import from the CPU numba compiles for (:func:`available_kernels`,
  override: ``QNETD_PA_KERNEL``, ``QNETD_NO_PCLMUL=1``, :func:`set_kernel`):

  - ``vpclmul512`` / ``vpclmul256`` / ``pclmul``: ``VPCLMULQDQ`` on 512- or 256-bit vectors, or
    ``PCLMULQDQ`` on 128 bits, through LLVM intrinsics generated in numba (:func:`_vbase`): per key word one
    broadcast, per vector of seed words two carry-less multiplies (even and odd words of each 128-bit lane),
    accumulators in registers (2W output words at a time, W = 8, 4, 2 words per vector);
  - ``portable``: no carry-less instruction; per key word a 256-entry table of its products with every byte,
    seed words multiplied byte by byte.

  Each kernel is a separate numba specialisation (selected by the type of a token argument), so code for an
  instruction set the CPU lacks is never compiled. Exact by construction: every operation is XOR, AND, shift
  or carry-less multiply in GF(2); nothing is rounded.
* :func:`toeplitz_hash_words`: the same on packed 64-bit words (no bit-array conversions).
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
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = [
    "AmplificationError",
    "HAVE_PCLMUL",
    "KERNEL",
    "KERNELS",
    "available_kernels",
    "set_kernel",
    "toeplitz_hash_words",
    "new_seed",
    "toeplitz_hash",
    "toeplitz_hash_fft",
    "toeplitz_reference",
    "pack_bits",
    "unpack_bits",
]


class AmplificationError(ValueError):
    """Bad arguments, or (fft method) a convolution that did not round exactly."""


# --- kernel selection ---------------------------------------------------------------------------------------
# Each kernel is a distinct numba specialisation, selected by the *type* of a token argument (so code for an
# instruction set is only ever compiled when that kernel is used: compiling a PCLMULQDQ intrinsic for a CPU
# without it is a fatal LLVM error, not an exception).
KERNELS = ("vpclmul512", "vpclmul256", "pclmul", "portable")  # fastest first
_TOKENS = {"portable": np.uint8(0), "pclmul": np.uint16(0), "vpclmul256": np.uint32(0), "vpclmul512": np.uint64(0)}
_WIDTH = {8: 0, 16: 2, 32: 4, 64: 8}  # token bit width -> uint64 words per vector (0: portable, no vectors)
_NEEDS = {"vpclmul512": {"vpclmulqdq", "avx512f"}, "vpclmul256": {"vpclmulqdq", "avx"}, "pclmul": {"pclmul"},
          "portable": set()}
# base-case size (words) below which the Karatsuba split stops, per kernel; measured (docs/qkd-keys.md)
BASE_WORDS = {"vpclmul512": 128, "vpclmul256": 64, "pclmul": 96, "portable": 16}


def _cpu_features() -> set[str]:
    """Features of the CPU numba compiles for (the host, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say else)."""
    try:
        from numba.core import config

        if config.CPU_FEATURES:
            return {f[1:] for f in str(config.CPU_FEATURES).split(",") if f.startswith("+")}
        if config.CPU_NAME and config.CPU_NAME != "host":
            return set()  # a generic target: assume nothing
        import llvmlite.binding as llvm

        return {k for k, v in llvm.get_host_cpu_features().items() if v}
    except Exception:  # pragma: no cover - exotic llvmlite builds
        return set()


_FEATURES = _cpu_features()


def available_kernels() -> tuple[str, ...]:
    """Kernels this CPU can run, fastest first (``portable`` always)."""
    return tuple(k for k in KERNELS if _NEEDS[k] <= _FEATURES)


def _default_kernel() -> str:
    if os.environ.get("QNETD_NO_PCLMUL", ""):
        return "portable"
    want = os.environ.get("QNETD_PA_KERNEL", "")
    avail = available_kernels()
    if want in avail:
        return want
    if want:
        import logging

        logging.getLogger(__name__).warning("QNETD_PA_KERNEL=%s not available here (%s); using %s", want,
                                            ", ".join(avail), avail[0])
    return avail[0]


KERNEL = _default_kernel()
HAVE_PCLMUL = "pclmul" in _FEATURES and KERNEL != "portable"


def set_kernel(name: str) -> str:
    """Select the kernel used by default (one of :func:`available_kernels`); returns the previous one."""
    global KERNEL
    if name not in available_kernels():
        raise AmplificationError(f"kernel {name!r} not available on this CPU (have: {', '.join(available_kernels())})")
    prev, KERNEL = KERNEL, name
    return prev


@intrinsic
def _clmul_hw(typingctx, a, b):  # pragma: no cover - compiled
    """(lo, hi) words of the 128-bit carry-less product of two uint64 (x86 PCLMULQDQ)."""
    sig = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
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


_VNAME = {2: "llvm.x86.pclmulqdq", 4: "llvm.x86.pclmulqdq.256", 8: "llvm.x86.pclmulqdq.512"}


@intrinsic
def _vbase(typingctx, mode, t, x, n, p):  # pragma: no cover - compiled
    """Vector base case: p[i] ^= word n-1+i of the product t(z) x(z), i = 0 .. n+1 (more words may be touched).

    Words Q_k (128-bit, at product words k, k+1) = sum_b clmul(t[k-b], x[b]) for k = n-1 .. in groups of S = R*W:
    per b, one broadcast of x[b] and R loads of W consecutive seed words; (V)PCLMULQDQ with imm 0x00 gives the
    Q_k of the even words of each 128-bit lane, imm 0x01 those of the odd words. Accumulators stay in
    registers; each group ends with p[k - n + 1 ...] ^= even part, p[k - n + 2 ...] ^= odd part.
    Reads t[0 .. 2n + S - 2]: the caller guarantees S - 1 readable words past t[2n - 1] (their values only reach
    Q_k with k > 2n - 1, i.e. product words >= 2n, which are not used); x is read in range."""
    W = _WIDTH[mode.bitwidth]
    R = 2  # vectors per pass (measured: more does not help; the multiplier port is the limit)
    S = R * W
    sig = types.void(mode, t, x, n, p)

    def codegen(context, builder, signature, args):
        _, ta, xa, nv, pa_ = args
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        i8 = ir.IntType(8)
        vt = ir.VectorType(i64, W)
        vp = vt.as_pointer()
        tptr = context.make_array(signature.args[1])(context, builder, ta).data
        xptr = context.make_array(signature.args[2])(context, builder, xa).data
        pptr = context.make_array(signature.args[4])(context, builder, pa_).data
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, i8]), _VNAME[W])
        zero = ir.Constant(vt, [0] * W)
        accs = [cgutils.alloca_once(builder, vt) for _ in range(2 * R)]
        ngroups = builder.sdiv(builder.add(nv, i64(S)), i64(S))  # ceil((n + 1) / S)
        nm1 = builder.sub(nv, i64(1))
        splat = ir.Constant(ir.VectorType(i32, W), [0] * W)
        with cgutils.for_range(builder, ngroups) as g:
            gs = builder.mul(g.index, i64(S))
            k0 = builder.add(nm1, gs)
            for a in accs:
                builder.store(zero, a)
            with cgutils.for_range(builder, nv) as bl:
                b = bl.index
                xb = builder.load(builder.gep(xptr, [b]))
                xv = builder.insert_element(ir.Constant(vt, None), xb, i32(0))
                xv = builder.shuffle_vector(xv, ir.Constant(vt, None), splat)
                base = builder.sub(k0, b)
                for r in range(R):
                    ptr = builder.bitcast(builder.gep(tptr, [builder.add(base, i64(r * W))]), vp)
                    tv = builder.load(ptr, align=8)
                    e = builder.call(fn, [tv, xv, i8(0)])
                    o = builder.call(fn, [tv, xv, i8(1)])
                    builder.store(builder.xor(builder.load(accs[2 * r]), e), accs[2 * r])
                    builder.store(builder.xor(builder.load(accs[2 * r + 1]), o), accs[2 * r + 1])
            for r in range(R):
                for h in range(2):
                    ptr = builder.bitcast(builder.gep(pptr, [builder.add(gs, i64(r * W + h))]), vp)
                    v = builder.load(ptr, align=8)
                    builder.store(builder.xor(v, builder.load(accs[2 * r + h])), ptr, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _mul_table(a, tl, th):  # pragma: no cover - jit
    """tl[v], th[v] = low word and overflow bits (< 2**7) of the carry-less product a * v, v = 0 .. 255."""
    tl[0] = 0
    th[0] = 0
    for k in range(8):
        step = 1 << k
        lo = a << np.uint64(k)
        hi = (a >> np.uint64(64 - k)) if k else np.uint64(0)
        for i in range(step):
            tl[step + i] = tl[i] ^ lo
            th[step + i] = th[i] ^ hi


@njit(cache=True, nogil=True)
def _mul_by_table(v, tl, th):  # pragma: no cover - jit
    """(lo, hi) of a * v from a's table (:func:`_mul_table`): bytes of v, most significant first (Horner)."""
    c = v >> np.uint64(56)
    lo = tl[c]
    hi = th[c]
    for w in range(6, -1, -1):
        hi = (hi << np.uint64(8)) | (lo >> np.uint64(56))
        c = (v >> np.uint64(8 * w)) & np.uint64(255)
        lo = (lo << np.uint64(8)) ^ tl[c]
        hi ^= th[c]
    return lo, hi


@njit(cache=True, nogil=True)
def _clmul_sw(a, b):  # pragma: no cover - jit
    """Portable carry-less 64x64 -> 128 multiply (the portable kernel's arithmetic, for tests)."""
    tl = np.empty(256, np.uint64)
    th = np.empty(256, np.uint64)
    _mul_table(a, tl, th)
    return _mul_by_table(b, tl, th)


@njit(cache=True, nogil=True)
def _base_portable(t, x, n, p):  # pragma: no cover - jit
    """Same contract as :func:`_vbase`, without carry-less multiply instructions: for each key word x[b], a
    table of x[b] * (0..255) (low word, overflow), then every seed word t[k - b] is multiplied byte by byte
    (Horner, most significant byte first) and its 128-bit product xored into product words k, k + 1."""
    tl = np.empty(256, np.uint64)
    th = np.empty(256, np.uint64)
    for b in range(n):
        if x[b] == 0:
            continue
        _mul_table(x[b], tl, th)
        for i in range(n + 1):  # Q_k, k = n - 1 + i: seed word k - b (in range), product words k, k + 1
            lo, hi = _mul_by_table(t[n - 1 + i - b], tl, th)
            p[i] ^= lo
            p[i + 1] ^= hi


def _base(mode, t, x, n, p):  # pragma: no cover - stub, replaced by the overload below in jitted code
    raise NotImplementedError


@overload(_base)
def _base_overload(mode, t, x, n, p):
    if _WIDTH[mode.bitwidth] == 0:
        def impl(mode, t, x, n, p):  # pragma: no cover - jit
            _base_portable(t, x, n, p)
    else:
        def impl(mode, t, x, n, p):  # pragma: no cover - jit
            _vbase(mode, t, x, n, p)
    return impl


PAD_WORDS = 40  # readable words a seed needs past its end, and slack of the base case's product buffer


@njit(cache=True, nogil=True)
def _tmvp(mode, t, x, n, y, scratch, base):  # pragma: no cover - jit
    """y[0:n] = T x over GF(2): T the 64n x 64n Toeplitz matrix ``T[i, j] = u[i - j + 64n]`` of the seed u = t
    (2n words; bit 0 unused; PAD_WORDS readable words after it). Karatsuba-style split:
    T = [[T1, T0], [T2, T1]] (block seeds at word offsets h, 0, 2h, same convention):
    P0 = T1 (x0 + x1), y0 = P0 + (T0 + T1) x1, y1 = P0 + (T2 + T1) x0 -- three half-size products.
    scratch: >= 4n + 2 PAD_WORDS words, disjoint from t, x, y."""
    if n <= base or n & 1:
        p = scratch[PAD_WORDS: 2 * PAD_WORDS + n + 2]  # after a gap: a parent's seed may be read into it
        for i in range(n + PAD_WORDS + 2):
            p[i] = 0
        _base(mode, t, x, n, p)
        for i in range(n):
            y[i] = p[i + 1]
        return
    h = n // 2
    sx = scratch[:h]
    p0 = scratch[h: 2 * h]
    st = scratch[2 * h:]
    rest = scratch[4 * h:]
    for i in range(h):
        sx[i] = x[i] ^ x[h + i]
    _tmvp(mode, t[h:], sx, h, p0, rest, base)
    for i in range(2 * h):
        st[i] = t[i] ^ t[h + i]
    _tmvp(mode, st, x[h:], h, y[:h], rest, base)
    for i in range(2 * h):
        st[i] = t[2 * h + i] ^ t[h + i]
    _tmvp(mode, st, x[:h], h, y[h:], rest, base)
    for i in range(h):
        y[i] ^= p0[i]
        y[h + i] ^= p0[i]


@njit(cache=True, nogil=True)
def _hash_blocks(mode, sp, xw, N, nb, base_off, out, base):  # pragma: no cover - jit
    """out[0:N] = sum over column blocks b of T_b x_b; block b's seed starts at word base_off - b*N of sp."""
    tmp = np.empty(N, np.uint64)
    scratch = np.empty(4 * N + 4 * PAD_WORDS, np.uint64)
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
        _tmvp(mode, sp[o:], xb, N, tmp, scratch, base)
        for i in range(N):
            out[i] ^= tmp[i]


@njit(cache=True, nogil=True)
def _place_bits(dst, src, nbits, bitoff):  # pragma: no cover - jit
    """dst ^= (the first nbits bits of src) shifted up by bitoff bits (dst zero there, large enough)."""
    nw = (nbits + 63) // 64
    q = bitoff // 64
    r = np.uint64(bitoff % 64)
    for i in range(nw):
        v = src[i]
        if i == nw - 1 and nbits % 64:
            v &= (np.uint64(1) << np.uint64(nbits % 64)) - np.uint64(1)
        dst[q + i] ^= v << r
        if r:
            dst[q + i + 1] ^= v >> (np.uint64(64) - r)


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
    if x.max() > 1 or s.max() > 1:
        raise AmplificationError("key and seed must hold bits (0 or 1)")
    return x, s, n


def _square_words(m_words: int, base: int) -> int:
    """Square block size N = U * 2**k >= m_words with base/2 < U <= base (little padding)."""
    k = 0
    while -(-m_words // (1 << k)) > base:
        k += 1
    return -(-m_words // (1 << k)) << k


def _as_words(w: np.ndarray, nbits: int, what: str) -> np.ndarray:
    a = np.asarray(w)
    if a.ndim != 1 or a.dtype.kind not in "ui" or a.dtype.itemsize != 8:
        raise AmplificationError(f"{what} must be a 1-D array of 64-bit words")
    if a.size < (nbits + 63) // 64:
        raise AmplificationError(f"{what} has {a.size} words; {nbits} bits need {(nbits + 63) // 64}")
    return np.ascontiguousarray(a).astype(np.uint64, copy=False)  # by value: int64 wraps, byte order handled


def toeplitz_hash_words(key_words: np.ndarray, n: int, seed_words: np.ndarray, m: int,
                        kernel: str | None = None) -> np.ndarray:
    """The hash on packed words (layout of :func:`pack_bits`: bit i is bit i % 64 of word i // 64).

    ``key_words`` holds the n key bits, ``seed_words`` the n + m - 1 seed bits (bits past them are ignored);
    returns ceil(m / 64) words, bits past m zero. Same result as ``toeplitz_hash`` without the bit-array
    conversions. ``kernel`` overrides the module's :data:`KERNEL` (one of :func:`available_kernels`)."""
    n, m = int(n), int(m)
    if n <= 0 or m <= 0:
        raise AmplificationError("need n > 0 input bits and m > 0 output bits")
    if m > n:
        raise AmplificationError(f"output length m={m} exceeds the input length n={n}")
    kernel = KERNEL if kernel is None else kernel
    if kernel not in available_kernels():
        raise AmplificationError(f"kernel {kernel!r} not available on this CPU "
                                 f"(have: {', '.join(available_kernels())})")
    xw_in = _as_words(key_words, n, "key_words")
    sw_in = _as_words(seed_words, n + m - 1, "seed_words")
    base = BASE_WORDS[kernel]
    # T (m x n) is cut into nb square Toeplitz blocks of N words (B = 64N bits) side by side; rows >= m and
    # columns >= n are padding (x zero there, outputs dropped). Column block b in the aligned convention of
    # _tmvp: T[i, bB + j] = s[i - j + n - 1 - bB] = u_b[i - j + B] with u_b[k] = s[k + n - 1 - (b + 1) B].
    # The seed is placed p0 bits up in a zero buffer, p0 chosen so every u_b starts on a word boundary.
    N = _square_words((m + 63) // 64, base)
    B = 64 * N
    nb = -(-n // B)
    p0 = max(0, nb * B - (n - 1))
    p0 += (-(p0 + n - 1)) % 64
    sp = np.zeros((p0 + n + B + 63) // 64 + PAD_WORDS, np.uint64)  # highest bit read: p0 + n + B - 2
    _place_bits(sp, sw_in, n + m - 1, p0)
    xw = np.zeros(nb * N, np.uint64)
    _place_bits(xw, xw_in, n, 0)
    out = np.zeros(N, np.uint64)
    _hash_blocks(_TOKENS[kernel], sp, xw, N, nb, (p0 + n - 1 - B) // 64, out, base)
    mw = (m + 63) // 64
    out = out[:mw].copy()
    if m % 64:
        out[-1] &= np.uint64((1 << (m % 64)) - 1)
    return out


def toeplitz_hash(key: np.ndarray, seed: np.ndarray, m: int, method: str = "clmul") -> np.ndarray:
    """``T(seed) @ key mod 2`` as ``m`` bits (0/1 uint8). ``len(seed)`` must be ``len(key) + m - 1``."""
    if method == "fft":
        return toeplitz_hash_fft(key, seed, m)
    if method == "reference":
        return toeplitz_reference(key, seed, m)
    if method != "clmul":
        raise AmplificationError(f"unknown method {method!r} (clmul, fft, reference)")
    x, s, n = _check(key, seed, m)
    return unpack_bits(toeplitz_hash_words(pack_bits(x), n, pack_bits(s), m), m)


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
