"""Privacy amplification and sifting throughput, each beside a simple reference measured in the same run.

PA: Toeplitz hash of n key bits to m bits (``daemon.qkd.amplification.toeplitz_hash``, carry-less Karatsuba
on packed words with a (V)PCLMULQDQ base case), beside the numpy float64 FFT convolution (``toeplitz_hash_fft``)
at the same sizes and the dense numpy integer matrix product at a small size (its O(n m) rate only falls
with n). Also the packed-word entry point (``toeplitz_hash_words``, no bit-array conversions), every kernel
this CPU has at n = 1e6, and the cold numba compile time (fresh cache directory, separate interpreter).
Sifting: ``sift_events`` on coincidence masks (1 % multi-clicks) beside the plain per-event Python sift, and
``sift_tags`` from a merged tag stream. One core (numba and numpy single-threaded). Final line: JSON.

Importable: ``pa_figures(n, m, repeat)``, ``sifting_figures(n_events=5_000_000, n_reference=200_000,
repeat=3)``, ``pa_kernel_figures(n, m, repeat)``, ``pa_compile_seconds(kernel=None)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from daemon.qkd import amplification as pa  # noqa: E402
from daemon.qkd.sifting import TaggerMap, sift_events, sift_reference, sift_tags  # noqa: E402


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def pa_figures(n: int, m: int, repeat: int = 5, seed: int = 0) -> dict:
    """Best-of-``repeat`` rate of ``toeplitz_hash`` (uint8 bits in and out) and of ``toeplitz_hash_words``,
    beside ``toeplitz_hash_fft`` (the reference, best of fewer runs) at the same n, m; results checked equal."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = pa.new_seed(n, m)
    y = pa.toeplitz_hash(x, s, m)
    assert np.array_equal(y, pa.toeplitz_hash_fft(x, s, m)), "clmul and fft disagree"
    xw, sw = pa.pack_bits(x), pa.pack_bits(s)
    t = best_of(lambda: pa.toeplitz_hash(x, s, m), repeat)
    tw = best_of(lambda: pa.toeplitz_hash_words(xw, n, sw, m), repeat)
    tf = best_of(lambda: pa.toeplitz_hash_fft(x, s, m), max(1, min(3, repeat)) if n <= 10**6 else 1)
    rate, ref = n / t / 1e6, n / tf / 1e6
    return {"n": n, "m": m, "kernel": pa.KERNEL, "mbit_per_s": round(rate, 2),
            "words_mbit_per_s": round(n / tw / 1e6, 2), "reference": "numpy FFT (toeplitz_hash_fft)",
            "reference_mbit_per_s": round(ref, 2), "ratio": round(rate / ref, 2),
            "seconds": t, "reference_seconds": tf}


