"""Benchmark: how fast the virtual optical bench generates time tags, on one core, with bounded memory.

Scenarios (drivers/sim/bench, default config unless said):

* default  -- the default testbed (about 0.41 M tags per simulated second);
* 10M      -- brightness 2.5e6 pairs/s/mW: about 9.7 M tags per simulated second (dead time already matters).

For each: tags generated per second of CPU time through ``BenchModel.block`` (the generator) and through
``BlockStream.take`` in 20 ms batches (what the simulated tagger driver does). Compared in the same run with:

* reference -- the placeholder ``drivers.sim.tagstream.PoissonPairSource`` producing the same number of tags
  (its singles and pair rates set from the bench's expected rates), with no optics, detector or tagger model;
* naive     -- the bench's own plain-Python reference block (``kernels.ref_simulate_block``, same physics,
  bit-identical output), on a short run.

Then a long run of the 10M scenario samples the resident set size to show that memory stays flat.
Runs in well under two minutes (plus about 20 s once, the first time numba compiles the kernels), pinned to
one core. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from drivers.sim.bench import kernels as K  # noqa: E402
from drivers.sim.bench import model as bench_model  # noqa: E402
from drivers.sim.bench.config import default_config  # noqa: E402
from drivers.sim.bench.model import BenchModel  # noqa: E402
from drivers.sim.tagstream import BlockStream, PoissonPairSource  # noqa: E402

PS = 10**12
TEN_M = {"source": {"brightness": 2.5e6}}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu() -> float:
    return time.process_time()


def run_blocks(source, first: int, count: int) -> tuple[int, float]:
    """Tags and CPU seconds for ``count`` consecutive blocks from ``first``."""
    n = 0
    t0 = cpu()
    for k in range(first, first + count):
        n += len(source.block(k)[0])
    return n, cpu() - t0


def run_stream(model: BenchModel, seconds: float, batch_s: float = 0.02) -> tuple[int, float]:
    stream = BlockStream(model)
    n, t, t0 = 0, 0, cpu()
    step = int(batch_s * PS)
    while t < seconds * PS:
        t += step
        n += len(stream.take(t)[0])
    return n, cpu() - t0


def best_of(fn, repeats: int) -> tuple[int, float]:
    """The fastest of a few repeats: the machine is shared, its speed varies; best-of is the honest figure of
    the code (the median is printed too)."""
    results = [fn() for _ in range(repeats)]
    rates = [n / dt for n, dt in results]
    i = int(np.argmax(rates))
    return results[i][0], results[i][1], float(np.median(rates))


def reference_source(model: BenchModel) -> PoissonPairSource:
    """The placeholder source with the bench's tag rates: true coincidences as pairs, the rest as background."""
    ex = model.expected_rates()
    singles = np.array(ex["singles_measured_hz"])
    pairs = float(ex["coincidences_total_hz"])
    background = np.clip(singles - pairs / 4, 0, None)
    return PoissonPairSource(channel_count=8, singles_hz=background.tolist(), pair_rate_hz=pairs,
                             pair_channels=[[0, 4], [1, 5], [2, 6], [3, 7]], jitter_ps=20.0, delays_ps=[0] * 8,
                             resolution_ps=1, seed=1, block_ps=model.block_ps)


def kernel_share(model: BenchModel, first: int, count: int) -> float:
    """Fraction of the block time spent in the compiled block kernel (the rest: state snapshot, drift step,
    probability tables, bookkeeping in Python)."""
    inner = [0.0]
    original = K.simulate_block

    def timed(*args):
        t0 = time.perf_counter()
        out = original(*args)
        inner[0] += time.perf_counter() - t0
        return out

    bench_model.K.simulate_block = timed
    try:
        t0 = time.perf_counter()
        for k in range(first, first + count):
            model.block(k)
        total = time.perf_counter() - t0
    finally:
        bench_model.K.simulate_block = original
    return inner[0] / total


