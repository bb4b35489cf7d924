"""Parameter estimation: QBER per basis with confidence intervals, phase-error bound, abort decision.

The Z basis gives the key, the X basis estimates the phase error: with ``k`` X-basis bits and ``e_x`` errors,
the phase error of the ``n`` Z key bits is at most ``e_x / k + mu(n, k, eps_sec)`` except with probability
``eps_sec`` (Tomamichel et al. 2012; :mod:`daemon.qkd.finite_key`). The QBER intervals are Wilson score
intervals at the given two-sided confidence (for display and monitoring; the security bound uses ``mu``).
A block aborts -- no key, a reason string to publish -- when a basis has no bits, a QBER is above the
threshold, or the phase-error bound reaches 1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from daemon.qkd.finite_key import mu as finite_mu

__all__ = ["BasisQber", "Estimate", "count_errors", "estimate", "wilson_interval"]


def wilson_interval(errors: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must lie in (0, 1)")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = errors / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def count_errors(alice: np.ndarray, bob: np.ndarray) -> tuple[int, int]:
    """(bits, errors) of two equal-length 0/1 arrays."""
    a = np.asarray(alice, dtype=np.uint8)
    b = np.asarray(bob, dtype=np.uint8)
    if a.shape != b.shape:
        raise ValueError("alice and bob bit arrays differ in length")
    return int(a.size), int(np.count_nonzero(a != b))


@dataclass(frozen=True)
class BasisQber:
    bits: int
    errors: int
    qber: float  # errors / bits (nan when no bits)
    lower: float
    upper: float


@dataclass(frozen=True)
class Estimate:
    z: BasisQber  # key basis
    x: BasisQber  # phase-error basis
    mu: float
    phase_error_bound: float  # qber_x + mu
    threshold: float
    abort: bool
    reason: str | None

    def as_dict(self) -> dict:
        return {"qber_z": self.z.qber, "qber_x": self.x.qber, "bits_z": self.z.bits, "bits_x": self.x.bits,
                "errors_z": self.z.errors, "errors_x": self.x.errors, "qber_z_interval": [self.z.lower, self.z.upper],
                "qber_x_interval": [self.x.lower, self.x.upper], "mu": self.mu,
                "phase_error_bound": self.phase_error_bound, "threshold": self.threshold, "abort": self.abort,
                "reason": self.reason}


def _basis(bits: int, errors: int, confidence: float) -> BasisQber:
    lo, hi = wilson_interval(errors, bits, confidence)
    return BasisQber(bits, errors, errors / bits if bits else math.nan, lo, hi)


def estimate(bits_z: int, errors_z: int, bits_x: int, errors_x: int, *, threshold: float = 0.11,
             eps_sec: float = 1e-10, confidence: float = 0.95) -> Estimate:
    """QBER per basis, the phase-error bound and the abort decision for one block (counts only)."""
    if not 0.0 < threshold <= 0.5:
        raise ValueError("threshold must lie in (0, 0.5]")
    for b, e in ((bits_z, errors_z), (bits_x, errors_x)):
        if b < 0 or not 0 <= e <= b:
            raise ValueError("need 0 <= errors <= bits")
    z = _basis(bits_z, errors_z, confidence)
    x = _basis(bits_x, errors_x, confidence)
    m = finite_mu(bits_z, bits_x, eps_sec)
    peb = (x.qber + m) if bits_x else math.inf
    reason = None
    if bits_z == 0:
        reason = "no Z-basis (key) bits in the block"
    elif bits_x == 0:
        reason = "no X-basis bits: the phase error cannot be bounded"
    elif x.qber > threshold:
        reason = f"QBER X {x.qber:.4f} above the abort threshold {threshold:.4f} ({errors_x}/{bits_x})"
    elif z.qber > threshold:
        reason = f"QBER Z {z.qber:.4f} above the abort threshold {threshold:.4f} ({errors_z}/{bits_z})"
    elif peb >= 0.5:
        reason = (f"phase-error bound {peb:.4f} (QBER X {x.qber:.4f} + mu {m:.4f}) reaches 1/2: "
                  f"too few bits for the finite-key bound")
    return Estimate(z=z, x=x, mu=m, phase_error_bound=peb, threshold=threshold, abort=reason is not None,
                    reason=reason)
