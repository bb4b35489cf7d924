"""The compiled kernels against their plain references (bit for bit), and the random variates' distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.sim.bench import kernels as K
from drivers.sim.bench.model import CAT_A, CAT_B

sorted_ints = st.lists(st.integers(0, 10**6), max_size=300).map(lambda v: np.array(sorted(v), np.int64))


# -- random numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill,scalar", [(K.fill_uniform, K.rng_uniform), (K.fill_normal, K.rng_normal),
                                         (K.fill_exponential, K.rng_exponential)])
def test_bulk_and_scalar_draws_are_the_same_stream(fill, scalar):
    s1 = K.rng_state([7, 1])
    s2 = s1.copy()
    bulk = np.empty(20_000)
    fill(s1, bulk)
    one_by_one = np.array([scalar(s2) for _ in range(20_000)])
    np.testing.assert_array_equal(bulk, one_by_one)
    np.testing.assert_array_equal(s1, s2)


def _chi2_check(counts: np.ndarray, probs: np.ndarray) -> None:
    """Pearson chi-square against expected bin probabilities: within 5 sd of its mean (k - 1, sd sqrt(2(k - 1)))."""
    n = counts.sum()
    expected = probs * n
    assert expected.min() > 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), (chi2, dof)


def test_normal_variates_follow_the_gaussian():
    """Bins across the core, the ziggurat's layer edges and wedges, and both tails."""
    z = np.empty(4_000_000)
    K.fill_normal(K.rng_state([11]), z)
    edges = np.concatenate([[-np.inf], np.linspace(-4.0, 4.0, 81), [np.inf]])
    cdf = np.array([0.5 * math.erfc(-x / math.sqrt(2)) if np.isfinite(x) else (0.0 if x < 0 else 1.0) for x in edges])
    counts = np.histogram(z, edges)[0]
    _chi2_check(counts, np.diff(cdf))
    n = len(z)
    tail = np.count_nonzero(np.abs(z) > 3.442619855899)  # the base layer's tail
    p_tail = math.erfc(3.442619855899 / math.sqrt(2))
    assert abs(tail - n * p_tail) < 5 * math.sqrt(n * p_tail)


def test_exponential_variates_follow_the_exponential():
    e = np.empty(4_000_000)
    K.fill_exponential(K.rng_state([12]), e)
    edges = np.concatenate([np.linspace(0.0, 9.0, 181), [np.inf]])
    counts = np.histogram(e, edges)[0]
    _chi2_check(counts, np.diff(1.0 - np.exp(-edges)))


def test_uniform_variates_are_uniform():
    u = np.empty(2_000_000)
    K.fill_uniform(K.rng_state([13]), u)
    assert u.min() >= 0.0 and u.max() < 1.0
    _chi2_check(np.histogram(u, np.linspace(0, 1, 101))[0], np.full(100, 0.01))


def test_alias_table_draws_each_category_with_its_probability():
    p = np.array([0.0, 0.3, 0.05, 0.1, 0.0, 0.25, 0.3, 1e-3])
    thr, alias = K.alias_table(p)
    s = K.rng_state([5])
    words = np.empty(300_000)
    K.fill_uniform(s, words)  # any 64-bit words: take them from a fresh stream
    s = K.rng_state([6])
    cats = np.array([K.alias_draw(np.uint64(K.rng_next(s)), thr, alias) for _ in range(300_000)])
    counts = np.bincount(cats, minlength=len(thr))
    assert counts[len(p):].sum() == 0 and counts[0] == 0 and counts[4] == 0
    nz = p > 0
    _chi2_check(counts[: len(p)][nz], p[nz] / p.sum())


def test_poisson_process_count_and_spacing():
    s = K.rng_state([3])
    rate = 1e-6  # per ps: 1 MHz
    counts = [len(K.gen_poisson_times(s, 0, 10**9, rate)) for _ in range(400)]  # mean 1000 per ms
    mean, var = np.mean(counts), np.var(counts, ddof=1)
    assert abs(mean - 1000) < 5 * math.sqrt(1000 / 400)
    assert abs(var / 1000 - 1) < 5 * math.sqrt(2 / 399)  # Poisson: variance = mean
    t = K.gen_poisson_times(s, 5, 10**11, rate)
    assert t[0] >= 5 and t[-1] < 5 + 10**11 and np.all(np.diff(t) >= 0)


