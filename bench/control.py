"""Benchmark: closed-loop control (daemon/control) on the simulated testbed: polarization compensation and
delay tracking.

The whole daemon runs in process on the default testbed (config/sim.toml: bench, APT simulators behind the
real MPC320 driver, analysis pipeline, [control.polarization.bbm92] on pc_bob), with the bench tagger
accelerated (``--speed`` simulated seconds per wall second) and the simulated paddles at 0.2 s per 100
degrees (the MPC320 default is 1 s; only wall time changes).

1. Convergence (daemon level): Bob's fiber starts at a Haar-random unitary (``--seed``), no drift;
   ``control.bbm92.start``; the measurements (steps) and tagger seconds until both bases reach target_qber
   (1.5 % = (1 - V)/2 + 0.5 % at V = 0.98), for method "model" (the default) and method "sweep".
2. Drift over a simulated hour (model level, daemon/control/harness.py: the bench's own drift walk and
   expected rates, Poisson counts of the 4x4 matrix, the loop's Tracker, paddle transits at 1 s per 100
   degrees counted): both fibers at ``--drift`` rad^2/s, with and without compensation. Time-averaged QBER
   (Z and X averaged, every 1 s interval, the intervals measured while paddles move included), the QBER of
   the intervals not adjusting, moves, adjusting share, and the secure key the intervals not adjusting
   give: sifted Z bits in blocks of 1e5, the X bits of the same intervals for parameter estimation, leak_EC =
   f n h(Q_Z) with f = 1.06 (the Cascade efficiency measured in docs/qkd-reconciliation.md: an estimate of
   the leak, not disclosed bits), daemon.qkd.finite_key.secure_length (TLGR 2012, eps_sec 1e-10).
3. Optionally (``--daemon-minutes``) the same drift comparison at daemon level (tagger, coincidences, APT),
   with the real key pipeline ([qkd.links.bbm92], stores in a temporary directory): its final key bits
   (measured leak, not estimated) of the blocks completed in the run.
4. Delay tracking (daemon level, [control.delay.bbm92_delay]): Bob's fiber 800 ps longer at once
   (sim.set_fiber_delay), then a delay drift of ``--delay-drift`` ps/s for ``--delay-minutes``: the delays'
   total shift against the bench's ground truth, the peak offsets measured while drifting.

The last line is one JSON object: converge_steps, converge_sim_s, mean_qber_compensated,
mean_qber_uncompensated, key_bits_compensated, key_bits_uncompensated, and the details.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.config import default_config_text, parse, validate  # noqa: E402

PS = 1e-12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(seed: int, speed: float, drift: float, random_bob: bool, auto: bool, method: str = "model",
           track: bool = True, delay_tracker: bool = False, keys: bool = False):
    text = default_config_text()
    text = text.replace("speed = 1.0", f"speed = {speed}").replace('log_format = "auto"', 'log_format = "json"')
    text = text.replace('log_level = "info"', 'log_level = "error"').replace("seed = 1\n", f"seed = {seed}\n")
    text = text.replace("drift_rad2_per_s = 1.0e-4", f"drift_rad2_per_s = {drift}")
    if random_bob:
        text = text.replace('fiber_km = 10.0\n', 'fiber_km = 10.0\ninitial_unitary = "random"\n')
    text = text.replace('arm = "bob"\n', 'arm = "bob"\nmove_time_s_per_100deg = 0.2\n')
    extra = f'method = "{method}"\ntrack = {str(track).lower()}\n'
    if not auto:
        extra += "auto = false\n"
    text = text.replace('controller = "pc_bob"\n', 'controller = "pc_bob"\n' + extra)
    raw = parse(text)
    if keys and "qkd" in raw:  # the real key pipeline, its stores in a temporary directory
        raw["qkd"]["store_dir"] = tempfile.mkdtemp(prefix="qnetd-bench-control-")
    else:
        raw.pop("qkd", None)
    raw["daemon"]["control"] = f"tcp://127.0.0.1:{free_port()}"
    raw["daemon"]["publish"] = f"tcp://127.0.0.1:{free_port()}"
    if delay_tracker:
        raw["control"]["delay"] = {"bbm92_delay": {"link": "bbm92", "measure_s": 2.0}}
    return validate(raw, "bench")


async def with_daemon(cfg, scenario):
    from daemon.app import Daemon

    d = Daemon(cfg)
    run = asyncio.create_task(d.run())
    try:
        while d.control is None or d.state != "running":
            if run.done():
                raise RuntimeError("daemon ended")
            await asyncio.sleep(0.05)
        return await scenario(d)
    finally:
        d.request_stop("bench")
        await asyncio.wait_for(run, 30)


async def converge(d) -> dict:
    lp = d.control.loops["bbm92"]
    while lp._t_last_ps < 2 * 10**12:
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    lp.start("bench")
    while lp.adjusting:
        await asyncio.sleep(0.05)
    st = lp.status()
    return {"state": st["state"], "steps": st["steps"], "sim_s": st["sim_s"], "wall_s": round(time.monotonic() - t0, 1),
            "first_qber": lp.history[0]["qber"], "final_qber": st["qber"]}


def drift_run(minutes: float):
    async def scenario(d) -> dict:
        lp = d.control.loops["bbm92"]
        rows: list[tuple[float, float, bool]] = []
        blocks: list[dict] = []

        states: list[tuple[float, str, str | None, int]] = []

        def listen(topic, fields, t_begin, t_end):
            q = fields.get("qber") or {}
            if (topic == "qkd.bbm92" and fields.get("kind", "interval") == "interval"
                    and q.get("Z") is not None and q.get("X") is not None):
                rows.append((t_end * PS, (q["Z"] + q["X"]) / 2, d.control.adjusting("bbm92")))

        publish = d.publisher.publish

        def tap(topic, fields, *args, **kw):  # key blocks and loop states go to the publisher only
            if topic == "qkd.bbm92" and fields.get("kind") == "block" and rows:
                blocks.append({"bits": int(fields.get("final_key_bits") or 0), "aborted": bool(fields.get("aborted"))})
            elif topic == "control.bbm92" and (not states or states[-1][1] != fields.get("state")):
                states.append((round((d.acquisition.last_t_end_ps or 0) * PS, 1), fields.get("state"),
                               fields.get("reason"), fields.get("steps")))
            return publish(topic, fields, *args, **kw)

        d.publisher.publish = tap

        d.acquisition.listeners.append(listen)
        while not rows or rows[-1][0] - rows[0][0] < minutes * 60:
            await asyncio.sleep(0.2)
        all_q = [q for _, q, _ in rows]
        kept = [q for _, q, a in rows if not a]
        return {"intervals": len(rows), "sim_s": round(rows[-1][0] - rows[0][0], 1),
                "mean_qber": sum(all_q) / len(all_q), "max_qber": max(all_q),
                "adjusting_share": 1 - len(kept) / len(rows),
                "mean_qber_not_adjusting": sum(kept) / len(kept) if kept else None, "runs": lp.runs,
                "track_moves": lp.track_moves, "key_blocks": len(blocks),
                "key_blocks_aborted": sum(b["aborted"] for b in blocks),
                "final_key_bits": sum(b["bits"] for b in blocks),
                "runs_log": [st for st in states if st[1] not in ("tracking", "idle")]}
    return scenario


def delay_run(drift_ps_per_s: float, minutes: float):
    async def scenario(d) -> dict:
        tr = d.control.delays["bbm92_delay"]
        while tr.estimates < 1:
            await asyncio.sleep(0.05)
        base = await d.table.call("sim.fiber_delay", {"arm": "bob"})
        await d.table.call("sim.set_fiber_delay", {"arm": "bob", "picoseconds": base + 800})
        n0 = tr.estimates
        while not (tr.corrections >= 1 and tr.estimates >= n0 + 3):
            await asyncio.sleep(0.05)
        step = {"applied_ps": 800, "shift_ps": tr.total_shift_ps,
                "offsets_after_ps": [h["offset_ps"] for h in tr.history[-2:]]}
        h0 = len(tr.history)
        t0 = d.acquisition.last_t_end_ps
        await d.table.call("sim.set_delay_drift", {"arm": "bob", "ps_per_s": drift_ps_per_s})
        while (d.acquisition.last_t_end_ps - t0) * PS < minutes * 60:
            await asyncio.sleep(0.2)
        await d.table.call("sim.set_delay_drift", {"arm": "bob", "ps_per_s": 0.0})
        during = [h["offset_ps"] for h in tr.history[h0:] if h["offset_ps"] is not None]
        moved = await d.table.call("sim.fiber_delay", {"arm": "bob"}) - base
        n1 = tr.estimates
        while tr.estimates < n1 + 2:
            await asyncio.sleep(0.05)
        return {"step": step, "drift_ps_per_s": drift_ps_per_s, "drift_sim_s": minutes * 60,
                "fiber_moved_ps": round(moved, 2), "delays_shifted_ps": tr.total_shift_ps,
                "residual_ps": round(moved + tr.total_shift_ps, 2), "final_offset_ps": tr.offset_ps,
                "offsets_while_drifting_ps": {"mean_abs": round(sum(map(abs, during)) / max(1, len(during)), 2),
                                              "max_abs": max(map(abs, during), default=None), "n": len(during)},
                "corrections": tr.corrections, "tolerance_ps": tr.cfg["tolerance_ps"]}
    return scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--speed", type=float, default=25.0)
    ap.add_argument("--drift", type=float, default=1e-4,
                    help="rad^2/s, both fibers (default: the bench default, lab-typical)")
    ap.add_argument("--hours", type=float, default=1.0, help="simulated hours of the model-level drift runs")
    ap.add_argument("--daemon-minutes", type=float, default=0.0,
                    help="simulated minutes of daemon-level drift runs (0: skip)")
    ap.add_argument("--delay-drift", type=float, default=1.0, help="ps/s of Bob's fiber delay drift")
    ap.add_argument("--delay-minutes", type=float, default=2.0)
    ap.add_argument("--no-delay", action="store_true")
    a = ap.parse_args()
    from daemon.control.harness import run

    conv = asyncio.run(with_daemon(config(a.seed, a.speed, 0.0, True, False, "model", False), converge))
    print("convergence (model):", json.dumps(conv), flush=True)
    sweep = asyncio.run(with_daemon(config(a.seed, a.speed, 0.0, True, False, "sweep", False), converge))
    print("convergence (sweep):", json.dumps(sweep), flush=True)
    out = {"converge_steps": conv["steps"], "converge_sim_s": conv["sim_s"], "converged": conv["state"] == "converged",
           "convergence": conv, "convergence_sweep": sweep}
    t0 = time.monotonic()
    comp = run(hours=a.hours, drift_rad2_per_s=a.drift, compensate=True, seed=a.seed)
    unc = run(hours=a.hours, drift_rad2_per_s=a.drift, compensate=False, seed=a.seed)
    for r in (comp, unc):
        r.pop("rows")
    print("hour, compensated:", json.dumps(comp), flush=True)
    print("hour, uncompensated:", json.dumps(unc), flush=True)
    print(f"key bits: leak_EC = f n h(Q_Z), f = 1.06 (measured Cascade efficiency, an estimate); model-level runs "
          f"took {time.monotonic() - t0:.0f} s wall", flush=True)
    out.update(mean_qber_compensated=round(comp["mean_qber"], 5), mean_qber_uncompensated=round(unc["mean_qber"], 5),
               mean_qber_compensated_not_adjusting=round(comp["mean_qber_not_adjusting"], 5),
               mean_max_qber_zx_compensated=round(comp["mean_max_qber_zx"], 5),
               key_bits_compensated=comp["key_bits"], key_bits_uncompensated=unc["key_bits"], f_ec=1.06,
               drift_rad2_per_s=a.drift, drift_sim_hours=a.hours, compensated=comp, uncompensated=unc)
    if a.daemon_minutes > 0:
        dcomp = asyncio.run(with_daemon(config(a.seed, a.speed, a.drift, False, True, keys=True),
                                        drift_run(a.daemon_minutes)))
        print("daemon, compensated:", json.dumps(dcomp), flush=True)
        dunc = asyncio.run(with_daemon(config(a.seed, a.speed, a.drift, False, False, "model", False, keys=True),
                                       drift_run(a.daemon_minutes)))
        print("daemon, uncompensated:", json.dumps(dunc), flush=True)
        out.update(daemon_compensated=dcomp, daemon_uncompensated=dunc)
    if not a.no_delay:
        dl = asyncio.run(with_daemon(config(a.seed, a.speed, 0.0, False, False, "model", False, True),
                                     delay_run(a.delay_drift, a.delay_minutes)))
        print("delay tracking:", json.dumps(dl), flush=True)
        out.update(delay=dl)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
