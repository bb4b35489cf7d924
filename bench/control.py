"""Benchmark: closed-loop polarization compensation (daemon/control/polarization.py) on the simulated testbed.

The whole daemon runs in process on the default testbed (config/sim.toml: bench, APT simulators behind the
real MPC320 driver, analysis pipeline, [control.polarization.bbm92] on pc_bob), with the bench tagger
accelerated (``--speed`` simulated seconds per wall second) and the simulated paddles at 0.2 s per 100
degrees (the MPC320 default is 1 s; only wall time changes).

1. Convergence: Bob's fiber starts at a Haar-random unitary (``--seed``), no drift; ``control.bbm92.start``;
   reports the measurements (steps) and tagger seconds until both bases reach target_qber (1.5 %).
2. Drift: both fibers drift at ``--drift`` rad^2/s for ``--minutes`` simulated minutes, once with the loop in
   auto mode (threshold 3 %, hold 10 s) and once without it; the time-averaged QBER (Z and X averaged, every
   1 s interval, including the intervals measured while adjusting) of each run, the share of intervals
   flagged adjusting, and the QBER of the intervals not adjusting (what a key pipeline would use).

The last line is one JSON object: converge_steps, converge_sim_s, mean_qber_compensated,
mean_qber_uncompensated, and the details.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.config import default_config_text, parse, validate  # noqa: E402

PS = 1e-12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(seed: int, speed: float, drift: float, random_bob: bool, auto: bool):
    text = default_config_text()
    text = text.replace("speed = 1.0", f"speed = {speed}").replace('log_format = "auto"', 'log_format = "json"')
    text = text.replace('log_level = "info"', 'log_level = "error"').replace("seed = 1\n", f"seed = {seed}\n")
    text = text.replace("drift_rad2_per_s = 1.0e-4", f"drift_rad2_per_s = {drift}")
    if random_bob:
        text = text.replace('fiber_km = 10.0\n', 'fiber_km = 10.0\ninitial_unitary = "random"\n')
    text = text.replace('arm = "bob"\n', 'arm = "bob"\nmove_time_s_per_100deg = 0.2\n')
    if not auto:
        text = text.replace('controller = "pc_bob"\n', 'controller = "pc_bob"\nauto = false\n')
    raw = parse(text)
    raw["daemon"]["control"] = f"tcp://127.0.0.1:{free_port()}"
    raw["daemon"]["publish"] = f"tcp://127.0.0.1:{free_port()}"
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

        def listen(topic, fields, t_begin, t_end):
            q = fields.get("qber") or {}
            if topic == "qkd.bbm92" and q.get("Z") is not None and q.get("X") is not None:
                rows.append((t_end * PS, (q["Z"] + q["X"]) / 2, d.control.adjusting("bbm92")))

        d.acquisition.listeners.append(listen)
        while not rows or rows[-1][0] - rows[0][0] < minutes * 60:
            await asyncio.sleep(0.2)
        all_q = [q for _, q, _ in rows]
        kept = [q for _, q, a in rows if not a]
        return {"intervals": len(rows), "sim_s": round(rows[-1][0] - rows[0][0], 1),
                "mean_qber": sum(all_q) / len(all_q), "max_qber": max(all_q),
                "adjusting_share": 1 - len(kept) / len(rows),
                "mean_qber_not_adjusting": sum(kept) / len(kept) if kept else None, "runs": lp.runs}
    return scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--speed", type=float, default=25.0)
    ap.add_argument("--drift", type=float, default=1e-3, help="rad^2/s, both fibers, for the drift runs")
    ap.add_argument("--minutes", type=float, default=10.0, help="simulated minutes per drift run")
    ap.add_argument("--no-drift-run", action="store_true")
    a = ap.parse_args()
    conv = asyncio.run(with_daemon(config(a.seed, a.speed, 0.0, True, False), converge))
    print("convergence:", json.dumps(conv), flush=True)
    out = {"converge_steps": conv["steps"], "converge_sim_s": conv["sim_s"], "converged": conv["state"] == "converged",
           "convergence": conv}
    if not a.no_drift_run:
        comp = asyncio.run(with_daemon(config(a.seed, a.speed, a.drift, False, True), drift_run(a.minutes)))
        print("compensated:", json.dumps(comp), flush=True)
        unc = asyncio.run(with_daemon(config(a.seed, a.speed, a.drift, False, False), drift_run(a.minutes)))
        print("uncompensated:", json.dumps(unc), flush=True)
        out.update(mean_qber_compensated=round(comp["mean_qber"], 5), mean_qber_uncompensated=round(unc["mean_qber"], 5),
                   drift_rad2_per_s=a.drift, drift_sim_minutes=a.minutes, compensated=comp, uncompensated=unc)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
