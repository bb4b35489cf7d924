"""BenchModel as a BlockSource: determinism, ordering, the lead bound, overflow, the fibers, memory."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.sim.bench import optics as O
from drivers.sim.tagstream import BlockStream
from tests.bench.helpers import PS, Tap, make_model, take

# a small, busy, awkward bench: 50 us blocks, SPAD afterpulsing, coarse resolution, input delays
BUSY = dict(block_ms=0.05, source={"brightness": 5e6}, detectors={"preset": "spad", "afterpulse_probability": 0.2},
            tagger={"resolution_ps": 7, "input_delays_ps": [0, 3000, 0, 100_000, 5, 0, 0, 250_000], "max_rate_hz": 0.0},
            arms={"alice": {"drift_rad2_per_s": 50.0}})
BUSY_T = 2 * 10**9  # 2 ms: 40 blocks


def read(model, cuts: list[int], t_end: int) -> tuple[np.ndarray, np.ndarray]:
    stream = BlockStream(model)
    ts, ch = [], []
    for t in [*cuts, t_end]:
        a, b, overflow, _ = stream.take(t)
        ts.append(a)
        ch.append(b)
    return np.concatenate(ts), np.concatenate(ch)


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(0, BUSY_T), max_size=12).map(sorted))
def test_same_seed_same_tags_whatever_the_chunking(cuts):
    ref_t, ref_c = read(make_model(**BUSY), [], BUSY_T)
    ts, ch = read(make_model(**BUSY), cuts, BUSY_T)
    np.testing.assert_array_equal(ts, ref_t)
    np.testing.assert_array_equal(ch, ref_c)
    assert len(ts) > 10_000


def test_a_different_seed_gives_different_tags():
    a = take(make_model(seed=1), 0.01)[0]
    b = take(make_model(seed=2), 0.01)[0]
    assert len(a) > 1000 and not (len(a) == len(b) and np.array_equal(a, b))


def test_blocks_are_sorted_and_within_the_lead_bound():
    m = make_model(**BUSY)
    for k in range(40):
        ts, ch, dropped = m.block(k)
        assert ts.dtype == np.int64 and ch.dtype == np.uint8 and dropped == 0
        assert np.all(np.diff(ts) >= 0)
        assert len(ts) == 0 or ts[0] >= k * m.block_ps - m.lead_ps
        assert np.all(ts % 7 == 0) and ch.max(initial=0) < 8


def test_carried_events_are_bounded():
    """Memory does not grow with the run: what a block carries is a few events per detector."""
    m = make_model(**BUSY)
    for k in range(200):
        m.block(k)
        assert len(m._det_carry_t) < 200 and len(m._tag_carry_t) < 200
    assert len(m._history) <= m.HISTORY_BLOCKS


def test_max_rate_overflow_drops_tags_and_reports_them():
    """Beyond max_rate_hz x block a block keeps its earliest tags; the rest are reported dropped."""
    capped = make_model(tagger={"max_rate_hz": 1e5})
    free = make_model(tagger={"max_rate_hz": 0.0})
    allowed = int(1e5 * capped.block_ps / PS)
    for k in range(10):
        ts, ch, dropped = capped.block(k)
        ref, ref_ch, none = free.block(k)
        assert none == 0 and len(ref) > allowed
        assert dropped == len(ref) - allowed
        np.testing.assert_array_equal(ts, ref[:allowed])
        np.testing.assert_array_equal(ch, ref_ch[:allowed])
    stream = BlockStream(make_model(tagger={"max_rate_hz": 1e5}))
    ts, ch, overflow, dropped = stream.take(PS // 10)
    assert overflow and dropped > 0 and len(ts) <= 11 * allowed


def test_restarting_a_stream_repeats_the_tags_of_the_fresh_bench():
    m = make_model(arms={"alice": {"drift_rad2_per_s": 0.0}, "bob": {"drift_rad2_per_s": 0.0}})
    first = take(m, 0.05)
    again = take(m, 0.05)  # a new BlockStream from 0 (the tagger reconnected)
    np.testing.assert_array_equal(first[0], again[0])


def test_a_stream_skipping_ahead_drifts_the_fibers_for_the_gap():
    m = make_model(arms={"alice": {"drift_rad2_per_s": 1.0}})
    stream = BlockStream(m)
    stream.take(PS // 100)
    u0 = m.fiber_unitary("alice")
    stream.skip_to(5 * PS)
    ts, ch, _, _ = stream.take(5 * PS + PS // 100)
    assert len(ts) > 1000 and ts[0] >= 5 * PS
    assert 1 - O.fidelity(u0.conj().T @ m.fiber_unitary("alice")) > 1e-3


def test_fiber_unitary_history_and_prediction():
    m = make_model(arms={"alice": {"drift_rad2_per_s": 2.0}, "bob": {"drift_rad2_per_s": 0.0}})
    B = m.block_ps
    ahead = m.fiber_unitary("alice", 30 * B + 5)  # predicted before any block
    Tap(m).take(0.5)
    np.testing.assert_allclose(m.fiber_unitary("alice", 30 * B + 5), ahead, atol=1e-12)
    np.testing.assert_allclose(m.fiber_unitary("bob"), np.eye(2), atol=1e-12)
    u = m.fiber_unitary("alice")
    np.testing.assert_allclose(u @ u.conj().T, np.eye(2), atol=1e-12)
    with pytest.raises(ValueError):
        m.fiber_unitary("carol")


def test_random_initial_unitary_is_seeded():
    a = make_model(arms={"bob": {"initial_unitary": "random"}})
    b = make_model(arms={"bob": {"initial_unitary": "random"}})
    c = make_model(seed=9, arms={"bob": {"initial_unitary": "random"}})
    np.testing.assert_array_equal(a.fiber_unitary("bob"), b.fiber_unitary("bob"))
    assert not np.allclose(a.fiber_unitary("bob"), c.fiber_unitary("bob"))
    assert O.fidelity(a.fiber_unitary("bob")) < 0.999
    # the expected QBER is then what the compensating paddles remove
    before = max(a.expected_rates()["qber"])
    for p, deg in enumerate(a.compensating_paddles("bob")):
        a.state.set_paddle("bob", p, deg)
    after = a.expected_rates()["qber"]
    assert before > 0.02 and max(after) < (1 - 0.98) / 2 + 1e-3


def test_set_drift_rate_and_input_delay_validate():
    m = make_model()
    m.set_drift_rate("bob", 0.5)
    assert m.drift_rate("bob") == 0.5
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            m.set_drift_rate("bob", bad)
    with pytest.raises(ValueError):
        m.set_input_delay(8, 0)
    with pytest.raises(ValueError):
        m.set_input_delay(0, -1)
    m.set_input_delay(3, 12_345)
    assert m.input_delays_ps[3] == 12_345


def test_input_delay_shifts_its_channel():
    """The same clicks, the same jitter draws: channel 5's tags exactly 1 us later, the others unchanged."""
    base = take(make_model(), 0.02)
    m = make_model()
    m.set_input_delay(5, 1_000_000)
    moved = take(m, 0.02)
    a, b = base[0][base[1] == 5], moved[0][moved[1] == 5]
    a = a[a < int(0.02 * PS) - 1_000_000]
    assert len(a) > 500
    np.testing.assert_array_equal(b[:len(a)], a + 1_000_000)
    np.testing.assert_array_equal(base[0][base[1] == 4], moved[0][moved[1] == 4])


