"""Validation of the virtual optical bench against physics.md, from its tags alone.

Each expected value is computed here from the config numbers with the formula of physics.md (not taken from
the model); each tolerance is 5 standard deviations of the counting statistics of the test itself.
Dead times are set to 0 where a test isolates another effect (optics, efficiencies, jitter), so no dead-time
correction has to be modelled in the expectation; the dead-time tests keep them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.bench.helpers import (PS, Channels, Tap, binomial_sigma, fiber_delay_ps, make_model, matrix, pair_count,
                                 take, within)
from drivers.sim.bench import optics as O
from drivers.sim.bench.optics import BELL_SIGNS

STILL = {"alice": {"drift_rad2_per_s": 0.0}, "bob": {"drift_rad2_per_s": 0.0}}  # identity fibers, no drift
NO_DEAD = {"dead_time_ns": 0.0}
OFFSET = fiber_delay_ps(10.0) - fiber_delay_ps(2.0)  # default arms: Bob's fiber 10 km, Alice's 2 km
SIGMA_C = math.sqrt(20.0**2 + 20.0**2 + 2 * 10.0**2)  # SNSPD 20 ps each side, tagger 10 ps per tag
PAIRS_PER_S_PER_MW = 1e6
PUMP_MW = 0.5 * (30.0 - 20.0)  # default pump: slope 0.5 mW/mA, threshold 20 mA, setpoint 30 mA


def eta(arm: str, eta_det: float = 0.85) -> float:
    km = {"alice": 2.0, "bob": 10.0}[arm]
    return 10 ** (-(2.0 + 0.2 * km) / 10) * eta_det


def bright(**tables):
    """Default bench with 1e6 pairs/s/mW (5e6 pairs/s), still fibers, given overrides."""
    base = {"source": {"brightness": PAIRS_PER_S_PER_MW}, "arms": STILL}
    for key, value in tables.items():
        base[key] = {**base.get(key, {}), **value}
    return make_model(**base)


# -- singles and dead time ---------------------------------------------------------------------------------


def test_singles_are_r_eta_over_4_plus_dark_counts_after_dead_time():
    T = 1.0
    ts, ch = take(bright(), T)
    r = PAIRS_PER_S_PER_MW * PUMP_MW
    tau = 50e-9
    for d in range(8):
        n = r * eta("alice" if d < 4 else "bob") / 4 + 100.0  # physics.md: S = R eta / 4 + DCR
        expected = n / (1 + n * tau)
        counted = np.count_nonzero(ch == d)
        assert within(counted, expected * T, math.sqrt(expected * T)), (d, counted, expected * T)


def test_dead_time_saturates_singles_as_non_paralyzable():
    """At n tau ~ 0.5 the measured rate is n / (1 + n tau), far from n."""
    T = 0.05
    brightness = 2e7
    m = make_model(source={"brightness": brightness}, arms=STILL, tagger={"max_rate_hz": 0.0})
    ts, ch = take(m, T)
    r = brightness * PUMP_MW
    for d in range(8):
        n = r * eta("alice" if d < 4 else "bob") / 4 + 100.0
        expected = n / (1 + n * 50e-9)
        counted = np.count_nonzero(ch == d)
        assert n * 50e-9 > 0.3  # the regime where saturation is large
        assert within(counted, expected * T, math.sqrt(expected * T)), (d, counted, expected * T, n * T)


def test_channel_gaps_respect_the_detector_dead_time():
    ts, ch = take(make_model(source={"brightness": 2e7}, tagger={"max_rate_hz": 0.0}, block_ms=0.2), 0.02)
    tt_clip = 2 * 8 * 10  # the tagger jitter (10 ps rms, clipped at 8 sigma) of two tags
    for d in range(8):
        gaps = np.diff(ts[ch == d])
        assert gaps.min() >= 50_000 - tt_clip


# -- coincidences, accidentals, peak ------------------------------------------------------------------------


def test_true_coincidences_are_r_eta_a_eta_b_times_window_share():
    T, w = 1.0, 100
    c8 = Channels(*take(bright(detectors=NO_DEAD, tagger=NO_DEAD), T))
    peak = matrix(c8, OFFSET, w).sum()
    acc = matrix(c8, OFFSET + 1_000_000, w).sum()  # an offset window 1 us away: accidentals only
    share = math.erf(w / (2 * math.sqrt(2) * SIGMA_C))
    expected = PAIRS_PER_S_PER_MW * PUMP_MW * eta("alice") * eta("bob") * share * T
    assert 0.5 < share < 0.95  # the window cuts the peak: its Gaussian shape is tested too
    assert within(peak - acc, expected, math.sqrt(peak + acc)), (peak - acc, expected)


def test_accidentals_are_si_sj_w():
    """Offset windows (1-3 us away from the peak) hold accidentals only: S_i S_j w for each detector pair."""
    T, w = 1.0, 10_000
    ts, ch = take(bright(detectors=NO_DEAD, tagger=NO_DEAD), T)
    c8 = Channels(ts, ch)
    singles = np.bincount(ch, minlength=8) / T
    counted = np.zeros((4, 4))
    for shift in (1_000_000, -1_000_000, 3_000_000):
        counted += matrix(c8, OFFSET + shift, w)
    expected = 3 * np.outer(singles[:4], singles[4:]) * w / PS * T
    for i in range(4):
        for j in range(4):
            assert within(counted[i, j], expected[i, j], math.sqrt(expected[i, j])), (i, j)
    assert within(counted.sum(), expected.sum(), math.sqrt(expected.sum()))


@pytest.mark.parametrize("preset,sigma_det", [("snspd", 20.0), ("spad", 150.0)])
def test_coincidence_peak_width_and_position(preset, sigma_det):
    """Matched outputs (H-H, V-V, D-D, A-A): the peak is at the fiber delay difference, with the rms width
    sqrt(sigma_A^2 + sigma_B^2 + 2 sigma_tt^2). Pairs with one partner within +-5 sigma_c are kept; the few
    accidentals among them (uniform, measured in an offset window) are part of the expected variance."""
    T = 2.0
    m = make_model(arms=STILL, detectors={"preset": preset, "dead_time_ns": 0.0, "afterpulse_probability": 0.0})
    ts, ch = take(m, T)
    sigma_c = math.sqrt(2 * sigma_det**2 + 2 * 10.0**2)
    half = 5 * sigma_c

    def diffs(offset):
        out = []
        for i in range(4):
            a, b = ts[ch == i], ts[ch == 4 + i]
            lo = np.searchsorted(b, a + int(offset - half))
            hi = np.searchsorted(b, a + int(offset + half))
            has = hi - lo == 1
            out.append(b[lo[has]] - a[has] - offset)
        return np.concatenate(out).astype(float)

    d = diffs(OFFSET)
    n_acc = len(diffs(OFFSET + 1_000_000))
    n = len(d)
    assert n > 20_000
    var = ((n - n_acc) * sigma_c**2 + n_acc * (2 * half) ** 2 / 12) / n
    assert within(d.mean(), 0.0, math.sqrt(var / n) + 1.0), (d.mean(), 0.0)  # +1 ps: delays rounded to ps
    assert within(d.std(), math.sqrt(var), math.sqrt(var / (2 * n))), (d.std(), sigma_c)


# -- polarization: QBER, CHSH, Eve, drift -----------------------------------------------------------------------


def qber_measured(ts, ch, bell: str, basis: int, w: int = 200) -> tuple[float, float, float]:
    """(measured QBER, accidentals, coincidences) in one basis, window w around the peak."""
    c8 = ts if isinstance(ts, Channels) else Channels(ts, ch)
    sign = BELL_SIGNS[bell][basis]
    outs = (2 * basis, 2 * basis + 1)
    c = np.array([[pair_count(c8, i, 4 + j, OFFSET, w) for j in outs] for i in outs], float)
    a = np.array([[pair_count(c8, i, 4 + j, OFFSET + 1_000_000, w) for j in outs] for i in outs], float)
    err = c[0, 1] + c[1, 0] if sign > 0 else c[0, 0] + c[1, 1]
    return err / c.sum(), a.sum(), c.sum()


@pytest.mark.parametrize("bell", ["phi+", "phi-", "psi+", "psi-"])
def test_qber_is_half_one_minus_v_at_ideal_compensation(bell):
    V, T = 0.9, 1.0
    c8 = Channels(*take(bright(source={"visibility": V, "bell_state": bell}, detectors=NO_DEAD, tagger=NO_DEAD), T))
    for basis in (0, 1):
        e, acc, total = qber_measured(c8, None, bell, basis)
        true = total - acc
        expected = (true * (1 - V) / 2 + acc / 2) / total  # physics.md, with the accidentals of that basis
        assert within(e, expected, binomial_sigma(expected, total)), (bell, basis, e, expected)


def test_chsh_is_2_sqrt2_v():
    V, T, w = 0.95, 1.0, 200
    m = bright(source={"visibility": V}, receivers={"mode": "chsh"}, detectors=NO_DEAD, tagger=NO_DEAD)
    c8 = Channels(*take(m, T))
    c = matrix(c8, OFFSET, w)
    a = matrix(c8, OFFSET + 1_000_000, w)
    s_meas, s_exp, var = 0.0, 0.0, 0.0
    for alpha, beta, sign in ((0, 0, 1), (0, 1, -1), (1, 0, 1), (1, 1, 1)):
        blk = c[2 * alpha:2 * alpha + 2, 2 * beta:2 * beta + 2]
        n = blk.sum()
        e = (blk[0, 0] + blk[1, 1] - blk[0, 1] - blk[1, 0]) / n
        acc = a[2 * alpha:2 * alpha + 2, 2 * beta:2 * beta + 2].sum()
        e_true = V * math.cos(2 * math.radians([0, 45][alpha] - [22.5, 67.5][beta]))
        s_meas += sign * e
        s_exp += sign * e_true * (n - acc) / n  # accidentals add to the denominator only
        var += (1 - e * e) / n
    assert abs(s_exp - 2 * math.sqrt(2) * V) < 0.01
    assert within(s_meas, s_exp, math.sqrt(var)), (s_meas, s_exp)


@pytest.mark.parametrize("arm,fraction", [("bob", 0.5), ("alice", 1.0)])
def test_intercept_resend_raises_qber_by_p_v_over_4(arm, fraction):
    V, T = 0.98, 1.0
    c8 = Channels(*take(bright(source={"visibility": V}, eve={"fraction": fraction, "arm": arm},
                               detectors=NO_DEAD, tagger=NO_DEAD), T))
    for basis in (0, 1):
        e, acc, total = qber_measured(c8, None, "phi+", basis)
        true_e = (1 - V) / 2 + fraction * V / 4  # p/4 for V = 1: Eve's wrong basis half the time
        expected = ((total - acc) * true_e + acc / 2) / total
        assert within(e, expected, binomial_sigma(expected, total)), (basis, e, expected)


def test_drift_raises_qber_and_compensation_restores_it():
    V = 0.98
    m = bright(source={"visibility": V}, detectors=NO_DEAD, tagger=NO_DEAD,
               arms={"alice": {"drift_rad2_per_s": 3.0}, "bob": {"drift_rad2_per_s": 3.0}})
    tap = Tap(m)
    tap.take(1.0)  # 1 s of drift: theta^2 ~ 6 rad^2 per arm, far from the aligned state
    for arm in ("alice", "bob"):
        m.set_drift_rate(arm, 0.0)
    # drifted: the QBER is what the drifted unitaries predict, far above (1 - V)/2
    predicted = m.expected_rates()["qber"]
    c8 = Channels(*tap.take(0.5))
    raised = False
    for basis in (0, 1):
        e, acc, total = qber_measured(c8, None, "phi+", basis)
        expected = ((total - acc) * predicted[basis] + acc / 2) / total
        assert within(e, expected, binomial_sigma(expected, total)), (basis, e, expected)
        raised |= e > (1 - V) / 2 + 10 * binomial_sigma((1 - V) / 2, total)
    assert raised
    # compensate both arms with the paddles
    for arm in ("alice", "bob"):
        angles = m.compensating_paddles(arm)
        assert all(0.0 <= a <= 170.0 for a in angles)
        for paddle, deg in enumerate(angles):
            m.state.set_paddle(arm, paddle, deg)
        u = m.arm_unitary(arm)
        assert abs(abs(np.trace(u)) / 2 - 1) < 1e-9  # an exact in-range solution exists for this seed
    # a state change acts on blocks generated after it: the stream already holds the next block
    tap.take(2 * m.block_ps / PS)
    c8 = Channels(*tap.take(0.5))
    for basis in (0, 1):
        e, acc, total = qber_measured(c8, None, "phi+", basis)
        expected = ((total - acc) * (1 - V) / 2 + acc / 2) / total
        assert within(e, expected, binomial_sigma(expected, total)), (basis, e, expected)


def test_qber_follows_the_drifting_fiber_unitaries():
    """With the fibers drifting, each 50 ms slice shows the QBER its blocks' fiber unitaries predict."""
    V = 0.98
    m = bright(source={"visibility": V}, detectors=NO_DEAD, tagger=NO_DEAD,
               arms={"alice": {"drift_rad2_per_s": 1.0}, "bob": {"drift_rad2_per_s": 1.0}})
    tap = Tap(m)
    predictions = []
    for _ in range(6):
        ts, ch = tap.take(0.05)
        blocks = range((tap.t - int(0.05 * PS)) // m.block_ps, tap.t // m.block_ps)
        per_block = []
        for k in blocks:  # each block's coincidences per basis are the same share of its pairs: plain mean
            t = k * m.block_ps + m.block_ps // 2
            ua = O.controller_unitary(m.state.paddles("alice")) @ m.fiber_unitary("alice", t)
            ub = O.controller_unitary(m.state.paddles("bob")) @ m.fiber_unitary("bob", t)
            per_block.append(O.qber(O.joint_probabilities(O.werner_state("phi+", V), ua, ub, (0, 45), (0, 45)), 0,
                                    "phi+"))
        e_pred = float(np.mean(per_block))
        e, acc, total = qber_measured(ts, ch, "phi+", 0)
        expected = ((total - acc) * e_pred + acc / 2) / total
        assert within(e, expected, binomial_sigma(expected, total)), (e, expected)
        predictions.append(e_pred)
    assert max(predictions) - min(predictions) > 0.05  # the drift did move the QBER


# -- the pump and the detectors' state ---------------------------------------------------------------------


@pytest.mark.parametrize("change", [{"current_setpoint_ma": 15.0}, {"output_on": False}])
def test_no_pump_power_gives_dark_counts_only(change):
    T = 2.0
    m = make_model(arms=STILL)
    m.state.update_laser(**change)
    ts, ch = take(m, T)
    for d in range(8):
        assert within(np.count_nonzero(ch == d), 100.0 * T, math.sqrt(100.0 * T))
    c8 = Channels(ts, ch)
    # no pairs: coincidences only at the accidental rate (100 Hz x 100 Hz x 1 ns x 16 pairs x 2 s = 3e-4)
    assert matrix(c8, OFFSET, 1000).sum() == 0


def test_latched_or_disabled_detector_gives_no_clicks_at_all():
    T = 0.5
    m = make_model()
    m.state.update_detector(1, bias_ua=25.0)  # above the 20 uA critical bias: latches
    m.state.update_detector(6, enabled=False)
    assert m.state.detector(1).latched and not m.state.detector(6).enabled
    tap = Tap(m)
    ts, ch = tap.take(T)
    counts = np.bincount(ch, minlength=8)
    assert counts[1] == 0 and counts[6] == 0
    assert all(counts[d] > 1000 for d in (0, 2, 3, 4, 5, 7))
    assert m.state.rates_hz[1] == 0.0 and m.state.rates_hz[6] == 0.0
    # releasing the latch (bias to 0, then nominal) and re-enabling restore the clicks
    m.state.update_detector(1, bias_ua=0.0)
    m.state.update_detector(1, bias_ua=15.0)
    m.state.update_detector(6, enabled=True)
    ts, ch = tap.take(T)
    counts = np.bincount(ch, minlength=8)
    assert counts[1] > 1000 and counts[6] > 1000


def test_a_closed_detector_still_absorbs_its_photons():
    """Disabling Alice's H detector removes its clicks, not the photons: V, D and A keep their rates."""
    T = 1.0
    m = bright(detectors=NO_DEAD, tagger=NO_DEAD)
    m.state.update_detector(0, enabled=False)
    ts, ch = take(m, T)
    n = PAIRS_PER_S_PER_MW * PUMP_MW * eta("alice") / 4 + 100.0
    for d in (1, 2, 3):
        assert within(np.count_nonzero(ch == d), n * T, math.sqrt(n * T))


def test_afterpulsing_adds_p_over_1_minus_p_clicks_after_an_exponential_delay():
    T, p, tau = 1.0, 0.05, 100e-9
    m = make_model(arms=STILL, detectors={"preset": "spad", "afterpulse_probability": p, "dead_time_ns": 0.0,
                                          "afterpulse_time_ns": tau * 1e9}, tagger=NO_DEAD)
    ts, ch = take(m, T)
    r = 1e5 * PUMP_MW
    for d in range(8):
        n = r * eta("alice" if d < 4 else "bob", 0.5) / 4 + 300.0
        expected = n / (1 - p)  # each click afterpulses with probability p, and so may the afterpulse
        counted = np.count_nonzero(ch == d)
        assert within(counted, expected * T, math.sqrt(expected * T)), (d, counted, expected * T)
        # the gap after a click ends at its afterpulse (probability p, delay Exp(tau)) or at the next primary
        # event (Poisson, rate n): P(gap < x) = 1 - (1 - p (1 - exp(-x / tau))) exp(-n x)
        gaps = np.diff(ts[ch == d])
        for x in (100e-9, 1e-6):
            prob = 1 - (1 - p * (1 - math.exp(-x / tau))) * math.exp(-n * x)
            short = np.count_nonzero(gaps < x * PS)
            assert within(short, prob * len(gaps), math.sqrt(len(gaps) * prob * (1 - prob))), (d, x, short)
