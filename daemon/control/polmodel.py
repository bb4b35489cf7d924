"""Model-based polarization compensation: estimate the channel from the coincidence matrix, solve for the paddles.

The ``qkd.<link>`` messages carry the whole 4x4 coincidence matrix (Alice H, V, D, A x Bob H, V, D, A), not
only the two sifted QBERs: the cross-basis blocks (Alice Z with Bob X and Alice X with Bob Z) are measured
at no cost by the passive BBM92 receivers. From the four correlations E[a][b] (a, b in {Z, X}) one
interval gives four numbers about the two-photon state, where the QBERs give two.

Model (physics.md). The pairs leave the source in the Bell state |B>; each arm applies a unitary, and the
arm with the polarization controller applies ``Uc(phi) U_fiber`` with the MPC320's quarter-half-quarter
controller ``Uc = J(pi/2, phi3) J(pi, phi2) J(pi/2, phi1)``, ``J(delta, phi) = R(-phi) diag(e^{-i delta/2},
e^{i delta/2}) R(phi)``. Whatever the fibers do, the state at the receivers can be written (Bob's controller)
``(G x Uc(phi)) |B>`` with ONE unknown G in SU(2) (Alice's fiber and Bob's fiber moved across the Bell state),
so the measured correlations are ``E[a][b] = v <psi| A_a x A_b |psi>`` with A the analysers' observables
(cos 2theta sigma_z + sin 2theta sigma_x) and v the visibility (Werner noise and accidentals).

Estimation: least squares of the counts-weighted correlations of recent measurements (each at its known
commanded paddle angles) over G (a rotation vector g, Levenberg-Marquardt from the previous estimate and,
when that does not fit, from a grid over SU(2)) with v in closed form. One measurement at one paddle
setting leaves a two-fold ambiguity (the sign of the error rotation about the two measured axes is not
seen by the Z/X blocks, only by Y which is not measured); two settings resolve it, and so does continuity
with the previous estimate under slow drift. Then the paddles: the setting within the limits that
maximizes the predicted fidelity with |B>, preferring the nearest (short moves).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from drivers.paddles import controller_unitaries

_S = 1.0 / math.sqrt(2.0)
# |B> as a 2x2 matrix: |B> = sum B[a, b] |a>|b> (Alice first)
BELL_MATRICES: dict[str, np.ndarray] = {
    "phi+": np.array([[_S, 0], [0, _S]], complex),
    "phi-": np.array([[_S, 0], [0, -_S]], complex),
    "psi+": np.array([[0, _S], [_S, 0]], complex),
    "psi-": np.array([[0, _S], [-_S, 0]], complex),
}
_SX = np.array([[0, 1], [1, 0]], complex)
_SY = np.array([[0, -1j], [1j, 0]], complex)
_SZ = np.array([[1, 0], [0, -1]], complex)


def su2(g: np.ndarray) -> np.ndarray:
    """exp(-i g.sigma/2) for rotation vectors g of shape (..., 3)."""
    g = np.asarray(g, float)
    if g.shape == (3,):
        th = math.sqrt(float(g @ g))
        if th < 1e-12:
            return np.eye(2, dtype=complex)
        c, sn = math.cos(th / 2), math.sin(th / 2) / th
        x, y, z = g
        return np.array([[c - 1j * sn * z, -1j * sn * x - sn * y], [-1j * sn * x + sn * y, c + 1j * sn * z]])
    th = np.linalg.norm(g, axis=-1)
    n = np.where(th[..., None] > 1e-12, g / np.maximum(th, 1e-12)[..., None], 0.0)
    gs = n[..., 0, None, None] * _SX + n[..., 1, None, None] * _SY + n[..., 2, None, None] * _SZ
    return np.cos(th / 2)[..., None, None] * np.eye(2) - 1j * np.sin(th / 2)[..., None, None] * gs


def observables(angles_deg: Sequence[float]) -> np.ndarray:
    """(2, 2, 2): the +-1 observables of the two analysers (cos 2theta sigma_z + sin 2theta sigma_x)."""
    t = np.radians(np.asarray(angles_deg, float))
    return np.stack([math.cos(2 * x) * _SZ + math.sin(2 * x) * _SX for x in t])


def correlations(matrix: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(E[a][b], N[a][b]) of a 4x4 coincidence matrix (Alice + - + - rows, Bob columns; analysers Z, X)."""
    m = np.asarray(matrix, float).reshape(4, 4)
    e = np.zeros((2, 2))
    n = np.zeros((2, 2))
    for a in range(2):
        for b in range(2):
            blk = m[2 * a:2 * a + 2, 2 * b:2 * b + 2]
            tot = blk.sum()
            n[a, b] = tot
            e[a, b] = (blk[0, 0] + blk[1, 1] - blk[0, 1] - blk[1, 0]) / tot if tot > 0 else 0.0
    return e, n


