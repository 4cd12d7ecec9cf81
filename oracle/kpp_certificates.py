"""KOALA++ certificates: the recursion against the full-matrix EKF, and the evaluator against a
vector implementation, in exact Rationals (or at ≥ 50 digits).

1. The derivation's own checks (:func:`oracle.kpp_derive.derive_pp`, both estimates).
2. Full-matrix EKF, exact Rationals: a tensor of n = 3 weights, P_{-1} = σ·I, the phantom first
   observation, then steps whose gradients keep one direction (scaled, sign changes): the
   recursion's weights and surrogate equal the EKF's at every step (both estimates).
3. The same EKF with gradients that turn: after each step the recursion's v_k differs from the
   EKF's H_k P_{k-1} by exactly the dropped term of the derivation, from the exact v_{k-1}.
4. Per-tensor filters: with a block-diagonal P and one observation per tensor (noise R each),
   the stacked EKF moves and contracts every block exactly as its own filter does.
5. The evaluator (60 digits, float inputs) against a vector KOALA++ written as the authors' code
   runs it (dot products recomputed from the stored vectors every step, S from the vectors),
   in exact Rationals: groups, weight decay, a None grad, a skipped tensor, adaptive and fixed R.
"""

from __future__ import annotations

import random

import mpmath
import sympy as sp

from . import ekf
from .assumptions import tensor_slices
from .checks import Check, is_zero
from .evaluator import DPS
from .kpp_assumptions import ESTIMATES, estimate_closed_form
from .kpp_derive import derive_pp, pp_symbols
from .kpp_evaluator import KoalaPlusPlusOracle
from .problems import exact_groups, float_problem, group_spec, worst_relative_gap
from .problems import small_rational as _q

__all__ = ["PP_CERTIFICATES"]




def _recursion_step(estimate: str, H, h, v, hh, hv, S0, Q, R):
    """One step of the derived recursion in exact Rationals: (v_k, S_k)."""
    s, d = pp_symbols(), derive_pp(estimate)
    dot = lambda a, b: (a.T * b)[0, 0]  # noqa: E731
    vals = {s.HH: dot(H, H), s.Hh: dot(H, h), s.Hv: dot(H, v), s.hh: hh, s.hv: hv, s.S0: S0, s.Q: Q, s.R: R}
    v_new = d.coef["v"].subs(vals) * v + d.coef["H"].subs(vals) * H + d.coef["h"].subs(vals) * h
    return v_new, d.S.subs(vals)


def _ekf_step(P, H, Q, R):
    """EKF predict (Q·I) and update with H (noise R): (P^, P⁺, S)."""
    n = P.shape[0]
    x = sp.zeros(n, 1)
    prior = ekf.predict(lambda st: st, sp.eye(n), x, P, Q * sp.eye(n))
    upd = ekf.update(x, prior.P, lambda st: sp.Matrix([[(H.T * st)[0, 0]]]), sp.Matrix([[R]]), sp.Matrix([[0]]))
    return prior.P, upd.P, upd.S[0, 0]


def _trajectory(estimate: str, grads, sigma, Q, R, lr, L):
    """EKF vs recursion over the steps of ``grads`` (columns): yields (k, EKF v, recursion v,
    EKF step, recursion step, EKF P_{k-1}, recursion state before the step)."""
    n = grads[0].shape[0]
    P = sigma * sp.eye(n)
    _, P, S_phantom = _ekf_step(P, grads[0], Q, R)  # the phantom observation of H_1
    h, v = grads[0], sigma * grads[0]
    hh, hv, S0 = (h.T * h)[0, 0], (h.T * v)[0, 0], S_phantom
    for k, H in enumerate(grads):
        v_ekf = (H.T * P).T
        prev = (h, v, hh, hv, S0)
        v_rec, S_rec = _recursion_step(estimate, H, h, v, hh, hv, S0, Q, R)
        P_hat, P_post, S_ekf = _ekf_step(P, H, Q, R)
        step_ekf = -lr * L * P_hat * H / S_ekf
        step_rec = -lr * L * (v_rec + Q * H) / S_rec
        yield k, v_ekf, v_rec, step_ekf, step_rec, P, prev
        P = P_post
        h, v, hh, hv, S0 = H, v_rec, (H.T * H)[0, 0], (v_rec.T * H)[0, 0], S_rec


