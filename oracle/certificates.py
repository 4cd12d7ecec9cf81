"""Certificates: the derived closed forms against the full-matrix EKF, and the evaluator against both.

Three kinds, all exact or at ≥ 50 digits:

1. Symbolic identities recorded while deriving (:mod:`oracle.derive`), plus the EKF's own
   Joseph-form identity, the Riccati fixed point and the KOALA-M → KOALA-V reduction.
2. The full-matrix EKF on tiny models (n = 1…4 weights, one or several tensors) in exact
   Rationals, without the eigenvalue switch: the weight and velocity updates must equal the closed
   forms exactly (the isotropic prior makes them exact), and the posterior covariance must differ
   from KOALA's by exactly (B^ E B^) ⊗ (h_max·I - Σ_i g~_i g~_i^T / S_i) — zero for n = 1.
3. The mpmath evaluator (:mod:`oracle.evaluator`) against a full-matrix KOALA (the generic EKF with
   the switches applied to matrices, exact arithmetic) over several steps with float inputs.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Callable

import mpmath
import sympy as sp

from . import ekf
from .assumptions import (
    KOALA_M,
    KOALA_V,
    Assumptions,
    dynamics_block,
    fractional_target,
    kron_identity,
    largest_eigenvalue_replacement,
    loss_observation,
    tensor_slices,
)
from .checks import Check, is_zero
from .derive import derive_m, derive_reduction, derive_riccati, derive_v, scalar_symbols
from .evaluator import DPS, KoalaMOracle, KoalaVOracle
from .kpp_certificates import PP_CERTIFICATES
from .problems import exact_groups, float_problem, group_spec, worst_relative_gap
from .problems import small_rational as _q

__all__ = ["all_checks", "CERTIFICATES", "EXACT_SIZES"]

# Tiny models for the exact comparisons: one tensor of 1..4 weights, and layer-wise mixtures.
EXACT_SIZES = [(1,), (2,), (3,), (4,), (1, 2), (2, 2), (1, 1, 2)]




def _prior_block(rng: random.Random, k: int) -> sp.Matrix:
    if k == 1:
        return sp.Matrix([[_q(rng, positive=True)]])
    pxx, puu = _q(rng, positive=True), _q(rng, positive=True)
    pxu = sp.Rational(rng.randint(-9, 9), 10) * min(pxx, puu)  # |Pxu| < sqrt(Pxx Puu)
    return sp.Matrix([[pxx, pxu], [pxu, puu]])


def _closed_form_update(variant: str, B: sp.Matrix, sizes, xh, uh, g, L, lr, wd, R):
    """KOALA's update from the derived closed forms, in exact Rationals."""
    s = scalar_symbols()
    d = derive_v() if variant == "V" else derive_m()
    x_new, u_new = xh.copy(), uh.copy() if uh is not None else None
    hs, Gs, taus, Ss = [], [], [], []
    for b in tensor_slices(sizes):
        t = [d.direction.subs({s.g: g[j], s.wd: wd, s.x: xh[j]}) for j in range(b.start, b.stop)]
        G = sum(v**2 for v in t)
        X2 = sum(xh[j] ** 2 for j in range(b.start, b.stop))
        Lt = d.observed_loss.subs({s.L: L, s.wd: wd, s.X2: X2})
        if variant == "V":
            vals = {s.lr: lr, s.Lt: Lt, s.ph: B[0, 0], s.G: G, s.R: R}
            h = d.contraction.subs(vals)
        else:
            vals = {s.lr: lr, s.Lt: Lt, s.Pxx_h: B[0, 0], s.Pxu_h: B[0, 1], s.G: G, s.R: R}
            h = d.contraction.subs(vals)
            cu = d.step["u"].subs(vals)
            for jj, j in enumerate(range(b.start, b.stop)):
                u_new[j] = uh[j] - cu * t[jj]
        cx = d.step["x"].subs(vals)
        for jj, j in enumerate(range(b.start, b.stop)):
            x_new[j] = xh[j] - cx * t[jj]
        hs.append(h)
        Gs.append(G)
        taus.append(t)
        Ss.append(sp.simplify(G / h))
    Gmax = max(Gs)
    if variant == "V":
        B_post = sp.Matrix([[d.cov_stable["p"].subs({s.ph: B[0, 0], s.G: Gmax, s.R: R})]])
    else:
        vals = {s.Pxx_h: B[0, 0], s.Pxu_h: B[0, 1], s.Puu_h: B[1, 1], s.G: Gmax, s.R: R,
                s.det_h: B.det()}
        B_post = sp.Matrix([[d.cov_stable["Pxx"].subs(vals), d.cov_stable["Pxu"].subs(vals)],
                            [d.cov_stable["Pxu"].subs(vals), d.cov_stable["Puu"].subs(vals)]])
    return x_new, u_new, B_post, hs, taus, Ss


