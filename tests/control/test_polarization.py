"""Polarization compensation on the simulated testbed, in process and in accelerated simulated time: the real
MPC320 driver against its APT simulator, the bench, the analysis pipeline and the loop of daemon/control."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

from daemon.config import default_config_text, parse, validate, ConfigError
from daemon.control.polarization import fit_minimum

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(*, seed: int = 3, speed: float = 25.0, auto: bool = False, limits=(5.0, 165.0), method: str = "model",
                track: bool = True, drift: float = 0.0):
    text = default_config_text()
    text = text.replace("speed = 1.0", f"speed = {speed}").replace('log_format = "auto"', 'log_format = "json"')
    text = text.replace('log_level = "info"', 'log_level = "warning"')
    text = text.replace("seed = 1\n", f"seed = {seed}\n")
    text = text.replace("drift_rad2_per_s = 1.0e-4", f"drift_rad2_per_s = {drift}")
    text = text.replace('fiber_km = 10.0\n', 'fiber_km = 10.0\ninitial_unitary = "random"\n')
    text = text.replace('arm = "bob"\n', 'arm = "bob"\nmove_time_s_per_100deg = 0.2\n')
    text = text.replace('resource = "sim://pc_bob"\n[devices.pc_bob.limits]\nangle_deg = [0.0, 170.0]',
                        f'resource = "sim://pc_bob"\n[devices.pc_bob.limits]\nangle_deg = [{limits[0]}, {limits[1]}]')
    text = text.replace("hold_s = 10.0", "hold_s = 3.0").replace("auto start when", "auto start when")
    if not auto:
        text = text.replace('controller = "pc_bob"\n', 'controller = "pc_bob"\nauto = false\n')
    text = text.replace('controller = "pc_bob"\n',
                        f'controller = "pc_bob"\nmethod = "{method}"\ntrack = {str(track).lower()}\n'
                        f'drift_prior_rad2_per_s = {max(drift, 1e-4)}\n')
    raw = parse(text)
    raw.pop("qkd", None)  # no key pipeline (and no key store written) in these tests
    raw["daemon"]["control"] = f"tcp://127.0.0.1:{free_port()}"
    raw["daemon"]["publish"] = f"tcp://127.0.0.1:{free_port()}"
    return validate(raw, "test")


async def with_daemon(cfg, scenario):
    from daemon.app import Daemon

    d = Daemon(cfg)
    run = asyncio.create_task(d.run())
    try:
        t0 = time.monotonic()
        while d.control is None or d.state != "running":
            assert not run.done(), "daemon ended"
            assert time.monotonic() - t0 < 120, "daemon did not start"
            await asyncio.sleep(0.05)
        return await scenario(d)
    finally:
        d.request_stop("test")
        await asyncio.wait_for(run, 30)


async def wait_for(pred, timeout: float, what: str):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, what
        await asyncio.sleep(0.05)


def apt_moves_counts(d, instrument: str) -> list[int]:
    """The encoder counts of every MOT_MOVE_ABSOLUTE the APT simulator received."""
    from drivers import apt
    from drivers.apt import MsgId

    out = []
    for m in d.simulation.instruments[instrument].received_messages():
        if m.msg_id == MsgId.MOT_MOVE_ABSOLUTE and m.is_long:
            _ident, counts = apt.unpack_chan_pos(m.data)
            out.append(counts)
    return out


def test_fit_minimum_recovers_a_trig_polynomial():
    rng = np.random.default_rng(1)
    a = np.array([0, 30, 60, 90, 120, 150, 47.0])
    f = lambda x: 0.3 + 0.1 * np.cos(np.radians(2 * x) - 1) + 0.05 * np.sin(np.radians(4 * x))  # noqa: E731
    x, v = fit_minimum(a, f(a) + rng.normal(0, 1e-4, a.size), 0, 170)
    grid = np.linspace(0, 170, 17001)
    assert abs(x - grid[np.argmin(f(grid))]) < 0.5 and abs(v - f(grid).min()) < 1e-3


def test_config_errors_have_key_paths():
    raw = parse(default_config_text())
    raw["control"]["polarization"]["bbm92"].update(controller="pump", link="nope", threshold_qber=2.0)
    with pytest.raises(ConfigError) as e:
        validate(raw, "test")
    text = str(e.value)
    for key in ("control.polarization.bbm92.controller", "control.polarization.bbm92.link",
                "control.polarization.bbm92.threshold_qber"):
        assert key in text, text


# method "sweep" runs in test_auto_start_and_fault_pauses_with_reason (converging took 25-37 steps, docs/control.md)
@pytest.mark.parametrize("method,max_steps", [("model", 8)])
def test_converges_from_a_random_unitary_within_limits(method, max_steps):
    cfg = make_config(method=method, track=False)

    async def scenario(d):
        lp = d.control.loops["bbm92"]
        before = await d.table.call("control.bbm92.status", {})
        assert before["adjusting"] is False
        await wait_for(lambda: lp._t_last_ps > 2 * 10**12, 60, "no qkd data")
        await d.table.call("control.bbm92.start", {})
        assert lp.adjusting
        await wait_for(lambda: not lp.adjusting, 240, "loop did not end")
        st = await d.table.call("control.bbm92.status", {})
        moves = apt_moves_counts(d, "pc_bob")
        return st, lp.history, moves

    st, history, moves = asyncio.run(with_daemon(cfg, scenario))
    assert history[0]["qber"]["Z"] + history[0]["qber"]["X"] > 0.1, history[0]  # the seed gives a bad start
    assert st["state"] == "converged", st
    assert max(st["qber"].values()) <= 0.01 + 0.005
    assert st["steps"] <= max_steps, st
    from drivers import apt

    lo, hi = apt.degrees_to_counts(5.0), apt.degrees_to_counts(165.0)  # the driver rounds to whole counts
    assert len(moves) >= st["steps"] - 1 and all(lo <= m <= hi for m in moves), moves


def test_auto_start_and_fault_pauses_with_reason():
    cfg = make_config(auto=True, seed=5, method="sweep")  # sweeps: a run long enough to fault in the middle

    async def scenario(d):
        lp = d.control.loops["bbm92"]
        await wait_for(lambda: lp.adjusting, 60, "auto start did not happen")
        assert lp.reason.startswith("auto")
        await wait_for(lambda: lp.steps >= 2, 60, "no progress")
        await d.table.call("sim.stop_instrument", {"name": "pc_bob"})
        await wait_for(lambda: lp.state == "paused", 60, "did not pause")
        paused = lp.status()
        assert paused["adjusting"] is True
        await d.table.call("control.bbm92.stop", {})
        return paused, lp.status()

    paused, stopped = asyncio.run(with_daemon(cfg, scenario))
    assert "pc_bob" in paused["reason"], paused
    assert stopped["state"] == "stopped" and stopped["adjusting"] is False


def test_tracks_drift_through_the_driver_and_pauses_on_a_fault():
    """Both fibers drift at 1e-3 rad^2/s (10x the default, to be seen in a few simulated minutes); the loop's
    tracking (method model, no run started) keeps the QBER near (1 - V)/2 with small moves through the MPC320
    driver, while the same drift with the paddles left alone (computed from the bench's fiber unitaries along
    the way) goes far above it. Intervals measured while the paddles move count too. Then pc_bob's simulator stops: the next move pauses the loop with the reason."""
    from drivers.sim.bench import optics as O

    cfg = make_config(drift=1e-3, track=True)  # drift_prior_rad2_per_s = 1e-3 as well (an operator's setting)

    async def scenario(d):
        lp = d.control.loops["bbm92"]
        model = d.simulation.model
        rho = O.werner_state("phi+", model.cfg.source.visibility)
        rows = []

        def listen(topic, fields, t_begin, t_end):
            q = fields.get("qber") or {}
            if topic == "qkd.bbm92" and q.get("Z") is not None and fields.get("kind", "interval") == "interval":
                p = O.joint_probabilities(rho, model.fiber_unitary("alice"), model.fiber_unitary("bob"),
                                          (0.0, 45.0), (0.0, 45.0))  # what the paddles at home would give
                rows.append(((q["Z"] + q["X"]) / 2, (O.qber(p, 0, "phi+") + O.qber(p, 1, "phi+")) / 2,
                             d.control.adjusting("bbm92")))

        d.acquisition.listeners.append(listen)
        await wait_for(lambda: len(rows) >= 80, 180, "no statistics")
        tracked = list(rows)
        await d.table.call("sim.stop_instrument", {"name": "pc_bob"})
        await wait_for(lambda: lp.state == "paused", 120, "did not pause")
        return tracked, lp.status(), apt_moves_counts(d, "pc_bob")

    rows, paused, moves = asyncio.run(with_daemon(cfg, scenario))
    measured = np.mean([q for q, _, _ in rows[20:]])
    untouched = np.mean([u for _, u, _ in rows[20:]])
    adjusting = np.mean([a for _, _, a in rows])
    assert paused["track_moves"] >= 3 and paused["state"] == "paused" and "pc_bob" in paused["reason"], paused
    # (at 10x the lab-typical drift; the < 3 % figure over an hour at the typical drift is test_tracking_hour)
    assert measured < 0.05, (measured, untouched)
    assert untouched > 2 * measured, (measured, untouched)
    assert adjusting < 0.5, adjusting
    from drivers import apt

    lo, hi = apt.degrees_to_counts(5.0), apt.degrees_to_counts(165.0)
    assert moves and all(lo <= m <= hi for m in moves), moves


