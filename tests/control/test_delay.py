"""Delay tracking (daemon/control/delay.py) on the simulated testbed, in process, in accelerated simulated time:
the bench's fiber delay changes (a step through sim.set_fiber_delay, a drift through sim.set_delay_drift) and
the tracker moves the analysis delays after the coincidence peak while the qkd.<link> statistics go on."""

from __future__ import annotations

import asyncio

import pytest

from daemon.config import ConfigError, parse, validate
from tests.control.test_polarization import make_config, wait_for, with_daemon

pytestmark = pytest.mark.integration


def delay_config(**table):
    cfg = make_config(method="model", track=False)
    raw = dict(cfg.raw)
    raw["control"] = dict(raw["control"])
    raw["control"]["delay"] = {"bbm92_delay": {"link": "bbm92", "measure_s": 2.0, **table}}
    return validate(raw, "test")


def test_config_errors_have_key_paths():
    cfg = make_config()
    raw = dict(cfg.raw)
    raw["control"] = dict(raw["control"])
    raw["control"]["delay"] = {"d": {"link": "nope", "range_ps": 1005, "bin_ps": 10, "tolerance_ps": 5000}}
    with pytest.raises(ConfigError) as e:
        validate(raw, "test")
    text = str(e.value)
    for key in ("control.delay.d.link", "control.delay.d.range_ps", "control.delay.d.tolerance_ps"):
        assert key in text, text
    assert parse("[control.delay.x]\nlink = 'bbm92'\n")["control"]["delay"]["x"]["link"] == "bbm92"


def test_follows_a_fiber_length_step_and_a_drift_without_stopping_the_statistics():
    cfg = delay_config()

    async def scenario(d):
        tr = d.control.delays["bbm92_delay"]
        rows = []

        def listen(topic, fields, t_begin, t_end):
            if topic == "qkd.bbm92" and fields.get("kind", "interval") == "interval":
                rows.append((t_end, fields["coincidences"], d.control.adjusting("bbm92")))

        d.acquisition.listeners.append(listen)
        await wait_for(lambda: tr.estimates >= 1, 60, "no delay estimate")
        assert tr.corrections == 0 and abs(tr.offset_ps) <= 20, tr.status()  # the configured delays are right
        base = await d.table.call("sim.fiber_delay", {"arm": "bob"})
        # a step: Bob's fiber 800 ps longer (beyond the 500 ps half-window: coincidences are lost)
        await d.table.call("sim.set_fiber_delay", {"arm": "bob", "picoseconds": base + 800})
        await wait_for(lambda: tr.corrections >= 1, 60, "did not follow the step")
        await wait_for(lambda: tr.offset_ps is not None and abs(tr.offset_ps) <= 20 and tr.estimates >= 4, 60,
                       "peak not centred after the step")
        step_shift = tr.total_shift_ps
        # a user's calibration takes precedence over the tracker's background histograms
        cal = await d.table.call("analysis.calibrate_delays", {"duration_s": 0.5, "coarse_range_ps": 5000})
        assert cal["all_found"], cal
        # a drift: 30 ps per simulated second for 25 simulated seconds
        n0 = len(rows)
        await d.table.call("sim.set_delay_drift", {"arm": "bob", "ps_per_s": 30.0})
        await wait_for(lambda: len(rows) - n0 >= 25, 120, "no statistics during the drift")
        await d.table.call("sim.set_delay_drift", {"arm": "bob", "ps_per_s": 0.0})
        drift_rows = rows[n0:]
        moved = await d.table.call("sim.fiber_delay", {"arm": "bob"}) - base
        # once the drift stops, an estimate finds the peak centred (after at most one more correction)
        await wait_for(lambda: tr.offset_ps is not None and abs(tr.offset_ps) <= 20 and not tr.adjusting
                       and tr.history[-1]["shift_ps"] == 0, 60, "peak not centred after the drift")
        status = await d.table.call("control.bbm92_delay.status", {})
        return step_shift, drift_rows, moved, status, list(tr.history)

    step_shift, drift_rows, moved, status, history = asyncio.run(with_daemon(cfg, scenario))
    assert abs(step_shift + 800) <= 10, step_shift  # Bob's delays moved back by the 800 ps
    assert moved > 1450  # the step and the drift (~750 ps) together
    assert abs(status["total_shift_ps"] + moved) <= 30, (status, moved)  # the delays followed the fiber
    assert abs(status["offset_ps"]) <= 20, status
    # key statistics went on during the drift: every interval had coincidences, few were marked adjusting
    counts = [c for _, c, _ in drift_rows]
    assert min(counts) > 0.5 * max(counts), counts
    assert sum(a for _, _, a in drift_rows) <= len(drift_rows) // 2
    # while drifting at 30 ps/s the peak never got further than about one estimate's worth of drift (2 s
    # histogram + the switch) from the centre; the window is +-500 ps
    during = [h for h in history if h["offset_ps"] is not None][-6:]
    assert max(abs(h["offset_ps"]) for h in during) <= 200, during
