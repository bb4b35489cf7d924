"""Benchmark of two-party reconciliation (Cascade, daemon/qkd/cascade.py) and verification (Toeplitz tag).

Run:  .venv/bin/python bench/qkd_reconciliation.py [--n 1000000] [--blocks 3] [--fail-seconds 60]

For each QBER (1, 2, 3, 5, 8 %): ``--blocks`` blocks of ``--n`` bits (Alice uniform, Bob = Alice xor iid errors),
each reconciled by CascadeAlice/CascadeBob over the in-process loopback channel and then verified (50-bit tag,
eps_cor = 1e-15). Figures:

* efficiency f = leak / (n h(Q_measured)), leak = disclosed bits counted by the channel (parities + tag);
* mbit_per_s = sifted bits / wall time of reconciliation + verification, with *both* parties running in this one
  thread (so it is per core for the two sides together; each daemon only runs one side); mbit_per_cpu_s the same
  per CPU second of this process (less sensitive to other load on a shared machine); alice_share / bob_share:
  fraction of the wall time spent in each party's handlers (the rest is the channel: encode, decode, pump);
* round_trips per block (mean), blocks, failed_blocks (verification mismatch: discarded on both sides),
  cascade_residual_blocks (keys differ after Cascade; equal to failed_blocks unless a tag collided).

``reconciliation_figures(qbers, n, blocks)`` returns these figures as dicts (for bench/qkd.py), each with the
textbook reference of the same run in ``reference_*`` fields.

Reference, measured in the same run: a plain textbook Cascade (Brassard-Salvail: 4 passes, k1 = ceil(0.73/Q),
doubling, numpy random permutations, sequential binary search per block, one round trip per step, cascade back
to earlier passes), in numpy + Python, on smaller blocks (``--ref-n``).

Residual errors: at QBER 3 % (``--fail-qber``) as many ``--fail-n``-bit blocks as fit in ``--fail-seconds`` are run; the count of
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


class _Timed:
    """A party whose handlers are timed (its own work: kernels and message building, not the channel)."""

    def __init__(self, party) -> None:
        self.party = party
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self.party.done

    def start(self):
        t0 = time.perf_counter()
        try:
            return self.party.start()
        finally:
            self.seconds += time.perf_counter() - t0

    def on_message(self, msg):
        t0 = time.perf_counter()
        try:
            return self.party.on_message(msg)
        finally:
            self.seconds += time.perf_counter() - t0


def reconcile(a: np.ndarray, b: np.ndarray, q: float, seed: int) -> dict:
    """Cascade then verification of one block over one loopback channel, both parties in this thread.
    ``seconds`` is wall time, ``cpu_seconds`` this process's CPU time (robust to other load on the machine);
    ``alice_s``/``bob_s`` the time in each party's handlers, the rest is the channel (encode/decode/pump)."""
    t0, c0 = time.perf_counter(), time.process_time()
    ea, eb = loopback_pair()
    alice, bob = _Timed(CascadeAlice(a, q, seed)), _Timed(CascadeBob(b))
    pump(alice, bob, ea, eb)
    va, vb = _Timed(VerifyAlice(alice.party.key, EPS_COR)), _Timed(VerifyBob(bob.party.key))
    pump(va, vb, ea, eb)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": dt, "cpu_seconds": dc, "alice_s": alice.seconds + va.seconds, "bob_s": bob.seconds + vb.seconds,
            "leak": ea.sent.leak_bits + eb.sent.leak_bits, "round_trips": ea.round_trips,
            "ok": bool(va.party.ok and vb.party.ok),
            "cascade_equal": bool(np.array_equal(alice.party.key, bob.party.key)),
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


def _warm_up(rng: np.random.Generator) -> None:
    """Compile / load the numba cache outside the timing."""
    a, b = make_pair(4000, 0.05, rng)
    reconcile(a, b, 0.05, 0)


def measure(n: int, q: float, blocks: int, rng: np.random.Generator) -> dict:
    """``blocks`` blocks of ``n`` bits at QBER ``q`` through Cascade + verification."""
    leak = bits = secs = cpu = a_s = b_s = rts = failed = residual = 0
    hsum = 0.0
    for _ in range(blocks):
        a, b = make_pair(n, q, rng)
        r = reconcile(a, b, q, int(rng.integers(2**62)))
        leak += r["leak"]
        hsum += n * binary_entropy(float(np.mean(a != b)))
        bits += n
        secs += r["seconds"]
        cpu += r["cpu_seconds"]
        a_s += r["alice_s"]
        b_s += r["bob_s"]
        rts += r["round_trips"]
        failed += not r["ok"]
        residual += not r["cascade_equal"]
    return {"qber": q, "n": n, "efficiency": round(leak / hsum, 4), "mbit_per_s": round(bits / secs / 1e6, 2),
            "mbit_per_cpu_s": round(bits / cpu / 1e6, 2), "alice_share": round(a_s / secs, 3),
            "bob_share": round(b_s / secs, 3), "round_trips": round(rts / blocks, 1), "blocks": blocks,
            "failed_blocks": failed, "cascade_residual_blocks": residual}