def pa_kernel_figures(n: int = 10**6, m: int = 5 * 10**5, repeat: int = 3) -> dict:
    """Packed-word rate of every kernel this CPU can run (the portable one on a smaller n: it is slow)."""
    rng = np.random.default_rng(1)
    out = {}
    for k in pa.available_kernels():
        nk, mk = (n, m) if k != "portable" else (n // 20, m // 20)
        xw = pa.pack_bits(rng.integers(0, 2, nk, dtype=np.uint8))
        sw = pa.pack_bits(pa.new_seed(nk, mk))
        pa.toeplitz_hash_words(xw, nk, sw, mk, kernel=k)
        t = best_of(lambda: pa.toeplitz_hash_words(xw, nk, sw, mk, kernel=k), repeat if k != "portable" else 1)
        out[k] = {"n": nk, "m": mk, "mbit_per_s": round(nk / t / 1e6, 2)}
    return out


def pa_compile_seconds(kernel: str | None = None) -> dict:
    """Cold start in a fresh interpreter with an empty numba cache: import, then the first hash (compile),
    then the same again with the now-filled cache (load)."""
    code = ("import time; t0 = time.perf_counter(); import numpy as np; from daemon.qkd import amplification as pa; "
            "t1 = time.perf_counter(); pa.toeplitz_hash(np.ones(1000, np.uint8), np.ones(1499, np.uint8), 500); "
            "t2 = time.perf_counter(); print(t1 - t0, t2 - t1, pa.KERNEL)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        if kernel:
            env["QNETD_PA_KERNEL"] = kernel
        for label in ("cold", "cached"):
            r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                               check=True)
            imp, first, k = r.stdout.split()
            res[label] = {"import_s": round(float(imp), 3), "first_call_s": round(float(first), 3)}
            res["kernel"] = k
    return res


def sifting_figures(n_events: int = 5_000_000, n_reference: int = 200_000, repeat: int = 3, seed: int = 0) -> dict:
    """``sift_events`` on coincidence masks (1 % multi-clicks) beside the plain per-event Python sift."""
    rng = np.random.default_rng(seed)
    singles = np.array([1, 2, 4, 8], np.uint8)
    ma = singles[rng.integers(0, 4, n_events)]
    mb = singles[rng.integers(0, 4, n_events)]
    multi = rng.random(n_events) < 0.01
    ma[multi] = rng.integers(1, 16, int(multi.sum()))
    sift_events(ma[:100], mb[:100])
    ts = best_of(lambda: sift_events(ma, mb, "psi-"), repeat)
    r = sift_events(ma, mb, "psi-")
    rate = r.sifted / ts / 1e6
    nr = min(n_reference, n_events)
    tr = best_of(lambda: sift_reference(ma[:nr], mb[:nr], "psi-"), 1)
    ref = sift_reference(ma[:nr], mb[:nr], "psi-").sifted / tr / 1e6
    return {"events": n_events, "mbit_per_s": round(rate, 2), "events_per_s": round(n_events / ts),
            "reference": "plain Python sift_reference", "reference_mbit_per_s": round(ref, 3),
            "ratio": round(rate / ref, 1)}


def tag_sifting_figures(n_tags: int = 20_000_000, repeat: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    t_tags = np.cumsum(rng.integers(1, 4000, n_tags)).astype(np.int64)
    ch = rng.integers(0, 8, n_tags).astype(np.uint8)
    tm = TaggerMap((0, 1, 2, 3), (4, 5, 6, 7), window_ps=1000)
    sift_tags(t_tags[:1000], ch[:1000], tm)
    tt = best_of(lambda: sift_tags(t_tags, ch, tm), repeat)
    rt = sift_tags(t_tags, ch, tm)
    return {"tags_per_s": round(n_tags / tt), "mbit_per_s": round(rt.sifted / tt / 1e6, 2),
            "coincidences_per_tag": round(rt.coincidences / n_tags, 3)}


def main() -> None:
    out: dict = {"pclmul": pa.HAVE_PCLMUL, "kernel": pa.KERNEL, "kernels": list(pa.available_kernels())}
    print(f"privacy amplification (one core, kernel {pa.KERNEL}; available: {', '.join(pa.available_kernels())})",
          flush=True)
    figs = []
    for n, m in ((10**5, 10**5 // 2), (10**6, 10**6 // 2), (10**6, 10**6 // 4), (4 * 10**6, 2 * 10**6)):
        f = pa_figures(n, m, 7 if n <= 10**6 else 3)
        figs.append(f)
        print(f"  n = {n:>9,} m = {m:>9,}: {f['mbit_per_s']:7.1f} Mbit/s ({f['seconds'] * 1e3:6.2f} ms; words API "
              f"{f['words_mbit_per_s']:6.1f})   numpy FFT {f['reference_mbit_per_s']:5.1f} Mbit/s "
              f"({f['reference_seconds'] * 1e3:6.1f} ms)   ratio {f['ratio']:5.1f}x", flush=True)
    kf = pa_kernel_figures()
    print("  kernels (words API): " + ", ".join(f"{k} {v['mbit_per_s']:.1f} Mbit/s at n = {v['n']:,}"
                                               for k, v in kf.items()), flush=True)
    nd = 4096
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, nd, dtype=np.uint8)
    s = pa.new_seed(nd, nd // 2)
    td = best_of(lambda: pa.toeplitz_reference(x, s, nd // 2), 3)
    dense = nd / td / 1e6
    print(f"  dense numpy matrix at n = {nd}: {dense:.2f} Mbit/s (O(n m): scaled to n = 1e6 it would be "
          f"{dense * nd / 1e6:.4f} Mbit/s)", flush=True)
    cs = pa_compile_seconds()
    print(f"  start-up ({cs['kernel']}): import {cs['cold']['import_s']:.2f} s, first hash with an empty numba "
          f"cache {cs['cold']['first_call_s']:.2f} s, from the cache {cs['cached']['first_call_s']:.2f} s", flush=True)

    print("sifting (one core)", flush=True)
    sf = sifting_figures()
    print(f"  from coincidence events: {sf['mbit_per_s']:.1f} Mbit/s sifted ({sf['events_per_s'] / 1e6:.1f} M "
          f"events/s); plain Python {sf['reference_mbit_per_s']:.2f} Mbit/s; ratio {sf['ratio']:.0f}x", flush=True)
    tf = tag_sifting_figures()
    print(f"  from tags (clusters + squash + sift): {tf['tags_per_s'] / 1e6:.1f} M tags/s, {tf['mbit_per_s']:.1f} "
          f"Mbit/s sifted at {tf['coincidences_per_tag']:.2f} coincidences per tag", flush=True)

    one = next(f for f in figs if f["n"] == 10**6 and f["m"] == 10**6 // 2)
    out.update({
        "pa_mbit_per_s": one["mbit_per_s"],
        "pa_ratio_vs_fft_1e6": one["ratio"],
        "pa": [{k: v for k, v in f.items() if k not in ("seconds", "reference_seconds")} for f in figs],
        "pa_kernels": kf,
        "pa_dense_reference_mbit_per_s_n4096": round(dense, 3),
        "pa_compile": cs,
        "sifting_mbit_per_s": sf["mbit_per_s"],
        "sifting_reference_mbit_per_s": sf["reference_mbit_per_s"],
        "sifting_ratio": sf["ratio"],
        "sifting_tags_per_s": tf["tags_per_s"],
        "sifting_from_tags_mbit_per_s": tf["mbit_per_s"],
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
