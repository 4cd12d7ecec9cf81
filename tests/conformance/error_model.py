"""The error model behind every tolerance of the conformance suite.

No tolerance in tests/conformance is tuned by trial: each is a first-order forward error bound
of the arithmetic the implementation contract prescribes, evaluated on the oracle's exact
intermediate values (``oracle.evaluator`` traces).

Standard model: every floating-point operation returns (exact)·(1 + δ), |δ| ≤ u, with u the
unit roundoff of the dtype it runs in; γ(k) = k·u / (1 - k·u) bounds k such roundings in a chain
(γ(a) + γ(b) + γ(a)γ(b) ≤ γ(a + b) folds second-order terms). A sum of N non-negative terms in
*any* order is within γ(N - 1) of the exact sum, so the bounds hold for every reduction order
(torch's vectorised norms, Triton's block partials).

Contract (the implementation under test): per-tensor squared norms in the compute dtype (float32
for 16/32-bit params, float64 for float64 params); the scalar filter in float64; elementwise work
in the compute dtype, rounded once to the param dtype.

The comparisons restart the oracle from the implementation's exact state before each phase
(predict, update), so each bound covers one phase from identical inputs; the free-running
float64 comparison has its own bound (``free_running_rtol``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import torch

from oracle import DPS

# ---------------------------------------------------------------------------------------------
# Unit roundoff u = 2^-p, p the significand bits (implicit bit included): 53, 24, 8, 11.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

# ---------------------------------------------------------------------------------------------
# THE TABLE: how many roundings each computed quantity goes through, in which arithmetic, and
# why. "compute" = float32 (float64 for float64 params), "filter" = float64, "param" = the param
# dtype. N is the tensor's element count, T the number of tensors.
ROUNDINGS = {
    # elementwise inputs of the update
    "direction":  (3, "compute", "g~ = g + wd·x: wd cast to the compute dtype, wd·x, + g "
                                 "(raw-gradient direction: 0, it is an input)"),
    # per-tensor squared norms: N - 1 additions + N squares share one chain of length N; then
    "norm":       (9, "compute", "‖d^‖² vs ‖d‖²: squaring doubles d^'s 3 roundings (6); torch "
                                 "forms ‖·‖ then squares: sqrt (1) + float64 square (≤ 2) -> γ(N + 9)"),
    "param_sq":   (4, "compute", "‖x‖²: chain of N, sqrt (1), cast and float64 square (≤ 3) -> γ(N + 4)"),
    # scalar filter, float64
    "loss_reg":   (3, "filter", "L~ = L + ½·wd·X2: ½·wd exact, ·X2 (1), + L (1), margin (1)"),
    "noise":      (3, "filter", "R = β·R + (1 - β)·m2: 1 - β (1), two products (1 each), sum: "
                                "all terms ≥ 0 so γ(3)·R"),
    "innovation": (2, "filter", "S = P·G + R: product, sum"),
    "coef":       (3, "filter", "c = lr·L~ / S · P: product, quotient, product"),
    "posterior":  (2, "filter", "ρ = R/S, ρ·P^ (S counted in 'innovation')"),
    "det":        (2, "filter", "det P^ = P^xx·P^uu - P^xu²: two products and a difference on "
                                "terms bounded by P^xx·P^uu + P^xu²"),
    "puu_num":    (2, "filter", "G·det + R·P^uu: two products, one sum (the sum's on |terms|)"),
    "predict_p":  (1, "filter", "p + q"),
    "predict_P":  (4, "filter", "F P F^T + Q entrywise: ≤ 4 roundings on |F||P||F|^T + Q"),
    "qx":         (4, "filter", "qx ← fl(0.9)·qx + fl(1 - 0.9)·D: two constants, two products, "
                                "a sum, on non-negative terms"),
    "distance":   (5, "compute", "‖xavg - x‖² per tensor: difference (1, doubled by the square), "
                                 "sqrt (1), float64 square (2) -> γ(N + 5); then T - 1 float64 "
                                 "additions, sqrt and /n (3)"),
    # elementwise, compute dtype
    "coef_cast":  (1, "compute", "c (float64) cast to the compute dtype"),
    "axpy":       (2, "compute", "c·d, then x - c·d"),
    "momentum_x": (1, "compute", "x^ = x + u"),
    "momentum_u": (2, "compute", "u^ = a·u: a cast, product"),
    "lerp":       (4, "compute", "xavg + fl(0.1)·(x - xavg): constant, difference, product, sum "
                                 "(all bounded by 0.9|xavg| + 0.1|x| up to a factor 2, counted)"),
    "store":      (1, "param", "the compute-dtype result rounded once to the param dtype"),
    "store_rtz":  (2, "param", "the same store rounded toward zero: < 1 ulp = 2u. Triton's CPU "
                               "interpreter converts float32 to bfloat16 by truncation (real GPUs "
                               "and torch round to nearest); used for that case only"),
    # fold mode (KoalaM(fold_predict=True)): the velocity buffer holds u+ and the filter's
    # velocity after j predicts is a^j·u+, so fold mode forms the scale s = a^j on the host and
    # applies it in registers (see fold_* below)
    "fold_scale":     (0, "filter", "s = a**j as a host float64: exact for j <= 1 (1.0, a); for j >= 2 "
                                    "CPython's float pow (C pow) is within 1 ulp = 2u, counted as "
                                    "γ(j) (>= γ(2)) by passing extra = j"),
    "fold_velocity":  (2, "compute", "û = s·u+ formed in registers by the fold update: s rounded to the "
                                     "compute dtype (1), the product (1); never stored"),
    "fold_position":  (3, "compute", "fold mode's own predict x + s·u+ (velocity buffer left as is): s "
                                     "rounded to the compute dtype (1), s·u+ (1), the sum (1)"),
    "fold_recompute": (1, "compute", "posterior_weights() after an update: x - 1·u+ by torch's sub_ "
                                     "(the product by s = 1 is exact), the difference (1); then the store"),
}

# Second-order terms (a rounding of a value that is itself off by a bound) are folded in by this
# factor on every first-order bound: each is at most (sum of counts)·u_c ≤ 64·u_c of it.
SECOND_ORDER = 64


def gamma(k: float, u: float) -> mpmath.mpf:
    k, u = mpmath.mpf(k), mpmath.mpf(u)
    return k * u / (1 - k * u)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def truncates_bfloat16(impl: dict, device: torch.device, dtype: torch.dtype) -> bool:
    """True for the Triton path run by the CPU interpreter on bfloat16 params."""
    return bool(impl.get("fused")) and device.type == "cpu" and dtype == torch.bfloat16


@dataclass(frozen=True)
class Precision:
    """Unit roundoffs of one param dtype's three arithmetics."""

    dtype: torch.dtype
    truncating_store: bool = False  # see ROUNDINGS["store_rtz"]

    @property
    def u_param(self) -> float:
        return UNIT_ROUNDOFF[self.dtype]

    @property
    def u_compute(self) -> float:
        return UNIT_ROUNDOFF[compute_dtype(self.dtype)]

    @property
    def u_filter(self) -> float:
        return UNIT_ROUNDOFF[torch.float64]

    @property
    def floor(self) -> mpmath.mpf:
        """Absolute rounding error below the normal range: half the subnormal spacing."""
        return mpmath.mpf(torch.finfo(self.dtype).smallest_normal) * mpmath.mpf(self.u_param)

    def g(self, name: str, extra: float = 0) -> mpmath.mpf:
        """γ(count + extra) in the arithmetic the table names for ``name``."""
        count, where, _ = ROUNDINGS[name]
        u = {"compute": self.u_compute, "filter": self.u_filter, "param": self.u_param}[where]
        return gamma(count + extra, u)

    def slack(self) -> mpmath.mpf:
        return 1 + SECOND_ORDER * mpmath.mpf(self.u_compute)

    def stored(self, value, compute_error) -> mpmath.mpf:
        """Bound after the final rounding to the param dtype of a value computed with
        ``compute_error``: |fl_d(y) - exact| ≤ err + u_d·(|exact| + err) + floor."""
        err = compute_error * self.slack()
        store = self.g("store_rtz" if self.truncating_store else "store")
        return err + store * (abs(value) + err) + self.floor


