"""Delay calibration finds injected delays (offline and on a live stream through the pipeline)."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.analysis.calibration import (CalibrationRun, CalibrationSettings, analyse_histogram, find_delay,
                                         propagate_delays)
from daemon.analysis.pipeline import AnalysisPipeline, validate
from drivers.base import TagBatch


def stream(delays: dict[int, int], pairs, n_pairs=20_000, bg=100_000, jitter=40.0, T=10**11, seed=0):
    """Pairs on (a, b) channel couples: b lags a by delays[b] - delays[a] (raw), plus uniform background."""
    rng = np.random.default_rng(seed)
    ts, ch = [], []
    for a, b in pairs:
        t = rng.integers(0, T, n_pairs)
        ts += [t + delays.get(a, 0) + rng.normal(0, jitter, n_pairs).astype(np.int64),
               t + delays.get(b, 0) + rng.normal(0, jitter, n_pairs).astype(np.int64)]
        ch += [np.full(n_pairs, a, np.uint8), np.full(n_pairs, b, np.uint8)]
    for c in {c for p in pairs for c in p}:
        ts.append(rng.integers(0, T, bg))
        ch.append(np.full(bg, c, np.uint8))
    ts = np.concatenate(ts)
    ch = np.concatenate(ch)
    o = np.argsort(ts, kind="stable")
    ts, ch = ts[o], ch[o]
    keep = ts >= 0
    return ts[keep], ch[keep]


@pytest.mark.parametrize("seed", range(4))
def test_find_delay_offline(seed):
    rng = np.random.default_rng(100 + seed)
    d = int(rng.integers(-60_000, 60_000))
    jitter = float(rng.uniform(20, 80))
    ts, ch = stream({1: d}, [(0, 1)], jitter=jitter, seed=seed)
    r = find_delay(ts[ch == 0], ts[ch == 1])
    assert r["found"]
    assert abs(r["offset_ps"] - d) <= 3
    assert r["peak_width_ps"] == pytest.approx(2.355 * jitter * np.sqrt(2), rel=0.25)
    assert r["signal_to_background"] > 10
    assert r["sigma_ps"] == pytest.approx(jitter * np.sqrt(2), rel=0.25)


def test_no_peak_is_reported_not_invented():
    rng = np.random.default_rng(1)
    a = np.sort(rng.integers(0, 10**10, 50_000))
    b = np.sort(rng.integers(0, 10**10, 50_000))
    r = find_delay(a, b)
    assert not r["found"] and "reason" in r
    assert not analyse_histogram(np.zeros(20_000, np.int64), -100_000, CalibrationSettings())["found"]


def test_settings_checked():
    assert CalibrationSettings(coarse_bin_ps=1000, fine_bin_ps=300).check()
    with pytest.raises(ValueError):
        find_delay(np.zeros(1, np.int64), np.zeros(1, np.int64), CalibrationSettings(fine_bin_ps=0))


def test_propagate_delays_chains_and_refuses_cycles():
    assert propagate_delays([(0, 1), (1, 2)], {(0, 1): 100, (1, 2): -50}, {1: 10, 2: 20}) == {1: -90, 2: -30}
    assert propagate_delays([(0, 1)], {}, {1: 10}) == {1: 10}  # not found: unchanged
    with pytest.raises(ValueError, match="cycle"):
        propagate_delays([(0, 1), (1, 0)], {}, {})
    with pytest.raises(ValueError, match="twice"):
        propagate_delays([(0, 2), (1, 2)], {}, {})


def test_live_calibration_through_the_pipeline():
    true = {4: 7300, 5: -2100, 6: 15_000, 7: 400}
    pairs = [(0, 4), (1, 5), (2, 6), (3, 7)]
    ts, ch = stream(true, pairs, n_pairs=5000, bg=20_000, T=2 * 10**10)
    cfg, err = validate({"delays_ps": [0, 0, 0, 0, 1000, 0, 0, 0]})
    assert not err
    p = AnalysisPipeline(cfg)
    progress = []
    run = p.start_calibration(pairs, 0.015, CalibrationSettings(), progress.append)
    bounds = np.linspace(0, 2 * 10**10, 41).astype(np.int64)
    for x, y in zip(bounds[:-1], bounds[1:]):
        lo, hi = np.searchsorted(ts, [x, y])
        p.feed(TagBatch(ts[lo:hi], ch[lo:hi], int(x), int(y)))
    assert run.done and run.result["all_found"]
    for r in run.result["pairs"]:
        a, b = r["pair"]
        assert abs(r["delay_ps"] - (-true[b])) <= 5, r  # the new delay cancels the injected lag
    assert progress[-1]["phase"] == "done"
    assert any(0 < x["fraction"] < 1 for x in progress if x["phase"] == "collecting")
    with pytest.raises(ValueError):
        CalibrationRun([(1, 1)], {}, 10)
