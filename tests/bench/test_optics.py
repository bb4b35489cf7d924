"""Jones calculus, the polarization controller, states and joint probabilities (exact, no statistics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.sim.bench import optics as O

I2 = np.eye(2)


def phase_free_close(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> bool:
    """a = e^{i g} b for some global phase g."""
    return abs(abs(np.trace(a.conj().T @ b)) / 2 - 1) < tol


def test_retarder_is_unitary_with_its_fast_axis_at_phi():
    for delta in (math.pi / 2, math.pi, 0.3):
        for phi in (0.0, 0.4, math.pi / 3):
            j = O.retarder(delta, phi)
            np.testing.assert_allclose(j @ j.conj().T, I2, atol=1e-14)
            assert abs(np.linalg.det(j) - 1) < 1e-14
            fast = np.array([math.cos(phi), math.sin(phi)])
            np.testing.assert_allclose(j @ fast, np.exp(-0.5j * delta) * fast, atol=1e-14)


def test_half_wave_plate_at_22_5_degrees_turns_h_into_d():
    h = np.array([1, 0])
    d = np.array([1, 1]) / math.sqrt(2)
    out = O.retarder(math.pi, math.radians(22.5)) @ h
    assert abs(abs(np.vdot(d, out)) - 1) < 1e-14


def test_controller_at_zero_is_the_identity_and_angles_have_period_180():
    assert phase_free_close(O.controller_unitary([0, 0, 0]), I2)
    a = O.controller_unitary([10.0, 70.0, 130.0])
    assert phase_free_close(a, O.controller_unitary([190.0, 250.0, 310.0]))
    assert phase_free_close(a, O.controller_unitary([10.0, 160.0, 130.0]))  # half-wave angle: period 90 up to sign


def test_su2_rotation_turns_the_stokes_vector():
    """exp(-i theta sigma_z / 2) is a rotation by theta about the H/V axis of the Poincare sphere: theta = pi
    takes D to A."""
    d = np.array([1, 1]) / math.sqrt(2)
    a = np.array([1, -1]) / math.sqrt(2)
    out = O.su2_rotation(math.pi, np.array([0.0, 0.0, 1.0])) @ d
    assert abs(abs(np.vdot(a, out)) - 1) < 1e-14


def test_haar_unitaries_are_su2():
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = O.haar_su2(rng)
        np.testing.assert_allclose(u @ u.conj().T, I2, atol=1e-13)
        assert abs(np.linalg.det(u) - 1) < 1e-13


@pytest.mark.parametrize("bell", list(O.BELL_STATES))
@pytest.mark.parametrize("v", [1.0, 0.9, 0.0])
def test_qber_of_a_werner_state_is_half_one_minus_v(bell, v):
    p = O.joint_probabilities(O.werner_state(bell, v), I2, I2, (0, 45), (0, 45))
    assert abs(p.sum() - 1) < 1e-14
    np.testing.assert_allclose(p.sum(axis=1), 0.25, atol=1e-14)  # every output gets 1/4 of the photons
    for basis in (0, 1):
        assert abs(O.qber(p, basis, bell) - (1 - v) / 2) < 1e-14


def test_local_unitaries_that_cancel_keep_the_qber():
    """For phi+, (U x U*) leaves the state unchanged: U_A U_B^T = I."""
    rng = np.random.default_rng(1)
    u = O.haar_su2(rng)
    p = O.joint_probabilities(O.werner_state("phi+", 1.0), u, u.conj(), (0, 45), (0, 45))
    assert O.qber(p, 0, "phi+") < 1e-14 and O.qber(p, 1, "phi+") < 1e-14


def test_chsh_is_2_sqrt2_v_at_the_optimal_angles():
    for v in (1.0, 0.95):
        p = O.joint_probabilities(O.werner_state("phi+", v), I2, I2, (0, 45), (22.5, 67.5))
        assert abs(O.chsh(p) - 2 * math.sqrt(2) * v) < 1e-12
        assert abs(O.correlation(p, 0, 0) - v * math.cos(math.radians(45))) < 1e-12


@pytest.mark.parametrize("arm", ["alice", "bob"])
def test_intercept_resend_adds_p_v_over_4(arm):
    v, frac = 0.96, 0.6
    rho = O.intercept_resend(O.werner_state("phi+", v), arm, frac)
    assert abs(np.trace(rho) - 1) < 1e-14
    p = O.joint_probabilities(rho, I2, I2, (0, 45), (0, 45))
    for basis in (0, 1):
        assert abs(O.qber(p, basis, "phi+") - ((1 - v) / 2 + frac * v / 4)) < 1e-14


def test_compensating_angles_undo_random_fiber_unitaries_within_the_paddle_range():
    rng = np.random.default_rng(2)
    exact = 0
    n = 60
    for _ in range(n):
        u = O.haar_su2(rng)
        angles, infid = O.compensating_angles(u)
        assert all(0.0 <= a <= 170.0 for a in angles)
        got = 1 - O.fidelity(O.controller_unitary(angles) @ u)
        assert abs(got - infid) < 1e-12
        assert infid < 1e-3  # out-of-range cases: the best setting in range stays close
        exact += infid < 1e-12
    assert exact >= n - 3  # about 1% of unitaries need an angle in (170, 180)


def test_full_range_always_has_an_exact_solution():
    rng = np.random.default_rng(3)
    for _ in range(30):
        u = O.haar_su2(rng)
        angles, infid = O.compensating_angles(u, 0.0, 179.999)
        assert infid < 1e-12
