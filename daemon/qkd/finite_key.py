"""Finite-key length: Tomamichel, Lim, Gisin, Renner, Nat. Commun. 3:634 (2012), arXiv:1103.4130.

With ``n`` key bits (Z basis), ``k`` parameter-estimation bits (X basis) whose error rate is at most ``Q_tol``,
the protocol is ``eps_cor``-correct and ``eps_sec``-secret when the extracted length satisfies

    l <= n * (q - h(Q_tol + mu)) - leak_EC - log2(2 / (eps_sec**2 * eps_cor)),
    mu = sqrt((n + k) / (n * k) * (k + 1) / k * ln(2 / eps_sec)),

``h`` the binary entropy, ``q = 1`` for ideal BB84/BBM92 measurements, ``leak_EC`` the bits actually disclosed
by error correction plus the verification tag (measured, never ``f * n * h(Q)``). ``h`` is taken as 1 once
``Q_tol + mu >= 1/2`` (nothing can be extracted then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FiniteKey", "binary_entropy", "mu", "secure_length"]


def binary_entropy(p: float) -> float:
    """h(p) = -p log2 p - (1-p) log2 (1-p), h(0) = h(1) = 0; p is clipped to [0, 1/2] from above as h(1/2)=1."""
    if p <= 0.0:
        return 0.0
    if p >= 0.5:
        return 1.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def mu(n: int, k: int, eps_sec: float) -> float:
    """Statistical deviation of the phase error from the observed X error rate (TLGR 2012, eq. in Methods)."""
    if n <= 0 or k <= 0:
        return math.inf
    return math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(2.0 / eps_sec))


@dataclass(frozen=True)
class FiniteKey:
    """The secure length and every term of the bound (bits)."""

    length: int  # floor of the bound, 0 when negative
    bound: float  # the bound itself (may be negative)
    n: int
    k: int
    q_tol: float
    mu: float
    phase_error: float  # Q_tol + mu (the phase-error bound)
    h_phase: float  # h(Q_tol + mu)
    privacy_term: float  # n * (q - h(Q_tol + mu))
    leak_ec: int
    eps_term: float  # log2(2 / (eps_sec^2 eps_cor))
    eps_sec: float
    eps_cor: float
    q: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def secure_length(n: int, k: int, q_tol: float, leak_ec: int, eps_sec: float = 1e-10, eps_cor: float = 1e-15,
                  q: float = 1.0) -> FiniteKey:
    """Length of the final key that the TLGR 2012 bound allows (0 when the bound is negative)."""
    if n < 0 or k < 0 or leak_ec < 0:
        raise ValueError("n, k and leak_ec must be non-negative")
    if not 0.0 <= q_tol <= 1.0:
        raise ValueError("q_tol must be an error rate in [0, 1]")
    if not (0.0 < eps_sec < 1.0 and 0.0 < eps_cor < 1.0):
        raise ValueError("eps_sec and eps_cor must lie in (0, 1)")
    m = mu(n, k, eps_sec)
    pe = q_tol + m
    h = binary_entropy(pe)
    priv = n * (q - h) if n > 0 else 0.0
    eps_term = math.log2(2.0 / (eps_sec * eps_sec * eps_cor))
    bound = priv - leak_ec - eps_term
    length = int(math.floor(bound)) if bound > 0 and math.isfinite(bound) else 0
    return FiniteKey(length=length, bound=bound, n=n, k=k, q_tol=q_tol, mu=m, phase_error=pe, h_phase=h,
                     privacy_term=priv, leak_ec=leak_ec, eps_term=eps_term, eps_sec=eps_sec, eps_cor=eps_cor, q=q)