# ---------------------------------------------------------------------------------------------
# Bounds of the measurement update. Inputs are exact (the oracle was restarted from the
# implementation's state); only this update's arithmetic contributes.


@dataclass
class ScalarInputErrors:
    """Errors already present in the update's scalar inputs (0 unless the loss moments were
    computed by the implementation from per-sample losses)."""

    loss: mpmath.mpf = mpmath.mpf(0)
    loss_var: mpmath.mpf = mpmath.mpf(0)


def norm_error(prec: Precision, numel: int, magnitude) -> mpmath.mpf:
    """|‖d^‖² - ‖d‖²| ≤ γ(N + 9)·Σ(|g| + |wd·x|)² (``magnitude`` is that sum, A)."""
    return prec.g("norm", numel) * magnitude


def noise_error(prec: Precision, R, alpha_r, adaptive: bool, inputs: ScalarInputErrors):
    if not adaptive:
        return mpmath.mpf(0)
    return prec.g("noise") * R + (1 - mpmath.mpf(alpha_r)) * inputs.loss_var


def loss_reg_error(prec: Precision, t, inputs: ScalarInputErrors):
    """|L~^ - L~| for tensor trace ``t``."""
    half_wd = t.wd / 2
    d_x2 = prec.g("param_sq", t.numel) * t.X2
    return half_wd * d_x2 + inputs.loss + prec.g("loss_reg") * (abs(t.L_tilde) + half_wd * t.X2)