# -- kernels against references ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(a=st.lists(st.integers(-10**9, 10**9), max_size=200))
def test_insertion_sort_sorts(a):
    x = np.array(a, np.int64)
    K.insertion_sort(x)
    np.testing.assert_array_equal(x, np.sort(np.array(a, np.int64)))


@settings(max_examples=60, deadline=None)
@given(a=sorted_ints, b=sorted_ints)
def test_merge2_is_a_sorted_union(a, b):
    np.testing.assert_array_equal(K.merge2(a, b), np.sort(np.concatenate([a, b])))


def _keys(events, base=0):
    """Sorted keys of (t, c) tuples."""
    ev = sorted(events)
    t = np.array([e[0] for e in ev], np.int64)
    c = np.array([e[1] for e in ev], np.uint8)
    return K.pack(t, c, base)


def _tuples(keys, base=0):
    t, c = K.unpack(keys, base)
    return list(zip(t.tolist(), c.tolist()))


events8 = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=300)


@settings(max_examples=60, deadline=None)
@given(events=events8)
def test_keys_order_by_time_then_channel(events):
    keys = _keys(events, base=-5)
    assert np.all(np.diff(keys) >= 0)
    assert _tuples(keys, base=-5) == sorted(events)


@settings(max_examples=80, deadline=None)
@given(events=events8, extra=events8.map(lambda v: v[:6]), dead=st.lists(st.integers(0, 50_000), min_size=8, max_size=8),
       horizon=st.lists(st.integers(0, 2 * 10**6), min_size=8, max_size=8), p=st.sampled_from([0.0, 0.3, 0.5]),
       off=st.integers(0, 7), seed=st.integers(0, 2**32), cap=st.sampled_from([0, 3, 1000]))
def test_detector_filter_matches_the_reference(events, extra, dead, horizon, p, off, seed, cap):
    s1 = K.rng_state([seed])
    s2 = s1.copy()
    base = -1000
    dead = np.array(dead, np.int64)
    horizon = np.array(horizon, np.int64)
    p_ap = np.array([p, 0.0, p, p, 0.0, p, p, p])
    tau = np.full(8, 20_000.0)
    counting = np.ones(8, bool)
    counting[off] = False
    last1 = np.array([K.NEVER, -100, 0, 5, K.NEVER, K.NEVER, 77, K.NEVER], np.int64)
    last2 = [int(x) for x in last1]
    main = _keys(events, base)
    out, n, carry = K.detector_filter(s1, main, len(main), _keys(extra, base), base, last1, dead, p_ap, tau, horizon,
                                      counting, np.empty(cap, np.int64))
    kept = [e for e in sorted(events + extra) if counting[e[1]]]
    ref_clicks, ref_carry = K.ref_detector_filter(s2, kept, last2, dead, p_ap, tau, horizon)
    assert _tuples(out[:n], base) == ref_clicks
    assert _tuples(carry, base) == ref_carry
    assert last1.tolist() == last2
    np.testing.assert_array_equal(s1, s2)
    for c in range(8):  # no two clicks of a detector closer than its dead time
        t = [x for x, ch in ref_clicks if ch == c]
        assert all(b - a >= dead[c] for a, b in zip(t, t[1:]))


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 10**6), st.integers(-500, 500), st.integers(0, 7)), max_size=300),
       dead=st.integers(0, 5_000), block=st.sampled_from([997, 20_000, 10**7]))