class ChannelModel:
    """The link's two-photon channel as seen through one polarization controller (see the module doc)."""

    def __init__(self, bell_state: str = "phi+", arm: str = "bob", alice_angles_deg=(0.0, 45.0),
                 bob_angles_deg=(0.0, 45.0), lo: float = 0.0, hi: float = 170.0) -> None:
        self.bell = BELL_MATRICES[bell_state]
        self.arm = arm
        self.obs_a = observables(alice_angles_deg)
        self.obs_b = observables(bob_angles_deg)
        self.lo, self.hi = float(lo), float(hi)
        self._grid: tuple[np.ndarray, np.ndarray] | None = None
        # the ideal correlations of the key bases (signs): QBER = (1 - sign E) / 2
        self.signs = np.sign(np.real(self.predict_pure(np.zeros(3), np.zeros(3)).diagonal()))
        self.signs[self.signs == 0] = 1

    # -- forward model -----------------------------------------------------------------------------------
    def _psi(self, g: np.ndarray, phi: np.ndarray, uc: np.ndarray | None = None) -> np.ndarray:
        gm = su2(g)
        if uc is None:
            uc = controller_unitaries(phi)
        if self.arm == "bob":
            return gm @ self.bell @ np.swapaxes(uc, -1, -2)  # (G x Uc)|B> as a matrix: G B Uc^T
        return uc @ self.bell @ np.swapaxes(gm, -1, -2)

    def predict_pure(self, g: np.ndarray, phi: np.ndarray, uc: np.ndarray | None = None) -> np.ndarray:
        """E[..., a, b] for visibility 1; g (..., 3) rotation vectors, phi (..., 3) paddle degrees (broadcast);
        ``uc``: the controller matrices of phi when already known."""
        psi = self._psi(np.asarray(g, float), phi if uc is not None else np.asarray(phi, float), uc)
        ph = np.conj(np.swapaxes(psi, -1, -2))
        # <psi| A x B |psi> = Tr(Psi^dagger A Psi B^T), observables real symmetric
        e = np.einsum("...ij,ajk,...kl,bli->...ab", ph, self.obs_a, psi, self.obs_b)
        return np.real(e)

    def fidelity(self, g: np.ndarray, phi: np.ndarray, uc: np.ndarray | None = None) -> np.ndarray:
        psi = self._psi(np.asarray(g, float), phi if uc is not None else np.asarray(phi, float), uc)
        return np.abs(np.einsum("ij,...ij->...", np.conj(self.bell), psi)) ** 2

    def qber(self, g: np.ndarray, v: float, phi: np.ndarray) -> np.ndarray:
        """Predicted (QBER Z, QBER X) for visibility v."""
        d = np.diagonal(self.predict_pure(g, phi), axis1=-2, axis2=-1)
        return (1 - v * self.signs * d) / 2

    # -- estimation --------------------------------------------------------------------------------------
    @staticmethod
    def _stack(obs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (controller_unitaries(np.stack([p for p, _, _ in obs])), np.stack([e for _, e, _ in obs]).reshape(-1),
                np.stack([w for _, _, w in obs]).reshape(-1))

    def _residuals(self, g: np.ndarray, stacked: tuple[np.ndarray, np.ndarray, np.ndarray]
                   ) -> tuple[np.ndarray, float]:
        """Weighted residuals (v in closed form) and v, for one g."""
        ucs, e, w = stacked
        p = self.predict_pure(g, None, ucs).reshape(-1)
        den = float((w * p * p).sum())
        v = float((w * p * e).sum() / den) if den > 0 else 0.0
        v = min(1.0, max(0.0, v))
        return np.sqrt(w) * (e - v * p), v

    def _cost_batch(self, gs: np.ndarray, obs) -> np.ndarray:
        """Weighted residual sum of squares for many g at once (v in closed form each)."""
        num = np.zeros(len(gs))
        den = np.zeros(len(gs))
        ee = np.zeros(len(gs))
        for phi, e, w in obs:
            p = self.predict_pure(gs, None, controller_unitaries(phi))
            num += (w * p * e).sum(axis=(1, 2))
            den += (w * p * p).sum(axis=(1, 2))
            ee += float((w * e * e).sum())
        v = np.clip(np.where(den > 0, num / np.maximum(den, 1e-30), 0), 0, 1)
        return ee - 2 * v * num + v * v * den

    def _lm(self, g0: np.ndarray, obs, iters: int = 40) -> tuple[np.ndarray, float, float]:
        obs = self._stack(obs)
        g = np.array(g0, float)
        r, v = self._residuals(g, obs)
        cost = float(r @ r)
        lam = 1e-3
        h = 1e-6
        for _ in range(iters):
            jac = np.stack([(self._residuals(g + h * np.eye(3)[k], obs)[0] - r) / h for k in range(3)], 1)
            a = jac.T @ jac
            grad = jac.T @ r
            improved = False
            for _ in range(8):
                step = np.linalg.solve(a + lam * (np.diag(np.diag(a)) + 1e-12 * np.eye(3)), -grad)
                r2, v2 = self._residuals(g + step, obs)
                c2 = float(r2 @ r2)
                if c2 < cost:
                    g, r, v, lam = g + step, r2, v2, max(lam / 3, 1e-9)
                    improved = cost - c2 > 1e-7 * max(1.0, cost)
                    cost = c2
                    break
                lam *= 4
            if not improved:
                break
        return g, v, cost

    def fit(self, obs: Iterable[tuple[Sequence[float], np.ndarray, np.ndarray]], start: np.ndarray | None = None,
            global_search: bool = True) -> tuple[np.ndarray, float, float]:
        """Least-squares (g, v, residual per degree of freedom) of measurements ``(paddles_deg, E, N)``."""
        obs = [(np.asarray(p, float), np.asarray(e, float), np.asarray(n, float)) for p, e, n in obs]
        dof = max(1, 4 * len(obs) - 4)
        starts: list[np.ndarray] = []
        if start is not None:
            starts.append(np.asarray(start, float))
        if global_search or start is None:
            grid = _SU2_GRID
            c = self._cost_batch(grid, obs[-6:])  # starting points: the newest groups suffice
            starts += [grid[i] for i in np.argsort(c)[:3]]
        best = None
        for s in starts:
            g, v, cost = self._lm(s, obs)
            if best is None or cost < best[2] - 1e-9:
                best = (g, v, cost)
        g, v, cost = best
        return g, v, cost / dof

    # -- the paddles -------------------------------------------------------------------------------------
    def best_paddles(self, g: np.ndarray, current: Sequence[float], paddles: Sequence[int] = (0, 1, 2),
                     move_weight: float = 2e-5, near_enough: float = 0.985) -> tuple[list[float], float]:
        """Paddle angles within [lo, hi] maximizing the fidelity with |B> given the channel g, minus a small
        penalty per degree of travel (among equally good settings, the nearest); (angles, fidelity).
        Paddles not in ``paddles`` stay where they are."""
        cur = np.asarray(current, float)
        free = np.zeros(3, bool)
        free[list(paddles)] = True
        lo, hi = self.lo, self.hi

        def score(phi: np.ndarray) -> np.ndarray:
            return self.fidelity(g, phi) - move_weight * np.abs(phi - cur).sum(-1)

        idx = np.flatnonzero(free)
        offs = np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * len(idx), indexing="ij"), -1).reshape(-1, len(idx))
        # quadratic model in the free coordinates: 1, x_k, x_k x_l (k <= l)
        pairs = [(k, l) for k in range(len(idx)) for l in range(k, len(idx))]

        def design(x: np.ndarray) -> np.ndarray:
            cols = [np.ones(len(x))] + [x[:, k] for k in range(len(idx))] + [x[:, k] * x[:, l] for k, l in pairs]
            return np.stack(cols, 1)

        basis = np.linalg.pinv(design(offs))

        def refine(phi: np.ndarray) -> tuple[np.ndarray, float]:
            """Newton steps on a quadratic fitted to a 3^n stencil (h = 0.5 degree), trust region 10 degrees."""
            h = 0.5
            f = float(score(phi))
            for _ in range(25):
                pts = np.repeat(phi[None, :], len(offs), 0)
                pts[:, idx] += h * offs
                c = basis @ score(np.clip(pts, lo, hi))
                n = len(idx)
                grad = c[1:1 + n] / h
                hess = np.zeros((n, n))
                for (k, l), ck in zip(pairs, c[1 + n:]):
                    hess[k, l] += ck / h ** 2
                    hess[l, k] += ck / h ** 2
                w, vecs = np.linalg.eigh(hess)
                if np.all(w < -1e-9):
                    step = -np.linalg.solve(hess, grad)
                else:  # not concave here: a gradient step along the ascent direction
                    step = grad / max(np.linalg.norm(grad), 1e-12) * 2.0
                norm = np.linalg.norm(step)
                if norm > 10.0:
                    step *= 10.0 / norm
                ok = False
                for _ in range(6):
                    q = phi.copy()
                    q[idx] = np.clip(q[idx] + step, lo, hi)
                    fq = float(score(q))
                    if fq > f:
                        ok = True
                        break
                    step /= 3
                if not ok:
                    break
                moved = float(np.abs(q - phi).max())
                phi, f = q, fq
                if moved < 0.01:
                    break
            return phi, f

        # first downhill from where the paddles are (tracking: the nearest good setting) ...
        best_phi, best_s = refine(cur.copy())
        if float(self.fidelity(g, best_phi)) < near_enough:
            # ... else a coarse grid over the free paddles and the best few refined
            if free.all():  # the usual case: the grid's controller matrices are computed once
                if self._grid is None:
                    axes = [np.linspace(lo, hi, 13)] * 3
                    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
                    self._grid = (grid, controller_unitaries(grid))
                grid, ucs = self._grid
                s = self.fidelity(g, None, ucs) - move_weight * np.abs(grid - cur).sum(-1)
            else:
                axes = [np.linspace(lo, hi, 13) if free[k] else np.array([cur[k]]) for k in range(3)]
                grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
                s = score(grid)
            for i in np.argsort(-s)[:3]:
                phi, f = refine(grid[i].copy())
                if f > best_s:
                    best_phi, best_s = phi, f
        return [round(float(x), 3) for x in best_phi], float(self.fidelity(g, best_phi))


