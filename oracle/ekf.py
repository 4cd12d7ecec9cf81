"""The generic Extended Kalman Filter, written once in SymPy.

These two functions are the only hand-written mathematics in the oracle. They are the EKF of the
KOALA paper's Table 1 (Davtyan et al., AAAI 2022, arXiv 2107.03331):

    predict:  x^ = f(x)                 P^ = F P F^T + Q
    update:   S  = H P^ H^T + R         K  = P^ H^T S^-1
              x  = x^ + K (z - h(x^))   P  = (I - K H) P^

with H = dh/dx evaluated at x^ (the EKF linearisation). The paper's observation is the loss,
h = L, and its target z = L_target; the state model is x_k = f(x_{k-1}) + w with noise
covariance Q, the observation L_target = L(x_k) + v with noise variance R. Everything KOALA
computes is obtained from them by the named assumptions in :mod:`oracle.assumptions`;
:mod:`oracle.derive` applies the assumptions and lets SymPy do the algebra.

Matrices are ``sympy.Matrix``; entries may be symbols (derivation) or exact Rationals
(certificates on tiny sizes). Nothing here rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy as sp

__all__ = ["Prediction", "Update", "predict", "update"]


@dataclass(frozen=True)
class Prediction:
    x: sp.Matrix  # x^ = f(x)
    P: sp.Matrix  # P^ = F P F^T + Q


@dataclass(frozen=True)
class Update:
    H: sp.Matrix  # dh/dx at x^            [m, N]
    S: sp.Matrix  # innovation covariance  [m, m]
    K: sp.Matrix  # Kalman gain            [N, m]
    innovation: sp.Matrix  # z - h(x^)     [m, 1]
    x: sp.Matrix  # posterior mean         [N, 1]
    P: sp.Matrix  # posterior covariance   [N, N]


def predict(f: Callable[[sp.Matrix], sp.Matrix], F: sp.Matrix, x: sp.Matrix,
            P: sp.Matrix, Q: sp.Matrix) -> Prediction:
    """Time update: x^ = f(x), P^ = F P F^T + Q."""
    return Prediction(x=sp.Matrix(f(x)), P=F * P * F.T + Q)


def update(x_hat: sp.Matrix, P_hat: sp.Matrix, h: Callable[[sp.Matrix], sp.Matrix],
           R: sp.Matrix, z: sp.Matrix) -> Update:
    """Measurement update with H = dh/dx at x^ (computed here, by differentiation).

    ``h`` maps a state column [N, 1] to an observation column [m, 1]; ``R`` is [m, m]; ``z`` [m, 1].
    """
    n = x_hat.shape[0]
    probe = sp.Matrix(sp.symbols(f"_probe0:{n}"))
    H = sp.Matrix(h(probe)).jacobian(probe).subs(dict(zip(probe, x_hat)))
    S = H * P_hat * H.T + R
    K = P_hat * H.T * S.inv()
    innovation = z - sp.Matrix(h(x_hat))
    x = x_hat + K * innovation
    P = (sp.eye(n) - K * H) * P_hat
    return Update(H=H, S=S, K=K, innovation=innovation, x=x, P=P)
