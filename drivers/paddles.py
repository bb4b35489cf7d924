"""Jones matrices of fiber paddle polarization controllers (lambda/4 - lambda/2 - lambda/4 loops, MPC320-type).

Shared by the simulated bench (drivers/sim/bench/optics.py: what the fiber and paddles do to the light) and the
daemon's polarization model (daemon/control/polmodel.py: what the loop assumes the paddles do), so both use one
definition of the device's optics.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["controller_unitaries", "retarders"]


def retarders(delta: float, phi: np.ndarray) -> np.ndarray:
    """Linear retarders of retardance ``delta`` (rad) with fast axes at ``phi`` (rad, any shape):
    shape ``phi.shape + (2, 2)``."""
    phi = np.asarray(phi, float)
    c, s = np.cos(phi), np.sin(phi)
    e1, e2 = np.exp(-0.5j * delta), np.exp(0.5j * delta)
    m = np.empty(phi.shape + (2, 2), complex)
    m[..., 0, 0] = c * c * e1 + s * s * e2
    m[..., 0, 1] = c * s * (e1 - e2)
    m[..., 1, 0] = c * s * (e1 - e2)
    m[..., 1, 1] = s * s * e1 + c * c * e2
    return m


def controller_unitaries(angles_deg: np.ndarray) -> np.ndarray:
    """Controller Jones matrices for paddle angles of shape (..., 3) in degrees (paddle 0 acts first)."""
    a = np.radians(np.asarray(angles_deg, float))
    return retarders(math.pi / 2, a[..., 2]) @ retarders(math.pi, a[..., 1]) @ retarders(math.pi / 2, a[..., 0])