def coefficient_error(prec: Precision, t, P, Pxx, R, dR, inputs: ScalarInputErrors, c):
    """|c^ - c| for c = lr·L~·P/S with S = P^xx·G + R; P is the prior entry the coefficient
    multiplies (P^xx for the weights, P^xu for the velocities), exact on input."""
    dG = norm_error(prec, t.numel, t.A)
    dS = Pxx * dG + dR + prec.g("innovation") * t.S
    dL = loss_reg_error(prec, t, inputs)
    return abs(t.lr * P / t.S) * dL + abs(c) * (dS / t.S + prec.g("coef") + prec.g("coef_cast"))


def step_bounds(prec: Precision, t, c, dc, before, after, raw_direction: bool, input_error=None):
    """Elementwise bounds for y = before - c·d, stored in the param dtype. ``input_error``
    (per element, optional): an error already in ``before`` as the kernel sees it (fold mode's
    predicted velocity, formed in registers); it passes into y unchanged (y is affine in
    ``before`` with coefficient 1)."""
    out = []
    for j, (b, a) in enumerate(zip(before, after)):
        d = t.direction[j]
        dd = mpmath.mpf(0) if raw_direction else prec.g("direction") * (abs(t.grad[j]) + abs(t.wd * t.x_prior[j]))
        err = dc * abs(d) + abs(c) * dd + prec.g("axpy") * (abs(c * d) + abs(a))
        if input_error is not None:
            err += input_error[j]
        out.append(prec.stored(a, err))
    return out


