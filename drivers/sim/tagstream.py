"""Deterministic, chunk-independent tag streams for simulated taggers.

A simulation generates events block by block: block ``k`` covers emission times ``[k*B, (k+1)*B)`` and is
generated from its own random stream (seed, k), so the tags do not depend on how a reader slices time.
Delays and jitter move tags out of their block, by at most ``lead_ps`` *before* its start, so
:class:`BlockStream` keeps a small pending buffer and hands out tags only up to a time that no block not yet
generated can reach back before.

A tag source (the placeholder :class:`PoissonPairSource` here, the physical bench in drivers/sim/bench)
only implements ``block(k) -> (timestamps int64 ps, channels uint8)``, or ``(timestamps, channels, dropped)``
where ``dropped > 0`` says the simulated tagger dropped that many tags in block k (its overflow).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["BlockSource", "BlockStream", "PoissonPairSource", "block_rng"]


class BlockSource(Protocol):
    block_ps: int
    lead_ps: int  # how far before its block's start a tag of the block may land (>= 0)

    def block(self, k: int) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, int]: ...


def block_rng(seed: int, k: int) -> np.random.Generator:
    """The random stream of block k: independent of every other block and of the read pattern."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, k])))


class BlockStream:
    """Turns a BlockSource into a sorted tag stream readable over any sequence of intervals."""

    def __init__(self, source: BlockSource) -> None:
        self.source = source
        self._next_block = 0
        self._ts = np.empty(0, np.int64)
        self._ch = np.empty(0, np.uint8)
        self._emitted_until = 0
        self._overflows: list[tuple[int, int, int]] = []  # (block start, block end, dropped) not yet reported

    def skip_to(self, t: int) -> None:
        """Jump forward to t without generating the blocks in between (a stream restarted after a pause).

        Tags of skipped blocks that would have landed after t are lost; determinism holds from t on for a
        stream that then keeps reading.
        """
        if t <= self._emitted_until:
            return
        self._next_block = max(self._next_block, t // self.source.block_ps)
        cut = int(np.searchsorted(self._ts, t, side="left"))
        self._ts, self._ch = self._ts[cut:], self._ch[cut:]
        self._emitted_until = t

    def take(self, t_end: int) -> tuple[np.ndarray, np.ndarray, bool, int]:
        """All tags in [previous t_end, t_end), sorted by time, with the overflow state of that range.

        Returns ``(timestamps, channels, overflow, dropped)``: ``overflow`` if a block with dropped tags
        overlaps the range; ``dropped`` counts each such block's drops once, in the first range it overlaps.
        """
        if t_end < self._emitted_until:
            raise ValueError("BlockStream.take: time went backwards")
        B = self.source.block_ps
        # every block whose tags may land before t_end: block start - lead < t_end
        need = [self._ts], [self._ch]
        while self._next_block * B - self.source.lead_ps < t_end:
            ts, ch, *rest = self.source.block(self._next_block)
            if rest and rest[0]:
                self._overflows.append((self._next_block * B, (self._next_block + 1) * B, int(rest[0])))
            need[0].append(ts)
            need[1].append(ch)
            self._next_block += 1
        if len(need[0]) > 1:
            ts = np.concatenate(need[0])
            ch = np.concatenate(need[1])
            order = np.argsort(ts, kind="stable")
            self._ts, self._ch = ts[order], ch[order]
        # blocks not yet generated only hold tags >= their start - lead >= t_end: below t_end is final.
        lo = int(np.searchsorted(self._ts, self._emitted_until, side="left"))  # > 0 only after skip_to
        cut = int(np.searchsorted(self._ts, t_end, side="left"))
        out_ts, out_ch = self._ts[lo:cut], self._ch[lo:cut]
        self._ts, self._ch = self._ts[cut:], self._ch[cut:]
        begin, self._emitted_until = self._emitted_until, t_end
        overflow, dropped, keep = False, 0, []
        for start, end, n in self._overflows:
            overlaps = start < t_end and end > begin
            if overlaps:
                overflow = True
                dropped += n
            if end > t_end:
                keep.append((start, end, 0 if overlaps else n))  # each block's drops are reported once
        self._overflows = keep
        return out_ts, out_ch, overflow, dropped


class PoissonPairSource:
    """Seeded Poisson background on every channel plus correlated pairs with Gaussian jitter.

    A stand-in for the physical bench: pairs at ``pair_rate_hz`` are assigned uniformly to one of
    ``pair_channels`` (each ``[a, b]``), both tags born at the same instant, then each channel adds its fixed
    delay and Gaussian jitter (sigma ``jitter_ps``) and the time is floored to ``resolution_ps``.
    """

    def __init__(
        self,
        *,
        channel_count: int,
        singles_hz: list[float],
        pair_rate_hz: float,
        pair_channels: list[list[int]],
        jitter_ps: float,
        delays_ps: list[int],
        resolution_ps: int,
        seed: int,
        block_ps: int = 10_000_000_000,
        max_rate_hz: float = 0.0,
    ) -> None:
        self.channel_count = channel_count
        self.singles_hz = np.asarray(singles_hz, float)
        self.pair_rate_hz = float(pair_rate_hz)
        self.pair_channels = np.asarray(pair_channels, np.uint8).reshape(-1, 2)
        self.jitter_ps = float(jitter_ps)
        self.delays_ps = np.asarray(delays_ps, np.int64)
        self.resolution_ps = int(resolution_ps)
        self.seed = int(seed)
        self.block_ps = int(block_ps)
        self.max_rate_hz = float(max_rate_hz)
        self._clip = 8.0 * self.jitter_ps  # jitter is clipped at 8 sigma so max_shift is a hard bound
        if len(self.delays_ps) and self.delays_ps.min() < 0:
            raise ValueError("delays_ps must be >= 0")
        self.lead_ps = int(np.ceil(self._clip)) + self.resolution_ps

    def block(self, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        rng = block_rng(self.seed, k)
        t0 = k * self.block_ps
        seconds = self.block_ps * 1e-12
        parts_t, parts_c = [], []
        # uncorrelated background, channel by channel
        counts = rng.poisson(self.singles_hz * seconds)
        for ch, n in enumerate(counts):
            if n:
                parts_t.append(rng.integers(t0, t0 + self.block_ps, n, dtype=np.int64))
                parts_c.append(np.full(n, ch, np.uint8))
        # correlated pairs
        n_pairs = int(rng.poisson(self.pair_rate_hz * seconds)) if len(self.pair_channels) else 0
        if n_pairs:
            born = rng.integers(t0, t0 + self.block_ps, n_pairs, dtype=np.int64)
            which = self.pair_channels[rng.integers(0, len(self.pair_channels), n_pairs)]
            for side in (0, 1):
                jitter = np.clip(rng.normal(0.0, self.jitter_ps, n_pairs), -self._clip, self._clip) if self.jitter_ps else 0.0
                parts_t.append(born + np.rint(jitter).astype(np.int64))
                parts_c.append(which[:, side].copy())
        if not parts_t:
            return np.empty(0, np.int64), np.empty(0, np.uint8), 0
        ts = np.concatenate(parts_t)
        ch = np.concatenate(parts_c)
        ts = ts + self.delays_ps[ch]
        if self.resolution_ps > 1:
            ts = (ts // self.resolution_ps) * self.resolution_ps
        keep = ts >= 0
        ts, ch = ts[keep], ch[keep]
        order = np.argsort(ts, kind="stable")
        ts, ch = ts[order], ch[order]
        dropped = 0
        if self.max_rate_hz > 0:  # the tagger's sustained-rate limit: tags beyond it in a block are lost
            allowed = int(self.max_rate_hz * seconds)
            if len(ts) > allowed:
                dropped = len(ts) - allowed
                ts, ch = ts[:allowed], ch[:allowed]
        return ts, ch, dropped
