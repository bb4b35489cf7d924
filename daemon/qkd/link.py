"""The key pipeline of one link: streaming sifting -> blocks -> two-party block protocol -> both key stores.

:meth:`KeyLink.feed` runs in the acquisition's analysis thread (one batch at a time, in order): it sifts the
batch with the analysis pipeline's current delays and window, drops the bits of batches taken while the
polarization loop is adjusting the channel (and of the batch after, whose tags may predate the settled
paddles), and cuts the Z-basis (key) bits into blocks of ``block_bits``; the X-basis bits that arrived with them
go into the same block for estimation. :meth:`KeyLink.process` runs in the link's key thread: it runs
:func:`daemon.qkd.block.run_block` (Alice and Bob as separate parties over the channel) and stores the final keys
on both sides under the same IDs (two-phase commit, :class:`daemon.qkd.keystore.LinkKeyStores`).

Key bytes: each key's bits packed most significant bit first (``numpy.packbits``); key sizes are multiples of 8.
Nothing here logs key material: logs and published figures carry IDs, sizes and statistics only.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.qkd.block import BlockParams, run_block
from daemon.qkd.stream import StreamSifter
from drivers.base import TagBatch

PS_PER_S = 1_000_000_000_000


@dataclass
class Block:
    """Sifted bits of one block, both sides (in one daemon both sides' bits are at hand; each party object
    gets only its own)."""

    block_id: str
    alice_z: np.ndarray
    bob_z: np.ndarray
    alice_x: np.ndarray
    bob_x: np.ndarray
    t_begin_ps: int
    t_end_ps: int
    coincidences: int


@dataclass
class _Acc:
    parts: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"az": [], "bz": [], "ax": [], "bx": []})
    z: int = 0
    x: int = 0
    coincidences: int = 0
    t_begin: int | None = None

    def add(self, az: np.ndarray, bz: np.ndarray, ax: np.ndarray, bx: np.ndarray, coincidences: int,
            t_begin: int) -> None:
        if self.t_begin is None:
            self.t_begin = t_begin
        for k, a in (("az", az), ("bz", bz), ("ax", ax), ("bx", bx)):
            if a.size:
                self.parts[k].append(a)
        self.z += int(az.size)
        self.x += int(ax.size)
        self.coincidences += coincidences

    def take(self, k: str) -> np.ndarray:
        p = self.parts[k]
        return np.concatenate(p) if p else np.empty(0, np.uint8)


class KeyLink:
    """One link's sifting and block state (see the module docstring)."""

    def __init__(self, name: str, cfg: dict[str, Any], link: dict[str, Any], *, pipeline: Any = None,
                 stores: Any = None, adjusting: Any = None, log: Any = None) -> None:
        self.name = name
        self.cfg = cfg
        self.link = link
        self.pipeline = pipeline  # AnalysisPipeline: delays and window are read from it per batch
        self.stores = stores  # LinkKeyStores (None in tests that only sift)
        self.adjusting = adjusting or (lambda: False)
        self.log = log
        self.params = BlockParams(eps_sec=cfg["eps_sec"], eps_cor=cfg["eps_cor"], abort_qber=cfg["abort_qber"],
                                  key_size_bits=cfg["key_size_bits"])
        self._window, delays = self._settings()
        self.sifter = StreamSifter(tuple(link["alice"]), tuple(link["bob"]), self._window, link["bell_state"],
                                   delays)
        self._acc = _Acc()
        self._guard = False  # drop the batch after an adjustment too
        self._lock = threading.Lock()  # status() reads from the event loop
        self.discarded_adjusting_bits = 0
        self.blocks_cut = 0
        self.blocks_done = 0
        self.blocks_aborted = 0
        self.final_bits = 0
        self.keys_stored = 0
        self.last: dict[str, Any] | None = None
        self.busy_s = 0.0

    # -- analysis thread -----------------------------------------------------------------------------------
    def _settings(self) -> tuple[int, dict[int, int]]:
        """(window, delays) for sifting: the link's own window if set, else the analysis pipeline's."""
        window, delays = self.pipeline.window_and_delays() if self.pipeline is not None else (1000, {})
        return int(self.cfg["window_ps"] or window), delays

    def reset(self) -> None:
        """A new stream: drop the carried tags (the partial block is kept: its bits are valid)."""
        self.sifter.reset()

    def feed(self, batch: TagBatch) -> list[Block]:
        """Sift one batch; return the blocks it completed."""
        t0 = time.perf_counter()
        window, delays = self._settings()
        if window != self._window:
            counters = self.sifter.counters
            self.sifter = StreamSifter(tuple(self.link["alice"]), tuple(self.link["bob"]), window,
                                       self.link["bell_state"], delays)
            self.sifter.counters = counters
            self._window = window
        adjusting = bool(self.adjusting())
        broken = bool(batch.flags) or batch.missed_events > 0
        r = self.sifter.feed(batch.timestamps, batch.channels, batch.t_begin, batch.t_end, broken=broken,
                             delays_ps=delays)
        blocks: list[Block] = []
        if adjusting or self._guard:
            self.discarded_adjusting_bits += r.sifted
            self._guard = adjusting
        else:
            self._acc.add(r.alice_z, r.bob_z, r.alice_x, r.bob_x, r.coincidences, batch.t_begin)
            while self._acc.z >= self.cfg["block_bits"]:
                blocks.append(self._cut(batch.t_end))
        self.busy_s += time.perf_counter() - t0
        return blocks

    def _cut(self, t_end: int) -> Block:
        n = self.cfg["block_bits"]
        acc = self._acc
        az, bz, ax, bx = (acc.take(k) for k in ("az", "bz", "ax", "bx"))
        block = Block(str(uuid.uuid4()), az[:n], bz[:n], ax, bx, int(acc.t_begin), int(t_end), acc.coincidences)
        self._acc = _Acc()
        if az.size > n:  # the Z bits beyond the block start the next one (their X partners went with this one)
            self._acc.add(az[n:], bz[n:], np.empty(0, np.uint8), np.empty(0, np.uint8), 0, int(t_end))
        self.blocks_cut += 1
        return block

    # -- key thread ----------------------------------------------------------------------------------------
    def process(self, block: Block) -> dict[str, Any]:
        """Run the block protocol and store the keys; returns the public figures (``qkd.<link>`` block fields)
        and, under ``"_keys"``, the (key_id, key bytes) list for push delivery (never logged)."""
        t0 = time.perf_counter()
        alice, bob, wire = run_block(block.alice_z, block.alice_x, block.bob_z, block.bob_x, self.params)
        seconds = (block.t_end_ps - block.t_begin_ps) / PS_PER_S
        fields: dict[str, Any] = {
            "link": self.name, "kind": "block", "block_id": block.block_id,
            "t_begin_ps": block.t_begin_ps, "t_end_ps": block.t_end_ps, "duration_s": seconds,
            "coincidences": block.coincidences,
            "sifted_bits": int(block.alice_z.size + block.alice_x.size),
            "key_bits_in": alice.n, "estimation_bits": alice.k,
            "qber_z": alice.qber_z, "qber_x": alice.qber_x, "errors_z": alice.errors_z, "errors_x": alice.errors_x,
            "leak_ec": alice.leak_ec, "leak_wire_bits": wire["leak_bits"], "efficiency": alice.efficiency,
            "round_trips": wire["round_trips"], "messages": wire["messages"], "bytes": wire["bytes"],
            "final_key_bits": 0, "keys": 0, "key_size_bits": self.params.key_size_bits,
            "secret_key_rate_bps": 0.0, "finite_key": alice.finite_key,
            "aborted": not alice.ok, "abort_stage": None if alice.ok else alice.stage, "abort_reason": alice.reason,
            "stored": False,
        }
        keys: list[tuple[str, bytes]] = []
        if alice.ok and bob.ok:
            if alice.key_ids != bob.key_ids or any(not np.array_equal(a, b) for a, b in zip(alice.keys, bob.keys)):
                # verification passed but the final keys differ: impossible unless a bug; never store such keys
                fields.update(aborted=True, abort_stage="amplification", abort_reason="final keys differ (bug)")
            else:
                keys = [(kid, np.packbits(bits).tobytes()) for kid, bits in zip(alice.key_ids, alice.keys)]
                bob_bytes = [np.packbits(bits).tobytes() for bits in bob.keys]
                if self.stores is not None:
                    self._store(block, keys, bob_bytes, alice)
                fields.update(final_key_bits=alice.final_bits, keys=len(keys), stored=self.stores is not None,
                              secret_key_rate_bps=alice.final_bits / seconds if seconds > 0 else None)
        with self._lock:
            self.blocks_done += 1
            if fields["aborted"]:
                self.blocks_aborted += 1
            else:
                self.final_bits += alice.final_bits
                self.keys_stored += len(keys)
            fields["process_s"] = round(time.perf_counter() - t0, 6)
            self.busy_s += fields["process_s"]
            self.last = {k: v for k, v in fields.items() if k != "finite_key"}
        fields["_keys"] = keys
        return fields

    def _store(self, block: Block, keys: list[tuple[str, bytes]], bob_bytes: list[bytes], alice: Any) -> None:
        from daemon.qkd.keystore import BlockStats

        stats = BlockStats(block_id=block.block_id, n_sifted=int(block.alice_z.size + block.alice_x.size),
                           qber_z=alice.qber_z, qber_x=alice.qber_x, leak_ec=alice.leak_ec, f=alice.efficiency,
                           eps_sec=self.params.eps_sec, eps_cor=self.params.eps_cor)
        items = [(kid, a, b) for (kid, a), b in zip(keys, bob_bytes)]
        add_many = getattr(self.stores, "add_many", None)
        if add_many is not None:
            add_many(items, self.params.key_size_bits, stats=stats)
        else:
            for kid, a, b in items:
                self.stores.add(a, b, self.params.key_size_bits, stats=stats, key_id=kid)

    def status(self) -> dict[str, Any]:
        c = self.sifter.counters
        with self._lock:
            return {
                "link": self.name, "block_bits": self.cfg["block_bits"], "key_size_bits": self.cfg["key_size_bits"],
                "window_ps": self._window, "sifting": dict(c.__dict__), "carried_tags": self.sifter.carried,
                "block_fill_bits": self._acc.z, "discarded_adjusting_bits": self.discarded_adjusting_bits,
                "blocks_cut": self.blocks_cut, "blocks_done": self.blocks_done, "blocks_aborted": self.blocks_aborted,
                "final_key_bits": self.final_bits, "keys_stored": self.keys_stored, "last_block": self.last,
                "busy_s": round(self.busy_s, 3),
            }
