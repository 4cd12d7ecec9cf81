"""Derive KOALA's closed forms from the generic EKF under the named assumptions.

Nothing in this module (or in :mod:`oracle.stages`) writes a KOALA formula by hand. The
derivation builds a small *symbolic* model (:mod:`oracle.symbolic_model`: two tensors, sizes
(2, 1), every entry a symbol), applies the switches of :mod:`oracle.assumptions`, runs
:func:`oracle.ekf.predict` / :func:`oracle.ekf.update`, and reads the closed forms off the
result, stage by stage (:func:`_derive`):

* predict: the time update of the state and of the covariance block (p^ = p + q; P^ = F P F^T + Q
  for KOALA-M) — :func:`oracle.stages.derive_predict`;
* update, per tensor: the observation (H = [g~^T, 0], h(x^) = L~), the gain K_j / g~ (the same
  scalar for every coordinate of the tensor) and the steps (Δx = -c_x·g~, Δu = -c_u·g~), the
  covariance contraction h = ‖g~‖²/S — ``derive_observation``, ``derive_gain_and_step``,
  ``derive_covariance``;
* all tensors: the generic forms, the layer-wise max and batch update, and the naive posterior
  P^ - P^ diag(h, 0) P^ with its subtraction-free (numerically stable) equivalent found by
  ``factor`` — ``derive_generic_forms``, ``derive_max_contraction``, ``derive_layerwise_batch``,
  ``derive_stable_covariance``.

Results are expressed in the per-tensor invariants G = ‖g~‖², X2 = ‖x^‖² and L~ = L + ½·wd·X2:
the coordinates of the last weight of a tensor are eliminated through G and X2, and the
derivation checks that no coordinate survives (the forms depend on the gradient only through its
norm). Each such check is recorded as a :class:`oracle.checks.Check`. ``oracle/README.md`` maps
every form to the KOALA paper (Davtyan et al., AAAI 2022, arXiv 2107.03331).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import sympy as sp

from . import stages
from .assumptions import KOALA_M, KOALA_V, Assumptions
from .checks import Check, is_zero, no_float_constants
from .symbolic_model import SIZES, scalar_symbols, symbolic_model

__all__ = ["Derivation", "derive", "derive_v", "derive_m", "derive_riccati", "derive_reduction",
           "riccati_fixed_point_expr", "SIZES", "scalar_symbols", "STAGES"]

# The EKF stages the derived forms are grouped by (keys of :meth:`Derivation.stages`).
STAGES = ("predict", "observation", "gain and step", "covariance")


@dataclass
class Derivation:
    """The closed forms of one variant, in the symbols of :func:`scalar_symbols`.

    predict_state   elementwise time update, e.g. {"x": x + u, "u": a*u}
    predict_cov     the prior block entries from the previous posterior, e.g. {"p": p + q}
    direction       H's entry for one coordinate: g~ = g + wd*x
    observed_loss   h_i(x^) for a tensor, in X2: L + wd*X2/2 (named L~ = Lt below)
    gain            {"x": K_x/g~, "u": K_u/g~} in (prior block, G, R)
    step            {"x": c_x, "u": c_u} with Δx = -c_x·g~ and Δu = -c_u·g~, in (lr, Lt, prior, G, R)
    contraction     h = G/S
    cov_naive       posterior block P^ - P^ diag(h, 0) P^, written in G
    cov_stable      the same, subtraction-free, in G (and det_h for KOALA-M)
    extra           further named results of the covariance stage (ρ = R/S for KOALA-M)
    checks          what the derivation verified on its way, in stage order
    """

    variant: str
    assumptions: Assumptions
    predict_state: dict
    predict_cov: dict
    direction: sp.Expr
    observed_loss: sp.Expr
    gain: dict
    step: dict
    contraction: sp.Expr
    cov_naive: dict
    cov_stable: dict
    extra: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)

    def stages(self) -> dict:
        """Every derived expression with a readable name, grouped by EKF stage (:data:`STAGES`)."""
        predict, observation, gain_and_step, covariance = {}, {}, {}, {}
        for k, v in self.predict_state.items():
            predict[f"predict {k}^"] = v
        for k, v in self.predict_cov.items():
            predict[f"predict {k}^"] = v
        observation["direction g~"] = self.direction
        observation["observed loss L~"] = self.observed_loss
        for k, v in self.gain.items():
            gain_and_step[f"gain K_{k}/g~"] = v
        for k, v in self.step.items():
            gain_and_step[f"step c_{k} (Δ{k} = -c_{k}·g~)"] = v
        covariance["contraction h"] = self.contraction
        for k, v in self.cov_naive.items():
            covariance[f"naive {k}+"] = v
        for k, v in self.cov_stable.items():
            covariance[f"stable {k}+"] = v
        covariance.update(self.extra)
        return dict(zip(STAGES, (predict, observation, gain_and_step, covariance)))

    def forms(self) -> dict:
        """Every derived expression, flattened with readable names (for printing and scanning)."""
        return {name: expr for group in self.stages().values() for name, expr in group.items()}


# ----------------------------------------------------------------------------------------------
# the derivation, common to both variants


def _derive(assumptions: Assumptions) -> Derivation:
    """Run the stages of :mod:`oracle.stages` in EKF order and collect forms and certificates."""
    m = symbolic_model(assumptions, SIZES)
    prior = stages.derive_predict(m)
    checks: list[Check] = list(prior.checks)

    observations, steps, covariances = [], [], []
    for i in range(len(m.sizes)):
        obs = stages.derive_observation(m, prior, i)
        step = stages.derive_gain_and_step(m, obs)
        cov = stages.derive_covariance(m, prior, obs)
        checks += obs.checks + step.checks + cov.checks
        observations.append(obs)
        steps.append(step)
        covariances.append(cov)

    generic = stages.derive_generic_forms(m, observations, steps, covariances)
    checks += generic.checks
    checks += stages.derive_max_contraction(m, generic.h)
    checks += stages.derive_layerwise_batch(m, prior, observations)
    posterior = stages.derive_stable_covariance(m, prior, generic.h)
    checks += posterior.checks

    derivation = Derivation(
        variant=m.variant, assumptions=assumptions, predict_state=prior.predict_state,
        predict_cov=prior.predict_cov, direction=observations[0].direction,
        observed_loss=generic.observed_loss, gain=generic.gain, step=generic.step,
        contraction=generic.h, cov_naive=posterior.naive, cov_stable=posterior.stable,
        extra=posterior.extra, checks=checks)
    checks.append(Check(
        f"{m.variant}.no-float-constants",
        "no SymPy Float in any derived form (all constants exact Rationals)",
        all(no_float_constants(e) for e in derivation.forms().values())))
    return derivation


@functools.lru_cache(maxsize=None)
def derive_v() -> Derivation:
    """KOALA-V's closed forms (the paper's vanilla variant: F = I, P = p·I, Q = q·I), derived."""
    return _derive(KOALA_V)


@functools.lru_cache(maxsize=None)
def derive_m() -> Derivation:
    """KOALA-M's closed forms (the paper's momentum variant: state [x; u]), derived."""
    return _derive(KOALA_M)


def derive(variant: str) -> Derivation:
    return {"V": derive_v, "M": derive_m}[variant]()


@functools.lru_cache(maxsize=None)
def derive_riccati() -> SimpleNamespace:
    """KOALA-V's covariance recursion for constant G, q, R and its fixed point, derived.

    One step maps p to φ(p) = p+(p^ = p + q): the derived predict followed by the derived stable
    posterior. The fixed point p* solves φ(p) = p; SymPy gives two roots and the positive one is
    kept. φ'(p) ∈ (0, 1) for p ≥ 0 makes the recursion a contraction, so p_k → p*.
    """
    s = scalar_symbols()
    d = derive_v()
    phi = d.cov_stable["p"].subs(s.ph, d.predict_cov["p"])
    roots = sp.solve(sp.numer(sp.together(phi - s.p)), s.p)
    # Pick the root that is positive (decided at one exact point, then certified below).
    probe = {s.q: 1, s.G: 1, s.R: 1}
    positive = [r for r in roots if r.subs(probe) > 0]
    fixed = sp.simplify(positive[0]) if len(positive) == 1 else None
    checks = []
    checks.append(Check(
        "V.riccati-fixed-point",
        "φ(p) = p has exactly one positive root p* = (sqrt(qG(qG + 4R)) - qG)/(2G), and φ(p*) = p*",
        fixed is not None and is_zero(phi.subs(s.p, fixed) - fixed)
        and bool(sp.factor(fixed * (fixed + s.q) * s.G - s.q * s.R).equals(0)),
        f"p* = {fixed}"))
    dphi = sp.factor(sp.diff(phi, s.p))
    one_minus = sp.factor(1 - dphi)
    checks.append(Check(
        "V.riccati-contraction",
        "0 < φ'(p) < 1 for p ≥ 0 (φ' = R²/S²), so p_k converges to p* monotonically",
        bool(dphi.is_positive) and bool(one_minus.is_positive), f"φ'(p) = {dphi}"))
    return SimpleNamespace(phi=phi, fixed_point=fixed, derivative=dphi, checks=checks)


def riccati_fixed_point_expr() -> sp.Expr:
    return derive_riccati().fixed_point


@functools.lru_cache(maxsize=None)
def derive_reduction() -> list:
    """KOALA-M with a = 0, Pxu = Puu = 0 (sv = sc = 0), qu = 0 is KOALA-V with p = Pxx, q = qx."""
    s = scalar_symbols()
    v, m = derive_v(), derive_m()
    off = {s.a: 0, s.Pxu: 0, s.Puu: 0, s.qu: 0}
    prior = {k: e.subs(off) for k, e in m.predict_cov.items()}
    to_prior = {s.Pxx_h: prior["Pxx"], s.Pxu_h: prior["Pxu"], s.Puu_h: prior["Puu"]}
    det = (s.Pxx_h * s.Puu_h - s.Pxu_h**2).subs(to_prior)
    v_prior = {s.ph: v.predict_cov["p"].subs({s.p: s.Pxx, s.q: s.qx})}
    cov = {k: e.subs(s.det_h, det).subs(to_prior) for k, e in m.cov_stable.items()}
    holds = (
        is_zero(m.predict_state["x"].subs({s.u: 0}) - v.predict_state["x"])
        and is_zero(m.predict_state["u"].subs(off)) and is_zero(prior["Pxu"])
        and is_zero(prior["Puu"])
        and is_zero(m.step["x"].subs(to_prior) - v.step["x"].subs(v_prior))
        and is_zero(m.step["u"].subs(to_prior))
        and is_zero(cov["Pxx"] - v.cov_stable["p"].subs(v_prior))
        and is_zero(cov["Pxu"]) and is_zero(cov["Puu"]))
    return [Check(
        "M-reduces-to-V",
        "KOALA-M with a = 0, sv = sc = qv = 0 and u = 0 takes KOALA-V's step and covariance with "
        "p = Pxx, q = qx, and keeps u = 0, Pxu = Puu = 0", holds)]
