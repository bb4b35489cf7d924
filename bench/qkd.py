"""Benchmark of the whole key pipeline (issue 6): sifting, reconciliation, privacy amplification, blocks.

Run:  .venv/bin/python bench/qkd.py [--quick]

Each figure is printed beside a simple reference measured in the same run, and the last line is one JSON object
with at least ``reconciliation`` (list of {qber, efficiency, mbit_per_s, round_trips, blocks, failed_blocks}),
``pa_mbit_per_s`` and ``sifting_mbit_per_s``.

* Sifting, the daemon's path: the embedded testbed's bench (config/sim.toml physics) generates tags; they are cut
  into 20 ms TagBatches and fed to :class:`daemon.qkd.stream.StreamSifter` with the testbed's delays
  (Alice +39.17 us). Figures: tags/s and sifted Mbit/s of CPU time; reference: the coincidence engine (the live
  4x4 analysis with accidentals) on the same batches -- sifting must keep up with it -- and the plain-Python
  per-event sift of ``bench/qkd_amplification.py``.
* Reconciliation: ``bench/qkd_reconciliation.py`` (Cascade two-party, both sides in this thread; reference:
  textbook Cascade).
* Privacy amplification: ``bench/qkd_amplification.py`` (reference: numpy FFT).
* Blocks end to end: sifted bits of the bench cut into 1e5-bit blocks and run through
  :meth:`daemon.qkd.link.KeyLink.process` (estimation, Cascade, verification, PA; no store): time per block,
  final key bits, secret fraction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon.analysis.coincidences import CoincidenceEngine, EngineSpec  # noqa: E402
from daemon.config import load  # noqa: E402
from daemon.qkd.stream import StreamSifter  # noqa: E402
from drivers.base import TagBatch  # noqa: E402
from drivers.sim.bench.model import BenchModel  # noqa: E402
from drivers.sim.tagstream import BlockStream  # noqa: E402

PS = 10**12
ROOT = Path(__file__).resolve().parents[1]


def testbed_batches(seconds: float, batch_s: float = 0.02) -> tuple[list[TagBatch], dict, dict]:
    """TagBatches of the embedded testbed's bench, its [analysis] table and link."""
    cfg = load(ROOT / "config" / "sim.toml")
    model = BenchModel(cfg.simulation.bench)
    model.warm_up()
    stream = BlockStream(model)
    out, t, step = [], 0, int(batch_s * PS)
    while t < seconds * PS:
        ts, ch = stream.take(t + step)[:2]
        out.append(TagBatch(np.ascontiguousarray(ts, np.int64), np.ascontiguousarray(ch, np.uint8), t, t + step))
        t += step
    return out, cfg.analysis, cfg.analysis["links"][0]


def sifting_figures(batches: list[TagBatch], analysis: dict, link: dict) -> dict:
    delays = {i: int(d) for i, d in enumerate(analysis["delays_ps"])}
    tags = sum(len(b) for b in batches)

    def sift() -> tuple[float, int]:
        s = StreamSifter(tuple(link["alice"]), tuple(link["bob"]), analysis["window_ps"], link["bell_state"], delays)
        t0 = time.process_time()
        bits = 0
        for b in batches:
            bits += s.feed(b.timestamps, b.channels, b.t_begin, b.t_end, delays_ps=delays).sifted
        return time.process_time() - t0, bits

    def engine() -> float:
        pairs = tuple((a, b) for a in link["alice"] for b in link["bob"])
        e = CoincidenceEngine(EngineSpec(pairs, analysis["window_ps"], analysis["accidental_offset_ps"], delays,
                                         PS, ()))
        t0 = time.process_time()
        for b in batches:
            e.feed(b)
        return time.process_time() - t0

    sift()  # compile / warm
    engine()
    runs = [sift() for _ in range(3)]
    dt, bits = min(runs)
    de = min(engine() for _ in range(3))
    return {"tags": tags, "sifted_bits": bits, "tags_per_s": tags / dt, "mbit_per_s": bits / dt / 1e6,
            "engine_tags_per_s": tags / de, "ratio_to_engine": (tags / dt) / (tags / de),
            "tagger_seconds": (batches[-1].t_end - batches[0].t_begin) / PS}


