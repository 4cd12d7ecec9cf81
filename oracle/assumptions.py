"""KOALA's modelling assumptions as named, composable switches.

Each function below turns one assumption of the KOALA paper (Davtyan et al., AAAI 2022: the
KOALA-V and KOALA-M sections) or of the authors' official code (github.com/Araachie/koala:
weight decay, per-tensor observations combined by a max) into the matrices the generic EKF
(:mod:`oracle.ekf`) consumes; ``oracle/README.md`` maps every switch to its source.
:class:`Assumptions` bundles them; ``KOALA_V`` and ``KOALA_M`` are the two bundles the package
implements. Turning a switch off gives back the plain EKF, which is what the certificates compare
against.

State layout. A model has tensors of sizes ``sizes = (n_1, ..., n_T)``, n = sum(sizes) weights.
KOALA-V's state is the weight vector x (length n). KOALA-M's state is s = [x; u] (weights then
velocities, length 2n), so every matrix is ``block ⊗ I_n`` with a 1x1 or 2x2 block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import sympy as sp

__all__ = [
    "Assumptions",
    "KOALA_V",
    "KOALA_M",
    "dynamics_block",
    "kron_identity",
    "tensor_slices",
    "loss_observation",
    "fractional_target",
    "largest_eigenvalue_replacement",
    "layerwise_combine",
]


@dataclass(frozen=True)
class Assumptions:
    """Which of KOALA's approximations are applied on top of the generic EKF.

    dynamics            "identity": f(x) = x, F = I (KOALA-V).
                        "momentum": f([x; u]) = [x + u; a u], F = [[1, 1], [0, a]] ⊗ I (KOALA-M).
    isotropic           P and Q are ``block ⊗ I_n`` (P = p·I for KOALA-V; 2x2 ⊗ I for KOALA-M).
    largest_eigenvalue  in the covariance update, H^T H's weight block g g^T is replaced by its
                        largest eigenvalue ‖g‖² times I, which keeps P isotropic.
    layerwise           every tensor is its own observation (one row of H, noise R each); the
                        covariance contractions h_i are combined by a max.
    fractional_target   the observation target is z = (1 - lr)·h(x^), so the innovation is -lr·h(x^).
    weight_decay        tensor i observes its regularised loss L + ½·wd·‖x_i‖² (its own term only).
    """

    dynamics: str = "identity"
    isotropic: bool = True
    largest_eigenvalue: bool = True
    layerwise: bool = True
    fractional_target: bool = True
    weight_decay: bool = True

    def __post_init__(self) -> None:
        if self.dynamics not in ("identity", "momentum"):
            raise ValueError(f"dynamics must be 'identity' or 'momentum', got {self.dynamics!r}")

    @property
    def block(self) -> int:
        """Size of the Kronecker block: 1 (weights) or 2 (weights, velocities)."""
        return 1 if self.dynamics == "identity" else 2

    def without(self, **switches: bool) -> "Assumptions":
        """The same bundle with some switches turned off (``without(largest_eigenvalue=False)``)."""
        return replace(self, **switches)


KOALA_V = Assumptions(dynamics="identity")
KOALA_M = Assumptions(dynamics="momentum")


def dynamics_block(assumptions: Assumptions, a: sp.Expr) -> sp.Matrix:
    """F's block: [[1]] for identity dynamics (KOALA-V), [[1, 1], [0, a]] for momentum (KOALA-M)."""
    if assumptions.dynamics == "identity":
        return sp.Matrix([[1]])
    return sp.Matrix([[1, 1], [0, a]])


def kron_identity(block: sp.Matrix, n: int) -> sp.Matrix:
    """``block ⊗ I_n``: the isotropic (per-coordinate identical) form of a block matrix."""
    k = block.shape[0]
    out = sp.zeros(k * n, block.shape[1] * n)
    for r in range(k):
        for c in range(block.shape[1]):
            for i in range(n):
                out[r * n + i, c * n + i] = block[r, c]
    return out


def tensor_slices(sizes: Sequence[int]) -> list[slice]:
    """Index range of every tensor inside the weight vector x."""
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    return out


def loss_observation(assumptions: Assumptions, sizes: Sequence[int], i: int, L: sp.Expr,
                     g: sp.Matrix, x_hat: sp.Matrix, wd: sp.Expr) -> Callable[[sp.Matrix], sp.Matrix]:
    """h_i(s): what tensor i observes, as a function of the state s.

    The data loss is known to the filter through its value L and gradient g at the prediction
    x^ (the EKF only ever uses h(x^) and H = dh/dx at x^), so it enters as its first-order model
    L + g_i·(x_i - x^_i). With ``layerwise`` the observation of tensor i sees only tensor i's
    gradient block; without it, the single observation sees the whole gradient. With
    ``weight_decay`` tensor i adds its own regulariser ½·wd·‖x_i‖² (code: the official
    implementation adds the tensor's own term only).
    """
    block = slice(None) if not assumptions.layerwise else tensor_slices(sizes)[i]
    n = sum(sizes)

    def h(s: sp.Matrix) -> sp.Matrix:
        x = s[:n, 0]
        xs, gs, xhs = x[block, 0], g[block, 0], x_hat[block, 0]
        value = L + sum(gj * (xj - xhj) for gj, xj, xhj in zip(gs, xs, xhs))
        if assumptions.weight_decay:
            value += wd / 2 * sum(xj**2 for xj in xs)
        return sp.Matrix([[value]])

    return h


def fractional_target(assumptions: Assumptions, lr: sp.Expr, observed: sp.Expr) -> sp.Expr:
    """z = (1 - lr)·h(x^): lr is the fraction of the (regularised) loss to remove.

    The paper's target L_target = (1 - lr)·L, with L the (regularised) observed loss.
    """
    if not assumptions.fractional_target:
        raise ValueError("without a target model the observation z is the user's to give")
    return (1 - lr) * observed


def largest_eigenvalue_replacement(assumptions: Assumptions, HtH: sp.Matrix, n: int) -> sp.Matrix:
    """Replace the weight block g g^T of H^T H by λ_max(g g^T)·I_n (paper: KOALA-V and KOALA-M).

    H = [g^T, 0] has no velocity part, so H^T H = E ⊗-embedded g g^T with E = diag(1, 0); only
    its weight block is non-zero, which this function checks. λ_max is found by SymPy from the
    eigenvalues of that block; for g g^T they are ‖g‖² (once) and 0.
    """
    if not assumptions.largest_eigenvalue:
        return HtH
    weight = HtH[:n, :n]
    rest = HtH.copy()
    rest[:n, :n] = sp.zeros(n, n)
    if rest != sp.zeros(*HtH.shape):
        raise AssertionError("H^T H has a non-zero velocity block; H must be [g^T, 0]")
    eigenvalues = list(weight.eigenvals().keys())
    lam = sp.Max(*eigenvalues)
    replaced = sp.zeros(*HtH.shape)
    replaced[:n, :n] = lam * sp.eye(n)
    return replaced


def layerwise_combine(assumptions: Assumptions, contractions: Sequence[sp.Expr]) -> sp.Expr:
    """Combine the per-tensor covariance contractions h_i into one h for all tensors: their max."""
    if not assumptions.layerwise:
        if len(contractions) != 1:
            raise ValueError("one observation per model when layer-wise observations are off")
        return contractions[0]
    return sp.Max(*contractions) if contractions else sp.Integer(0)