def ekf_parallel_gradients(estimate: str) -> Check:
    rng = random.Random(11)
    base = sp.Matrix([_q(rng) for _ in range(3)])
    grads = [_q(rng) * base for _ in range(4)]
    ok = all(is_zero(ve - vr) and is_zero(se - sr)
             for _, ve, vr, se, sr, _, _ in _trajectory(estimate, grads, sp.Rational(1, 10), sp.Rational(1, 5),
                                                        sp.Rational(3, 2), sp.Rational(1), sp.Rational(2)))
    return Check(f"PP.{estimate}-ekf-parallel-gradients",
                 "full-matrix EKF (exact Rationals, P = σ·I, phantom first observation), 4 steps whose "
                 "gradients keep one direction: weights and v_k equal the recursion's at every step", ok)


def ekf_turning_gradients(estimate: str) -> Check:
    """Gradients that turn: the recursion's one-step v_k from the EKF's exact v_{k-1} misses the EKF's
    v_k by exactly the dropped term of the derivation."""
    rng = random.Random(12)
    grads = [sp.Matrix([_q(rng) for _ in range(3)]) for _ in range(3)]
    sigma, Q, R = sp.Rational(1, 10), sp.Rational(1, 5), sp.Rational(3, 2)
    ok = []
    n = 3
    P = sigma * sp.eye(n)
    _, P, S_prev = _ekf_step(P, grads[0], Q, R)
    h = grads[0]
    P_before = sigma * sp.eye(n)  # P_{k-2} of the first step (the phantom's prior)
    for H in grads[1:]:
        v_prev = (h.T * P_before).T  # exact v_{k-1} = H_{k-1} P_{k-2}
        v_rec, _ = _recursion_step(estimate, H, h, v_prev, (h.T * h)[0, 0], (h.T * v_prev)[0, 0], S_prev, Q, R)
        v_ekf = (H.T * P).T
        hh = (h.T * h)[0, 0]
        H_perp = H - (H.T * h)[0, 0] / hh * h
        drop = (H_perp.T * P_before).T
        if estimate == "symmetric":
            drop = ((H_perp.T * P_before) * (sp.eye(n) - h * h.T / hh)).T
        ok.append(is_zero(v_ekf - v_rec - drop) and not is_zero(drop))
        P_before = P
        _, P, S_prev = _ekf_step(P, H, Q, R)
        h = H
    return Check(f"PP.{estimate}-ekf-turning-gradients",
                 "gradients that turn (exact Rationals): v_k(EKF) − v_k(recursion from the exact v_{k-1}) = "
                 "the derivation's dropped term, and it is not zero", all(ok))