def block_figures(batches: list[TagBatch], analysis: dict, link: dict, block_bits: int) -> dict:
    from daemon.qkd.link import KeyLink
    from daemon.qkd.service import LINK_FIELDS

    cfg = {k: f.default for k, f in LINK_FIELDS.items()}
    cfg.update(block_bits=block_bits, window_ps=analysis["window_ps"])

    class _Pipe:
        def window_and_delays(self) -> tuple[int, dict[int, int]]:
            return analysis["window_ps"], {i: int(d) for i, d in enumerate(analysis["delays_ps"]) if d}

    kl = KeyLink(link["name"], cfg, link, pipeline=_Pipe())
    blocks = [blk for b in batches for blk in kl.feed(b)]
    out = []
    for blk in blocks:
        t0 = time.perf_counter()
        f = kl.process(blk)
        out.append({"seconds": time.perf_counter() - t0, **{k: f[k] for k in (
            "qber_z", "qber_x", "efficiency", "final_key_bits", "key_bits_in", "aborted", "abort_reason",
            "duration_s", "round_trips")}})
    return {"blocks": len(out), "per_block": out,
            "mean_process_s": float(np.mean([o["seconds"] for o in out])) if out else None,
            "mean_secret_fraction": float(np.mean([o["final_key_bits"] / o["key_bits_in"] for o in out]))
            if out else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the benchmark)")
    ap.add_argument("--seconds", type=float, default=12.0, help="tagger seconds of the testbed stream")
    args = ap.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    summary: dict = {}

    batches, analysis, link = testbed_batches(seconds)
    sf = sifting_figures(batches, analysis, link)
    print(f"sifting (daemon path, {sf['tags']:,} tags of {sf['tagger_seconds']:.0f} testbed seconds): "
          f"{sf['tags_per_s'] / 1e6:.1f} M tags/s, {sf['mbit_per_s']:.2f} Mbit/s sifted; "
          f"coincidence engine on the same batches {sf['engine_tags_per_s'] / 1e6:.1f} M tags/s "
          f"(ratio {sf['ratio_to_engine']:.2f}); testbed rate {sf['tags'] / sf['tagger_seconds'] / 1e6:.2f} M tags/s")
    summary["sifting"] = sf

    from qkd_amplification import pa_figures
    from qkd_amplification import sifting_figures as event_sifting
    from qkd_reconciliation import reconciliation_figures

    es = event_sifting()
    print(f"sifting from events: {es['mbit_per_s']:.1f} Mbit/s vs plain Python {es['reference_mbit_per_s']:.2f} "
          f"(x{es['ratio']:.0f})")
    summary["sifting_events"] = es
    summary["sifting_mbit_per_s"] = sf["mbit_per_s"]

    sizes = (100_000,) if args.quick else (100_000, 1_000_000)
    pa = [pa_figures(n, n // 2, 3 if args.quick else 5) for n in sizes]
    for p in pa:
        print(f"PA n={p['n']:,} m={p['m']:,}: {p['mbit_per_s']:.0f} Mbit/s vs numpy FFT "
              f"{p['reference_mbit_per_s']:.1f} (x{p['ratio']:.1f})")
    summary["pa"] = pa
    summary["pa_mbit_per_s"] = pa[-1]["mbit_per_s"]

    rec = reconciliation_figures(n=100_000 if args.quick else 1_000_000, blocks=1 if args.quick else 3)
    for r in rec:
        ref = (f"; textbook Cascade f = {r['reference_efficiency']:.3f}, {r['reference_mbit_per_s']:.2f} Mbit/s"
               if r.get("reference_efficiency") is not None else "")
        print(f"Cascade QBER {r['qber']:.0%}: f = {r['efficiency']:.3f}, {r['mbit_per_s']:.1f} Mbit/s, "
              f"{r['round_trips']:.0f} round trips, {r['failed_blocks']}/{r['blocks']} failed{ref}")
    summary["reconciliation"] = rec

    bf = block_figures(batches, analysis, link, 20_000 if args.quick else 100_000)
    for i, b in enumerate(bf["per_block"]):
        print(f"block {i}: {b['key_bits_in']:,} key bits over {b['duration_s']:.2f} testbed s, QBER Z {b['qber_z']}, "
              f"X {b['qber_x']}, f {b['efficiency']}, final {b['final_key_bits']:,} bits, {b['seconds'] * 1e3:.0f} ms"
              + (f", aborted: {b['abort_reason']}" if b["aborted"] else ""))
    summary["blocks"] = {k: v for k, v in bf.items() if k != "per_block"}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
