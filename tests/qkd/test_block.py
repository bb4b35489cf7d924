"""The two-party block protocol: estimation, Cascade, verification, finite-key PA, as messages only."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.qkd import block as B
from daemon.qkd.block import BlockParams, run_block
from daemon.qkd.cascade import binary_entropy
from daemon.qkd.finite_key import secure_length


def pair(rng, n, q):
    a = rng.integers(0, 2, n, dtype=np.uint8)
    return a, a ^ (rng.random(n) < q).astype(np.uint8)


@pytest.mark.parametrize("q", [0.01, 0.04])
def test_block_gives_identical_keys_and_honest_leak(q):
    rng = np.random.default_rng(7)
    az, bz = pair(rng, 60_000, q)
    ax, bx = pair(rng, 60_000, q)
    p = BlockParams(key_size_bits=256)
    a, b, wire = run_block(az, ax, bz, bx, p)
    assert a.ok and b.ok and a.stage == "done"
    assert a.key_ids == b.key_ids and len(set(a.key_ids)) == len(a.key_ids) > 0
    assert all(np.array_equal(x, y) for x, y in zip(a.keys, b.keys))
    assert all(k.size == 256 for k in a.keys) and a.final_bits == 256 * len(a.keys)
    # the leak Alice subtracts is exactly what crossed the wire as key-dependent bits
    assert a.leak_ec == wire["leak_bits"]
    # error counts are the true ones
    assert a.errors_z == int(np.count_nonzero(az != bz)) and a.errors_x == int(np.count_nonzero(ax != bx))
    # the final length is the finite-key bound with that leak, floored to whole keys
    fk = secure_length(a.n, a.k, a.qber_x, a.leak_ec, p.eps_sec, p.eps_cor)
    assert a.final_bits == fk.length // 256 * 256
    assert 1.0 < a.efficiency < 1.3
    assert a.efficiency == pytest.approx(a.leak_ec / (a.n * binary_entropy(a.qber_z)))
    # the keys are not the raw bits: PA output differs from the first bits of the input
    assert not np.array_equal(np.concatenate(a.keys), az[:a.final_bits])


def test_eve_aborts_before_any_leak():
    rng = np.random.default_rng(3)
    az, bz = pair(rng, 20_000, 0.25)
    ax, bx = pair(rng, 20_000, 0.25)
    a, b, wire = run_block(az, ax, bz, bx)
    assert not a.ok and not b.ok
    assert a.stage == b.stage == "estimation" and "QBER X" in a.reason and a.reason == b.reason
    assert wire["leak_bits"] == 0 and not a.keys and not b.keys


def test_high_z_qber_aborts_after_reconciliation():
    rng = np.random.default_rng(4)
    az, bz = pair(rng, 20_000, 0.15)
    ax, bx = pair(rng, 20_000, 0.02)
    a, b, _ = run_block(az, ax, bz, bx)
    assert not a.ok and a.stage == "reconciliation" and "QBER Z" in a.reason and not b.keys


def test_small_block_gives_no_key():
    rng = np.random.default_rng(5)
    az, bz = pair(rng, 1_500, 0.03)
    ax, bx = pair(rng, 1_500, 0.03)
    a, b, _ = run_block(az, ax, bz, bx)
    assert not a.ok and a.stage == "amplification" and "finite-key length" in a.reason and not b.ok


def test_verification_mismatch_discards_on_both_sides(monkeypatch):
    rng = np.random.default_rng(6)
    az, bz = pair(rng, 20_000, 0.02)
    ax, bx = pair(rng, 20_000, 0.02)
    real = B.CascadeBob.key

    def broken(self):  # Cascade "left" one error
        k = real.fget(self).copy()
        k[17] ^= 1
        return k

    monkeypatch.setattr(B.CascadeBob, "key", property(broken))
    a, b, _ = run_block(az, ax, bz, bx)
    assert not a.ok and not b.ok and a.stage == b.stage == "verification" and not a.keys and not b.keys


def test_malformed_messages_are_errors():
    rng = np.random.default_rng(8)
    az, _ = pair(rng, 5000, 0.02)
    alice = B.BlockAlice(az, az)
    with pytest.raises(ValueError):
        alice.on_message(B.Message("nonsense"))
    bob = B.BlockBob(az, az)
    with pytest.raises(ValueError):
        bob.on_message(B.Message("pa.seed", {"m": 8}))
    out = alice.on_message(B.Message("est.x", {"k": 7}, {"bits": np.zeros(1, np.uint8)}))
    assert out.kind == "block.abort" and alice.done and "not one block" in alice.out.reason
