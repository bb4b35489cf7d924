"""Polarization optics of the bench (physics.md): Jones calculus, the fiber's SU(2) drift, the MPC320-like
polarization controller, two-photon states and the receivers' joint outcome probabilities.

Conventions (physics.md): Jones vectors in the H/V basis, |H> = (1, 0), |V> = (0, 1); angles in degrees at
the API, radians inside. Two-photon vectors are ordered |HH>, |HV>, |VH>, |VV> with Alice's photon first.

* Rotation: ``R(phi) = [[cos phi, sin phi], [-sin phi, cos phi]]`` (a change of frame by phi), so that a
  retarder ``J(delta, phi) = R(-phi) diag(e^{-i delta/2}, e^{i delta/2}) R(phi)`` has its fast axis (the
  eigenvector with phase -delta/2) along (cos phi, sin phi), i.e. at angle phi from H.
* Polarization controller: three fiber loops acting as lambda/4, lambda/2, lambda/4 retarders whose fast axes
  are at the paddle angles: ``C = J(pi/2, phi3) J(pi, phi2) J(pi/2, phi1)``; all paddles at 0 give -I, the
  identity up to a global phase.
* An analyser at angle theta projects on |theta> = cos theta |H> + sin theta |V> (outcome +) and on
  |theta + 90 deg> (outcome -). Receiver outputs per side, in detector order: analyser 0 +, analyser 0 -,
  analyser 1 +, analyser 1 - (BBM92 at 0 and 45 degrees: H, V, D, A).
"""

from __future__ import annotations

import math

import numpy as np

from drivers.paddles import controller_unitaries
from drivers.paddles import retarders as _retarders

__all__ = [
    "BELL_SIGNS",
    "BELL_STATES",
    "PADDLE_RANGE_DEG",
    "analyser_vectors",
    "bell_vector",
    "chsh",
    "compensating_angles",
    "controller_unitaries",
    "controller_unitary",
    "correlation",
    "fidelity",
    "haar_su2",
    "intercept_resend",
    "joint_probabilities",
    "qber",
    "retarder",
    "rotation",
    "su2_project",
    "su2_rotation",
    "werner_state",
]

PADDLE_RANGE_DEG = (0.0, 170.0)  # Thorlabs MPC320 paddle travel

_S = 1.0 / math.sqrt(2.0)
BELL_STATES: dict[str, np.ndarray] = {
    "phi+": np.array([_S, 0, 0, _S], complex),
    "phi-": np.array([_S, 0, 0, -_S], complex),
    "psi+": np.array([0, _S, _S, 0], complex),
    "psi-": np.array([0, _S, -_S, 0], complex),
}
# Correlation sign of each Bell state in the Z (H/V) and X (D/A) bases: +1 = equal outcomes, -1 = opposite.
BELL_SIGNS: dict[str, tuple[int, int]] = {"phi+": (1, 1), "phi-": (1, -1), "psi+": (-1, 1), "psi-": (-1, -1)}

_PAULI = np.array([[[0, 1], [1, 0]], [[0, -1j], [1j, 0]], [[1, 0], [0, -1]]], complex)


# --------------------------------------------------------------------------------------------------------
# Single-photon optics


def rotation(phi: float) -> np.ndarray:
    """R(phi), phi in radians: the change of frame by phi."""
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, s], [-s, c]], complex)


def retarder(delta: float, phi: float) -> np.ndarray:
    """Jones matrix of a retarder of retardance ``delta`` (rad) with its fast axis at ``phi`` (rad)."""
    return rotation(-phi) @ np.diag([np.exp(-0.5j * delta), np.exp(0.5j * delta)]) @ rotation(phi)


def controller_unitary(angles_deg) -> np.ndarray:
    """U = J(pi/2, phi3) J(pi, phi2) J(pi/2, phi1) for paddle angles [phi1, phi2, phi3] in degrees."""
    return controller_unitaries(np.asarray(angles_deg, float).reshape(3))


def su2_rotation(theta: float, axis: np.ndarray) -> np.ndarray:
    """exp(-i theta (n . sigma) / 2) for a unit vector n: a rotation by theta about n on the Poincare sphere."""
    n = np.asarray(axis, float)
    return math.cos(theta / 2) * np.eye(2) - 1j * math.sin(theta / 2) * np.einsum("k,kij->ij", n, _PAULI)