def reference(n: int, q: float, blocks: int, rng: np.random.Generator) -> dict:
    """The textbook Cascade on ``blocks`` blocks of ``n`` bits (it is ~1000x slower: keep n small)."""
    leak = hsum = secs = cpu = rts = 0.0
    bad = 0
    for _ in range(blocks):
        a, b = make_pair(n, q, rng)
        t0, c0 = time.perf_counter(), time.process_time()
        r = textbook_cascade(a, b, q, rng)
        secs += time.perf_counter() - t0
        cpu += time.process_time() - c0
        leak += r["leak"]
        hsum += n * binary_entropy(float(np.mean(a != b)))
        rts += r["round_trips"]
        bad += not r["equal"]
    return {"qber": q, "n": n, "efficiency": round(leak / hsum, 4), "mbit_per_s": round(n * blocks / secs / 1e6, 4),
            "mbit_per_cpu_s": round(n * blocks / cpu / 1e6, 4), "round_trips": round(rts / blocks, 1),
            "blocks": blocks, "failed_blocks": bad}


def reconciliation_figures(qbers=(0.01, 0.02, 0.03, 0.05, 0.08), n: int = 1_000_000, blocks: int = 3,
                           ref_n: int = 10_000, ref_blocks: int = 2, seed: int = 20261126) -> list[dict]:
    """One dict per QBER: this Cascade (+ verification) on ``blocks`` blocks of ``n`` bits, beside the textbook
    Cascade measured in the same run (``reference_*`` fields, on ``ref_n``-bit blocks)."""
    rng = np.random.default_rng(seed)
    _warm_up(rng)
    rows = []
    for q in qbers:
        row = measure(n, q, blocks, rng)
        ref = reference(ref_n, q, ref_blocks, rng)
        row.update({"reference_n": ref_n, "reference_efficiency": ref["efficiency"],
                    "reference_mbit_per_s": ref["mbit_per_s"], "reference_mbit_per_cpu_s": ref["mbit_per_cpu_s"],
                    "reference_round_trips": ref["round_trips"], "reference_failed_blocks": ref["failed_blocks"],
                    "efficiency_ratio": round(row["efficiency"] / ref["efficiency"], 3),
                    "speed_ratio": round(row["mbit_per_s"] / ref["mbit_per_s"], 1)})
        rows.append(row)
    return rows


def residual_run(n: int, q: float, seconds: float, rng: np.random.Generator) -> dict:
    """As many ``n``-bit blocks at QBER ``q`` as fit in ``seconds``: blocks whose keys differ after Cascade
    (caught by verification: discarded) and after verification (undetected)."""
    t_end = time.perf_counter() + seconds
    nblk = cascade_bad = undetected = 0
    while time.perf_counter() < t_end:
        a, b = make_pair(n, q, rng)
        r = reconcile(a, b, q, int(rng.integers(2**62)))
        nblk += 1
        cascade_bad += not r["cascade_equal"]
        undetected += (not r["cascade_equal"]) and r["ok"]
    return {"qber": q, "n": n, "blocks": nblk, "after_cascade": cascade_bad, "after_verification": undetected}


def _line(label: str, m: dict) -> str:
    return (f"{label}: f={m['efficiency']:.4f} {m['mbit_per_s']:.2f} Mbit/s (CPU {m['mbit_per_cpu_s']:.2f}) "
            f"{m['round_trips']:.0f} RTs, {m['failed_blocks']}/{m['blocks']} failed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--small-n", type=int, default=100_000)
    ap.add_argument("--small-blocks", type=int, default=10)
    ap.add_argument("--ref-n", type=int, default=10_000)
    ap.add_argument("--ref-blocks", type=int, default=2)
    ap.add_argument("--fail-n", type=int, default=10_000)
    ap.add_argument("--fail-qber", type=float, default=0.03)
    ap.add_argument("--fail-seconds", type=float, default=60.0)
    args = ap.parse_args()
    print("Cascade (parallel searches, parity reuse, subset checks) + 50-bit Toeplitz verification; both parties "
          "in one thread; Mbit/s = sifted bits per wall second (CPU: per CPU second of this process)", flush=True)
    big = reconciliation_figures(QBERS, args.n, args.blocks, args.ref_n, args.ref_blocks)
    rng = np.random.default_rng(20261127)
    small = [measure(args.small_n, q, args.small_blocks, rng) for q in QBERS]
    for m, s in zip(big, small):
        print(f"  Q={m['qber']:.0%}: {_line(f'n={args.n}', m)} | {_line(f'n={args.small_n}', s)} | textbook "
              f"n={args.ref_n}: f={m['reference_efficiency']:.4f} {m['reference_mbit_per_s'] * 1e3:.1f} kbit/s "
              f"{m['reference_round_trips']:.0f} RTs -> f ratio {m['efficiency_ratio']:.3f}, speed "
              f"x{m['speed_ratio']:.0f}; handlers: Alice {m['alice_share']:.0%}, Bob {m['bob_share']:.0%} of the "
              f"time (rest: channel)", flush=True)
    res = residual_run(args.fail_n, args.fail_qber, args.fail_seconds, rng)
    print(f"  residual errors at Q={res['qber']:.0%}, n={res['n']}: {res['after_cascade']}/{res['blocks']} blocks "
          f"differ after Cascade (discarded by verification), {res['after_verification']}/{res['blocks']} after "
          f"verification (bound per block: 2^-50 from the tag)", flush=True)
    print(json.dumps({"reconciliation": big, "reconciliation_small": small, "residual": res}))


if __name__ == "__main__":
    main()