def test_blocks_with_horizon_and_carry_equal_one_pass(data, dead, block):
    """Events are generated block by block (generation time g) and land at t = g + jitter, |jitter| <= 500: an
    event of block k+1 is never before (k+1) B - 500, the horizon of block k. Processing block by block with
    carries equals processing the whole sorted stream at once."""
    s = K.rng_state([1])
    dead = np.full(8, dead, np.int64)
    far = np.full(8, 1 << 50, np.int64)  # keys hold (t - base) < 2^60
    none, on = np.zeros(8), np.ones(8, bool)
    empty = np.empty(0, np.int64)

    def run(main, extra, last, horizon):
        out, n, carry = K.detector_filter(s, main, len(main), extra, 0, last, dead, none, none, horizon, on, empty)
        return out[:n], carry

    whole, _ = run(_keys([(g + j, c) for g, j, c in data]), empty, np.full(8, K.NEVER, np.int64), far)
    last, carry, out = np.full(8, K.NEVER, np.int64), empty, []
    for k in range(0, 10**6 // block + 1):
        events = _keys([(g + j, c) for g, j, c in data if k * block <= g < (k + 1) * block])
        kept, carry = run(events, carry, last, np.full(8, (k + 1) * block - 500))
        out.append(kept)
    out.append(run(carry, empty, last, far)[0])
    np.testing.assert_array_equal(np.concatenate(out), whole)


@settings(max_examples=40, deadline=None)
@given(events=events8, delays=st.lists(st.integers(0, 10**6), min_size=8, max_size=8),
       sigma=st.sampled_from([0.0, 3.0, 150.0]), res=st.sampled_from([1, 4, 42]), seed=st.integers(0, 2**32))
def test_tag_keys_and_both_sorts_match_the_reference(events, delays, sigma, res, seed):
    s1 = K.rng_state([seed])
    s2 = s1.copy()
    base = -3
    delays = np.array(delays, np.int64)
    tags = _keys(events, base)
    K.tag_keys(s1, tags, len(tags), base, delays, sigma, res)
    ref = sorted(K.ref_tag_times(s2, sorted(events), delays, sigma, res))
    np.testing.assert_array_equal(s1, s2)
    for small in (True, False):
        t = tags.copy()
        K.sort_tags(t, len(t), 8, small, np.empty(0, np.int64))
        assert _tuples(t, base) == ref
    bound = K.jitter_bound(sigma) + res
    for (t, c), (t0, c0) in zip(sorted(_tuples(tags, base), key=lambda x: x[1]), sorted(sorted(events), key=lambda x: x[1])):
        assert c == c0 and t % res == 0 and abs(t - t0 - delays[c]) <= bound


def test_gen_photons_matches_the_reference():
    rng = np.random.default_rng(4)
    thr, alias = K.alias_table(rng.random(len(CAT_A)))
    s1 = K.rng_state([8])
    s2 = s1.copy()
    delay = np.array([1000] * 4 + [50_000] * 4, np.int64)
    sigma = np.array([20.0, 0.0, 30.0, 40.0, 150.0, 20.0, 20.0, 1.0])
    base = -7
    a, na, b, nb = K.gen_photons(s1, 10**6, 10**9, 1e-5, thr, alias, CAT_A, CAT_B, delay, sigma, base,
                                 np.empty(0, np.int64), np.empty(100, np.int64))
    a, b = a[:na], b[:nb]
    ra, rb = K.ref_gen_photons(s2, 10**6, 10**9, 1e-5, thr, alias, CAT_A, CAT_B, delay, sigma)
    assert _tuples(a, base) == ra and _tuples(b, base) == rb
    np.testing.assert_array_equal(s1, s2)
    assert len(ra) + len(rb) > 10_000


def test_gen_photons_categories_follow_the_table():
    """Which detectors click, per pair: the alias table's probabilities (chi-square over the categories)."""
    rng = np.random.default_rng(5)
    p = rng.random(len(CAT_A)) + 0.2
    thr, alias = K.alias_table(p)
    s = K.rng_state([9])
    a, na, b, nb = K.gen_photons(s, 0, 10**12, 2e-7, thr, alias, CAT_A, CAT_B, np.zeros(8, np.int64), np.zeros(8), 0,
                                 np.empty(0, np.int64), np.empty(0, np.int64))
    a, b = a[:na], b[:nb]
    ta, ca = K.unpack(a, 0)
    tb, cb = K.unpack(b, 0)
    # pairs are identified by their emission time (no jitter, no delay): categories from the two sides
    both = np.intersect1d(ta, tb)
    n_events = len(np.union1d(ta, tb))
    assert n_events > 150_000 and len(both) > 10_000
    cat_of = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(CAT_A, CAT_B))}
    side_a = dict(zip(ta.tolist(), ca.tolist()))
    side_b = dict(zip(tb.tolist(), (cb - 4).tolist()))
    counts = np.zeros(len(CAT_A))
    for t in np.union1d(ta, tb).tolist():
        counts[cat_of[(side_a.get(t, -1), side_b.get(t, -1))]] += 1
    _chi2_check(counts, p / p.sum())


