"""The embedded default testbed end to end: the daemon starts the bench and its protocol-level simulators,
the real drivers talk to them (SCPI over TCP, APT on a pty, JSON over TCP), and physics links them."""

from __future__ import annotations

import math
import time

import pytest

from daemon.api import errors
from daemon.config import default_config_text

pytestmark = pytest.mark.integration

PS = 1e-12


def make_testbed_config(speed: float = 4.0) -> str:
    text = default_config_text()
    assert "speed = 1.0" in text
    return text.replace("speed = 1.0", f"speed = {speed}").replace('log_format = "auto"', 'log_format = "json"')


def expected_singles(fiber_km: float, power_mw: float = 5.0) -> float:
    """physics.md: S = R*eta/4 + DCR, then non-paralyzable dead time S/(1+S*tau), with the default config."""
    pairs = 1.0e5 * power_mw
    eta = 10 ** (-(2.0 + 0.2 * fiber_km) / 10) * 0.85
    s = pairs * eta / 4 + 100.0
    return s / (1 + s * 50e-9)


def next_counts(d, after_t_ps: int = 0, timeout: float = 20.0) -> dict:
    """The first counts message whose interval starts after ``after_t_ps`` (tagger time)."""
    for msg in d.client.subscribe("counts", timeout=timeout):
        if msg["t_begin_ps"] >= after_t_ps:
            return msg.header
    raise AssertionError("unreachable")


def wait_state(d, device: str, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = d.client.status()["devices"][device]
        if st["state"] == state:
            return st
        time.sleep(0.05)
    raise AssertionError(f"{device} did not reach {state}: {st}")


def test_default_testbed_runs_on_real_drivers(start_daemon):
    d = start_daemon(make_testbed_config())
    status = d.client.status()
    assert {n: s["state"] for n, s in status["devices"].items()} == dict.fromkeys(
        ("tagger", "pump", "pc_alice", "pc_bob", "snspd"), "ready")
    assert status["devices"]["pump"]["identity"]["model"].startswith("CLD")
    sim = d.client.call("sim.status")
    assert sim["instruments"]["pump"]["address"].startswith("TCPIP::127.0.0.1::")
    assert sim["instruments"]["pc_alice"]["model"] == "thorlabs_mpc320"

    msg = next_counts(d)
    assert msg["overflow"] is False
    seconds = msg["interval_ps"] * PS
    for ch, count in enumerate(msg["counts"]):
        mean = expected_singles(2.0 if ch < 4 else 10.0) * seconds
        assert abs(count - mean) < 5 * math.sqrt(mean), (ch, count, mean)


def test_pump_through_scpi_changes_the_counts(start_daemon):
    d = start_daemon(make_testbed_config())
    d.client.call("pump.set_output", on=False)  # SCPI OUTP1:STAT OFF -> no pairs, only dark counts
    t_off = d.client.call("tagger.status")["time_ps"]
    msg = next_counts(d, after_t_ps=t_off + 10**11)
    seconds = msg["interval_ps"] * PS
    for count in msg["counts"]:
        assert count < 5 * 100.0 * seconds + 10  # dark counts only (100 Hz per detector)
    with pytest.raises(errors.LimitExceeded):
        d.client.call("pump.set_current", milliamps=75.0)  # config limit 60 mA: never reaches the simulator
    d.client.call("pump.set_current", milliamps=40.0)  # 10 mW
    d.client.call("pump.set_output", on=True)
    t_on = d.client.call("tagger.status")["time_ps"]
    msg = next_counts(d, after_t_ps=t_on + 10**11)
    mean = expected_singles(2.0, power_mw=10.0) * msg["interval_ps"] * PS
    assert abs(msg["counts"][0] - mean) < 5 * math.sqrt(mean)


def test_interlock_trip_turns_the_laser_off(start_daemon):
    d = start_daemon(make_testbed_config())
    d.client.call("sim.trip_interlock", tripped=True)
    st = d.client.call("pump.status")
    assert st["output"] is False and "interlock" in " ".join(st["trips"]).lower()
    with pytest.raises(errors.DeviceFailure):
        d.client.call("pump.set_output", on=True)  # refused while tripped, and the driver says why
    d.client.call("sim.trip_interlock", tripped=False)
    d.client.call("pump.set_output", on=True)
    assert d.client.call("pump.status")["output"] is True


def test_unplugged_instrument_faults_and_comes_back(start_daemon):
    d = start_daemon(make_testbed_config())
    d.client.call("pc_alice.move", paddle=0, degrees=30.0)
    assert d.client.call("sim.status")["paddles_deg"]["alice"][0] == pytest.approx(30.0, abs=0.2)
    d.client.call("sim.stop_instrument", name="pc_alice")
    with pytest.raises((errors.DeviceUnavailable, errors.Timeout)):
        d.client.call("pc_alice.positions")
    assert d.client.status()["devices"]["pc_alice"]["state"] == "faulted"
    assert d.client.status()["devices"]["pump"]["state"] == "ready"  # the others carry on
    d.client.call("sim.start_instrument", name="pc_alice")
    d.client.call("pc_alice.reconnect")
    wait_state(d, "pc_alice", "ready")
    d.client.call("pc_alice.move", paddle=1, degrees=45.0)
    assert d.client.call("pc_alice.positions")[1] == pytest.approx(45.0, abs=0.2)


def test_sigterm_puts_the_simulated_lab_in_safe_states(start_daemon):
    import signal

    d = start_daemon(make_testbed_config())
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    events = [(r.get("device"), r["event"]) for r in d.logs()]
    for dev in ("tagger", "pump", "pc_alice", "pc_bob", "snspd"):
        assert (dev, "safe state reached") in events, dev


def test_coincidences_and_qber_on_the_default_testbed(start_daemon):
    """The analysis pipeline on the bench: coincidence rate and QBER as physics.md predicts."""
    d = start_daemon(make_testbed_config())
    link = next(iter(d.client.subscribe("qkd.bbm92", timeout=30)))
    coinc = next(iter(d.client.subscribe("coincidences", timeout=30)))
    seconds = (coinc["t_end_ps"] - coinc["t_begin_ps"]) * PS
    # true coincidences summed over the matrix: R * eta_A * eta_B (the 1 ns window holds the whole 32 ps peak)
    eta_a = 10 ** (-(2.0 + 0.4) / 10) * 0.85
    eta_b = 10 ** (-(2.0 + 2.0) / 10) * 0.85
    mean = 5.0e5 * eta_a * eta_b * seconds
    total = sum(coinc["counts"])
    assert abs(total - mean) < 5 * math.sqrt(mean) + 0.01 * mean, (total, mean)  # + dead-time losses (<1%)
    # QBER (1 - V)/2 = 1 % per basis with the fibers starting at identity; drift at 1e-4 rad^2/s adds at most
    # ~2*D*t/4 per arm, < 0.001 over the first 10 simulated seconds
    for basis in ("Z", "X"):
        n = link["sifted"][basis]
        q = link["qber"][basis]
        assert n > 1000
        assert abs(q - 0.01) < 5 * math.sqrt(0.01 * 0.99 / n) + 0.001, (basis, q, n)
    hist = next(iter(d.client.subscribe("histogram.h_h", timeout=30)))
    counts = hist.arrays["counts"]
    assert counts.sum() == hist["total"] and counts.sum() > 0
    assert counts.argmax() == pytest.approx(len(counts) / 2, abs=5)  # the peak sits at 0 after the delays
