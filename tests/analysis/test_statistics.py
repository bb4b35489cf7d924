"""Link statistics on synthetic data with a known QBER, visibility, CHSH S and CAR."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daemon.analysis.pipeline import AnalysisPipeline, validate
from daemon.analysis.statistics import BELL_STATES, chsh, ideal_correlation, link_statistics
from drivers.base import TagBatch

# channel layout: Alice H V D A = 0..3, Bob H V D A = 4..7


def counts_for(state: str, n_per_basis: int, errors_z: int, errors_x: int) -> np.ndarray:
    """A 4x4 matrix with exactly the given errors in Z and X and uniform off-basis counts."""
    m = np.zeros((4, 4), np.int64)
    for k, err in ((0, errors_z), (1, errors_x)):
        e = ideal_correlation(state, 45.0 * k, 45.0 * k)
        good = n_per_basis - err
        blk = np.array([[good // 2, err - err // 2], [err // 2, good - good // 2]]) if e > 0 else \
            np.array([[err // 2, good // 2], [good - good // 2, err - err // 2]])
        m[2 * k:2 * k + 2, 2 * k:2 * k + 2] = blk
    m[0:2, 2:4] = n_per_basis // 4
    m[2:4, 0:2] = n_per_basis // 4
    return m


@pytest.mark.parametrize("state", BELL_STATES)
def test_known_qber(state):
    m = counts_for(state, 10_000, 300, 750)
    acc = np.full((4, 4), 10, np.int64)
    s = link_statistics(m, acc, bell_state=state, interval_s=2.0)
    assert s["qber"]["Z"] == pytest.approx(0.03, abs=1e-15)
    assert s["qber"]["X"] == pytest.approx(0.075, abs=1e-15)
    assert s["visibility"]["Z"] == pytest.approx(0.94)
    assert s["qber_error"]["Z"] == pytest.approx(math.sqrt(0.03 * 0.97 / 10_000))
    assert s["sifted"] == {"Z": 10_000, "X": 10_000}
    assert s["chsh"] is None and "do not allow" in s["chsh_reason"]
    assert s["s_equivalent"] == pytest.approx(math.sqrt(2) * (0.94 + 0.85))
    C, A = int(m.sum()), 160
    assert s["car"] == pytest.approx((C - A) / A)
    assert s["coincidence_rate_hz"] == pytest.approx(C / 2.0)
    # accidental-subtracted QBER: errors and correct counts each lose their accidentals (10 per cell)
    assert s["qber_corrected"]["Z"] == pytest.approx((300 - 20) / (10_000 - 40))


def test_chsh_with_rotated_bob():
    """Bob at 22.5/67.5 deg: the ideal S is 2√2 and a state of visibility V gives S = 2√2 V."""
    V = 0.9
    N = 10**7
    a_ang, b_ang = (0.0, 45.0), (22.5, 67.5)
    m = np.zeros((4, 4))
    for i in range(2):
        for j in range(2):
            E = V * ideal_correlation("phi+", a_ang[i], b_ang[j])
            for x, sx in enumerate((1, -1)):
                for y, sy in enumerate((1, -1)):
                    m[2 * i + x, 2 * j + y] = N * (1 + sx * sy * E) / 4
    s = link_statistics(np.round(m).astype(np.int64), None, bell_state="phi+", alice_angles_deg=a_ang,
                        bob_angles_deg=b_ang)
    assert s["chsh_ideal"] == pytest.approx(2 * math.sqrt(2))
    assert s["chsh"] == pytest.approx(2 * math.sqrt(2) * V, abs=1e-5)
    assert s["qber"]["Z"] is None  # not a key basis at these angles
    assert s["car"] is None


def test_chsh_sign_pattern_for_every_state():
    for state in BELL_STATES:
        ideal = [[ideal_correlation(state, a, b) for b in (22.5, 67.5)] for a in (0.0, 45.0)]
        s, s_ideal, reason = chsh(ideal, ideal)
        assert reason is None and s == pytest.approx(2 * math.sqrt(2)) and s_ideal == pytest.approx(s)


def test_no_counts_gives_nulls():
    s = link_statistics(np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64))
    assert s["qber"] == {"Z": None, "X": None} and s["car"] is None and s["s_equivalent"] is None


def synthetic_bbm92(state: str, n_pairs: int, error_every: int, seed: int = 0):
    """Pairs 1 us apart (no accidental overlaps), random bases; in matching bases every ``error_every``-th pair
    has the wrong correlation. Returns the stream and the exact error counts per basis."""
    rng = np.random.default_rng(seed)
    ts, ch = [], []
    errs = {"Z": 0, "X": 0}
    tot = {"Z": 0, "X": 0}
    k_match = 0
    for i in range(n_pairs):
        t = 1_000_000 * (i + 1)
        ba, bb = rng.integers(0, 2), rng.integers(0, 2)
        xa = rng.integers(0, 2)
        if ba == bb:
            e = ideal_correlation(state, 45.0 * ba, 45.0 * bb)
            xb = xa if e > 0 else 1 - xa
            k_match += 1
            name = "ZX"[ba]
            tot[name] += 1
            if k_match % error_every == 0:
                xb = 1 - xb
                errs[name] += 1
        else:
            xb = rng.integers(0, 2)
        ts += [t, t + 30]
        ch += [2 * ba + xa, 4 + 2 * bb + xb]
    return np.array(ts, np.int64), np.array(ch, np.uint8), errs, tot


@pytest.mark.parametrize("state", ["phi+", "psi-"])
def test_pipeline_qber_on_synthetic_stream(state):
    ts, ch, errs, tot = synthetic_bbm92(state, 20_000, 25)
    cfg, e = validate({"window_ps": 200, "integration_s": 1.0, "accidental_offset_ps": 500_000,
                       "links": [{"name": "ab", "bell_state": state}]})
    assert not e
    p = AnalysisPipeline(cfg)
    msgs = p.feed(TagBatch(ts, ch, 0, 10**12 + 10**6))
    (q,) = [m for m in msgs if m[0] == "qkd.ab"]
    f = q[1]
    assert f["sifted"] == tot
    assert f["qber"]["Z"] == errs["Z"] / tot["Z"]
    assert f["qber"]["X"] == errs["X"] / tot["X"]
    assert abs(f["qber"]["Z"] - 0.04) < 0.005
    assert f["accidentals"] == 0 and f["car"] is None
    assert f["coincidences"] == 20_000
