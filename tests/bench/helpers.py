"""Helpers for the virtual optical bench tests: build a model from [simulation] tables, pull tags, count
coincidences (a small searchsorted counter of our own: the production coincidence engine is tested elsewhere).

Tolerances are computed from counting statistics in each test (5 standard deviations), never tuned."""

from __future__ import annotations

import math

import numpy as np

from drivers.sim.bench.config import validate
from drivers.sim.bench.model import BenchModel
from drivers.sim.tagstream import BlockStream

PS = 1_000_000_000_000  # ps per second
C = 299_792_458.0


def make_model(**tables) -> BenchModel:
    cfg, errors = validate(tables)
    assert not errors, errors
    return BenchModel(cfg)


class Tap:
    """Reads a model's tags interval after interval through a BlockStream (speed-independent direct access)."""

    def __init__(self, model: BenchModel) -> None:
        self.stream = BlockStream(model)
        self.t = 0

    def take(self, seconds: float) -> tuple[np.ndarray, np.ndarray]:
        self.t += int(round(seconds * PS))
        ts, ch, overflow, _ = self.stream.take(self.t)
        assert not overflow
        return ts, ch


def take(model: BenchModel, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """All tags of the first ``seconds`` of simulated time."""
    return Tap(model).take(seconds)


def fiber_delay_ps(km: float, group_index: float = 1.468) -> float:
    """L / (c / n_g) in ps, computed here independently of the model."""
    return km * 1e3 * group_index / C * 1e12


class Channels:
    """Tags split by channel once (the tests count many channel pairs on the same data)."""

    def __init__(self, ts: np.ndarray, ch: np.ndarray, n: int = 8) -> None:
        order = np.argsort(ch, kind="stable")
        bounds = np.searchsorted(ch[order], np.arange(n + 1))
        self.by = [ts[order[bounds[c]:bounds[c + 1]]] for c in range(n)]

    def __getitem__(self, c: int) -> np.ndarray:
        return self.by[c]


def pair_count(chans: Channels, i: int, j: int, offset: float, window: int) -> int:
    """Number of (a, b) with a on channel i, b on channel j and b - a in [offset - w/2, offset + w/2)."""
    a, b = chans[i], chans[j]
    start = int(round(offset - window / 2))
    lo = np.searchsorted(b, a + start, "left")
    hi = np.searchsorted(b, a + start + window, "left")
    return int((hi - lo).sum())


def matrix(chans: Channels, offset: float, window: int) -> np.ndarray:
    """4 x 4 coincidence counts, Alice's outputs 0-3 (channels 0-3) x Bob's (channels 4-7)."""
    return np.array([[pair_count(chans, i, 4 + j, offset, window) for j in range(4)] for i in range(4)], float)


def within(measured: float, expected: float, sigma: float, n_sigma: float = 5.0) -> bool:
    return abs(measured - expected) <= n_sigma * sigma


def binomial_sigma(p: float, n: float) -> float:
    return math.sqrt(max(p * (1 - p), 1e-300) / n)