def _exact_problem(variant: str, sizes, seed: int):
    rng = random.Random(seed)
    k = 1 if variant == "V" else 2
    assumptions = KOALA_V if variant == "V" else KOALA_M
    n = sum(sizes)
    B = _prior_block(rng, k)
    R, L = _q(rng, positive=True), _q(rng, positive=True)
    lr = sp.Rational(rng.randint(1, 10), 10)
    wd = sp.Rational(rng.randint(0, 5), 10)
    xh = sp.Matrix([_q(rng) for _ in range(n)])
    uh = sp.Matrix([_q(rng) for _ in range(n)]) if k == 2 else None
    g = sp.Matrix([_q(rng) for _ in range(n)])
    return assumptions, k, n, B, R, L, lr, wd, xh, uh, g


def _stacked_update(assumptions: Assumptions, sizes, s_hat, P_hat, g, xh, L, lr, wd, R):
    obs = [loss_observation(assumptions, sizes, i, L, g, xh, wd) for i in range(len(sizes))]
    z = sp.Matrix([fractional_target(assumptions, lr, o(s_hat)[0, 0]) for o in obs])
    return ekf.update(s_hat, P_hat, lambda st: sp.Matrix([o(st)[0, 0] for o in obs]),
                      R * sp.eye(len(sizes)), z)


def full_ekf_against_closed_forms(variant: str) -> list[Check]:
    """Exact comparisons on every size in EXACT_SIZES (fixed seeds)."""
    agree, differ, n1 = [], [], []
    for seed, sizes in enumerate(EXACT_SIZES):
        assumptions, k, n, B, R, L, lr, wd, xh, uh, g = _exact_problem(variant, sizes, seed)
        s_hat = xh if k == 1 else xh.col_join(uh)
        P_hat = kron_identity(B, n)
        upd = _stacked_update(assumptions, sizes, s_hat, P_hat, g, xh, L, lr, wd, R)
        x_cf, u_cf, B_post, hs, taus, Ss = _closed_form_update(
            variant, B, sizes, xh, uh, g, L, lr, wd, R)
        got_x = upd.x[:n, 0]
        ok = is_zero(got_x - x_cf) and (k == 1 or is_zero(upd.x[n:, 0] - u_cf))
        agree.append((sizes, ok))
        # predicted difference of the covariances
        E = sp.Matrix([[1]]) if k == 1 else sp.diag(1, 0)
        outer = sp.zeros(n, n)
        for b, t, S in zip(tensor_slices(sizes), taus, Ss):
            v = sp.zeros(n, 1)
            v[b, 0] = sp.Matrix(t)
            outer += v * v.T / S
        predicted = _kron(B * E * B, max(hs) * sp.eye(n) - outer)
        diff_ok = is_zero(upd.P - kron_identity(B_post, n) - predicted)
        differ.append((sizes, diff_ok))
        if sizes == (1,):
            n1.append(is_zero(upd.P - kron_identity(B_post, n)))
    label = ", ".join(str(sz) for sz, _ in agree)
    return [
        Check(f"{variant}.exact-ekf-state-update",
              "full-matrix EKF (exact Rationals, layer-wise observations, noise R·I) moves "
              "weights" + (" and velocities" if variant == "M" else "") +
              " exactly as the closed forms", all(ok for _, ok in agree), f"sizes {label}"),
        Check(f"{variant}.exact-ekf-covariance-n1",
              "with one weight (n = 1) the largest-eigenvalue switch is exact: EKF P+ = KOALA P+",
              all(n1)),
        Check(f"{variant}.exact-ekf-covariance-gap",
              "EKF P+ - KOALA P+ = (B^ E B^) ⊗ (h_max·I - Σ_i g~_i g~_i^T / S_i) exactly "
              "(KOALA keeps the max contraction in every direction)",
              all(ok for _, ok in differ), f"sizes {label}"),
    ]