def update_bounds(prec: Precision, oracle, trace, *, variant, adaptive: bool, alpha_r,
                  prior: dict, raw_grad_step: bool = False,
                  inputs: ScalarInputErrors | None = None, velocity_error: list | None = None) -> dict:
    """Bounds for every quantity the update changes. ``prior`` holds the exact state the update
    started from (filter entries p or Pxx/Pxu/Puu, and KOALA-M's "xavg" lists); ``oracle`` is
    after the update, ``trace`` its ``last_update``; ``variant`` its ``tests.variants.VariantInfo``.

    ``velocity_error`` (fold mode only): per tensor, per element, the error of the predicted
    velocity û the kernel forms from the buffer (:func:`fold_velocity_errors`). Updated tensors
    carry it into u+; tensors the update leaves alone still have their velocity rewritten as
    fl(û) (the fold's predict), bounded by the same error plus the store.

    Returns {"x": [per tensor list], "u": ..., "xavg": ..., scalar names: bound}.
    """
    inputs = inputs or ScalarInputErrors()
    R = trace.R
    dR = noise_error(prec, R, alpha_r, adaptive, inputs) if not trace.skipped else mpmath.mpf(0)
    out = {"x": [], "u": [], "xavg": []}
    Pxx = prior[variant.weight_variance_key]
    dGs = []
    for t in trace.tensors:
        after_x = oracle.x[t.index]
        if not t.updated:
            out["x"].append([mpmath.mpf(0)] * t.numel)
            if velocity_error is None:
                out["u"].append([mpmath.mpf(0)] * t.numel)
            else:
                out["u"].append([prec.stored(v, e) for v, e in zip(oracle.u[t.index], velocity_error[t.index])])
            out["xavg"].append([mpmath.mpf(0)] * t.numel)
            continue
        dGs.append(norm_error(prec, t.numel, t.A))
        dcx = coefficient_error(prec, t, Pxx, Pxx, R, dR, inputs, t.c_x)
        bx = step_bounds(prec, t, t.c_x, dcx, t.x_prior, after_x, raw_grad_step)
        out["x"].append(bx)
        if variant.has_velocity:
            dcu = coefficient_error(prec, t, prior["Pxu"], Pxx, R, dR, inputs, t.c_u)
            out["u"].append(step_bounds(prec, t, t.c_u, dcu, t.u_prior, oracle.u[t.index], False,
                                        None if velocity_error is None else velocity_error[t.index]))
            xb = []
            for j, m_new in enumerate(oracle.xavg[t.index]):
                m_old = prior["xavg"][t.index][j]
                err = bx[j] / 10 + 2 * prec.g("lerp") * (abs(m_old) * 9 / 10 + abs(after_x[j]) / 10)
                xb.append(prec.stored(m_new, err))
            out["xavg"].append(xb)
    # the filter scalars
    dGmax = max(dGs) if dGs else mpmath.mpf(0)
    G = trace.Gmax
    S = Pxx * G + R
    dS = Pxx * dGmax + dR + prec.g("innovation") * S
    rel_rho = dR / R + dS / S + prec.g("posterior")
    if not variant.has_velocity:
        out["p"] = oracle.p * rel_rho
    else:
        out["Pxx"] = oracle.Pxx * rel_rho
        out["Pxu"] = abs(oracle.Pxu) * rel_rho
        det = Pxx * prior["Puu"] - prior["Pxu"] ** 2
        ddet = prec.g("det") * (Pxx * prior["Puu"] + prior["Pxu"] ** 2)
        num = G * det + R * prior["Puu"]
        dnum = dGmax * abs(det) + G * ddet + dR * prior["Puu"] + prec.g("puu_num") * (G * abs(det) + R * prior["Puu"])
        out["Puu"] = dnum / S + abs(num / S) * (dS / S + prec.g("posterior"))
    out["R"] = dR
    return out


# ---------------------------------------------------------------------------------------------
# Bounds of the time update (predict), from the exact state before it.


def predict_bounds_v(prec: Precision, p_hat) -> dict:
    return {"p": prec.g("predict_p") * p_hat}


def predict_bounds_m(prec: Precision, before: dict, oracle, a, qv) -> dict:
    """``before``: exact state before predict (x, u, xavg lists; Pxx, Pxu, Puu, qx).
    ``oracle``: after predict (its ``last_D`` is the exact D)."""
    n_max = max((len(v) for v in before["x"]), default=0)
    T = len(before["x"])
    D = oracle.last_D
    dD = D * (prec.g("distance", n_max) / 2 + gamma(T + ROUNDINGS["distance"][0], prec.u_filter))
    qx = oracle.qx
    dqx = prec.g("qx") * qx + dD / 10
    a = mpmath.mpf(a)
    Pxx, Pxu, Puu = before["Pxx"], before["Pxu"], before["Puu"]
    g4 = prec.g("predict_P")
    out = {
        "qx": dqx,
        "Pxx": g4 * (Pxx + 2 * abs(Pxu) + Puu + qx) + dqx,
        "Pxu": g4 * abs(a) * (abs(Pxu) + Puu),
        "Puu": g4 * (a * a * Puu + mpmath.mpf(qv)),
        "x": [], "u": [],
    }
    for xs, us, xh, uh in zip(before["x"], before["u"], oracle.x, oracle.u):
        out["x"].append([prec.stored(v, prec.g("momentum_x") * abs(v)) for v in xh])
        out["u"].append([prec.stored(w, prec.g("momentum_u") * abs(w)) for w in uh])
    return out


