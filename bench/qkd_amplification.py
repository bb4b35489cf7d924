"""Privacy amplification and sifting throughput, each beside a simple reference measured in the same run.

PA: Toeplitz hash of n key bits to m = n/2 bits (``daemon.qkd.amplification.toeplitz_hash``, carry-less
Karatsuba on packed words), beside the numpy float64 FFT convolution (``toeplitz_hash_fft``) at the same sizes
and the dense numpy integer matrix product at a small size (its O(n m) rate only falls with n).
Sifting: ``sift_events`` on coincidence masks (1 % multi-clicks) beside the plain per-event Python sift, and
``sift_tags`` from a merged tag stream. One core (numba and numpy single-threaded). Final line: JSON.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from daemon.qkd import amplification as pa  # noqa: E402
from daemon.qkd.sifting import TaggerMap, sift_events, sift_reference, sift_tags  # noqa: E402


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    out: dict = {"pclmul": pa.HAVE_PCLMUL}
    print(f"privacy amplification (m = n/2, one core, PCLMULQDQ: {pa.HAVE_PCLMUL})", flush=True)
    pa_rates, fft_rates = {}, {}
    for n in (10**5, 10**6, 4 * 10**6):
        m = n // 2
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = pa.new_seed(n, m)
        y = pa.toeplitz_hash(x, s, m)
        assert np.array_equal(y, pa.toeplitz_hash_fft(x, s, m)), "clmul and fft disagree"
        t = best_of(lambda: pa.toeplitz_hash(x, s, m), 5 if n <= 10**6 else 2)
        tf = best_of(lambda: pa.toeplitz_hash_fft(x, s, m), 3 if n <= 10**6 else 1)
        pa_rates[n], fft_rates[n] = n / t / 1e6, n / tf / 1e6
        print(f"  n = {n:>9,}: clmul {pa_rates[n]:7.1f} Mbit/s ({t * 1e3:7.1f} ms)   numpy FFT {fft_rates[n]:6.1f} "
              f"Mbit/s ({tf * 1e3:7.1f} ms)   ratio {pa_rates[n] / fft_rates[n]:5.1f}x", flush=True)
    nd = 4096
    x = rng.integers(0, 2, nd, dtype=np.uint8)
    s = pa.new_seed(nd, nd // 2)
    td = best_of(lambda: pa.toeplitz_reference(x, s, nd // 2), 3)
    dense = nd / td / 1e6
    print(f"  dense numpy matrix at n = {nd}: {dense:.2f} Mbit/s (O(n m): scaled to n = 1e6 it would be "
          f"{dense * nd / 1e6:.4f} Mbit/s)", flush=True)

    print("sifting (one core)", flush=True)
    N = 5_000_000
    singles = np.array([1, 2, 4, 8], np.uint8)
    ma = singles[rng.integers(0, 4, N)]
    mb = singles[rng.integers(0, 4, N)]
    multi = rng.random(N) < 0.01
    ma[multi] = rng.integers(1, 16, int(multi.sum()))
    sift_events(ma[:100], mb[:100])
    ts = best_of(lambda: sift_events(ma, mb, "psi-"), 3)
    r = sift_events(ma, mb, "psi-")
    sift_rate = r.sifted / ts / 1e6
    NR = 200_000
    tr = best_of(lambda: sift_reference(ma[:NR], mb[:NR], "psi-"), 1)
    ref_rate = sift_reference(ma[:NR], mb[:NR], "psi-").sifted / tr / 1e6
    print(f"  from coincidence events: {sift_rate:.1f} Mbit/s sifted ({N / ts / 1e6:.1f} M events/s); plain Python "
          f"{ref_rate:.2f} Mbit/s; ratio {sift_rate / ref_rate:.0f}x", flush=True)
    M = 20_000_000
    t_tags = np.cumsum(rng.integers(1, 4000, M)).astype(np.int64)
    ch = rng.integers(0, 8, M).astype(np.uint8)
    tm = TaggerMap((0, 1, 2, 3), (4, 5, 6, 7), window_ps=1000)
    sift_tags(t_tags[:1000], ch[:1000], tm)
    tt = best_of(lambda: sift_tags(t_tags, ch, tm), 2)
    rt = sift_tags(t_tags, ch, tm)
    print(f"  from tags (clusters + squash + sift): {M / tt / 1e6:.1f} M tags/s, {rt.sifted / tt / 1e6:.1f} Mbit/s "
          f"sifted at {rt.coincidences / M:.2f} coincidences per tag", flush=True)

    out.update({
        "pa_mbit_per_s": round(pa_rates[10**6], 2),
        "pa_mbit_per_s_by_n": {str(k): round(v, 2) for k, v in pa_rates.items()},
        "pa_fft_reference_mbit_per_s_by_n": {str(k): round(v, 2) for k, v in fft_rates.items()},
        "pa_ratio_vs_fft_1e6": round(pa_rates[10**6] / fft_rates[10**6], 2),
        "pa_dense_reference_mbit_per_s_n4096": round(dense, 3),
        "sifting_mbit_per_s": round(sift_rate, 2),
        "sifting_reference_mbit_per_s": round(ref_rate, 3),
        "sifting_ratio": round(sift_rate / ref_rate, 1),
        "sifting_tags_per_s": round(M / tt),
        "sifting_from_tags_mbit_per_s": round(rt.sifted / tt / 1e6, 2),
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
