"""Covariance stage: the EKF's P = (I - K H) P^ under the largest-eigenvalue switch.

Per tensor the contraction h; over tensors their max; finally the subtraction-free posterior.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..assumptions import largest_eigenvalue_replacement
from ..checks import Check, is_zero, subtraction_free
from ..symbolic_model import SymbolicModel
from .gain_and_step import Observation
from .predict import Prior

__all__ = ["Covariance", "StableCovariance", "derive_covariance", "derive_max_contraction",
           "derive_stable_covariance"]


@dataclass
class Covariance:
    """Tensor i's posterior covariance block under the largest-eigenvalue switch.

    h       the contraction: B+ = B^ - B^ diag(h, 0) B^ (KOALA-V: p+ = p^ - p^²·h)
    B_post  the k x k posterior block B+, in the invariants
    """

    h: sp.Expr
    B_post: sp.Matrix
    checks: list


def derive_covariance(m: SymbolicModel, prior: Prior, obs: Observation) -> Covariance:
    """Posterior covariance of tensor i, from the EKF's P = (I - K H) P^ (Table 1).

    Rewrites it as P^ - P^ H^T H P^ / S (certified), applies ``largest_eigenvalue``: the weight
    block g~g~^T of H^T H becomes λ_max·I = ‖g~‖²·I (the paper's KOALA-V/KOALA-M
    approximation), and certifies that the result is again B+ ⊗ I with
    B+ = B^ - B^ diag(h, 0) B^ for one scalar h.
    """
    upd, P_hat, B_hat, i = obs.upd, prior.P_hat, prior.block, obs.i
    checks: list[Check] = []
    HtH = upd.H.T * upd.H
    joseph_free = P_hat - P_hat * HtH * P_hat / upd.S[0, 0]
    checks.append(Check(
        f"{m.variant}.covariance-{i}-rewrite",
        "(I - K H) P^ = P^ - P^ H^T H P^ / S (the form the eigenvalue switch acts on)",
        is_zero(upd.P - joseph_free)))
    HtH_rep = largest_eigenvalue_replacement(m.assumptions, HtH.subs(m.to_tau), m.n)
    P_koala = P_hat - P_hat * HtH_rep * P_hat / upd.S[0, 0].subs(m.to_tau)
    B_post = m.block_of(P_koala)
    checks.append(Check(
        f"{m.variant}.covariance-{i}-stays-isotropic",
        "with H^T H's weight block replaced by λ_max·I the posterior is again B+ ⊗ I",
        is_zero(P_koala - m.kron(B_post))))
    B_post = B_post.applyfunc(m.invariants)
    h = sp.factor(m.invariants((B_hat[0, 0] - B_post[0, 0]) / B_hat[0, 0] ** 2))
    E = sp.diag(1, 0) if m.k == 2 else sp.Matrix([[1]])
    checks.append(Check(
        f"{m.variant}.covariance-{i}-contraction-form",
        "P+ = P^ - P^ diag(h, 0) P^ with one scalar h",
        is_zero(B_post - (B_hat - B_hat * (h * E) * B_hat))))
    return Covariance(h=h, B_post=B_post, checks=checks)


def derive_max_contraction(m: SymbolicModel, h: sp.Expr) -> list:
    """Certify that the max of the per-tensor contractions h_i is h at G_max.

    Starts from the contraction h = G/S of :func:`derive_covariance` (one per tensor with the
    ``layerwise`` switch, combined by a max): dh/dG > 0, so the tensor with the largest G wins.
    """
    s = m.s
    dh_dG = sp.factor(sp.diff(h, s.G))
    delta = sp.Symbol("delta", positive=True)
    gap = sp.factor(h.subs(s.G, m.Gs[1] + delta) - h.subs(s.G, m.Gs[1]))
    return [
        Check(f"{m.variant}.contraction-increasing",
              "dh/dG > 0, so max_i h(G_i) = h(max_i G_i): the tensor with the largest ‖g~_i‖² wins",
              bool(dh_dG.is_positive), f"dh/dG = {dh_dG}"),
        Check(f"{m.variant}.max-is-h-of-Gmax",
              "h(G_1 + δ) - h(G_1) > 0 for δ > 0, so the max over tensors is h at the largest G",
              bool(gap.is_positive), f"gap = {gap}"),
    ]


@dataclass
class StableCovariance:
    """The posterior block, naive and subtraction-free.

    naive   B^ - B^ diag(h, 0) B^ entry by entry, in G ({"p": ...} or {"Pxx", "Pxu", "Puu"})
    stable  the same, factored; KOALA-M's Puu+ names det P^ as det_h
    extra   further named results ({"ρ = R/S": ...} for KOALA-M)
    """

    naive: dict
    stable: dict
    extra: dict
    checks: list


def derive_stable_covariance(m: SymbolicModel, prior: Prior, h: sp.Expr) -> StableCovariance:
    """Subtraction-free posterior, from B+ = B^ - B^ diag(h, 0) B^ of :func:`derive_covariance`
    (the EKF's P = (I - K H) P^ under the largest-eigenvalue switch) with h = G/S.

    ``factor`` finds the stable forms: p+ = p^·R/S (KOALA-V); Pxx+ = ρ·P^xx, Pxu+ = ρ·P^xu,
    Puu+ = (G·det P^ + R·P^uu)/S with ρ = R/S (KOALA-M). Certifies stable = naive, no
    subtraction (non-negative coefficients) and, for KOALA-M, det P+ = ρ·det P^.
    """
    s = m.s
    checks: list[Check] = []
    if m.k == 1:
        naive = {"p": sp.expand(s.ph - s.ph**2 * h)}
        stable = {"p": sp.factor(naive["p"])}
        checks.append(Check(
            "V.stable-equals-naive", "p^ - p^²·h = p^·R/(p^·G + R)",
            is_zero(stable["p"] - naive["p"]), f"p+ = {stable['p']}"))
        checks.append(Check(
            "V.stable-subtraction-free",
            "the stable p+ has no subtraction (non-negative coefficients in p^, G, R)",
            subtraction_free(stable["p"], (s.ph, s.G, s.R))))
        return StableCovariance(naive=naive, stable=stable, extra={}, checks=checks)

    B_hat = prior.block
    B = B_hat - B_hat * (h * sp.diag(1, 0)) * B_hat
    naive = {"Pxx": B[0, 0], "Pxu": B[0, 1], "Puu": B[1, 1]}
    stable = {nm: sp.factor(e) for nm, e in naive.items()}
    # Name the determinant where the factored Puu+ contains it.
    det_expr = s.Pxx_h * s.Puu_h - s.Pxu_h**2
    num, den = sp.fraction(stable["Puu"])
    coeffs = sp.collect(sp.expand(num), s.G, evaluate=False)
    named = is_zero(coeffs.get(s.G, 0) - det_expr)
    rest = sp.expand(num - s.G * coeffs.get(s.G, 0))
    stable["Puu"] = (s.G * s.det_h + rest) / den
    checks.append(Check(
        "M.Puu-numerator-is-det",
        "the G-coefficient of Puu+'s numerator is det P^ = P^xx·P^uu - P^xu²", named))
    checks.append(Check(
        "M.stable-equals-naive",
        "Pxx+ = ρ·P^xx, Pxu+ = ρ·P^xu, Puu+ = (G·det P^ + R·P^uu)/S with ρ = R/S",
        all(is_zero(stable[nm].subs(s.det_h, det_expr) - naive[nm]) for nm in naive),
        "; ".join(f"{nm}+ = {stable[nm]}" for nm in stable)))
    checks.append(Check(
        "M.stable-subtraction-free",
        "Pxx+ and Puu+ have no subtraction in (P^xx, P^uu, det P^, G, R); Pxu+ = ρ·P^xu",
        subtraction_free(stable["Pxx"], (s.Pxx_h, s.G, s.R))
        and subtraction_free(stable["Puu"], (s.Pxx_h, s.Puu_h, s.det_h, s.G, s.R))
        and is_zero(stable["Pxu"] / s.Pxu_h - stable["Pxx"] / s.Pxx_h)))
    det_post = sp.factor(B.det())
    rho = sp.factor(stable["Pxx"] / s.Pxx_h)
    checks.append(Check(
        "M.det-contracts", "det P+ = ρ·det P^ with ρ = R/S ∈ (0, 1]: P stays PSD",
        is_zero(det_post - rho * det_expr), f"ρ = {rho}"))
    return StableCovariance(naive=naive, stable=stable, extra={"ρ = R/S": rho}, checks=checks)