def test_state_is_built_from_the_config():
    m = make_model(pump={"current_ma": 42.0}, eve={"fraction": 0.25, "arm": "alice"},
                   receivers={"mode": "chsh"})
    s = m.state.snapshot()
    assert s.laser.current_setpoint_ma == 42.0 and s.laser.output_on and s.laser.threshold_ma == 20.0
    assert s.eve_fraction == 0.25 and s.eve_arm == "alice"
    assert s.analyser_angles_deg["bob"] == (22.5, 67.5)
    assert all(d.critical_bias_ua == 20.0 and d.bias_ua == 15.0 and d.counting for d in s.detectors)
    assert m.channel_count == 8 and m.resolution_ps == 1


def test_expected_rates_follow_physics_md():
    ex = make_model().expected_rates(window_ps=500)
    eta_a = 10 ** (-(2 + 0.4) / 10) * 0.85
    eta_b = 10 ** (-(2 + 2.0) / 10) * 0.85
    r = 1e5 * 5.0
    assert ex["pair_rate_hz"] == pytest.approx(r)
    assert ex["singles_hz"][0] == pytest.approx(r * eta_a / 4 + 100)
    assert ex["singles_hz"][7] == pytest.approx(r * eta_b / 4 + 100)
    n = ex["singles_hz"][0]
    assert ex["singles_measured_hz"][0] == pytest.approx(n / (1 + n * 50e-9))
    assert sum(map(sum, ex["coincidences_hz"])) == pytest.approx(r * eta_a * eta_b, rel=1e-2)  # live time ~0.3%
    share = ex["window_share"][0][0]
    assert share == pytest.approx(__import__("math").erf(500 / (2 * 2**0.5 * (2 * 20**2 + 2 * 10**2) ** 0.5)))
    assert ex["qber"] == pytest.approx([0.01, 0.01])
    assert ex["chsh"] == pytest.approx(2 * 0.98)  # bbm92 angles: E(Z,Z) = E(X,X) = V, E(Z,X) = 0
    assert ex["accidentals_hz"][0][0] == pytest.approx(ex["singles_measured_hz"][0] * ex["singles_measured_hz"][4] * 500e-12)


def test_rates_written_to_the_state():
    m = make_model()
    Tap(m).take(0.2)
    ex = m.expected_rates()["singles_measured_hz"]
    for d in range(8):
        # the last 100 ms: Poisson, 5 sigma
        assert abs(m.state.rates_hz[d] - ex[d]) < 5 * (ex[d] / 0.1) ** 0.5