def main() -> None:
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for the generator
    except (AttributeError, OSError):
        pass
    figures: dict[str, float] = {}
    t_start = time.monotonic()
    print("virtual optical bench: tag generation benchmark (one core)")

    warm = BenchModel(default_config()).warm_up()
    figures["warm_up_s"] = round(warm, 2)
    print(f"  kernels compiled/loaded in {warm:.1f} s")

    # -- default testbed ------------------------------------------------------------------------------------
    d = BenchModel(default_config())
    nxt = iter(range(0, 10**9, 1000))
    run_blocks(d, next(nxt), 20)
    n, dt, med = best_of(lambda: run_blocks(d, next(nxt), 1000), 3)
    figures["default_sim_tags_per_s"] = round(float(np.sum(d.expected_rates()["singles_measured_hz"])))
    figures["default_tags_per_s"] = round(n / dt)
    print(f"  default testbed: {figures['default_sim_tags_per_s'] / 1e6:.2f} M tags per simulated s; generated "
          f"{n / dt / 1e6:.1f} M tags/s (median {med / 1e6:.1f}), {n / dt / figures['default_sim_tags_per_s']:.0f}x real time")
    n, dt, _ = best_of(lambda: run_stream(BenchModel(default_config()), 10.0), 2)
    figures["default_stream_tags_per_s"] = round(n / dt)
    print(f"  default testbed through BlockStream (20 ms batches): {n / dt / 1e6:.1f} M tags/s")

    # -- ~10 M tags/s -----------------------------------------------------------------------------------
    m = BenchModel(default_config(**TEN_M))
    nxt = iter(range(0, 10**9, 300))
    run_blocks(m, next(nxt), 20)
    n, dt, med = best_of(lambda: run_blocks(m, next(nxt), 300), 3)
    sim_rate = n / (300 * m.block_ps / PS)
    figures["10M_sim_tags_per_s"] = round(sim_rate)
    figures["tags_per_s"] = round(n / dt)
    figures["tags_per_s_median"] = round(med)
    figures["ns_per_tag"] = round(dt / n * 1e9, 1)
    print(f"  10M scenario: {sim_rate / 1e6:.2f} M tags per simulated s; generated {n / dt / 1e6:.1f} M tags/s "
          f"(median {med / 1e6:.1f}), {dt / n * 1e9:.1f} ns per tag")
    n, dt, _ = best_of(lambda: run_stream(BenchModel(default_config(**TEN_M)), 3.0), 2)
    figures["stream_tags_per_s"] = round(n / dt)
    print(f"  10M scenario through BlockStream (20 ms batches): {n / dt / 1e6:.1f} M tags/s")
    share = kernel_share(m, next(nxt), 100)
    figures["kernel_share"] = round(share, 3)
    print(f"  profile: {share:.0%} of the block time in the compiled kernel, {1 - share:.0%} in Python")

    # -- reference and naive ----------------------------------------------------------------------------
    ref = reference_source(m)
    n_ref, dt_ref, _ = best_of(lambda: run_blocks(ref, 0, 300), 3)
    figures["reference_tags_per_s"] = round(n_ref / dt_ref)
    figures["ratio_vs_reference"] = round(figures["tags_per_s"] / (n_ref / dt_ref), 2)
    print(f"  reference PoissonPairSource, same tag rate ({n_ref / 300 / (m.block_ps / PS) / 1e6:.2f} M/s simulated): "
          f"{n_ref / dt_ref / 1e6:.1f} M tags/s -> bench/reference = {figures['ratio_vs_reference']:.2f}")
    naive = _naive_rate()
    figures["naive_tags_per_s"] = round(naive)
    figures["ratio_vs_naive"] = round(figures["default_tags_per_s"] / naive, 1)
    print(f"  naive (the plain-Python reference block, same physics and output): {naive / 1e3:.1f} k tags/s -> "
          f"bench/naive = {figures['ratio_vs_naive']:.0f}")

    # -- memory ---------------------------------------------------------------------------------------
    # the generator alone (what the bench owns), then the same through BlockStream (the tagger's path, whose
    # concatenations and sorts add allocator churn of their own)
    gen = BenchModel(default_config(**TEN_M))
    gen_samples, n_long, t0 = [], 0, cpu()
    for k in range(3000):  # 30 s simulated, ~290 M tags
        n_long += len(gen.block(k)[0])
        if k % 300 == 299:
            gen_samples.append(round(rss_mb(), 1))
    figures["long_run_tags"] = n_long
    figures["long_run_tags_per_s"] = round(n_long / (cpu() - t0))
    figures["rss_samples_mb"] = gen_samples
    figures["rss_growth_mb"] = round(gen_samples[-1] - gen_samples[1], 1)
    print(f"  memory, generator alone over {n_long / 1e6:.0f} M tags (30 s simulated): RSS {gen_samples} MB")
    stream = BlockStream(BenchModel(default_config(**TEN_M)))
    samples = []
    t, step = 0, int(0.02 * PS)
    for i in range(1500):  # 30 s simulated
        t += step
        stream.take(t)
        if i % 150 == 149:
            samples.append(round(rss_mb(), 1))
    figures["stream_rss_samples_mb"] = samples
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"  memory, through BlockStream (30 s simulated): RSS {samples} MB; peak {figures['peak_rss_mb']} MB "
          "(of which ~190 MB is numpy, numba and LLVM themselves)")
    figures["wall_s"] = round(time.monotonic() - t_start, 1)
    print(f"  goal >= 20 M tags/s per core: {'met' if figures['tags_per_s'] >= 20e6 else 'NOT met'}")
    print(json.dumps(figures))


def _naive_rate() -> float:
    """Tags per second of CPU for the plain-Python reference of one default block (same draws, same tags)."""
    model = BenchModel(default_config())
    model.block(0)
    captured = {}
    original = K.simulate_block

    def capture(*args):
        captured["args"] = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        return original(*args)

    bench_model.K.simulate_block = capture
    try:
        ts = model.block(1)[0]
    finally:
        bench_model.K.simulate_block = original
    args = captured["args"][:-4]  # without the workspace buffers
    t0 = cpu()
    ref = K.ref_simulate_block(*args)
    dt = cpu() - t0
    assert np.array_equal(ref[0][ref[0] >= 0], ts) or len(ts) == 0, "the reference must reproduce the block"
    return len(ref[0]) / dt


if __name__ == "__main__":
    main()