def _grid() -> np.ndarray:
    """Rotation vectors spread over SU(2) (|g| up to 2 pi covers it): a deterministic quasi-uniform set."""
    rng = np.random.default_rng(12345)
    q = rng.normal(size=(200, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 0] < 0] *= -1
    th = 2 * np.arccos(np.clip(q[:, 0], -1, 1))
    n = q[:, 1:] / np.maximum(np.linalg.norm(q[:, 1:], axis=1, keepdims=True), 1e-12)
    return np.vstack([np.zeros(3), n * th[:, None]])


_SU2_GRID = _grid()


class Tracker:
    """Estimation memory and the decision to move: what the loop's model method and its tracking share.

    ``add`` takes one interval's 4x4 matrix measured at known paddles; consecutive intervals at the same
    paddle setting are summed into groups of at most ``chunk_s``. The channel drifts, so an old group says
    less about the channel now than its counts suggest: each correlation gets the weight
    1 / (1/N + 4 D age) (counting variance plus the variance a drift of D rad^2/s per fiber, two fibers,
    adds in ``age`` seconds; ``drift_rad2_per_s`` is the expected drift, a prior, not a measurement).
    Groups older than ``memory_s`` are dropped. ``propose`` fits the channel (from the previous estimate
    when it still fits, else globally) and returns the paddles to go to when that lowers the predicted
    QBER Z + QBER X by at least ``min_gain``."""

    def __init__(self, model: ChannelModel, *, memory_s: float = 30.0, min_gain: float = 0.002,
                 paddles: Sequence[int] = (0, 1, 2), refit_residual: float = 9.0, chunk_s: float = 5.0,
                 drift_rad2_per_s: float = 1e-4, move_weight: float = 3e-4, urgent_qber: float = 0.03,
                 jump_gain: float = 0.0) -> None:
        self.model = model
        self.jump_gain = float(jump_gain)
        self.urgent_qber = float(urgent_qber)
        self.move_weight = float(move_weight)
        self.memory_s = float(memory_s)
        self.min_gain = float(min_gain)
        self.paddles = tuple(paddles)
        self.refit_residual = float(refit_residual)
        self.chunk_s = float(chunk_s)
        self.drift = float(drift_rad2_per_s)
        self.groups: list[dict] = []  # {paddles, t0, t1, counts (4x4)}
        self.g: np.ndarray | None = None
        self.v: float | None = None
        self.residual: float | None = None
        self.fits = 0

    def reset(self) -> None:
        self.groups.clear()
        self.g = self.v = self.residual = None

    def add(self, t_s: float, paddles: Sequence[float], matrix) -> None:
        key = tuple(round(float(p), 3) for p in paddles)
        m = np.asarray(matrix, float).reshape(4, 4)
        if self.groups and self.groups[-1]["paddles"] == key and t_s - self.groups[-1]["t0"] < self.chunk_s:
            grp = self.groups[-1]
            grp["counts"] = grp["counts"] + m
            grp["t1"] = t_s
        else:
            self.groups.append({"paddles": key, "t0": t_s, "t1": t_s, "counts": m.copy()})
        horizon = t_s - self.memory_s
        self.groups = [g for g in self.groups if g["t1"] >= horizon or g is self.groups[-1]]

    def current_counts(self) -> float:
        return float(self.groups[-1]["counts"].sum()) if self.groups else 0.0

    def observations(self, now_s: float) -> list[tuple[tuple, np.ndarray, np.ndarray]]:
        out = []
        for grp in self.groups:
            e, n = correlations(grp["counts"])
            age = max(0.0, now_s - 0.5 * (grp["t0"] + grp["t1"]))
            w = 1.0 / (1.0 / np.maximum(n, 1.0) + 4.0 * self.drift * age)
            if n.sum() > 0:
                out.append((grp["paddles"], e, np.where(n > 0, w, 0.0)))
        return out

    def fit(self, now_s: float, force_global: bool = False) -> bool:
        obs = self.observations(now_s)
        if not obs:
            return False
        glob = True  # both branches of the ambiguity are minima: always compare them (and the previous estimate)
        g, v, res = self.model.fit(obs, start=self.g, global_search=glob)
        if not glob and res > self.refit_residual:  # the previous estimate no longer explains the data
            g, v, res = self.model.fit(obs, start=self.g, global_search=True)
        self.g, self.v, self.residual = g, v, res
        self.fits += 1
        return True

    def predicted(self, paddles: Sequence[float]) -> tuple[float, float]:
        assert self.g is not None and self.v is not None
        q = self.model.qber(self.g, self.v, np.asarray(paddles, float))
        return float(q[0]), float(q[1])

    def move_order(self, current: Sequence[float], target: Sequence[float]) -> list[int]:
        """The order to move the paddles in (the driver moves one after the other): the permutation whose path
        (in steps of at most 5 degrees) has the lowest predicted QBER Z + X summed over the degrees travelled; for a long
        move the paddles pass through bad settings, and the order decides how bad."""
        import itertools

        idx = [k for k in self.paddles if abs(float(target[k]) - float(current[k])) >= 0.001]
        if len(idx) < 2 or self.g is None or self.v is None:
            return idx
        best, best_cost = idx, math.inf
        for order in itertools.permutations(idx):
            pts, weights, cur = [], [], np.asarray(current, float).copy()
            for k in order:
                d = float(target[k]) - cur[k]
                n = max(1, int(math.ceil(abs(d) / 5.0)))
                for j in range(1, n + 1):
                    q = cur.copy()
                    q[k] = cur[k] + d * (j - 0.5) / n  # the middle of each step
                    pts.append(q)
                    weights.append(abs(d) / n)
                cur[k] = float(target[k])
            q = self.model.qber(self.g, self.v, np.stack(pts))
            cost = float((q.sum(-1) * np.asarray(weights)).sum())
            if cost < best_cost - 1e-12:
                best, best_cost = list(order), cost
        return best

    def propose(self, now_s: float, current: Sequence[float], force_global: bool = False,
                min_gain: float | None = None, move_weight: float | None = None) -> tuple[list[float] | None, dict]:
        """(target paddles or None, info): fit, then the best setting if it gains at least min_gain."""
        min_gain = self.min_gain if min_gain is None else min_gain
        if not self.fit(now_s, force_global):
            return None, {"reason": "no data"}
        now_q = self.predicted(current)
        # travel is penalized while the channel is good (small, near moves); when it is bad (max QBER above
        # urgent_qber) or for a run (move_weight given), the best setting wherever it is
        if move_weight is None:
            move_weight = self.move_weight if max(now_q) <= self.urgent_qber else 2e-5
        penalized = move_weight > 2e-5
        target, fid = self.model.best_paddles(self.g, current, self.paddles, move_weight=move_weight)
        new_q = self.predicted(target)
        jump = False
        if penalized and self.jump_gain > 0 and max(new_q) - (1 - self.v) / 2 >= self.jump_gain:
            # opt-in (jump_gain > 0, default off): the nearby setting leaves one basis well above the floor
            # (near the controller's singular surface a small move cannot follow every direction of the drift);
            # the best setting wherever it is, when it lowers max(QBER Z, X) by at least jump_gain, is taken
            # even below urgent_qber. Off by default: such a move often follows data the fit's two-fold
            # ambiguity is unresolved in, and in the daemon the long transits cost more than the gain
            # (docs/control.md, measured)
            far, far_fid = self.model.best_paddles(self.g, current, self.paddles, move_weight=2e-5, near_enough=2.0)
            far_q = self.predicted(far)
            if max(new_q) - max(far_q) >= self.jump_gain:
                target, fid, new_q, jump = far, far_fid, far_q, True
        gain = sum(now_q) - sum(new_q)
        info = {"predicted_now": now_q, "predicted_target": new_q, "gain": gain, "fidelity": fid,
                "visibility": self.v, "residual": self.residual, "jump": jump}
        if gain < min_gain or max(abs(a - b) for a, b in zip(target, current)) < 0.01:
            return None, info
        return target, info