def su2_project(u: np.ndarray) -> np.ndarray:
    """The nearest SU(2) matrix [[a, -b*], [b, a*]] built from u's first column (removes rounding drift)."""
    a, b = u[0, 0], u[1, 0]
    norm = math.sqrt(abs(a) ** 2 + abs(b) ** 2)
    a, b = a / norm, b / norm
    return np.array([[a, -np.conj(b)], [b, np.conj(a)]], complex)


def haar_su2(rng: np.random.Generator) -> np.ndarray:
    """A Haar-random SU(2) matrix (a uniformly random unit quaternion)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return su2_project(np.array([[q[0] + 1j * q[1], 0], [q[2] + 1j * q[3], 0]], complex))


def fidelity(m: np.ndarray) -> float:
    """|Tr M| / 2: 1 iff the 2x2 unitary M is the identity up to a global phase."""
    return float(abs(np.trace(m)) / 2.0)


# --------------------------------------------------------------------------------------------------------
# Two-photon states


def bell_vector(name: str) -> np.ndarray:
    try:
        return BELL_STATES[name]
    except KeyError:
        raise ValueError(f"unknown Bell state {name!r}; one of {', '.join(BELL_STATES)}") from None


def werner_state(bell: str, visibility: float) -> np.ndarray:
    """rho = V |Psi><Psi| + (1 - V) I/4 (physics.md, 'Two-photon state')."""
    psi = bell_vector(bell)
    return visibility * np.outer(psi, psi.conj()) + (1.0 - visibility) * np.eye(4) / 4.0


def _basis_projectors(theta_deg: float) -> tuple[np.ndarray, np.ndarray]:
    v = analyser_vectors([theta_deg, theta_deg])[:2]
    return np.outer(v[0], v[0].conj()), np.outer(v[1], v[1].conj())


def intercept_resend(rho: np.ndarray, arm: str, fraction: float) -> np.ndarray:
    """The pair state after Eve intercepts a ``fraction`` of the photons of ``arm`` at the source's output,
    measures each in the Z (H/V) or X (D/A) basis at random and resends the state she found.

    On an intercepted pair: rho -> 1/2 sum_{basis} sum_r (P_r x I) rho (P_r x I) (P_r on Eve's arm); Eve is
    before the fiber, so her resent photon meets the same fiber and compensation as the original.
    """
    if fraction <= 0.0:
        return rho
    eye = np.eye(2)
    measured = np.zeros_like(rho)
    for theta in (0.0, 45.0):
        for p in _basis_projectors(theta):
            k = np.kron(p, eye) if arm == "alice" else np.kron(eye, p)
            measured += 0.5 * k @ rho @ k
    return (1.0 - fraction) * rho + fraction * measured


# --------------------------------------------------------------------------------------------------------
# Receivers


def analyser_vectors(angles_deg) -> np.ndarray:
    """Projection vectors (4, 2) of one receiver's outputs: analyser 0 +, 0 -, analyser 1 +, 1 -."""
    out = np.empty((4, 2), complex)
    for k, theta in enumerate(angles_deg):
        t = math.radians(theta)
        out[2 * k] = (math.cos(t), math.sin(t))
        out[2 * k + 1] = (-math.sin(t), math.cos(t))
    return out


def joint_probabilities(rho: np.ndarray, u_a: np.ndarray, u_b: np.ndarray, angles_a, angles_b) -> np.ndarray:
    """P[i, j]: probability that, of a pair reaching both receivers, Alice's photon leaves at output i and Bob's
    at output j (each receiver's 50:50 splitter included: P sums to 1).

    P[i, j] = 1/4 Tr[rho' (Pi_i x Pi_j)], rho' = (U_A x U_B) rho (U_A x U_B)^dagger; computed as
    1/4 <v_i w_j| rho |v_i w_j> with v_i = U_A^dagger |theta_i>, w_j = U_B^dagger |theta_j>.
    """
    v = analyser_vectors(angles_a) @ u_a.conj()  # rows: (U_A^dagger |theta_i>)^T = <theta_i| U_A conj'd
    w = analyser_vectors(angles_b) @ u_b.conj()
    phi = np.einsum("ia,jb->ijab", v, w).reshape(4, 4, 4)  # phi[i, j] = v_i (x) w_j
    p = 0.25 * np.einsum("ijk,kl,ijl->ij", phi.conj(), rho, phi).real
    return np.clip(p, 0.0, None)


def correlation(p: np.ndarray, alpha: int, beta: int) -> float:
    """E(alpha, beta) = (P++ + P-- - P+- - P-+) / sum over Alice's analyser alpha and Bob's analyser beta."""
    block = p[2 * alpha:2 * alpha + 2, 2 * beta:2 * beta + 2]
    total = block.sum()
    return float((block[0, 0] + block[1, 1] - block[0, 1] - block[1, 0]) / total) if total > 0 else 0.0


def qber(p: np.ndarray, basis: int, bell: str) -> float:
    """Error fraction when both use analyser ``basis``: outcomes against the Bell state's correlation sign."""
    sign = BELL_SIGNS[bell][basis]
    block = p[2 * basis:2 * basis + 2, 2 * basis:2 * basis + 2]
    total = block.sum()
    errors = block[0, 1] + block[1, 0] if sign > 0 else block[0, 0] + block[1, 1]
    return float(errors / total) if total > 0 else 0.0


def chsh(p: np.ndarray) -> float:
    """S = |E(a, b) - E(a, b') + E(a', b) + E(a', b')| with a, a' = Alice's analysers 0, 1 and b, b' Bob's."""
    return abs(correlation(p, 0, 0) - correlation(p, 0, 1) + correlation(p, 1, 0) + correlation(p, 1, 1))


# --------------------------------------------------------------------------------------------------------
# Compensation: paddle angles that undo a fiber unitary


def _hwp_residual(a1: np.ndarray, a3: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For the target T (= U^dagger) and quarter-wave angles (rad, broadcast): M = Q(a3)^dagger T Q(a1)^dagger
    must be a half-wave plate, -i [[cos 2p, sin 2p], [sin 2p, -cos 2p]] up to sign, i.e. in SU(2) form
    [[x, -y*], [y, x*]] with Re x = Re y = 0. Returns (..., 2) = (Re x, Re y)."""
    q1 = _retarders(math.pi / 2, a1)
    q3 = _retarders(math.pi / 2, a3)
    m = np.swapaxes(q3.conj(), -1, -2) @ t @ np.swapaxes(q1.conj(), -1, -2)
    return np.stack([m[..., 0, 0].real, m[..., 1, 0].real], -1)


def _solve_exact(u: np.ndarray) -> list[np.ndarray]:
    """All paddle solutions in [0, 180) degrees of C(angles) U = +-I (generically four)."""
    t = u.conj().T
    g = np.radians(np.arange(0.0, 180.0, 3.0))
    a1, a3 = np.meshgrid(g, g, indexing="ij")
    res = np.linalg.norm(_hwp_residual(a1, a3, t), axis=-1).ravel()
    roots: list[np.ndarray] = []
    h = 1e-7
    for idx in np.argsort(res)[:40]:
        x = np.array([a1.ravel()[idx], a3.ravel()[idx]])
        for _ in range(40):
            r = _hwp_residual(x[0], x[1], t)
            if np.linalg.norm(r) < 1e-15:
                break
            jac = np.empty((2, 2))
            for k in range(2):
                e = np.zeros(2)
                e[k] = h
                jac[:, k] = (_hwp_residual(*(x + e), t) - _hwp_residual(*(x - e), t)) / (2 * h)
            try:
                x = x - np.linalg.solve(jac, r)
            except np.linalg.LinAlgError:
                break
        if np.linalg.norm(_hwp_residual(x[0], x[1], t)) > 1e-10:
            continue
        x = np.mod(x, math.pi)
        if any(np.allclose(x, y, atol=1e-7) or np.allclose(np.abs(x - y), math.pi, atol=1e-7) for y in roots):
            continue
        roots.append(x)
        if len(roots) == 2:  # (phi1, phi3) and (phi1 + 90, phi3 + 90)
            break
    out = []
    for x in roots:
        q1 = _retarders(math.pi / 2, x[0])
        q3 = _retarders(math.pi / 2, x[1])
        m = q3.conj().T @ t @ q1.conj().T  # = +-(-i) [[c, s], [s, -c]], c = cos 2 phi2, s = sin 2 phi2
        c, s = (1j * m[0, 0]).real, (1j * m[1, 0]).real
        p2 = 0.5 * math.atan2(s, c)  # the other sign is phi2 + 90 degrees: both are solutions
        for phi2 in (p2, p2 + math.pi / 2):
            out.append(np.degrees(np.mod([x[0], phi2, x[1]], math.pi)))
    return out


def _refine_bounded(u: np.ndarray, a0: np.ndarray, lo: float, hi: float, iters: int = 50) -> tuple[np.ndarray, float]:
    """Minimize 1 - |Tr(C(a) U)|^2 / 4 over the box [lo, hi]^3 (degrees): damped Newton, projected."""
    def f(a):
        tr = np.einsum("...ij,ji->...", controller_unitaries(a), u)
        return 1.0 - np.abs(tr) ** 2 / 4.0

    a = np.clip(np.asarray(a0, float), lo, hi)
    h = 1e-3
    eye = np.eye(3) * h
    for _ in range(iters):
        pts = [a]
        for i in range(3):
            pts += [a + eye[i], a - eye[i]]
        for i in range(3):
            for j in range(i + 1, 3):
                pts += [a + eye[i] + eye[j], a + eye[i] - eye[j], a - eye[i] + eye[j], a - eye[i] - eye[j]]
        v = f(np.array(pts))
        f0 = v[0]
        grad = np.array([(v[1 + 2 * i] - v[2 + 2 * i]) / (2 * h) for i in range(3)])
        hess = np.zeros((3, 3))
        for i in range(3):
            hess[i, i] = (v[1 + 2 * i] - 2 * f0 + v[2 + 2 * i]) / h ** 2
        k = 7
        for i in range(3):
            for j in range(i + 1, 3):
                hess[i, j] = hess[j, i] = (v[k] - v[k + 1] - v[k + 2] + v[k + 3]) / (4 * h * h)
                k += 4
        lam, moved = 1e-9, False
        while lam < 1e6:
            try:
                step = -np.linalg.solve(hess + lam * np.eye(3), grad)
            except np.linalg.LinAlgError:
                step = -grad
            cand = np.clip(a + step, lo, hi)
            if f(cand) < f0:
                moved = True
                break
            lam = lam * 10 + 1e-6
        if not moved or np.max(np.abs(cand - a)) < 1e-12:
            break
        a = cand
    return a, 1.0 - fidelity(controller_unitary(a) @ u)


def compensating_angles(u: np.ndarray, lo: float = PADDLE_RANGE_DEG[0],
                        hi: float = PADDLE_RANGE_DEG[1]) -> tuple[list[float], float]:
    """Paddle angles [phi1, phi2, phi3] in [lo, hi] degrees with C(angles) U = identity up to a global phase,
    and the remaining infidelity 1 - |Tr(C U)|/2 (0 up to rounding when an exact solution lies in range).

    Q-H-Q reaches all of SU(2) with angles in [0, 180): the half-wave angle is fixed modulo 90 degrees and
    the quarter-wave pair (phi1, phi3) has two solutions, (a, b) and (a + 90, b + 90) mod 180. They are found
    exactly: for each (phi1, phi3), Q(phi3)^dagger U^dagger Q(phi1)^dagger must be a half-wave plate (two real
    conditions, solved by Newton's method from a 3-degree grid), and that plate gives phi2. The MPC320's
    0-170 degree travel excludes both solutions for about 0.5% of unitaries; then the best setting in range
    is found by a bounded minimization of the infidelity.
    """
    exact = _solve_exact(u)
    inside = [a for a in exact if np.all(a >= lo - 1e-9) and np.all(a <= hi + 1e-9)]
    if inside:
        a = np.clip(inside[0], lo, hi)
        return [float(x) for x in a], max(0.0, 1.0 - fidelity(controller_unitary(a) @ u))
    starts = [np.clip(a, lo, hi) for a in exact]
    grid = np.arange(lo, hi + 1e-9, 10.0)
    pts = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    fid = np.abs(np.einsum("nij,ji->n", controller_unitaries(pts), u)) / 2.0
    starts += [pts[i] for i in np.argsort(fid)[::-1][:8]]
    best_a, best_f = starts[0], 2.0
    for a0 in starts:
        a, infid = _refine_bounded(u, a0, lo, hi)
        if infid < best_f:
            best_a, best_f = a, infid
    return [float(x) for x in best_a], max(0.0, best_f)