# ---------------------------------------------------------------------------------------------
# Fold mode (KoalaM(fold_predict=True)): the update pass also performs the next predict's
# elementwise part. Between steps the weights hold the prediction fl(x+ + u+), the velocity
# buffer holds u+ and the filter's velocity after j predicts is a^j·u+ (j = 1 right after an
# update, 2 after one more predict()); filter_state holds the next prior. What the fold adds to
# the unfolded arithmetic, each bounded below from the table:
#
# * the predicted velocity û = fl(s)·u+ (s = a^j) is formed in registers, not restarted from a
#   stored exact value: "fold_scale" + "fold_velocity", relative to |û| (fold_velocity_errors);
# * its own predict (the second and later predict() of a step) moves x by s·u+ with s = a^j:
#   "fold_scale" + "fold_position" (fold_predict_position_bounds);
# * the weights after an update are fl(x+_s + u+_s) from the posterior values already rounded
#   to the param dtype (as the unfolded path stores and reloads them): "momentum_x" + store;
#   posterior_weights() recomputes x+ from them as fl(x - 1·u+): "fold_recompute" + store
#   (fold_weight_bounds);
# * the next prior is the predict applied to the update's rounded posterior: the predict's own
#   rounding (predict_bounds_m) plus the update's errors carried through F P F^T + Q and D
#   (fold_next_prior_bounds).


def fold_scale_error(prec: Precision, j: int) -> mpmath.mpf:
    """Relative error of the host scale s = a**j (0 for j <= 1: 1.0 and a are exact)."""
    return prec.g("fold_scale", j) if j >= 2 else mpmath.mpf(0)


def fold_velocity_errors(prec: Precision, u_hat: list, j: int) -> list:
    """Per tensor, per element: |fl_c(fl_c(s)·u+) - a^j·u+| for the exact predicted velocity
    ``u_hat`` = a^j·u+ (the product of three relative errors, first order; the second-order
    rest is in the slack every stored bound carries)."""
    rel = fold_scale_error(prec, j) + prec.g("fold_velocity")
    with mpmath.workdps(DPS):
        return [[rel * abs(v) for v in us] for us in u_hat]


def fold_predict_position_bounds(prec: Precision, x_before: list, u_hat: list, x_after: list, j: int) -> list:
    """Fold mode's own predict: x <- fl(x + fl_c(s)·u+) with s = a^j, against the exact
    x + a^j·u+ (``u_hat``); ``x_after`` the oracle's predicted weights."""
    out = []
    rel_s = fold_scale_error(prec, j)
    g = prec.g("fold_position")
    for xs, us, xh in zip(x_before, u_hat, x_after):
        out.append([prec.stored(v, rel_s * abs(w) + g * (abs(x) + abs(w))) for x, w, v in zip(xs, us, xh)])
    return out


def fold_weight_bounds(prec: Precision, x_post: list, u_post: list, bx: list, bu: list) -> tuple[list, list]:
    """After a fold update: (bounds of posterior_weights() against x+, bounds of the weights
    themselves against the prediction x+ + u+), per tensor, per element.

    ``x_post``, ``u_post``: the oracle's exact posterior; ``bx``, ``bu``: bounds of the
    posterior the kernel formed (|x+_s - x+|, |u+_s - u+|, after rounding to the param dtype).
    The weights are x_w = fl(x+_s + u+_s): e_w ≤ stored(|x+_s + u+_s|, γ("momentum_x")·|…|)
    with |x+_s + u+_s| ≤ |x+ + u+| + bx + bu. posterior_weights() gives fl(x_w - u+_s), whose
    exact value is x+_s + (x_w - x+_s - u+_s): |·| ≤ |x+| + bx + e_w, rounded by
    "fold_recompute" and the store. Hence inside ≤ bx + e_w + e_rc, outside ≤ bx + bu + e_w.
    """
    inside, outside = [], []
    g_w, g_rc = prec.g("momentum_x"), prec.g("fold_recompute")
    for xs, us, bxs, bus in zip(x_post, u_post, bx, bu):
        ins, outs = [], []
        for x, u, ex, eu in zip(xs, us, bxs, bus):
            m_w = abs(x + u) + ex + eu
            e_w = prec.stored(m_w, g_w * m_w)
            m_in = abs(x) + ex + e_w
            ins.append(ex + e_w + prec.stored(m_in, g_rc * m_in))
            outs.append(ex + eu + e_w)
        inside.append(ins)
        outside.append(outs)
    return inside, outside


