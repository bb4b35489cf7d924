"""BBM92 sifting: Bell-state flips, squashing of multi-clicks, clusters from tags, against a Python oracle."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.qkd.sifting import (BELL_FLIPS, TaggerMap, coincidence_events, sift_events, sift_reference, sift_tags)

H, V, D, A = 1, 2, 4, 8


def _bell_masks(state: str, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Ideal outcomes of a Bell pair measured in random bases on both sides."""
    fz, fx = BELL_FLIPS[state]
    basis_a = rng.integers(0, 2, n)
    basis_b = rng.integers(0, 2, n)
    bit_a = rng.integers(0, 2, n)
    same = basis_a == basis_b
    bit_b = np.where(same, bit_a ^ np.where(basis_a == 0, fz, fx), rng.integers(0, 2, n))
    code = np.array([[H, V], [D, A]])
    return code[basis_a, bit_a].astype(np.uint8), code[basis_b, bit_b].astype(np.uint8)


@pytest.mark.parametrize("state", sorted(BELL_FLIPS))
def test_bell_states_sift_without_errors(state):
    rng = np.random.default_rng(1)
    ma, mb = _bell_masks(state, 20_000, rng)
    r = sift_events(ma, mb, state)
    assert np.array_equal(r.alice_z, r.bob_z) and np.array_equal(r.alice_x, r.bob_x)
    assert 0.45 < r.sifted / 20_000 < 0.55
    assert r.multi_alice == r.multi_bob == r.cross_basis == 0
    other = {"phi+": "psi-", "psi-": "phi+", "phi-": "psi+", "psi+": "phi-"}[state]
    w = sift_events(ma, mb, other)  # the wrong state flips both bases: every bit wrong
    assert (w.alice_z != w.bob_z).all() and (w.alice_x != w.bob_x).all()


def test_squashing_rules():
    # double click in one basis: that basis, random bit; clicks in both bases: random basis and bit
    n = 40_000
    r = sift_events(np.full(n, H | V, np.uint8), np.full(n, H, np.uint8))
    assert r.alice_x.size == 0 and r.alice_z.size == n and r.multi_alice == n and r.multi_bob == 0
    assert 0.47 < r.alice_z.mean() < 0.53 and (r.bob_z == 0).all()
    r = sift_events(np.full(n, H | D, np.uint8), np.full(n, A, np.uint8))
    assert r.cross_basis == n and 0.45 < r.alice_x.size / n < 0.55 and r.alice_z.size == 0
    assert 0.46 < r.alice_x.mean() < 0.54
    r = sift_events(np.full(n, 15, np.uint8), np.full(n, 15, np.uint8))
    assert 0.23 < r.alice_z.size / n < 0.27 and 0.23 < r.alice_x.size / n < 0.27
    assert 0.45 < (r.alice_z != r.bob_z).mean() < 0.55  # independent random bits
    with pytest.raises(ValueError, match="1..15"):
        sift_events(np.array([0], np.uint8), np.array([1], np.uint8))
    with pytest.raises(ValueError, match="Bell"):
        sift_events(np.array([1], np.uint8), np.array([1], np.uint8), "phi")


def test_matches_python_reference_on_deterministic_events():
    rng = np.random.default_rng(7)
    singles = np.array([H, V, D, A], np.uint8)
    ma = singles[rng.integers(0, 4, 5000)]
    mb = singles[rng.integers(0, 4, 5000)]
    for state in BELL_FLIPS:
        r = sift_events(ma, mb, state)
        ref = sift_reference(ma, mb, state)
        for f in ("alice_z", "bob_z", "alice_x", "bob_x"):
            assert np.array_equal(getattr(r, f), getattr(ref, f)), (state, f)
        assert r.counts() == ref.counts()


def test_random_masks_counts_match_reference():
    rng = np.random.default_rng(8)
    ma = rng.integers(1, 16, 20_000).astype(np.uint8)
    mb = rng.integers(1, 16, 20_000).astype(np.uint8)
    r, ref = sift_events(ma, mb), sift_reference(ma, mb)
    assert (r.multi_alice, r.multi_bob, r.cross_basis) == (ref.multi_alice, ref.multi_bob, ref.cross_basis)
    assert abs(r.sifted - ref.sifted) < 600  # random bases on cross-basis events


def test_clusters_from_tags():
    tm = TaggerMap(alice=(0, 1, 2, 3), bob=(10, 11, 12, 13), window_ps=1000, delay_ps=-5000)
    # (time, channel): Bob's tags arrive 5 ns late; the delay brings them back
    tags = [(1_000, 0), (6_200, 10),               # H-H coincidence
            (50_000, 2), (50_100, 3), (55_300, 13),  # Alice D+A double click, Bob A
            (90_000, 1),                              # Alice single: no coincidence
            (120_000, 0), (125_000 + 999, 11),       # Bob at the window's last ps: in
            (200_000, 0), (205_000 + 1000, 11),      # Bob one ps beyond: out
            (300_000, 7), (300_010, 12), (305_050, 1)]  # channel 7 is nobody's (ignored)
    t = np.array([a for a, _ in tags], np.int64)
    ch = np.array([c for _, c in tags], np.uint8)
    ma, mb, te = coincidence_events(t, ch, tm)
    assert ma.tolist() == [H, D | A, H] and mb.tolist() == [H, A, V] and te.tolist() == [1_000, 50_000, 120_000]
    r = sift_tags(t, ch, tm, "phi+")
    assert r.coincidences == 3 and r.multi_alice == 1 and r.alice_z.size == 2


def test_tags_from_simulated_source_give_qber_of_the_noise():
    rng = np.random.default_rng(11)
    n = 50_000
    ma, mb = _bell_masks("psi-", n, rng)
    flip = rng.random(n) < 0.03  # 3 % depolarising-like bit flips on Bob
    swap = {H: V, V: H, D: A, A: D}
    mb = np.where(flip, np.vectorize(swap.get)(mb), mb).astype(np.uint8)
    t0 = np.arange(n, dtype=np.int64) * 100_000 + rng.integers(0, 1000, n)
    ch_a = np.log2(ma).astype(np.uint8)
    ch_b = (np.log2(mb).astype(np.uint8) + 4)
    t = np.concatenate([t0, t0 + 2000 + rng.integers(-100, 100, n)])
    ch = np.concatenate([ch_a, ch_b])
    o = np.argsort(t, kind="stable")
    r = sift_tags(t[o], ch[o], TaggerMap((0, 1, 2, 3), (4, 5, 6, 7), window_ps=600, delay_ps=-2000), "psi-")
    assert r.coincidences == n
    assert 0.025 < (r.alice_z != r.bob_z).mean() < 0.035 and 0.025 < (r.alice_x != r.bob_x).mean() < 0.035


def test_tagger_map_validation():
    with pytest.raises(ValueError):
        TaggerMap((0, 1, 2, 3), (3, 4, 5, 6))
    with pytest.raises(ValueError):
        TaggerMap((0, 1, 2, 3), (4, 5, 6, 7), window_ps=0)