def test_block_messages_are_ignored_and_intervals_are_not():
    """qkd.<link> carries per-interval statistics (kind interval, or no kind) and per-key-block messages (kind
    block): only the former feed the loop."""
    from types import SimpleNamespace

    from daemon.control.polarization import FIELDS, PolarizationLoop
    from drivers.params import validate_table

    errors: list = []
    cfg = validate_table({"link": "bbm92", "controller": "pc_bob", "auto": False, "track": False}, FIELDS, "t", errors)
    assert not errors
    sup = SimpleNamespace(name="pc_bob", cfg=SimpleNamespace(limits={"angle_deg": (0.0, 170.0)}))
    lp = PolarizationLoop("bbm92", cfg, sup, lambda *a: None, lambda: None)
    fields = {"qber": {"Z": 0.01, "X": 0.01}, "sifted": {"Z": 100, "X": 100}}
    lp.on_message("qkd.bbm92", {**fields, "kind": "block"}, 0, 5 * 10**12)
    assert lp._t_last_ps == 0
    lp.on_message("qkd.bbm92", fields, 0, 10**12)
    assert lp._t_last_ps == 10**12
    lp.on_message("qkd.bbm92", {**fields, "kind": "interval"}, 10**12, 2 * 10**12)
    assert lp._t_last_ps == 2 * 10**12