def fold_next_prior_bounds(prec: Precision, post: dict, post_bounds: dict, oracle, a, qv) -> dict:
    """The filter after a fold update (already the next prior) against the oracle's predict
    from its exact posterior.

    ``post``: the oracle's exact posterior (x, u, xavg lists; Pxx, Pxu, Puu, qx); ``post_bounds``:
    :func:`update_bounds` of that update (the kernel's posterior is off by these); ``oracle``:
    after its predict. The predict's own rounding is :func:`predict_bounds_m` on the exact
    posterior. The update's errors pass through the predict linearly: P^ = F P F^T + Q with
    F = [[1, 1], [0, a]] adds dPxx + 2·dPxu + dPuu, |a|·(dPxu + dPuu) and a²·dPuu; the
    distance D = ‖xavg - x‖/n moves by at most ‖e‖/n (triangle inequality) with e the
    elementwise bx + bxavg, so qx = 0.9·qx + 0.1·D by 0.1·‖e‖/n, which also enters P^xx. The
    predict's rounding of the perturbed inputs differs from that of the exact ones by
    second-order terms: the slack factor.
    """
    base = predict_bounds_m(prec, post, oracle, a, qv)
    a = mpmath.mpf(a)
    slack = prec.slack()
    with mpmath.workdps(DPS):
        sq = mpmath.fsum((ex + em_) ** 2 for bxs, bms in zip(post_bounds["x"], post_bounds["xavg"])
                         for ex, em_ in zip(bxs, bms))
        n = sum(len(v) for v in post["x"])
        dqx = mpmath.sqrt(sq) / max(n, 1) / 10 * slack
        dPxx, dPxu, dPuu = (post_bounds.get(k, mpmath.mpf(0)) for k in ("Pxx", "Pxu", "Puu"))
        return {
            "qx": base["qx"] + dqx,
            "Pxx": base["Pxx"] + (dPxx + 2 * dPxu + dPuu) * slack + dqx,
            "Pxu": base["Pxu"] + abs(a) * (dPxu + dPuu) * slack,
            "Puu": base["Puu"] + a * a * dPuu * slack,
        }


# ---------------------------------------------------------------------------------------------
# Free-running float64 trajectories (no restart): the per-step bounds above with u_c = u_f are
# at most (N_max + 16)·u_f relative to the magnitudes involved (the largest count chain:
# norm N + 9, coefficient 3 + 3 + 2, axpy 2, store 1, rounded up). Errors carried from earlier
# steps pass through maps whose sensitivity to the weights is 1 + c·wd (x ← x - c·(g + wd·x)),
# plus c's own dependence on x through L~ and G, bounded by the same factor for the test
# inputs (|c|·wd ≤ the recorded maximum); the covariance recursion contracts (φ' < 1).
# Over K steps: rtol = K·(N_max + 16)·u_f·(1 + max c·wd)^K, measured against the magnitudes
# (|x_0| + Σ_k |c_k·d_k|, "path length") for tensors and |value| for scalars.


# A predict() beyond the first of an iteration (a double predict) is counted as a step of its own
# (``steps`` = updates + extra predicts): it rounds x, u and P as the first one does (fold mode's
# deferred velocity: "fold_position" 3 + "fold_scale" ≤ 3 for j ≤ 3), far fewer than the
# N_max + 16 of a step, and the growth factor only gets larger with steps. Fold mode's
# posterior_weights() recomputation (fold_weight_bounds) is added on top as an absolute term.


def free_running_rtol(steps: int, n_max: int, max_c_wd) -> mpmath.mpf:
    u = mpmath.mpf(UNIT_ROUNDOFF[torch.float64])
    return steps * (n_max + 16) * u * (1 + mpmath.mpf(max_c_wd)) ** steps


# The target for float64 (≈1e-12): the free-running bound above must not exceed it for
# the scenarios of this suite; the tests assert that, so a scenario that would need a looser
# tolerance fails loudly instead of silently widening it.
FLOAT64_TARGET = 1e-12