def per_tensor_filters() -> Check:
    """Stacked EKF with block-diagonal P and one observation per tensor = independent filters."""
    ok = []
    for seed, sizes in enumerate([(1, 2), (2, 2), (1, 1, 2)]):
        rng = random.Random(40 + seed)
        n = sum(sizes)
        blocks = tensor_slices(sizes)
        P = sp.zeros(n, n)
        for b in blocks:
            m = b.stop - b.start
            A = sp.Matrix(m, m, lambda i, j: _q(rng))
            P[b, b] = A * A.T + sp.eye(m)
        H = [sp.Matrix([_q(rng) for _ in range(b.stop - b.start)]) for b in blocks]
        Q, R = sp.Rational(1, 5), sp.Rational(3, 2)
        x = sp.zeros(n, 1)
        prior = ekf.predict(lambda st: st, sp.eye(n), x, P, Q * sp.eye(n))
        rows = []
        for b, Hb in zip(blocks, H):
            row = sp.zeros(1, n)
            row[0, b] = Hb.T
            rows.append(row)
        targets = sp.Matrix([_q(rng) for _ in blocks])
        stacked = ekf.update(x, prior.P, lambda st: sp.Matrix([(row * st)[0, 0] for row in rows]),
                             R * sp.eye(len(sizes)), targets)
        for i, (b, Hb) in enumerate(zip(blocks, H)):
            m = b.stop - b.start
            own_prior = ekf.predict(lambda st: st, sp.eye(m), sp.zeros(m, 1), P[b, b], Q * sp.eye(m))
            own = ekf.update(sp.zeros(m, 1), own_prior.P, lambda st: sp.Matrix([[(Hb.T * st)[0, 0]]]),
                             sp.Matrix([[R]]), sp.Matrix([[targets[i]]]))
            ok.append(is_zero(stacked.x[b, 0] - own.x) and is_zero(stacked.P[b, b] - own.P))
        off = [stacked.P[b1, b2] for i, b1 in enumerate(blocks) for j, b2 in enumerate(blocks) if i != j]
        ok.append(all(is_zero(e) for e in off))
    return Check("PP.per-tensor-filters-decouple",
                 "block-diagonal P, one observation per tensor (noise R·I): the stacked EKF moves and "
                 "contracts every block exactly as its own filter, and P stays block-diagonal "
                 "(sizes (1, 2), (2, 2), (1, 1, 2), exact Rationals)", all(ok))


# ------------------------------------------------------------------------------------------------
# the evaluator against a vector KOALA++ (the authors' loop, exact Rationals)


class _VectorPlusPlus:
    """KOALA++ as the authors' code runs it, in exact Rationals: per tensor the vectors v and the
    previous H; α, λ and r from dot products recomputed every step; S_k = (v_k + Q·H_k)·H_k + R.
    Written from the paper's named forms (not the derived A, B, C)."""

    def __init__(self, sizes, groups, x0, hyper, symmetric):
        self.sizes, self.groups, self.symmetric = sizes, groups, symmetric
        self.blocks = tensor_slices(sizes)
        self.x = [sp.Matrix([sp.Rational(v) for v in x0[b]]) for b in self.blocks]
        self.state = [None] * len(sizes)
        H = {k: sp.Rational(v) for k, v in hyper.items() if v is not None}
        self.sigma, self.Q, self.alpha_r = H["sigma"], H["q"], H.get("alpha_r", sp.Rational(9, 10))
        self.fixed = hyper.get("r") is not None
        self.R = H["r"] if self.fixed else sp.Integer(1)

    def update(self, L, m2, grads):
        if not self.fixed:
            self.R = self.alpha_r * self.R + (1 - self.alpha_r) * m2
        Q, R = self.Q, self.R
        dot = lambda a, b: (a.T * b)[0, 0]  # noqa: E731
        for i, g in enumerate(grads):
            group = self.groups[i]
            if g is None:
                continue
            g = sp.Matrix([sp.Rational(e) for e in g])
            if dot(g, g) < group["eps"] ** 2:
                continue
            x = self.x[i]
            H = g + group["wd"] * x
            if self.state[i] is None:
                v_prev, h_prev, S_prev = self.sigma * H, H, None
            else:
                v_prev, h_prev, S_prev = self.state[i]
            n1, n2 = dot(h_prev, h_prev), dot(h_prev, v_prev)
            if S_prev is None:
                S_prev = n2 + Q * n1 + R
            lam = (dot(H, v_prev) + Q * dot(H, h_prev)) / S_prev
            alpha = dot(H, h_prev) / n1
            r = dot(H, v_prev) / n1 - dot(H, h_prev) * n2 / n1**2 if self.symmetric else 0
            v = (alpha - lam) * v_prev + Q * (H - lam * h_prev) + r * h_prev
            S = dot(v + Q * H, H) + R
            layer_loss = L + group["wd"] / 2 * dot(x, x)
            self.x[i] = x - group["lr"] * layer_loss * (v + Q * H) / S
            self.state[i] = (v, H, S)