def _kron(A: sp.Matrix, Bm: sp.Matrix) -> sp.Matrix:
    from sympy.matrices.expressions.kronecker import kronecker_product

    return sp.Matrix(kronecker_product(A, Bm))


def layerwise_against_whole_model() -> Check:
    """Without the layer-wise switch the filter observes the loss once, with the whole gradient.

    With wd = 0 the layer-wise step of tensor i is the whole-model EKF step scaled by exactly
    S_whole / S_i = (p^·Σ_j G_j + R) / (p^·G_i + R).
    """
    ok = []
    for seed, sizes in enumerate([(1, 2), (2, 2), (1, 1, 2)]):
        _, _, n, B, R, L, lr, _, xh, _, g = _exact_problem("V", sizes, 100 + seed)
        wd = sp.Integer(0)
        whole = KOALA_V.without(layerwise=False)
        h = loss_observation(whole, (n,), 0, L, g, xh, wd)
        z = sp.Matrix([[fractional_target(whole, lr, h(xh)[0, 0])]])
        upd = ekf.update(xh, kron_identity(B, n), h, sp.Matrix([[R]]), z)
        x_cf, *_ = _closed_form_update("V", B, sizes, xh, None, g, L, lr, wd, R)
        S_whole = B[0, 0] * sum(v**2 for v in g) + R
        for b in tensor_slices(sizes):
            S_i = B[0, 0] * sum(g[j] ** 2 for j in range(b.start, b.stop)) + R
            for j in range(b.start, b.stop):
                ok.append(is_zero((x_cf[j] - xh[j]) - (upd.x[j] - xh[j]) * S_whole / S_i))
    return Check("V.layerwise-vs-whole-model",
                 "layer-wise step of tensor i = whole-model EKF step × (p^ΣG_j + R)/(p^G_i + R) "
                 "(wd = 0, exact Rationals)", all(ok))


def joseph_form() -> Check:
    """(I - K H) P^ (I - K H)^T + K R K^T = (I - K H) P^ for the optimal gain (2 states)."""
    a, b, c, h1, h2, R = sp.symbols("a b c h1 h2 R", positive=True)
    P = sp.Matrix([[a, b], [b, c]])
    xs = sp.Matrix(sp.symbols("s0:2"))
    upd = ekf.update(xs, P, lambda st: sp.Matrix([[h1 * st[0] + h2 * st[1]]]),
                     sp.Matrix([[R]]), sp.Matrix([[0]]))
    I_KH = sp.eye(2) - upd.K * upd.H
    joseph = I_KH * P * I_KH.T + upd.K * sp.Matrix([[R]]) * upd.K.T
    return Check("ekf.joseph-form",
                 "(I - K H) P^ (I - K H)^T + K R K^T = (I - K H) P^ at the optimal gain",
                 is_zero(joseph - upd.P))


# ------------------------------------------------------------------------------------------------
# the evaluator against a full-matrix KOALA over several steps


GRID_DIGITS = 90  # the matrix path rounds its state to 10^-90 after every step (see below)


