"""Per-interval statistics of a BBM92 link: QBER per basis, visibility, CHSH S, coincidence-to-accidental ratio.

Inputs are 4x4 matrices of coincidences ``N[i, j]`` (and accidentals) between Alice's detectors
``(H, V, D, A)`` and Bob's ``(H, V, D, A)`` (passive basis choice: a 50:50 beam splitter, then a PBS per
basis). Basis 0 of a side is its H/V pair at analyser angle ``angles_deg[0]`` (default 0), basis 1 its D/A
pair at ``angles_deg[1]`` (default 45); the first detector of a pair is outcome +1, the second -1.

* Correlation of a basis pair: ``E = (N++ + N-- - N+- - N-+) / ΣN``.
* Ideal correlations of the Bell states (analyser angles θ): Φ+ ``cos 2(θa-θb)``, Φ- ``cos 2(θa+θb)``,
  Ψ+ ``-cos 2(θa+θb)``, Ψ- ``-cos 2(θa-θb)``.
* QBER of basis Z (both sides basis 0) and X (both basis 1): the share of coincidences whose outcomes disagree
  with the ideal correlation (for Φ+ in Z: ``(N_HV + N_VH) / ΣN_Z``); defined when the ideal |E| is 1.
  Visibility ``V = 1 - 2 QBER``; both also accidental-subtracted (counts minus the displaced-window count,
  clipped at 0). The standard error is ``sqrt(Q (1 - Q) / N)``.
* CHSH ``S = E(a,b) + E(a,b') + E(a',b) - E(a',b')`` up to which term carries the minus sign; the sign pattern
  is the one that maximises the ideal S for the configured angles and state. S is reported only when the
  analyser settings allow a violation (ideal S > 2, e.g. Bob at 22.5/67.5 deg); with the usual BBM92 settings
  (ideal S = 2) it is null with a reason, and ``s_equivalent = sqrt(2) (V_Z + V_X)`` (2√2 V) is given for
  diagnostics only.
* CAR ``= (C - A) / A`` with ``C`` all coincidences of the 16 pairs and ``A`` their accidentals; null if A = 0.

Values that are undefined (no counts) are None (JSON null), never NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["BELL_STATES", "chsh", "correlation", "ideal_correlation", "link_statistics", "qber"]

BELL_STATES = ("phi+", "phi-", "psi+", "psi-")


def ideal_correlation(state: str, theta_a_deg: float, theta_b_deg: float) -> float:
    """E(θa, θb) of a Bell state for linear-polarisation analysers at θa, θb (degrees)."""
    a, b = math.radians(theta_a_deg), math.radians(theta_b_deg)
    if state == "phi+":
        return math.cos(2 * (a - b))
    if state == "phi-":
        return math.cos(2 * (a + b))
    if state == "psi+":
        return -math.cos(2 * (a + b))
    if state == "psi-":
        return -math.cos(2 * (a - b))
    raise ValueError(f"unknown Bell state {state!r}; one of {', '.join(BELL_STATES)}")


def _block(m: np.ndarray, ia: int, ib: int) -> np.ndarray:
    """2x2 counts of Alice basis ia and Bob basis ib: rows Alice (+, -), columns Bob (+, -)."""
    return m[2 * ia:2 * ia + 2, 2 * ib:2 * ib + 2]


def correlation(block: np.ndarray) -> float | None:
    total = float(block.sum())
    if total <= 0:
        return None
    return float(block[0, 0] + block[1, 1] - block[0, 1] - block[1, 0]) / total


def qber(block: np.ndarray, expected_sign: int) -> tuple[float | None, float | None, float]:
    """(QBER, standard error, N) of a 2x2 block against the ideal correlation sign."""
    total = float(block.sum())
    if total <= 0:
        return None, None, 0.0
    errors = float(block[0, 1] + block[1, 0]) if expected_sign > 0 else float(block[0, 0] + block[1, 1])
    q = errors / total
    return q, math.sqrt(max(q * (1 - q), 0.0) / total), total


def chsh(E: list[list[float | None]], ideal: list[list[float]]) -> tuple[float | None, float, str | None]:
    """CHSH S from the 2x2 correlations ``E[ia][ib]`` with the sign pattern that maximises the ideal S.

    Returns ``(S or None, ideal S, reason if None)``.
    """
    best = None
    for minus in range(4):
        signs = [[1, 1], [1, 1]]
        signs[minus // 2][minus % 2] = -1
        for overall in (1, -1):
            s_ideal = overall * sum(signs[i][j] * ideal[i][j] for i in range(2) for j in range(2))
            if best is None or s_ideal > best[0] + 1e-12:
                best = (s_ideal, signs, overall)
    s_ideal, signs, overall = best
    if s_ideal <= 2 + 1e-9:
        return None, s_ideal, f"analyser settings do not allow a CHSH violation (ideal S = {s_ideal:.3f})"
    if any(E[i][j] is None for i in range(2) for j in range(2)):
        return None, s_ideal, "no coincidences in some basis pair"
    s = overall * sum(signs[i][j] * E[i][j] for i in range(2) for j in range(2))
    return s, s_ideal, None


def link_statistics(counts: np.ndarray, accidentals: np.ndarray | None, *, bell_state: str = "phi+",
                    alice_angles_deg: tuple[float, float] = (0.0, 45.0),
                    bob_angles_deg: tuple[float, float] = (0.0, 45.0),
                    interval_s: float | None = None) -> dict[str, Any]:
    """Everything the ``qkd.<link>`` topic reports, from one interval's 4x4 matrices (Alice rows, Bob columns)."""
    m = np.asarray(counts, np.int64).reshape(4, 4)
    acc = None if accidentals is None else np.asarray(accidentals, np.int64).reshape(4, 4)
    ideal = [[ideal_correlation(bell_state, alice_angles_deg[i], bob_angles_deg[j]) for j in range(2)]
             for i in range(2)]
    E = [[correlation(_block(m, i, j)) for j in range(2)] for i in range(2)]
    out: dict[str, Any] = {
        "bell_state": bell_state,
        "coincidences": int(m.sum()),
        "accidentals": None if acc is None else int(acc.sum()),
        "correlations": E,
        "ideal_correlations": ideal,
    }
    qb: dict[str, Any] = {}
    qerr: dict[str, Any] = {}
    qcorr: dict[str, Any] = {}
    vis: dict[str, Any] = {}
    sifted: dict[str, int] = {}
    for name, k in (("Z", 0), ("X", 1)):
        block = _block(m, k, k)
        sifted[name] = int(block.sum())
        e = ideal[k][k]
        if abs(abs(e) - 1) > 1e-6:
            qb[name] = qerr[name] = qcorr[name] = vis[name] = None  # not a key basis for these settings
            continue
        sign = 1 if e > 0 else -1
        q, err, _ = qber(block, sign)
        qb[name], qerr[name] = q, err
        vis[name] = None if q is None else 1 - 2 * q
        if acc is not None:
            net = np.clip(block - _block(acc, k, k), 0, None)
            qcorr[name] = qber(net, sign)[0]
        else:
            qcorr[name] = None
    out.update(sifted=sifted, qber=qb, qber_error=qerr, qber_corrected=qcorr, visibility=vis)
    s, s_ideal, reason = chsh(E, ideal)
    out.update(chsh=s, chsh_ideal=s_ideal, chsh_reason=reason)
    out["s_equivalent"] = (math.sqrt(2) * (vis["Z"] + vis["X"])
                           if vis.get("Z") is not None and vis.get("X") is not None else None)
    if acc is not None and acc.sum() > 0:
        a_tot = float(acc.sum())
        out["car"] = (float(m.sum()) - a_tot) / a_tot
    else:
        out["car"] = None
    if interval_s:
        out["coincidence_rate_hz"] = float(m.sum()) / interval_s
        out["sifted_rate_hz"] = float(sifted["Z"] + sifted["X"]) / interval_s
    return out
