"""Predict stage: the EKF's time update x^ = f(x), P^ = F P F^T + Q under KOALA's dynamics."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .. import ekf
from ..assumptions import dynamics_block
from ..checks import Check, is_zero
from ..symbolic_model import SymbolicModel

__all__ = ["Prior", "derive_predict"]


@dataclass
class Prior:
    """What predict gives the update.

    predict_state  elementwise time update per state block, e.g. {"x": x + u, "u": a*u}
    predict_cov    the prior block entries from the previous posterior, e.g. {"p": p + q}
    block          the k x k prior block B^ as fresh symbols (ph, or Pxx_h, Pxu_h, Puu_h): the
                   update is derived for any prior, not only for the predicted expression
    P_hat          block ⊗ I_n, [k·n, k·n]
    """

    predict_state: dict
    predict_cov: dict
    block: sp.Matrix
    P_hat: sp.Matrix
    checks: list


def derive_predict(m: SymbolicModel) -> Prior:
    """Time update, from the EKF's predict lines x^ = f(x) and P^ = F P F^T + Q (Table 1).

    Applies the ``dynamics`` and ``isotropic`` switches: f(s) = F s with F = F₂ ⊗ I_n
    (F₂ = [[1]] for KOALA-V, [[1, 1], [0, a]] for KOALA-M), P = B ⊗ I_n and Q = Q₂ ⊗ I_n with
    B = [p], Q₂ = [q] (KOALA-V) or B = [[Pxx, Pxu], [Pxu, Puu]], Q₂ = diag(qx, qu) (KOALA-M).
    Certifies that P^ is again of the form B^ ⊗ I_n and that f acts elementwise.
    """
    s, k, n = m.s, m.k, m.n
    checks: list[Check] = []
    F = m.kron(dynamics_block(m.assumptions, s.a))
    if k == 1:
        P2, Q2 = sp.Matrix([[s.p]]), sp.Matrix([[s.q]])
    else:
        P2 = sp.Matrix([[s.Pxx, s.Pxu], [s.Pxu, s.Puu]])
        Q2 = sp.diag(s.qx, s.qu)
    pred = ekf.predict(lambda st: F * st, F, m.state, m.kron(P2), m.kron(Q2))

    B_hat = m.block_of(pred.P)
    checks.append(Check(
        f"{m.variant}.predict-keeps-isotropy",
        "F (B ⊗ I) F^T + Q = B^ ⊗ I: the predicted covariance keeps the per-coordinate form",
        is_zero(pred.P - m.kron(B_hat)),
        f"B^ = {sp.simplify(B_hat).tolist()}"))

    predict_state = {}
    for b, name in enumerate(m.names):
        first = pred.x[b * n].subs({m.x[0]: s.x, m.u[0]: s.u})
        same = all(
            is_zero(pred.x[b * n + j].subs({m.x[j]: s.x, m.u[j]: s.u}) - first) for j in range(n))
        checks.append(Check(
            f"{m.variant}.predict-state-{name}-elementwise",
            f"f acts on every coordinate of {name} by the same map {name}^ = {first}", same))
        predict_state[name] = first

    if k == 1:
        predict_cov = {"p": sp.expand(B_hat[0, 0])}
        block = sp.Matrix([[s.ph]])
    else:
        predict_cov = {"Pxx": sp.expand(B_hat[0, 0]),
                       "Pxu": sp.factor(B_hat[0, 1]),
                       "Puu": sp.expand(B_hat[1, 1])}
        checks.append(Check(
            "M.predict-symmetric", "P^ is symmetric: P^_ux = P^_xu",
            is_zero(B_hat[1, 0] - B_hat[0, 1])))
        block = sp.Matrix([[s.Pxx_h, s.Pxu_h], [s.Pxu_h, s.Puu_h]])
    return Prior(predict_state=predict_state, predict_cov=predict_cov, block=block,
                 P_hat=m.kron(block), checks=checks)
