"""BenchModel: the seeded physics of the virtual optical bench, producing time tags block by block.

The model owns a :class:`~drivers.sim.bench.state.BenchState` (what the simulated instruments change) and
implements the :class:`~drivers.sim.tagstream.BlockSource` protocol: block ``k`` covers pair emission times
``[k * block_ps, (k + 1) * block_ps)``. Each block reads one state snapshot, advances the fibers' polarization
drift by one step, turns the optics into a probability table (optics.py) and runs the compiled block
(kernels.py). The formulas are in physics.md; docs/simulator.md maps each to its config key.

Determinism: block k draws from its own random stream (seed, k); the drift has one stream of its own,
consumed one step per block. Blocks must be generated in increasing k, which BlockStream guarantees, because
a block carries state to the next one: events beyond its horizon, each detector's and channel's last click
(dead time), the fiber unitaries. The same seed, config and state changes give the same tags whatever the reads' chunking.
A jump forward (a stream restarted later) drops the carried events and drifts the fibers for the elapsed
time; going back (a new stream from 0) restarts the dead-time state but the fibers drift on.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Any

import numpy as np

from drivers.sim.bench import kernels as K
from drivers.sim.bench import optics as O
from drivers.sim.bench.config import DETECTORS, BenchConfig
from drivers.sim.bench.state import ARMS, DETECTORS_PER_SIDE, BenchState, LaserState, Snapshot

__all__ = ["BenchModel", "CAT_A", "CAT_B", "category_probabilities"]

PS_PER_S = 1_000_000_000_000
_TAG_STREAM, _DRIFT_STREAM, _INIT_STREAM = 0x7A6, 0xD1F, 0x1A1  # purposes of the random streams

# Categories of a pair that gives at least one click: (Alice's detector or none, Bob's detector or none).
_CATS = [(a, b) for a in range(5) for b in range(5) if (a, b) != (4, 4)]
CAT_A = np.array([a if a < 4 else -1 for a, _ in _CATS], np.int64)
CAT_B = np.array([b if b < 4 else -1 for _, b in _CATS], np.int64)


def category_probabilities(p: np.ndarray, eta_a: np.ndarray, eta_b: np.ndarray) -> np.ndarray:
    """Probability per emitted pair of each click category (CAT_A/CAT_B order).

    ``p``: joint output probabilities (4 x 4, sums to 1); ``eta_a``/``eta_b``: per-output arm efficiency
    eta_ch * eta_det (0 for a detector that is not counting). Both clicks: p[a, b] eta_a[a] eta_b[b];
    Alice only: sum_b p[a, b] eta_a[a] (1 - eta_b[b]); Bob only: sum_a p[a, b] (1 - eta_a[a]) eta_b[b].
    """
    grid = np.zeros((5, 5))
    grid[:4, :4] = p * np.outer(eta_a, eta_b)
    grid[:4, 4] = eta_a * (p @ (1.0 - eta_b))
    grid[4, :4] = eta_b * ((1.0 - eta_a) @ p)
    return np.clip(grid.ravel()[:24], 0.0, None)  # (a, b) -> 5 a + b; (none, none) = 24 is left out


class BenchModel:
    """The physical bench: a BlockSource of time tags plus the state the instrument simulators change.

    Attributes: ``cfg`` (the BenchConfig), ``state`` (the BenchState), ``block_ps``, ``lead_ps``.
    Thread safety: every method may be called from any thread; block generation and parameter changes are
    serialized by an internal lock, and the instruments' state is read through one snapshot per block.
    """

    HISTORY_BLOCKS = 4096  # fiber unitaries kept for fiber_unitary(arm, t_ps) in the past
    RATE_WINDOW_S = 0.1  # state.rates_hz: clicks per detector over the last 100 ms of simulated time
    MAX_CATCHUP_STEPS = 10_000  # a jump of more blocks drifts in this many equal sub-steps
    MAX_PREDICT_BLOCKS = 100_000  # fiber_unitary() looks at most this far ahead

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self._lock = threading.RLock()
        det, tag = cfg.detectors, cfg.tagger
        laser = LaserState(
            output_on=cfg.pump.output_on, tec_on=cfg.pump.output_on, current_setpoint_ma=cfg.pump.current_ma,
            current_limit_ma=cfg.pump.current_limit_ma, threshold_ma=cfg.pump.threshold_ma,
            slope_mw_per_ma=cfg.pump.slope_mw_per_ma,
        )
        self.state = BenchState(
            laser=laser, detectors=DETECTORS, eve_fraction=cfg.eve.fraction, eve_arm=cfg.eve.arm,
            analyser_angles_deg={"alice": cfg.receivers.alice_angles_deg, "bob": cfg.receivers.bob_angles_deg},
        )
        for i in range(DETECTORS):
            self.state.update_detector(i, enabled=True, bias_ua=det.nominal_bias_ua[i],
                                       critical_bias_ua=det.critical_bias_ua[i])

        # fixed physics, per detector d = 0..7 (0-3 Alice, 4-7 Bob)
        self._arm_of = [ARMS[d // DETECTORS_PER_SIDE] for d in range(DETECTORS)]
        self._eta_ch = {arm: cfg.arms[arm].transmission for arm in ARMS}
        self._eta_arm = np.array([self._eta_ch[a] for a in self._arm_of])
        self._arm_delay = np.array([cfg.arms[a].delay_ps for a in self._arm_of], np.int64)
        # fiber delay changes (delay_drift_ps_per_s, set_fiber_delay): the delay in ps as a float per arm
        self._fiber_delay = {arm: float(cfg.arms[arm].delay_ps) for arm in ARMS}
        self._delay_rate = {arm: float(cfg.arms[arm].delay_drift_ps_per_s) for arm in ARMS}
        # per channel, the last tag returned: a shortened fiber must not make a channel's tags go back
        self._last_tag_ps = np.full(max(cfg.tagger.channels, DETECTORS), K.NEVER, np.int64)
        self._eta_det = np.array(det.efficiency, float)
        self._dark_hz = np.array(det.dark_count_hz, float)
        self._det_dead_ps = np.round(np.array(det.dead_time_ns) * 1e3).astype(np.int64)
        self._det_sigma = np.array(det.jitter_ps, float)
        self._det_clip = np.array([K.jitter_bound(s) for s in det.jitter_ps], np.int64)
        self._ap_prob = np.array(det.afterpulse_probability, float)
        self._ap_tau_ps = np.array(det.afterpulse_time_ns, float) * 1e3
        self._tt_sigma = float(tag.jitter_ps)
        self._tt_clip = K.jitter_bound(tag.jitter_ps)
        self._tt_dead_ps = np.round(np.array(tag.dead_time_ns) * 1e3).astype(np.int64)
        self._input_delay = np.array(tag.input_delays_ps, np.int64)
        self._res = int(tag.resolution_ps)
        self.block_ps = int(round(cfg.block_ms * 1e9))
        # delays only move tags later; jitters (clipped) and flooring to the resolution move them earlier
        self.lead_ps = int(self._det_clip.max()) + self._tt_clip + self._res

        # the fibers
        self._drift = {arm: float(cfg.arms[arm].drift_rad2_per_s) for arm in ARMS}
        self._u: dict[str, np.ndarray] = {}
        for i, arm in enumerate(ARMS):
            if cfg.arms[arm].initial_unitary == "random":
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, _INIT_STREAM, i])))
                self._u[arm] = O.haar_su2(rng)
            else:
                self._u[arm] = np.eye(2, dtype=complex)
        self._u_block = 0  # the block the current unitaries apply to
        self._drift_rng = K.stream_state(cfg.seed, _DRIFT_STREAM, 0)  # one stream, consumed step by step
        self._history: collections.deque = collections.deque(maxlen=self.HISTORY_BLOCKS)

        # sequential state carried from block to block
        self._last_k: int | None = None
        self._reset_sequential()
        # the kernel's big per-block buffers, kept from block to block (fresh ~1 MB arrays every block would
        # cost more in page faults than the physics); grown by the kernel when needed, bounded by the peak rate
        self._work = [np.empty(0, np.int64) for _ in range(4)]
        self._physics_cache: tuple[Any, dict[str, Any]] | None = None
        self._controller_cache: dict[tuple[float, float, float], np.ndarray] = {}
        self._rho_cache: tuple[Any, np.ndarray] | None = None
        self._rate_window = max(1, int(round(self.RATE_WINDOW_S * PS_PER_S / self.block_ps)))
        self._clicks_window: collections.deque = collections.deque()
        self._clicks_sum = np.zeros(DETECTORS, np.int64)
        self.stats = {"blocks": 0, "tags": 0, "dropped": 0}

    # -- BlockSource -------------------------------------------------------------------------------------
    @property
    def channel_count(self) -> int:
        return self.cfg.tagger.channels

    @property
    def resolution_ps(self) -> int:
        return self._res

    def block(self, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Tags of block k: (timestamps int64 ps sorted, channels uint8, dropped by the tagger's rate limit)."""
        with self._lock:
            snap = self.state.snapshot()
            self._advance_to(k)
            ph = self._physics(snap)
            B = self.block_ps
            t0 = k * B
            n = DETECTORS
            det_h = t0 + B + self._arm_delay - self._det_clip
            in_delay = self._input_delay[:n].copy()
            tag_h = ((det_h + in_delay - self._tt_clip) // self._res) * self._res
            s = K.stream_state(self.cfg.seed, _TAG_STREAM, k)
            # input delays that differ within a receiver displace its tags: sort by channel, then merge
            spread_small = self._delay_spread_small(in_delay)
            (ts, ch, clicks, self._det_carry_t, self._det_carry_c, self._tag_carry_t, self._tag_carry_c,
             *self._work) = K.simulate_block(
                s, np.int64(t0), np.int64(B), ph["pair_rate_per_ps"], ph["thr"], ph["alias"], CAT_A, CAT_B,
                self._arm_delay, self._det_sigma, det_h, ph["dark_rate_per_ps"], ph["counting"],
                self._det_dead_ps, self._ap_prob, self._ap_tau_ps, self._det_last, self._det_carry_t,
                self._det_carry_c, in_delay, self._tt_sigma, np.int64(self._res), self._tt_dead_ps[:n],
                tag_h, self._tag_last, self._tag_carry_t, self._tag_carry_c, spread_small, *self._work,
            )
            self._last_k = k
            self._record_rates(clicks)
            if len(ts) and ts[0] < 0:  # before the tagger's time origin (jitter at the very start)
                cut = int(np.searchsorted(ts, 0))
                ts, ch = ts[cut:], ch[cut:]
            if len(ts):
                # a fiber that got shorter between blocks: the few tags of a channel that would now precede
                # that channel's tags already returned are held at its last one (a shift of at most the delay
                # change), so every channel's tags still increase from block to block
                if ts[0] <= self._last_tag_ps.max():
                    early = ts < self._last_tag_ps[ch]
                    if early.any():
                        ts = np.where(early, self._last_tag_ps[ch], ts)
                        order = np.argsort(ts, kind="stable")
                        ts, ch = ts[order], ch[order]
                idx = np.full(len(self._last_tag_ps), -1, np.int64)
                idx[ch] = np.arange(len(ch))  # repeated indices: the last assignment (the latest tag) stays
                seen = idx >= 0
                self._last_tag_ps[seen] = ts[idx[seen]]
            dropped = 0
            if self.cfg.tagger.max_rate_hz > 0:
                allowed = int(self.cfg.tagger.max_rate_hz * B / PS_PER_S)
                if len(ts) > allowed:  # the tagger's buffer fills: the rest of the block is lost
                    dropped = len(ts) - allowed
                    ts, ch = ts[:allowed], ch[:allowed]
            self.stats["blocks"] += 1
            self.stats["tags"] += len(ts)
            self.stats["dropped"] += dropped
            return ts, ch, dropped

    def warm_up(self) -> float:
        """Compile (or load from numba's cache) every kernel the bench uses, on a throwaway copy of this bench:
        about 20 s the first time on a machine, well under a second once cached. Returns the seconds spent.
        Call it before the first block is needed in a hurry (the first block compiles otherwise)."""
        t0 = time.monotonic()
        cfg = dataclasses.replace(self.cfg, block_ms=0.01, detectors=dataclasses.replace(
            self.cfg.detectors, afterpulse_probability=(0.01,) * DETECTORS))
        clone = BenchModel(cfg)
        clone.set_drift_rate("alice", 1.0)
        clone.set_input_delay(3, 1_000_000)  # the channel-split tag sort as well
        for k in range(3):
            clone.block(k)
        return time.monotonic() - t0

    # -- block-to-block state ----------------------------------------------------------------------------
    def _reset_sequential(self) -> None:
        self._last_tag_ps = np.full(max(self.cfg.tagger.channels, DETECTORS), K.NEVER, np.int64)
        self._det_last = np.full(DETECTORS, K.NEVER, np.int64)
        self._tag_last = np.full(DETECTORS, K.NEVER, np.int64)
        self._drop_carries()

    def _drop_carries(self) -> None:
        self._det_carry_t = np.empty(0, np.int64)
        self._det_carry_c = np.empty(0, np.uint8)
        self._tag_carry_t = np.empty(0, np.int64)
        self._tag_carry_c = np.empty(0, np.uint8)

    def _delay_spread_small(self, delays: np.ndarray) -> np.ndarray:
        """Per receiver: are its tags, displaced by its channels' different input delays, still nearly sorted
        (a couple of displacements per tag at the last block's rate)? Only the sort method depends on it."""
        out = np.ones(2, bool)
        if self._clicks_window:
            last = self._clicks_window[-1]
            for i in range(2):
                d = delays[4 * i:4 * i + 4]
                rate = float(last[4 * i:4 * i + 4].sum()) / self.block_ps  # per ps
                out[i] = (int(d.max()) - int(d.min())) * rate < 2.0
        return out

    def _advance_to(self, k: int) -> None:
        """Continuity of the carried state and the fiber drift for block k."""
        if k < 0:
            raise ValueError(f"block index must be >= 0, got {k}")
        last = self._last_k
        if last is None:
            steps = k - self._u_block
        elif k == last + 1:
            steps = 1
        elif k > last + 1:  # a jump forward: pending events are stale, the fibers drift for the gap
            steps = k - last
            self._drop_carries()
        else:  # a new stream from an earlier time: dead-time state restarts, the fibers drift on
            steps = 1
            self._reset_sequential()
            self._history.clear()
        self._u, self._drift_rng = self._drift_steps(self._u, self._drift_rng, max(0, steps))
        if steps > 0 and any(self._delay_rate[a] for a in ARMS):
            dt = steps * self.block_ps / PS_PER_S
            for arm in ARMS:
                self._fiber_delay[arm] = max(0.0, self._fiber_delay[arm] + self._delay_rate[arm] * dt)
            self._update_arm_delay()
        self._u_block = k
        self._history.append((k, self._u["alice"].copy(), self._u["bob"].copy()))

    def _update_arm_delay(self) -> None:
        self._arm_delay = np.array([int(round(self._fiber_delay[a])) for a in self._arm_of], np.int64)

    def _drift_steps(self, u: dict[str, np.ndarray], rng: np.ndarray,
                     steps: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``steps`` blocks of the random walk U <- exp(-i theta n.sigma/2) U, theta ~ N(0, 2 D dt) (physics.md),
        from the drift stream's state ``rng``; returns new unitaries and state (the inputs are not changed).
        More than MAX_CATCHUP_STEPS blocks are walked in that many longer steps."""
        if steps <= 0 or all(self._drift[a] <= 0 for a in ARMS):
            return u, rng
        dt = self.block_ps / PS_PER_S
        if steps > self.MAX_CATCHUP_STEPS:
            dt, steps = dt * steps / self.MAX_CATCHUP_STEPS, self.MAX_CATCHUP_STEPS
        ua, ub, rng = u["alice"].copy(), u["bob"].copy(), rng.copy()
        K.drift_walk(rng, ua, ub, steps, math.sqrt(2.0 * self._drift["alice"] * dt),
                     math.sqrt(2.0 * self._drift["bob"] * dt))
        return {"alice": ua, "bob": ub}, rng

    def _record_rates(self, clicks: np.ndarray) -> None:
        self._clicks_window.append(clicks)
        self._clicks_sum += clicks
        if len(self._clicks_window) > self._rate_window:
            self._clicks_sum -= self._clicks_window.popleft()
        rates = self._clicks_sum * (PS_PER_S / (len(self._clicks_window) * self.block_ps))
        with self.state.lock:
            self.state.rates_hz[:DETECTORS] = rates.tolist()

    # -- physics of one state ----------------------------------------------------------------------------
    def _controller(self, paddles: tuple[float, float, float]) -> np.ndarray:
        m = self._controller_cache.get(paddles)
        if m is None:
            if len(self._controller_cache) > 64:
                self._controller_cache.clear()
            m = self._controller_cache[paddles] = O.controller_unitary(paddles)
        return m

    def _pair_state(self, snap: Snapshot) -> np.ndarray:
        key = (snap.eve_fraction, snap.eve_arm)
        if self._rho_cache is None or self._rho_cache[0] != key:
            src = self.cfg.source
            rho = O.intercept_resend(O.werner_state(src.bell_state, src.visibility), snap.eve_arm, snap.eve_fraction)
            self._rho_cache = (key, rho)
        return self._rho_cache[1]

    def _physics(self, snap: Snapshot, u_fiber: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Rates and probability tables for one state snapshot and fiber unitaries (cached on both)."""
        u_fiber = self._u if u_fiber is None else u_fiber
        key = (snap.generation, u_fiber["alice"].tobytes(), u_fiber["bob"].tobytes())
        if self._physics_cache is not None and self._physics_cache[0] == key:
            return self._physics_cache[1]
        pump_mw = snap.laser.power_mw
        pair_rate = self.cfg.source.brightness * pump_mw  # pairs/s
        counting = np.array([d.counting for d in snap.detectors[:DETECTORS]], bool)
        u_arm = {arm: self._controller(snap.paddles_deg[arm]) @ u_fiber[arm] for arm in ARMS}
        p = O.joint_probabilities(self._pair_state(snap), u_arm["alice"], u_arm["bob"],
                                  snap.analyser_angles_deg["alice"], snap.analyser_angles_deg["bob"])
        eta = self._eta_arm * self._eta_det * counting
        cat_p = category_probabilities(p, eta[:4], eta[4:])
        thr, alias = K.alias_table(cat_p)
        out = {
            "pump_mw": pump_mw,
            "pair_rate_hz": pair_rate,
            "pair_rate_per_ps": float(pair_rate * cat_p.sum() / PS_PER_S),
            "thr": thr,
            "alias": alias,
            "counting": counting,
            "dark_rate_per_ps": self._dark_hz * counting / PS_PER_S,
            "eta": eta,
            "p": p,
            "u_arm": u_arm,
        }
        self._physics_cache = (key, out)
        return out

    # -- fibers and compensation -------------------------------------------------------------------------
    def _check_arm(self, arm: str) -> None:
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {arm!r}")

    def fiber_unitary(self, arm: str, t_ps: int | None = None) -> np.ndarray:
        """The arm's fiber unitary (2x2 complex, SU(2)) now (as of the last generated block), or at emission time
        ``t_ps``: from the kept history (HISTORY_BLOCKS blocks) or, ahead of the last block, the walk the next
        blocks will take (at the current drift rate). Raises ValueError for a time no longer kept."""
        self._check_arm(arm)
        with self._lock:
            if t_ps is None:
                return self._u[arm].copy()
            k = int(t_ps) // self.block_ps
            if k >= self._u_block:
                ahead = k - self._u_block
                if ahead > self.MAX_PREDICT_BLOCKS:
                    raise ValueError(f"t_ps is {ahead} blocks ahead; at most {self.MAX_PREDICT_BLOCKS}")
                u, _ = self._drift_steps(self._u, self._drift_rng, ahead)
                return u[arm].copy()
            for kk, ua, ub in self._history:
                if kk == k:
                    return (ua if arm == "alice" else ub).copy()
            raise ValueError(f"t_ps {t_ps} is before the kept history of the fiber unitary")

    def set_fiber_unitary(self, arm: str, u: np.ndarray) -> None:
        """Replace the arm's current fiber unitary (projected to SU(2)); the drift continues from it."""
        self._check_arm(arm)
        m = np.asarray(u, complex).reshape(2, 2)
        m = m / np.sqrt(np.linalg.det(m))
        with self._lock:
            self._u[arm] = O.su2_project(m)

    def drift_rate(self, arm: str) -> float:
        self._check_arm(arm)
        return self._drift[arm]

    def set_drift_rate(self, arm: str, rad2_per_s: float) -> None:
        """Change the arm's polarization drift rate D (rad^2/s, >= 0) from the next block on."""
        self._check_arm(arm)
        if not (isinstance(rad2_per_s, (int, float)) and math.isfinite(rad2_per_s) and rad2_per_s >= 0):
            raise ValueError(f"drift rate must be a finite number >= 0 (rad^2/s), got {rad2_per_s!r}")
        with self._lock:
            self._drift[arm] = float(rad2_per_s)

    def arm_unitary(self, arm: str) -> np.ndarray:
        """The arm's total unitary now: polarization controller (current paddles) times fiber."""
        self._check_arm(arm)
        with self._lock:
            return O.controller_unitary(self.state.paddles(arm)) @ self._u[arm]

    def compensating_paddles(self, arm: str) -> list[float]:
        """Paddle angles [deg, deg, deg] within the MPC320's 0-170 degrees that undo the arm's current fiber
        unitary (the controller times the fiber is then the identity up to a global phase). For the ~1% of
        unitaries no in-range setting undoes exactly, the best in range (residual infidelity below 1e-3)."""
        self._check_arm(arm)
        with self._lock:
            u = self._u[arm].copy()
        return O.compensating_angles(u)[0]

    def fiber_delay_ps(self, arm: str) -> float:
        """The arm's fiber delay now (ps; tags use it rounded to whole ps)."""
        self._check_arm(arm)
        with self._lock:
            return self._fiber_delay[arm]

    def set_fiber_delay(self, arm: str, picoseconds: float) -> None:
        """Set the arm's fiber delay (a fiber length change; 0 <= ps <= 1e12), effective from the next block; a
        delay drift continues from it."""
        self._check_arm(arm)
        if not (isinstance(picoseconds, (int, float)) and math.isfinite(picoseconds)
                and 0 <= picoseconds <= 1_000_000_000_000):
            raise ValueError(f"fiber delay must be within 0..1e12 ps, got {picoseconds!r}")
        with self._lock:
            self._fiber_delay[arm] = float(picoseconds)
            self._update_arm_delay()

    def delay_drift(self, arm: str) -> float:
        self._check_arm(arm)
        return self._delay_rate[arm]

    def set_delay_drift(self, arm: str, ps_per_s: float) -> None:
        """Change the arm's fiber delay drift (ps per simulated second, either sign) from the next block on."""
        self._check_arm(arm)
        if not (isinstance(ps_per_s, (int, float)) and math.isfinite(ps_per_s) and abs(ps_per_s) <= 1e6):
            raise ValueError(f"delay drift must be a finite number of ps/s within +-1e6, got {ps_per_s!r}")
        with self._lock:
            self._delay_rate[arm] = float(ps_per_s)

    # -- tagger ------------------------------------------------------------------------------------------
    @property
    def input_delays_ps(self) -> list[int]:
        with self._lock:
            return [int(d) for d in self._input_delay]

    def set_input_delay(self, channel: int, picoseconds: int) -> None:
        """Set one channel's input delay (0 <= ps <= 1e12), effective from the next block."""
        if not 0 <= channel < self.channel_count:
            raise ValueError(f"channel {channel} does not exist (0..{self.channel_count - 1})")
        if not 0 <= picoseconds <= 1_000_000_000_000:
            raise ValueError(f"input delay must be within 0..1e12 ps, got {picoseconds}")
        with self._lock:
            delays = self._input_delay.copy()
            delays[channel] = int(picoseconds)
            self._input_delay = delays

    # -- analytic expectations ---------------------------------------------------------------------------
    def expected_rates(self, window_ps: float | None = None) -> dict[str, Any]:
        """Analytic rates for the current state and fiber unitaries (physics.md, 'What the daemon should then
        measure'); per detector d = 0..7 and per coincidence pair (Alice's output i, Bob's output j).

        ``singles_hz``: true click rate R eta_d P_d + DCR before dead time; ``singles_measured_hz``: after the
        detector's (or the tagger's, if longer) non-paralyzable dead time, n' / (1 + n' tau) with
        n' = n / (1 - p_ap) counting afterpulse cascades (an approximation for p_ap << 1);
        ``coincidences_hz[i][j]`` = R eta_A,i eta_B,j P[i, j] x live fractions (1 - m tau) of both detectors;
        with ``window_ps`` (full width w): the share erf(w / (2 sqrt2 sigma_c)) inside the window and the
        accidentals m_i m_j w; ``qber``: per basis from true coincidences only; ``chsh``: S of the
        probability table; ``peak_sigma_ps[i][j]`` = sqrt(sigma_i^2 + sigma_j^2 + 2 sigma_tt^2);
        ``peak_offset_ps[i][j]``: mean of t_Bob - t_Alice (fiber and input delays).
        """
        with self._lock:
            snap = self.state.snapshot()
            ph = self._physics(snap)
            delays = self._input_delay[:DETECTORS] + self._arm_delay
        r, p, eta, counting = ph["pair_rate_hz"], ph["p"], ph["eta"], ph["counting"]
        photon = np.concatenate([r * eta[:4] * p.sum(axis=1), r * eta[4:] * p.sum(axis=0)])
        singles = photon + self._dark_hz * counting
        n_eff = singles / (1.0 - self._ap_prob)
        tau = np.maximum(self._det_dead_ps, self._tt_dead_ps[:DETECTORS]) / PS_PER_S
        measured = n_eff / (1.0 + n_eff * tau)
        live = 1.0 - measured * tau
        true = r * np.outer(eta[:4], eta[4:]) * p * np.outer(live[:4], live[4:])
        sig = self._det_sigma
        sigma_c = np.sqrt(sig[:4, None] ** 2 + sig[None, 4:] ** 2 + 2 * self._tt_sigma ** 2)
        out: dict[str, Any] = {
            "pump_mw": ph["pump_mw"],
            "pair_rate_hz": r,
            "arm_transmission": dict(self._eta_ch),
            "arm_delay_ps": {arm: int(round(self._fiber_delay[arm])) for arm in ARMS},
            "detector_efficiency": (self._eta_det * counting).tolist(),
            "singles_hz": singles.tolist(),
            "singles_measured_hz": measured.tolist(),
            "coincidences_hz": true.tolist(),
            "coincidences_total_hz": float(true.sum()),
            "qber": [O.qber(p, 0, self.cfg.source.bell_state), O.qber(p, 1, self.cfg.source.bell_state)],
            "chsh": O.chsh(p),
            "joint_probabilities": p.tolist(),
            "peak_sigma_ps": sigma_c.tolist(),
            "peak_offset_ps": (delays[None, 4:] - delays[:4, None]).tolist(),
        }
        if window_ps is not None:
            w = float(window_ps)
            share = np.vectorize(math.erf)(w / (2.0 * math.sqrt(2.0) * np.maximum(sigma_c, 1e-12)))
            acc = np.outer(measured[:4], measured[4:]) * w / PS_PER_S
            out.update({
                "window_ps": w,
                "window_share": share.tolist(),
                "coincidences_in_window_hz": (true * share).tolist(),
                "coincidences_in_window_total_hz": float((true * share).sum()),
                "accidentals_hz": acc.tolist(),
            })
        return out

    def describe(self) -> dict[str, Any]:
        """A short JSON-friendly summary of the bench (for status pages)."""
        with self._lock:
            return {
                "seed": self.cfg.seed,
                "block_ps": self.block_ps,
                "channels": self.channel_count,
                "resolution_ps": self._res,
                "detector_preset": self.cfg.detectors.preset,
                "drift_rad2_per_s": dict(self._drift),
                "fiber_delay_ps": {a: round(self._fiber_delay[a], 3) for a in ARMS},
                "delay_drift_ps_per_s": dict(self._delay_rate),
                "input_delays_ps": self.input_delays_ps,
                **self.stats,
            }