def _on_grid(value) -> sp.Rational:
    """The Rational nearest to ``value`` on the grid 10^-GRID_DIGITS (exact integer arithmetic)."""
    value = sp.Rational(value)
    scale = 10**GRID_DIGITS
    num = 2 * value.p * scale + value.q
    return sp.Rational(num // (2 * value.q), scale)


def _sqrt_on_grid(value: sp.Rational) -> sp.Rational:
    """sqrt(value) truncated to the grid 10^-GRID_DIGITS (integer square root, exact)."""
    value = sp.Rational(value)
    scale = 10**GRID_DIGITS
    return sp.Rational(math.isqrt(value.p * value.q * scale * scale), value.q * scale)


class _MatrixKoala:
    """KOALA as matrices: the generic EKF with the switches applied to whole matrices.

    Exact Rational arithmetic within a step. Between steps the state is rounded to the grid
    10^-90 (and KOALA-M's square root in D is taken on that grid), which keeps the Rationals small;
    that perturbation is 40 orders of magnitude below the 1e-50 the evaluator is held to.
    Estimators (R, qx, xavg) and the skip rule are restated here in matrix form, so the
    evaluator's scalar implementation is checked against an independent one.
    """

    def __init__(self, variant, sizes, groups, x0, hyper):
        self.variant, self.sizes, self.groups = variant, sizes, groups
        self.assumptions = KOALA_V if variant == "V" else KOALA_M
        self.k = self.assumptions.block
        self.n = sum(sizes)
        n = self.n
        self.x = sp.Matrix([sp.Rational(v) for v in x0])
        self.u = sp.zeros(n, 1)
        self.xavg = sp.zeros(n, 1)
        H = {k: sp.Rational(v) for k, v in hyper.items() if v is not None}
        self.hyper = H
        self.R = H.get("r", sp.Integer(1))
        self.adaptive = hyper.get("r") is None
        if self.k == 1:
            self.P = H["sigma"] * sp.eye(n)
        else:
            self.P = kron_identity(sp.Matrix([[H["sw"], H["sc"]], [H["sc"], H["sv"]]]), n)
            self.qx = H["qw"]

    def state(self):
        return self.x if self.k == 1 else self.x.col_join(self.u)

    def predict(self):
        n = self.n
        F = kron_identity(dynamics_block(self.assumptions, self.hyper.get("a", 0)), n)
        if self.k == 1:
            Q = self.hyper["q"] * sp.eye(n)
        else:
            D = _sqrt_on_grid(sum((self.xavg[j] - self.x[j]) ** 2 for j in range(n))) / n
            self.qx = sp.Rational(9, 10) * self.qx + sp.Rational(1, 10) * D
            Q = kron_identity(sp.diag(self.qx, self.hyper["qv"]), n)
        pred = ekf.predict(lambda st: F * st, F, self.state(), self.P, Q)
        self.x = pred.x[:n, 0]
        if self.k == 2:
            self.u = pred.x[n:, 0]
        self.P = pred.P

    def update(self, L, m2, grads):
        n = self.n
        if self.adaptive:
            beta = self.hyper["alpha_r"]
            self.R = beta * self.R + (1 - beta) * m2
        g = sp.zeros(n, 1)
        observed = []
        blocks = tensor_slices(self.sizes)
        for i, b in enumerate(blocks):
            group = self.groups[i]
            if grads[i] is None:
                continue
            gi = [sp.Rational(v) for v in grads[i]]
            if sum(v**2 for v in gi) < group["eps"] ** 2:
                continue
            for jj, j in enumerate(range(b.start, b.stop)):
                g[j] = gi[jj]
            observed.append(i)
        if not observed:
            return
        x_hat, s_hat, P_hat = self.x, self.state(), self.P
        candidates, new_state = [], s_hat.copy()
        for i in observed:
            group = self.groups[i]
            h_i = loss_observation(self.assumptions, self.sizes, i, L, g, x_hat, group["wd"])
            z = sp.Matrix([[fractional_target(self.assumptions, group["lr"], h_i(s_hat)[0, 0])]])
            upd = ekf.update(s_hat, P_hat, h_i, sp.Matrix([[self.R]]), z)
            b = blocks[i]
            for bb in range(self.k):
                for j in range(b.start, b.stop):
                    new_state[bb * n + j] = upd.x[bb * n + j]
            HtH = largest_eigenvalue_replacement(self.assumptions, upd.H.T * upd.H, n)
            candidates.append(P_hat - P_hat * HtH * P_hat / upd.S[0, 0])
        self.x = new_state[:n, 0]
        if self.k == 2:
            self.u = new_state[n:, 0]
            for i in observed:
                for j in range(blocks[i].start, blocks[i].stop):
                    self.xavg[j] = sp.Rational(9, 10) * self.xavg[j] + sp.Rational(1, 10) * self.x[j]
        # layer-wise max: keep the most contracted candidate (smallest weight variance)
        self.P = min(candidates, key=lambda M: M[0, 0])

    def round_to_grid(self):
        self.x, self.u, self.xavg, self.P = (M.applyfunc(_on_grid)
                                             for M in (self.x, self.u, self.xavg, self.P))
        self.R = _on_grid(self.R)
        if self.k == 2:
            self.qx = _on_grid(self.qx)


def _float_problem(seed: int, variant: str):
    sizes = (1, 2, 1)
    x0, steps, groups = float_problem(seed, sizes, 3)
    if variant == "V":
        hyper = dict(sigma=0.25, q=0.5, r=None, alpha_r=0.9)
    else:
        hyper = dict(sw=0.25, sc=0.03125, sv=0.125, a=0.9, qw=0.01, qv=0.02, r=None, alpha_r=0.9)
    return sizes, x0, steps, groups, hyper


def evaluator_against_matrix_koala(variant: str) -> Check:
    """Three steps, three tensors in two groups, a None grad and a skipped tensor, adaptive R."""
    sizes, x0, steps, groups, hyper = _float_problem(7, variant)
    blocks = tensor_slices(sizes)
    params = [x0[b] for b in blocks]
    cls = KoalaVOracle if variant == "V" else KoalaMOracle
    oracle = cls(group_spec(params, groups), **hyper)
    matrix = _MatrixKoala(variant, sizes, exact_groups(groups), x0, hyper)
    worst = mpmath.mpf(0)
    with mpmath.workdps(DPS + 20):
        for L, m2, grads in steps:
            oracle.predict()
            matrix.predict()
            oracle.update(L, m2, grads)
            matrix.update(sp.Rational(L), sp.Rational(m2), grads)
            matrix.round_to_grid()
            pairs = [(oracle.x[i][jj], matrix.x[j]) for i, b in enumerate(blocks)
                     for jj, j in enumerate(range(b.start, b.stop))]
            if variant == "V":
                pairs.append((oracle.p, matrix.P[0, 0]))
            else:
                pairs += [(oracle.u[i][jj], matrix.u[j]) for i, b in enumerate(blocks)
                          for jj, j in enumerate(range(b.start, b.stop))]
                pairs += [(oracle.xavg[i][jj], matrix.xavg[j]) for i, b in enumerate(blocks)
                          for jj, j in enumerate(range(b.start, b.stop))]
                n = matrix.n
                pairs += [(oracle.Pxx, matrix.P[0, 0]), (oracle.Pxu, matrix.P[0, n]),
                          (oracle.Puu, matrix.P[n, n]), (oracle.qx, matrix.qx)]
            pairs.append((oracle.R, matrix.R))
            worst = worst_relative_gap(pairs, worst, DPS + 20)
    bound = mpmath.mpf(10) ** -(DPS - 10)
    return Check(f"{variant}.evaluator-vs-matrix-koala",
                 f"mpmath evaluator ({DPS} digits, float inputs) = full-matrix KOALA in exact "
                 f"arithmetic over 3 steps (groups, None grad, skip, adaptive R) to 1e-{DPS - 10}",
                 worst < bound, f"worst relative gap {mpmath.nstr(worst, 3)}")


# ------------------------------------------------------------------------------------------------

CERTIFICATES: list[tuple[str, Callable[[], list[Check]]]] = [
    ("derivation of KOALA-V", lambda: derive_v().checks),
    ("derivation of KOALA-M", lambda: derive_m().checks),
    ("EKF identity", lambda: [joseph_form()]),
    ("Riccati fixed point of KOALA-V", lambda: derive_riccati().checks),
    ("KOALA-M reduces to KOALA-V", derive_reduction),
    ("full-matrix EKF vs KOALA-V closed forms", lambda: full_ekf_against_closed_forms("V")),
    ("full-matrix EKF vs KOALA-M closed forms", lambda: full_ekf_against_closed_forms("M")),
    ("layer-wise observations", lambda: [layerwise_against_whole_model()]),
    ("evaluator vs full-matrix KOALA-V", lambda: [evaluator_against_matrix_koala("V")]),
    ("evaluator vs full-matrix KOALA-M", lambda: [evaluator_against_matrix_koala("M")]),
    *PP_CERTIFICATES,
]


@functools.lru_cache(maxsize=None)
def all_checks() -> tuple[tuple[str, tuple[Check, ...]], ...]:
    return tuple((title, tuple(fn())) for title, fn in CERTIFICATES)
