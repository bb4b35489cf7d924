"""Model-level harness: the polarization tracker of daemon/control against the bench physics, fast.

For long runs (a simulated hour and more) the daemon-level path (time tags, coincidence engine, MPC320
APT protocol) is too slow for a test; this harness keeps the physics and the decision code and drops the
tag generation. Per ``interval_s`` of simulated time it

- advances the real :class:`drivers.sim.bench.model.BenchModel` fibers (its own drift random walk, seeded),
- draws Poisson coincidence counts of the 4x4 matrix (Alice H V D A x Bob H V D A) from
  ``BenchModel.expected_rates(window_ps)``: true coincidences in the window plus accidentals, at the
  paddles the loop commanded (set on the bench state as the simulated MPC320 would); an interval in which
  paddles move sums the path they take (one paddle after the other, in index order as the loop moves them,
  or with ``order_moves`` in :meth:`Tracker.move_order`'s order, an experiment; ``move_s_per_100deg``, in
  steps of at most 5 degrees) and the setting reached, each for its share of the interval,
- hands the matrix to the same :class:`daemon.control.polmodel.Tracker` the daemon's loop uses, and when it
  proposes a move, applies it; the interval(s) spanned by the move (travel at ``move_s_per_100deg`` plus
  ``settle_s``) are flagged ``adjusting`` and neither feed the tracker nor count as key.

It reports the time-averaged QBER (Z and X averaged, every interval, adjusting ones included) and the key
the intervals not adjusting would give (``key_bits``: see there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from daemon.control.polmodel import ChannelModel, Tracker


def bench_model(drift_rad2_per_s: float, seed: int = 1, initial_unitary: str = "identity",
                visibility: float | None = None) -> tuple[Any, int]:
    """A BenchModel of the default simulated testbed (config/sim.toml) with both fibers drifting at D;
    returns (model, window_ps of the analysis)."""
    from daemon.config import default_config_text, parse, validate

    text = default_config_text().replace("seed = 1\n", f"seed = {seed}\n")
    raw = parse(text)
    for arm in ("alice", "bob"):
        raw["simulation"]["arms"][arm]["drift_rad2_per_s"] = float(drift_rad2_per_s)
        raw["simulation"]["arms"][arm]["initial_unitary"] = initial_unitary
    if visibility is not None:
        raw["simulation"]["source"]["visibility"] = float(visibility)
    cfg = validate(raw, "harness")
    from drivers.sim.bench.model import BenchModel

    return BenchModel(cfg.simulation.bench), int(cfg.analysis["window_ps"])


def key_bits(rows: list[dict], block_bits: int = 100_000, f_ec: float = 1.06) -> dict[str, Any]:
    """Secure key from the intervals not adjusting: sifted Z bits accumulated into blocks of ``block_bits``,
    each with the X bits of the same intervals for parameter estimation (Q_tol = their measured QBER),
    leak_EC = f_ec * n * h(Q_Z) (f_ec = 1.06: the Cascade efficiency measured in docs/qkd-reconciliation.md,
    an estimate, not a disclosed count), TLGR 2012 finite-key bound (daemon.qkd.finite_key.secure_length)."""
    from daemon.qkd.finite_key import binary_entropy, secure_length

    total, blocks, n, k, ez, ex = 0, 0, 0, 0, 0, 0
    sifted = 0
    for r in rows:
        if r["adjusting"]:
            continue
        n += r["nz"]
        k += r["nx"]
        ez += r["ez"]
        ex += r["ex"]
        sifted += r["nz"]
        if n >= block_bits:
            qz, qx = ez / n, (ex / k if k else 0.5)
            leak = int(math.ceil(f_ec * n * binary_entropy(qz)))
            total += secure_length(n, k, qx, leak).length
            blocks += 1
            n = k = ez = ex = 0
    return {"key_bits": total, "blocks": blocks, "sifted_z_bits": sifted, "block_bits": block_bits, "f_ec": f_ec}


def run(hours: float = 1.0, drift_rad2_per_s: float = 1e-4, compensate: bool = True, seed: int = 1,
        interval_s: float = 1.0, track_s: float = 5.0, memory_s: float = 30.0, min_gain: float = 0.003,
        move_s_per_100deg: float = 1.0, settle_s: float = 0.1, limits: tuple[float, float] = (0.0, 170.0),
        initial_unitary: str = "identity", move_penalty_per_deg: float = 3e-4,
        drift_prior_rad2_per_s: float = 1e-4, jump_gain: float = 0.0,
        order_moves: bool = False) -> dict[str, Any]:
    """One run; see the module doc. Returns mean/max QBER, moves, adjusting share, key bits, and ``rows``."""
    from drivers.sim.bench.model import PS_PER_S

    model, window_ps = bench_model(drift_rad2_per_s, seed, initial_unitary)
    rng = np.random.default_rng(seed + 1000)
    bell = model.cfg.source.bell_state
    cm = ChannelModel(bell, "bob", model.cfg.receivers.alice_angles_deg, model.cfg.receivers.bob_angles_deg,
                      limits[0], limits[1])
    tracker = Tracker(cm, memory_s=memory_s, min_gain=min_gain, move_weight=move_penalty_per_deg,
                      drift_rad2_per_s=drift_prior_rad2_per_s, jump_gain=jump_gain)
    paddles = [min(max(float(x), limits[0]), limits[1]) for x in model.state.paddles("bob")]
    for i, x in enumerate(paddles):
        model.state.set_paddle("bob", i, x)
    n_int = int(round(hours * 3600 / interval_s))
    busy_until = -1.0  # simulated second until which a move (plus settle) lasts
    last_track = 0.0
    verify = False
    from daemon.control.polarization import VERIFY_S as verify_s
    rows: list[dict] = []
    moves = 0
    jumps = 0  # long moves below the urgent threshold (Tracker jump_gain)
    transit: list[tuple[float, list[float]]] = []  # (duration s, paddles) of a move in progress, in order
    for i in range(n_int):
        t0, t1 = i * interval_s, (i + 1) * interval_s
        model._advance_to(int(t1 * PS_PER_S) // model.block_ps)  # the bench's own drift walk up to t1
        # the interval's counts: the paddles' path during a move (one paddle after the other, as the driver
        # moves them), then the setting reached, each for its share of the interval
        segments, left = [], interval_s
        while transit and left > 1e-9:
            dur, ang = transit[0]
            use = min(dur, left)
            segments.append((use, ang))
            left -= use
            if use >= dur - 1e-12:
                transit.pop(0)
            else:
                transit[0] = (dur - use, ang)
        if left > 1e-9:
            segments.append((left, paddles))
        lam = np.zeros((4, 4))
        for dur, ang in segments:
            for k, a in enumerate(ang):
                model.state.set_paddle("bob", k, a)
            r = model.expected_rates(window_ps)
            lam += (np.array(r["coincidences_in_window_hz"]) + np.array(r["accidentals_hz"])) * dur
        m = rng.poisson(lam)
        z, x = m[0:2, 0:2], m[2:4, 2:4]
        s = cm.signs
        ez = int(z[0, 1] + z[1, 0]) if s[0] > 0 else int(z[0, 0] + z[1, 1])
        ex = int(x[0, 1] + x[1, 0]) if s[1] > 0 else int(x[0, 0] + x[1, 1])
        nz, nx = int(z.sum()), int(x.sum())
        adjusting = t0 < busy_until
        rows.append({"t": t1, "qz": ez / max(nz, 1), "qx": ex / max(nx, 1), "nz": nz, "nx": nx, "ez": ez, "ex": ex,
                     "adjusting": adjusting})
        if not compensate or adjusting:
            continue
        tracker.add(t1, paddles, m)
        if t1 - last_track >= (min(track_s, verify_s) if verify else track_s):
            last_track = t1
            verify = False
            target, info = tracker.propose(t1, paddles)
            if target is not None:
                jumps += bool(info.get("jump"))
                # the driver moves one paddle after the other; the path in steps of at most 5 degrees
                cur = list(paddles)
                travel_s = 0.0
                for k in (tracker.move_order(paddles, target) if order_moves else range(3)):
                    d = target[k] - cur[k]
                    n = max(1, int(math.ceil(abs(d) / 5.0)))
                    for j in range(1, n + 1):
                        cur = list(cur)
                        cur[k] = paddles[k] + d * j / n
                        dur = abs(d) / n / 100.0 * move_s_per_100deg
                        if dur > 0:
                            transit.append((dur, cur))
                            travel_s += dur
                busy_until = t1 + travel_s + settle_s
                paddles = list(target)
                moves += 1
                verify = True  # the daemon's loop decides again VERIFY_S after a move
                last_track = busy_until
    q = np.array([(r["qz"] + r["qx"]) / 2 for r in rows])
    kept = [r for r in rows if not r["adjusting"]]
    qk = np.array([(r["qz"] + r["qx"]) / 2 for r in kept]) if kept else np.array([math.nan])
    return {"hours": hours, "drift_rad2_per_s": drift_rad2_per_s, "compensate": compensate, "seed": seed,
            "mean_qber": float(q.mean()), "max_qber": float(q.max()),
            "mean_qber_not_adjusting": float(qk.mean()), "moves": moves,
            "mean_qber_z": float(np.mean([r["qz"] for r in rows])), "mean_qber_x": float(np.mean([r["qx"] for r in rows])),
            "mean_max_qber_zx": float(np.mean([max(r["qz"], r["qx"]) for r in rows])),
            "jumps": jumps,
            "adjusting_share": 1 - len(kept) / len(rows), "fits": tracker.fits,
            **key_bits(rows), "rows": rows}
