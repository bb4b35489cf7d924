"""Benchmark of two-party reconciliation (Cascade, daemon/qkd/cascade.py) and verification (Toeplitz tag).

Run:  .venv/bin/python bench/qkd_reconciliation.py [--n 1000000] [--blocks 3] [--fail-seconds 60]

For each QBER (1, 2, 3, 5, 8 %): ``--blocks`` blocks of ``--n`` bits (Alice uniform, Bob = Alice xor iid errors),
each reconciled by CascadeAlice/CascadeBob over the in-process loopback channel and then verified (50-bit tag,
eps_cor = 1e-15). Figures:

* efficiency f = leak / (n h(Q_measured)), leak = disclosed bits counted by the channel (parities + tag);
* mbit_per_s = sifted bits / wall time of reconciliation + verification, with *both* parties running in this one
  thread (so it is per core for the two sides together; each daemon only runs one side);
* round_trips per block (mean), blocks, failed_blocks (verification mismatch: discarded on both sides).

Reference, measured in the same run: a plain textbook Cascade (Brassard-Salvail: 4 passes, k1 = ceil(0.73/Q),
doubling, numpy random permutations, sequential binary search per block, one round trip per step, cascade back
to earlier passes), in numpy + Python, on smaller blocks (``--ref-n``).

Residual errors: at QBER 3 % as many ``--fail-n``-bit blocks as fit in ``--fail-seconds`` are run; the count of
blocks whose keys differ after Cascade (caught by verification) and after verification (undetected) is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.qkd.cascade import CascadeAlice, CascadeBob, binary_entropy  # noqa: E402
from daemon.qkd.channel import loopback_pair, pump  # noqa: E402
from daemon.qkd.verification import VerifyAlice, VerifyBob  # noqa: E402

QBERS = [0.01, 0.02, 0.03, 0.05, 0.08]
EPS_COR = 1e-15


def make_pair(n: int, q: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.integers(0, 2, n, dtype=np.uint8)
    return a, a ^ (rng.random(n) < q).astype(np.uint8)


def reconcile(a: np.ndarray, b: np.ndarray, q: float, seed: int) -> dict:
    t0 = time.perf_counter()
    ea, eb = loopback_pair()
    alice, bob = CascadeAlice(a, q, seed), CascadeBob(b)
    pump(alice, bob, ea, eb)
    va, vb = VerifyAlice(alice.key, EPS_COR), VerifyBob(bob.key)
    pump(va, vb, ea, eb)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "leak": ea.sent.leak_bits + eb.sent.leak_bits, "round_trips": ea.round_trips,
            "ok": bool(va.ok and vb.ok), "cascade_equal": bool(np.array_equal(alice.key, bob.key)),
            "bytes": ea.sent.bytes + eb.sent.bytes}


def textbook_cascade(a: np.ndarray, b: np.ndarray, q: float, rng: np.random.Generator) -> dict:
    """Plain Cascade (Brassard-Salvail), sequential per-block binary search; leak counts Alice's parities."""
    n = a.size
    b = b.copy()
    k = max(2, math.ceil(0.73 / q))
    perms, sizes = [], []
    leak = 0
    round_trips = 0

    def bsearch(p: int, blk: int) -> int:
        nonlocal leak, round_trips
        idx = perms[p][blk * sizes[p]:(blk + 1) * sizes[p]]
        while idx.size > 1:
            left = idx[:idx.size // 2]
            leak += 1
            round_trips += 1
            if np.bitwise_xor.reduce(a[left]) != np.bitwise_xor.reduce(b[left]):
                idx = left
            else:
                idx = idx[idx.size // 2:]
        return int(idx[0])

    def block_of(p: int, bit: int) -> int:
        return int(np.flatnonzero(perms[p] == bit)[0]) // sizes[p]

    for p in range(4):
        perms.append(rng.permutation(n) if p else np.arange(n))
        sizes.append(min(n, k << p))
        nb = -(-n // sizes[p])
        pa = np.bitwise_xor.reduceat(a[perms[p]], np.arange(0, n, sizes[p]))
        leak += nb
        round_trips += 1
        for blk in range(nb):
            idx = perms[p][blk * sizes[p]:(blk + 1) * sizes[p]]
            if np.bitwise_xor.reduce(b[idx]) == pa[blk]:
                continue
            todo = [(p, blk)]
            while todo:
                pp, bb = todo.pop()
                idx = perms[pp][bb * sizes[pp]:(bb + 1) * sizes[pp]]
                if np.bitwise_xor.reduce(b[idx]) == np.bitwise_xor.reduce(a[idx]):
                    continue
                bit = bsearch(pp, bb)
                b[bit] ^= 1
                for r in range(p + 1):
                    if r != pp:
                        todo.append((r, block_of(r, bit)))
    return {"leak": leak, "round_trips": round_trips, "equal": bool(np.array_equal(a, b))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--small-n", type=int, default=100_000)
    ap.add_argument("--small-blocks", type=int, default=10)
    ap.add_argument("--ref-n", type=int, default=10_000)
    ap.add_argument("--ref-blocks", type=int, default=2)
    ap.add_argument("--fail-n", type=int, default=10_000)
    ap.add_argument("--fail-seconds", type=float, default=60.0)
    args = ap.parse_args()
    rng = np.random.default_rng(20261126)
    # compile / load the numba cache outside the timing
    a, b = make_pair(2000, 0.05, rng)
    reconcile(a, b, 0.05, 0)

    rows, ref_rows, small_rows = [], [], []
    print(f"Cascade (parallel searches, parity reuse, BICONF checks) + 50-bit Toeplitz verification; both parties "
          f"in one thread", flush=True)
    for q in QBERS:
        for n, nblk, out in ((args.n, args.blocks, rows), (args.small_n, args.small_blocks, small_rows)):
            leak = bits = secs = rts = failed = 0
            hsum = 0.0
            for k in range(nblk):
                a, b = make_pair(n, q, rng)
                r = reconcile(a, b, q, int(rng.integers(2**62)))
                leak += r["leak"]
                hsum += n * binary_entropy(float(np.mean(a != b)))
                bits += n
                secs += r["seconds"]
                rts += r["round_trips"]
                failed += not r["ok"]
            out.append({"qber": q, "n": n, "efficiency": round(leak / hsum, 4), "mbit_per_s": round(bits / secs / 1e6, 2),
                        "round_trips": round(rts / nblk, 1), "blocks": nblk, "failed_blocks": failed})
        # reference
        leak = hsum = secs = rts = 0.0
        bad = 0
        for k in range(args.ref_blocks):
            a, b = make_pair(args.ref_n, q, rng)
            t0 = time.perf_counter()
            r = textbook_cascade(a, b, q, rng)
            secs += time.perf_counter() - t0
            leak += r["leak"]
            hsum += args.ref_n * binary_entropy(float(np.mean(a != b)))
            rts += r["round_trips"]
            bad += not r["equal"]
        ref_rows.append({"qber": q, "n": args.ref_n, "efficiency": round(leak / hsum, 4),
                         "mbit_per_s": round(args.ref_n * args.ref_blocks / secs / 1e6, 4),
                         "round_trips": round(rts / args.ref_blocks, 1), "blocks": args.ref_blocks,
                         "failed_blocks": bad})
        m, s, rf = rows[-1], small_rows[-1], ref_rows[-1]
        print(f"  Q={q:.0%}: n={args.n}: f={m['efficiency']:.4f} {m['mbit_per_s']:.2f} Mbit/s "
              f"{m['round_trips']:.0f} RTs, {m['failed_blocks']}/{m['blocks']} failed | n={args.small_n}: "
              f"f={s['efficiency']:.4f} {s['mbit_per_s']:.2f} Mbit/s {s['round_trips']:.0f} RTs, "
              f"{s['failed_blocks']}/{s['blocks']} failed | textbook n={args.ref_n}: f={rf['efficiency']:.4f} "
              f"{rf['mbit_per_s'] * 1e3:.1f} kbit/s {rf['round_trips']:.0f} RTs  -> f ratio "
              f"{m['efficiency'] / rf['efficiency']:.3f}, speed x{m['mbit_per_s'] / rf['mbit_per_s']:.0f}", flush=True)

    # residual errors over many blocks
    t_end = time.perf_counter() + args.fail_seconds
    nblk = cascade_bad = undetected = 0
    while time.perf_counter() < t_end:
        a, b = make_pair(args.fail_n, 0.03, rng)
        r = reconcile(a, b, 0.03, int(rng.integers(2**62)))
        nblk += 1
        cascade_bad += not r["cascade_equal"]
        undetected += (not r["cascade_equal"]) and r["ok"]
    print(f"  residual errors at Q=3%, n={args.fail_n}: {cascade_bad}/{nblk} blocks differ after Cascade "
          f"(discarded by verification), {undetected}/{nblk} after verification "
          f"(bound per block: 2^-50 from the tag)", flush=True)
    print(json.dumps({"reconciliation": rows, "reconciliation_small": small_rows, "reference_textbook": ref_rows,
                      "residual": {"qber": 0.03, "n": args.fail_n, "blocks": nblk, "after_cascade": cascade_bad,
                                   "after_verification": undetected}}))


if __name__ == "__main__":
    main()