def _block_args(rng: np.random.Generator, k: int = 3) -> dict:
    p = rng.random(len(CAT_A)) * (rng.random(len(CAT_A)) < 0.7)
    thr, alias = K.alias_table(p if p.sum() > 0 else np.ones(len(CAT_A)))
    B = 1_000_000
    delay = np.array([rng.integers(0, 3 * B)] * 4 + [rng.integers(0, 3 * B)] * 4, np.int64)
    sigma = rng.choice([0.0, 30.0, 300.0], 8)
    clip = np.array([K.jitter_bound(x) for x in sigma], np.int64)
    in_delay = rng.integers(0, 5000, 8).astype(np.int64) * int(rng.choice([0, 1, 1000]))
    res = int(rng.choice([1, 7]))
    tt_sigma = float(rng.choice([0.0, 20.0]))
    det_h = k * B + B + delay - clip
    carry = sorted((int(rng.integers(det_h[c] - B, det_h[c] + 2000)), c) for c in range(8) for _ in range(rng.integers(0, 4)))
    tag_h = ((det_h + in_delay - K.jitter_bound(tt_sigma)) // res) * res
    tcarry = sorted((int(rng.integers(tag_h[c], tag_h[c] + 3000)), c) for c in range(8) for _ in range(rng.integers(0, 3)))
    return dict(
        t0=np.int64(k * B), block_ps=np.int64(B), pair_rate_per_ps=float(rng.choice([0.0, 5e-5, 3e-4])), thr=thr,
        alias=alias, cat_a=CAT_A, cat_b=CAT_B, arm_delay_ps=delay, det_sigma_ps=sigma, det_horizon=det_h,
        dark_rate_per_ps=rng.choice([0.0, 1e-5], 8), counting=rng.random(8) < 0.85,
        det_dead_ps=rng.choice([0, 3000, 40_000], 8).astype(np.int64), ap_prob=rng.choice([0.0, 0.2], 8),
        ap_tau_ps=np.full(8, 5000.0), det_last=rng.integers(k * B - 50_000, k * B, 8).astype(np.int64),
        det_carry_t=np.array([t for t, _ in carry], np.int64), det_carry_c=np.array([c for _, c in carry], np.uint8),
        input_delay_ps=in_delay, tt_sigma_ps=tt_sigma, resolution_ps=np.int64(res),
        tt_dead_ps=rng.choice([0, 2000], 8).astype(np.int64), tag_horizon=tag_h,
        tag_last=np.full(8, K.NEVER, np.int64), tag_carry_t=np.array([t for t, _ in tcarry], np.int64),
        tag_carry_c=np.array([c for _, c in tcarry], np.uint8), spread_small=rng.random(2) < 0.5,
        w0=np.empty(int(rng.choice([0, 10, 10**5])), np.int64), w1=np.empty(int(rng.choice([0, 10**5])), np.int64),
        w2=np.empty(int(rng.choice([0, 7])), np.int64), w3=np.empty(0, np.int64),
    )


@pytest.mark.parametrize("case", range(12))
def test_simulate_block_matches_the_reference_block(case):
    rng = np.random.default_rng(case)
    a1 = _block_args(rng)
    a2 = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a1.items()}
    s1 = K.rng_state([case, 99])
    s2 = s1.copy()
    got = K.simulate_block(s1, **a1)
    ref = K.ref_simulate_block(s2, **a2)
    assert len(got) == len(ref) + 4  # + the workspace buffers
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    np.testing.assert_array_equal(a1["det_last"], a2["det_last"])
    np.testing.assert_array_equal(a1["tag_last"], a2["tag_last"])
    np.testing.assert_array_equal(s1, s2)
    ts, ch = got[0], got[1]
    assert np.all(np.diff(ts) >= 0)
    assert not np.any(~a1["counting"][ch])  # no tag from a detector that is not counting
