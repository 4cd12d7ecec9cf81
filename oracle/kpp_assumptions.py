"""KOALA++'s modelling assumptions as named switches, and its least-squares covariance estimates.

KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025, arXiv 2506.04432; the authors' code
github.com/Sumxiaa/KOALA_Plus_Plus, ``Task1_Image_Classification/koalap.py``) keeps KOALA's
observation model (the loss, its fractional target, weight decay as a loss term) and identity
dynamics with process noise Q·I, and changes what is carried between steps:

directional surrogate   instead of the covariance P (n x n) each tensor carries the row
                        v_k = H_k P_{k-1} (paper), with which S_k and the gain are exact;
estimate                the one term of v_{k+1} that needs more of P than v_k carries,
                        H_{k+1} P_{k-1}, is formed from a least-squares estimate of P_{k-1}
                        given H_k P_{k-1} = v_k (paper): "plain" (the minimum-norm matrix) or
                        "symmetric" (the minimum-norm symmetric matrix);
per-tensor filters      each tensor has its own filter (a block-diagonal P, one observation per
                        tensor with noise R each), and a skipped tensor's filter does not move,
                        its time update included (code);
phantom first step      a tensor's first step starts from H_0 = H_1, v_0 = σ·H_1,
                        S_0 = (σ + Q)·‖H_1‖² + R and runs the recursion (code): the EKF with
                        P = σ·I that observes the first gradient twice (certified in
                        :mod:`oracle.kpp_certificates`).

The two estimates are *derived* here: :func:`derive_estimate` solves the KKT system of
"minimise ‖P‖_F² subject to hᵀP = vᵀ" (and P = Pᵀ) with SymPy, and certifies the solution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy as sp

from .checks import Check, is_zero

__all__ = ["PlusPlusAssumptions", "KOALA_PP_PLAIN", "KOALA_PP_SYMMETRIC", "ESTIMATES", "Estimate",
           "derive_estimate", "estimate_closed_form"]

#: The two least-squares estimates of the paper (the authors' ``is_symmetric`` flag).
ESTIMATES = ("plain", "symmetric")


@dataclass(frozen=True)
class PlusPlusAssumptions:
    """KOALA++'s switches on top of the generic EKF (see the module docstring).

    estimate             "plain" or "symmetric": the least-squares estimate of P_{k-1}.
    per_tensor           one filter per tensor (block-diagonal P).
    phantom_first_step   a tensor's first step starts from (H_1, σ·H_1, (σ + Q)‖H_1‖² + R).
    fractional_target    z = (1 - lr)·h(x^), as KOALA.
    weight_decay         tensor i observes L + ½·wd·‖x_i‖², as KOALA.
    """

    estimate: str = "symmetric"
    per_tensor: bool = True
    phantom_first_step: bool = True
    fractional_target: bool = True
    weight_decay: bool = True

    def __post_init__(self) -> None:
        if self.estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {self.estimate!r}")

    @property
    def symmetric(self) -> bool:
        return self.estimate == "symmetric"


KOALA_PP_PLAIN = PlusPlusAssumptions(estimate="plain")
KOALA_PP_SYMMETRIC = PlusPlusAssumptions(estimate="symmetric")


@dataclass(frozen=True)
class Estimate:
    """A least-squares estimate of P from hᵀP = vᵀ, in the coordinates of ``h`` and ``v``.

    P        the KKT solution [n, n] (rational in the entries of h and v)
    checks   its certificates: feasible, (symmetric,) minimal, equal to the closed form
    """

    kind: str
    P: sp.Matrix
    checks: tuple


def estimate_closed_form(kind: str, h: sp.Matrix, v: sp.Matrix) -> sp.Matrix:
    """The estimate as the paper writes it, for columns h, v [n, 1]:
    plain h·vᵀ/‖h‖²; symmetric (h·vᵀ + v·hᵀ)/‖h‖² − (h·v)·h·hᵀ/‖h‖⁴."""
    hh = (h.T * h)[0, 0]
    if kind == "plain":
        return h * v.T / hh
    hv = (h.T * v)[0, 0]
    return (h * v.T + v * h.T) / hh - hv * h * h.T / hh**2


def _unknowns(kind: str, n: int) -> tuple[sp.Matrix, list]:
    """The matrix of unknowns: n² free entries, or n(n+1)/2 for a symmetric matrix."""
    if kind == "plain":
        entries = sp.symbols(f"_e0:{n * n}", real=True)
        return sp.Matrix(n, n, entries), list(entries)
    free = {}
    P = sp.zeros(n, n)
    for i in range(n):
        for j in range(i, n):
            free[(i, j)] = sp.Symbol(f"_e{i}_{j}", real=True)
            P[i, j] = P[j, i] = free[(i, j)]
    return P, list(free.values())


@functools.lru_cache(maxsize=None)
def derive_estimate(kind: str, n: int = 3) -> Estimate:
    """Minimise ½‖P‖_F² subject to hᵀP = vᵀ (and P = Pᵀ for "symmetric") by its KKT system.

    h, v are columns of symbols ``h0..``, ``v0..`` (n entries). The objective is convex and the
    constraints linear, so the stationary point of the Lagrangian ½‖P‖² − μᵀ(Pᵀh − v) is the
    minimum; SymPy solves the linear system for the entries and μ. Certifies: the solution
    satisfies the constraint, is symmetric (symmetric kind), is Frobenius-orthogonal to every
    feasible direction (a null-space basis of the constraint), and equals the closed form.
    """
    h = sp.Matrix(sp.symbols(f"h0:{n}", real=True))
    v = sp.Matrix(sp.symbols(f"v0:{n}", real=True))
    P, free = _unknowns(kind, n)
    mu = sp.Matrix(sp.symbols(f"_mu0:{n}", real=True))
    lagrangian = sum(e**2 for e in P) / 2 - (mu.T * (P.T * h - v))[0, 0]
    equations = [sp.diff(lagrangian, e) for e in free] + list(P.T * h - v)
    solution = sp.solve(equations, free + list(mu), dict=True)
    if len(solution) != 1:
        raise AssertionError(f"the KKT system of the {kind} estimate has {len(solution)} solutions")
    P_star = P.subs(solution[0]).applyfunc(sp.cancel)
    checks = [Check(f"PP.estimate-{kind}-feasible", f"the {kind} estimate satisfies hᵀP = vᵀ",
                    is_zero(P_star.T * h - v))]
    if kind == "symmetric":
        checks.append(Check("PP.estimate-symmetric-is-symmetric", "the symmetric estimate is symmetric",
                            is_zero(P_star - P_star.T)))
    # Feasible directions: D with hᵀD = 0 (and D = Dᵀ). Minimal <=> <P*, D>_F = 0 for all of them.
    D, d_free = _unknowns(kind, n)
    null = sp.linsolve(list(D.T * h), d_free)
    (general,) = null
    params = sorted(set().union(*(sp.sympify(e).free_symbols for e in general)) & set(d_free), key=str)
    D_general = D.subs(dict(zip(d_free, general)))
    inner = sp.expand(sp.cancel(sum(a * b for a, b in zip(P_star, D_general))))
    checks.append(Check(
        f"PP.estimate-{kind}-minimal",
        f"the {kind} estimate is Frobenius-orthogonal to every feasible direction D "
        f"(hᵀD = 0{', D = Dᵀ' if kind == 'symmetric' else ''}): the least-squares (minimum-norm) solution",
        all(is_zero(sp.diff(inner, t)) for t in params) and is_zero(inner.subs({t: 0 for t in params}))))
    checks.append(Check(
        f"PP.estimate-{kind}-closed-form",
        "= h·vᵀ/‖h‖²" if kind == "plain" else "= (h·vᵀ + v·hᵀ)/‖h‖² − (h·v)·h·hᵀ/‖h‖⁴",
        is_zero(P_star - estimate_closed_form(kind, h, v))))
    return Estimate(kind=kind, P=P_star, checks=tuple(checks))
