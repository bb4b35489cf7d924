"""Verification of a reconciled block: a Toeplitz-hash tag compared over the channel.

Toeplitz hashing ``T_s(x)_r = XOR_j x_j s_{j+r}`` (``r < t``) with a uniform seed ``s`` of ``n + t - 1`` bits is a
2-universal family: for ``x != y``, ``Pr_s[T_s(x) = T_s(y)] = 2**-t`` exactly. With ``t >= log2(1/eps_cor)``
a block whose keys differ passes with probability at most ``eps_cor``. Alice draws a fresh seed per block from
``os.urandom`` (public, sent in the clear), sends the tag (``t`` disclosed bits: leak), Bob compares with the tag
of his corrected key and answers; both sides discard the block on a mismatch.

Messages: ``verify.tag`` (A->B: meta n, t; array ``seed`` uint64 words; disclosed: the tag bits),
``verify.result`` (B->A: meta ok).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
from numba import njit

from .cascade import _fold
from .channel import Message

__all__ = ["tag_bits_for", "toeplitz_tag", "VerifyAlice", "VerifyBob"]


def tag_bits_for(eps_cor: float) -> int:
    """Tag length for a correctness parameter: ceil(log2(1/eps_cor)), at least 1."""
    if not 0 < eps_cor < 1:
        raise ValueError("eps_cor must be in (0, 1)")
    return max(1, math.ceil(math.log2(1.0 / eps_cor)))


def seed_words(n: int, t: int) -> int:
    return (n + 63) // 64 + (t + 63) // 64 + 1


@njit(cache=True, nogil=True)
def _toeplitz(xw, sw, t):
    out = np.zeros(t, np.uint8)
    nw = xw.size
    for r in range(t):
        q = r >> 6
        sh = np.uint64(r & 63)
        acc = np.uint64(0)
        if sh == 0:
            for w in range(nw):
                acc ^= xw[w] & sw[w + q]
        else:
            back = np.uint64(64) - sh
            for w in range(nw):
                acc ^= xw[w] & ((sw[w + q] >> sh) | (sw[w + q + 1] << back))
        out[r] = _fold(acc)
    return out


def _words(bits: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(bits, dtype=np.uint8)
    packed = np.packbits(b, bitorder="little")
    pad = (-packed.size) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros(pad, np.uint8)])
    return packed.view("<u8").astype(np.uint64)


def toeplitz_tag(bits: np.ndarray, seed: np.ndarray, t: int) -> np.ndarray:
    """The ``t``-bit Toeplitz tag (uint8 0/1) of ``bits`` under ``seed`` (uint64 words, ``seed_words(n, t)``).
    Bit ``k`` of the seed is bit ``k % 64`` of word ``k // 64``."""
    n = int(np.asarray(bits).size)
    seed = np.ascontiguousarray(seed, dtype=np.uint64)
    if seed.size < seed_words(n, t):
        raise ValueError(f"seed of {seed.size} words, need {seed_words(n, t)}")
    return _toeplitz(_words(bits), seed, t)


class VerifyAlice:
    """Alice's side: fresh seed, sends her tag, learns the verdict."""

    def __init__(self, key: np.ndarray, eps_cor: float = 1e-15,
                 randbytes: Callable[[int], bytes] = os.urandom) -> None:
        self._bits = np.ascontiguousarray(key, dtype=np.uint8)
        self.t = tag_bits_for(eps_cor)
        self._randbytes = randbytes
        self.done = False
        self.ok: bool | None = None

    def start(self) -> Message:
        n = self._bits.size
        nw = seed_words(n, self.t)
        seed = np.frombuffer(self._randbytes(8 * nw), dtype="<u8").astype(np.uint64)
        tag = toeplitz_tag(self._bits, seed, self.t)
        return Message("verify.tag", {"n": n, "t": self.t}, {"seed": seed}, disclosed=tag)

    def on_message(self, msg: Message) -> None:
        if msg.kind != "verify.result":
            raise ValueError(f"VerifyAlice: unexpected message {msg.kind!r}")
        self.ok = bool(msg.meta["ok"])
        self.done = True
        return None


class VerifyBob:
    """Bob's side: recomputes the tag on his corrected key and answers ok / mismatch."""

    def __init__(self, key: np.ndarray, min_tag_bits: int = 1) -> None:
        self._bits = np.ascontiguousarray(key, dtype=np.uint8)
        self.min_tag_bits = min_tag_bits
        self.done = False
        self.ok: bool | None = None

    def start(self) -> None:
        return None

    def on_message(self, msg: Message) -> Message:
        if msg.kind != "verify.tag":
            raise ValueError(f"VerifyBob: unexpected message {msg.kind!r}")
        t = int(msg.meta["t"])
        tag = msg.disclosed if msg.disclosed is not None else np.zeros(0, np.uint8)
        if int(msg.meta["n"]) != self._bits.size or tag.size != t or t < self.min_tag_bits:
            self.ok = False
        else:
            mine = toeplitz_tag(self._bits, msg.arrays["seed"], t)
            self.ok = bool(np.array_equal(mine, tag))
        self.done = True
        return Message("verify.result", {"ok": self.ok})
