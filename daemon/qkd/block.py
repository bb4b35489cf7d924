"""One key block, two parties: estimation, Cascade, verification and privacy amplification as messages.

:class:`BlockAlice` and :class:`BlockBob` each hold only their own side's sifted bits. They exchange
:class:`~daemon.qkd.channel.Message` objects over a channel (the in-process loopback now; a ZeroMQ channel
between two daemons carries the same bytes), and the channel counts every key-dependent bit sent: that count is
the leak the finite-key bound subtracts. The phases:

1. ``est.x`` (B->A): Bob's X-basis bits (public: X bits are never key; they estimate the phase error). Alice
   counts the errors; above the abort threshold she ends the block (``block.abort``) before anything is leaked.
2. Cascade (:mod:`daemon.qkd.cascade`) on the Z-basis bits, its QBER parameter from this block's X basis and its
   permutation seed fresh from ``os.urandom``. Bob corrects his key towards Alice's; the number of corrections is
   the Z-basis error count.
3. Estimation with both bases (:func:`daemon.qkd.estimation.estimate`): abort above the threshold or when the
   phase-error bound reaches 1/2.
4. Verification (:mod:`daemon.qkd.verification`): a Toeplitz tag of ``ceil(log2 1/eps_cor)`` bits; a mismatch
   discards the block on both sides.
5. Privacy amplification (``pa.seed`` A->B): the secure length from the TLGR 2012 finite-key bound with the
   measured leak (Cascade parities + tag), rounded down to whole keys of ``key_size_bits``; a fresh Toeplitz
   seed from ``os.urandom`` (public) and the key IDs (UUIDs chosen by Alice). Both sides hash; Bob acknowledges.

Neither side ever sees the other's bits. The result of each side is a :class:`BlockOutcome`; the caller stores
the keys (both sides under the same IDs, :class:`daemon.qkd.keystore.LinkKeyStores`).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.qkd.amplification import new_seed, toeplitz_hash
from daemon.qkd.cascade import CascadeAlice, CascadeBob, binary_entropy
from daemon.qkd.channel import LoopbackEnd, Message, loopback_pair, pump
from daemon.qkd.estimation import estimate
from daemon.qkd.finite_key import secure_length
from daemon.qkd.verification import VerifyAlice, VerifyBob, tag_bits_for

__all__ = ["BlockAlice", "BlockBob", "BlockOutcome", "BlockParams", "run_block"]

MIN_CASCADE_QBER = 0.002  # Cascade's block sizes need a nonzero QBER parameter


@dataclass(frozen=True)
class BlockParams:
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15
    abort_qber: float = 0.11
    key_size_bits: int = 256


@dataclass
class BlockOutcome:
    """What one side knows when the block ends. ``keys`` holds the final key bits (0/1 uint8), one array per
    key ID; empty when the block was aborted (``reason`` says why, ``stage`` where)."""

    ok: bool = False
    stage: str = ""  # estimation, reconciliation, verification, amplification, done
    reason: str | None = None
    n: int = 0  # Z (key) bits
    k: int = 0  # X (estimation) bits
    errors_x: int | None = None
    errors_z: int | None = None  # corrections made by Cascade
    qber_x: float | None = None
    qber_z: float | None = None
    leak_ec: int = 0  # Cascade parities + verification tag (bits Alice disclosed)
    efficiency: float | None = None  # leak_ec / (n h(qber_z))
    final_bits: int = 0
    finite_key: dict[str, Any] | None = None
    key_ids: list[str] = field(default_factory=list)
    keys: list[np.ndarray] = field(default_factory=list)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint8)


class _Side:
    """What both sides hold: their own Z (key) and X (estimation) bits, the parameters, the outcome so far."""

    def __init__(self, key_z: np.ndarray, bits_x: np.ndarray, params: BlockParams = BlockParams()) -> None:
        self._z = _bits(key_z)
        self._x = _bits(bits_x)
        self.params = params
        self.out = BlockOutcome(n=int(self._z.size), k=int(self._x.size))
        self.done = False
        self._cascade: Any = None
        self._verify: Any = None


class BlockAlice(_Side):
    """Alice's side of one block: answers Bob, decides abort / continue, picks the PA seed and key IDs."""

    def __init__(self, key_z: np.ndarray, bits_x: np.ndarray, params: BlockParams = BlockParams()) -> None:
        super().__init__(key_z, bits_x, params)
        self._pending_keys: list[np.ndarray] = []

    def start(self) -> None:
        return None  # Bob opens with his X bits

    def _abort(self, stage: str, reason: str) -> Message:
        self.out.stage, self.out.reason, self.out.ok = stage, reason, False
        self.done = True
        return Message("block.abort", {"stage": stage, "reason": reason})

    def on_message(self, msg: Message) -> Message | None:
        p = self.params
        if msg.kind == "est.x":
            k = int(msg.meta["k"])
            if k != self._x.size:
                return self._abort("estimation", f"Bob has {k} X-basis bits, Alice {self._x.size}: not one block")
            bob_x = np.unpackbits(msg.arrays["bits"], count=k)
            self.out.errors_x = int(np.count_nonzero(bob_x != self._x))
            self.out.qber_x = self.out.errors_x / k if k else None
            if k == 0:
                return self._abort("estimation", "no X-basis bits: the phase error cannot be bounded")
            if self.out.qber_x > p.abort_qber:
                return self._abort("estimation", f"QBER X {self.out.qber_x:.4f} above the abort threshold "
                                                 f"{p.abort_qber:.4f} ({self.out.errors_x}/{k})")
            if self._z.size < 2:
                return self._abort("estimation", "fewer than 2 Z-basis (key) bits in the block")
            seed = int.from_bytes(os.urandom(8), "little") >> 1
            self._cascade = CascadeAlice(self._z, max(self.out.qber_x, MIN_CASCADE_QBER), seed)
            return self._cascade.start()
        if msg.kind.startswith("cascade.") and self._cascade is not None and self._verify is None:
            reply = self._cascade.on_message(msg)
            if msg.kind != "cascade.done":
                return reply
            self.out.errors_z = int(msg.meta["corrections"])
            est = estimate(self.out.n, self.out.errors_z, self.out.k, self.out.errors_x, threshold=p.abort_qber,
                           eps_sec=p.eps_sec)
            self.out.qber_z = est.z.qber
            if est.abort:
                self.out.leak_ec = self._cascade.disclosed
                return self._abort("reconciliation", est.reason or "estimation failed")
            self._verify = VerifyAlice(self._z, p.eps_cor)
            return self._verify.start()
        if msg.kind == "verify.result" and self._verify is not None:
            self._verify.on_message(msg)
            out = self.out
            out.leak_ec = self._cascade.disclosed + self._verify.t
            h = binary_entropy(out.qber_z) if out.qber_z else 0.0
            out.efficiency = out.leak_ec / (out.n * h) if h > 0 else None
            if not self._verify.ok:
                return self._abort("verification", "verification tags differ: Cascade left errors; block discarded")
            fk = secure_length(out.n, out.k, out.qber_x, out.leak_ec, p.eps_sec, p.eps_cor)
            out.finite_key = fk.as_dict()
            m = fk.length // p.key_size_bits * p.key_size_bits
            if m <= 0:
                return self._abort("amplification", f"finite-key length {fk.length} bits (bound {fk.bound:.0f}) is "
                                                    f"below one key of {p.key_size_bits} bits: block too small or "
                                                    f"QBER too high")
            seed = new_seed(out.n, m)
            final = toeplitz_hash(self._z, seed, m)
            out.key_ids = [str(uuid.uuid4()) for _ in range(m // p.key_size_bits)]
            self._pending_keys = list(final.reshape(-1, p.key_size_bits))
            out.final_bits = m
            return Message("pa.seed", {"m": m, "key_size_bits": p.key_size_bits, "key_ids": out.key_ids,
                                       "seed_bits": int(seed.size)}, {"seed": np.packbits(seed)})
        if msg.kind == "pa.ack":
            if list(msg.meta.get("key_ids", [])) != self.out.key_ids:
                return self._abort("amplification", "Bob acknowledged other key IDs")
            self.out.keys = self._pending_keys
            self.out.ok, self.out.stage = True, "done"
            self.done = True
            return None
        raise ValueError(f"BlockAlice: unexpected message {msg.kind!r}")


class BlockBob(_Side):
    """Bob's side of one block: discloses his X bits, runs Cascade's searches, verifies, hashes."""

    def start(self) -> Message:
        return Message("est.x", {"k": int(self._x.size)}, {"bits": np.packbits(self._x)})

    def on_message(self, msg: Message) -> Message | None:
        if msg.kind == "block.abort":
            self.out.stage, self.out.reason, self.out.ok = str(msg.meta["stage"]), str(msg.meta["reason"]), False
            self.done = True
            return None
        if msg.kind.startswith("cascade."):
            if self._cascade is None:
                if msg.kind != "cascade.start" or int(msg.meta["n"]) != self._z.size:
                    raise ValueError("BlockBob: Cascade must open with cascade.start over this block's Z bits")
                self._cascade = CascadeBob(self._z)
                self._cascade.start()
            reply = self._cascade.on_message(msg)
            if self._cascade.done:
                self.out.errors_z = self._cascade.corrections
            return reply
        if msg.kind == "verify.tag" and self._cascade is not None and self._cascade.done:
            self._verify = VerifyBob(self._cascade.key, min_tag_bits=tag_bits_for(self.params.eps_cor))
            return self._verify.on_message(msg)
        if msg.kind == "pa.seed" and self._verify is not None and self._verify.ok:
            m = int(msg.meta["m"])
            size = int(msg.meta["key_size_bits"])
            ids = [str(uuid.UUID(str(i))) for i in msg.meta["key_ids"]]
            nbits = self._z.size + m - 1
            if not 0 < m <= self._z.size or size <= 0 or m % size or len(ids) != m // size \
                    or int(msg.meta["seed_bits"]) != nbits:
                raise ValueError("BlockBob: inconsistent pa.seed")
            seed = np.unpackbits(msg.arrays["seed"], count=nbits)
            final = toeplitz_hash(self._cascade.key, seed, m)
            self.out.keys = list(final.reshape(-1, size))
            self.out.key_ids = ids
            self.out.final_bits = m
            self.out.ok, self.out.stage = True, "done"
            self.done = True
            return Message("pa.ack", {"key_ids": ids})
        raise ValueError(f"BlockBob: unexpected message {msg.kind!r}")


def run_block(alice_z: np.ndarray, alice_x: np.ndarray, bob_z: np.ndarray, bob_x: np.ndarray,
              params: BlockParams = BlockParams()) -> tuple[BlockOutcome, BlockOutcome, dict[str, Any]]:
    """Both sides of one block over an in-process loopback channel. Returns (Alice's outcome, Bob's outcome,
    channel figures: messages, bytes, leak_bits counted on the wire, round_trips)."""
    a_end, b_end = loopback_pair()
    alice, bob = BlockAlice(alice_z, alice_x, params), BlockBob(bob_z, bob_x, params)
    pump(alice, bob, a_end, b_end)
    wire = _wire_figures(a_end, b_end)
    return alice.out, bob.out, wire


def _wire_figures(a_end: LoopbackEnd, b_end: LoopbackEnd) -> dict[str, Any]:
    return {"messages": a_end.sent.messages + b_end.sent.messages, "bytes": a_end.sent.bytes + b_end.sent.bytes,
            "leak_bits": a_end.sent.leak_bits + b_end.sent.leak_bits, "round_trips": a_end.round_trips}
