"""Helpers shared by the time-tagger driver tests (test_qutag, test_swabian): a known pair source, reading
batches, and comparing tag streams."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np

from drivers.base import TagBatch, TimeTagger
from drivers.sim.tagstream import BlockStream, PoissonPairSource

REPO = Path(__file__).resolve().parents[2]


def pair_source(seed: int, *, singles: float = 50_000.0, pairs: float = 100_000.0, jitter: float = 40.0,
                pair_channels=((0, 2), (1, 3)), channels: int = 4) -> PoissonPairSource:
    return PoissonPairSource(channel_count=channels, singles_hz=[singles] * channels, pair_rate_hz=pairs,
                             pair_channels=[list(p) for p in pair_channels], jitter_ps=jitter,
                             delays_ps=[0] * channels, resolution_ps=1, seed=seed)


def source_tags(src: PoissonPairSource, until_ps: int) -> tuple[np.ndarray, np.ndarray]:
    """Tags a source produces in [0, until): (ps, 0-based source channel)."""
    ts, ch, _, _ = BlockStream(src).take(until_ps)
    return ts, ch


def read_n(d: TimeTagger, n: int) -> list[TagBatch]:
    out = []
    for _ in range(n):
        b = d.read(1.0)
        assert isinstance(b, TagBatch)
        b.check_order()
        out.append(b)
    return out


def joined(batches: list[TagBatch]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([b.timestamps for b in batches]), np.concatenate([b.channels for b in batches])


def canonical(ts: np.ndarray, ch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ch, ts))  # ties at the same ps may come in either channel order
    return ts[order], ch[order]


def assert_contiguous(batches: list[TagBatch]) -> None:
    for a, b in itertools.pairwise(batches):
        assert b.t_begin == a.t_end


def toml_blocks(doc: str) -> list[str]:
    """The ```toml blocks of a document in the repository."""
    return re.findall(r"```toml\n(.*?)```", (REPO / doc).read_text(), flags=re.DOTALL)