def evaluator_against_vector_koala_pp(estimate: str, r) -> Check:
    sizes = (1, 2, 3)
    x0, steps, groups = float_problem(21, sizes, 4)
    blocks = tensor_slices(sizes)
    params = [x0[b] for b in blocks]
    hyper = dict(sigma=0.25, q=0.125, r=r, alpha_r=0.875)
    symmetric = estimate == "symmetric"
    oracle = KoalaPlusPlusOracle(group_spec(params, groups), **hyper, symmetric=symmetric)
    vec = _VectorPlusPlus(sizes, exact_groups(groups), x0, hyper, symmetric)
    worst = mpmath.mpf(0)
    with mpmath.workdps(DPS + 20):
        for L, m2, grads in steps:
            oracle.predict()
            oracle.update(L, m2 if r is None else None, grads)
            vec.update(sp.Rational(L), sp.Rational(m2), grads)
            pairs = [(oracle.x[i][j], vec.x[i][j]) for i in range(len(sizes)) for j in range(sizes[i])]
            for i, st in enumerate(vec.state):
                if st is not None:
                    v, H, S = st
                    pairs += [(oracle.v[i][j], v[j]) for j in range(sizes[i])]
                    pairs += [(oracle.h[i][j], H[j]) for j in range(sizes[i])]
                    pairs += [(oracle.S[i], S), (oracle.hh[i], (H.T * H)[0, 0]), (oracle.hv[i], (H.T * v)[0, 0])]
            pairs.append((oracle.R, vec.R))
            worst = worst_relative_gap(pairs, worst, DPS + 20)
    bound = mpmath.mpf(10) ** -(DPS - 10)
    label = "adaptive R" if r is None else "fixed r"
    return Check(f"PP.{estimate}-evaluator-vs-vector-koala-pp-{'adaptive' if r is None else 'fixed'}-r",
                 f"mpmath evaluator ({DPS} digits, float inputs) = the authors' vector loop in exact "
                 f"Rationals over 4 steps (groups, weight decay, None grad, skip, {label}) to 1e-{DPS - 10}",
                 worst < bound, f"worst relative gap {mpmath.nstr(worst, 3)}")


def closed_form_estimates_agree() -> list[Check]:
    """The printed closed forms are the ones the recursion used (re-stated for the printout)."""
    h = sp.Matrix(sp.symbols("h0:3", real=True))
    v = sp.Matrix(sp.symbols("v0:3", real=True))
    return [Check("PP.estimates-differ", "the symmetric estimate adds (v·hᵀ − (h·v)·h hᵀ/‖h‖²)/‖h‖² to the plain one",
                  is_zero(estimate_closed_form("symmetric", h, v) - estimate_closed_form("plain", h, v)
                          - (v * h.T - (h.T * v)[0, 0] * h * h.T / (h.T * h)[0, 0]) / (h.T * h)[0, 0]))]


PP_CERTIFICATES = [
    *[(f"derivation of KOALA++ ({e} estimate)", (lambda e=e: derive_pp(e).checks)) for e in ESTIMATES],
    ("KOALA++ least-squares estimates", closed_form_estimates_agree),
    *[(f"full-matrix EKF vs KOALA++ ({e})", (lambda e=e: [ekf_parallel_gradients(e), ekf_turning_gradients(e)]))
      for e in ESTIMATES],
    ("KOALA++ per-tensor filters", lambda: [per_tensor_filters()]),
    *[(f"evaluator vs vector KOALA++ ({e})",
       (lambda e=e: [evaluator_against_vector_koala_pp(e, None), evaluator_against_vector_koala_pp(e, 0.75)]))
      for e in ESTIMATES],
]
