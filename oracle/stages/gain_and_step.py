"""Gain-and-step stage: the EKF's observation, S, K and x = x^ + K (z - h(x^)) per tensor.

Also the layer-wise check that the per-tensor steps are the stacked EKF's steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .. import ekf
from ..assumptions import fractional_target, loss_observation
from ..checks import Check, is_zero
from ..symbolic_model import SymbolicModel
from .predict import Prior

__all__ = ["Observation", "GainAndStep", "derive_observation", "derive_gain_and_step",
           "derive_layerwise_batch"]


@dataclass
class Observation:
    """Tensor i's observation and the EKF update it drives.

    upd        :class:`oracle.ekf.Update` of tensor i's single observation (H [1, k·n], S [1, 1],
               K [k·n, 1], x [k·n, 1], P [k·n, k·n])
    observed   h_i(x^) in the model's symbols
    direction  H's entry for one coordinate, in scalar symbols: g~ = g + wd*x
    L_tilde    h_i(x^) in the invariants: L + wd*X2_i/2
    """

    i: int
    upd: ekf.Update
    observed: sp.Expr
    direction: sp.Expr
    L_tilde: sp.Expr
    checks: list


def derive_observation(m: SymbolicModel, prior: Prior, i: int) -> Observation:
    """Tensor i's observation, from the EKF's H = dh/dx at x^, h(x^) and target z (Table 1).

    Applies ``weight_decay`` and ``layerwise`` (h_i(x) = L + g_i·(x_i - x^_i) + ½·wd·‖x_i‖²)
    and ``fractional_target`` (z = (1 - lr)·h_i(x^), the paper's L_target = (1 - lr)·L), then
    runs :func:`oracle.ekf.update` from the prior. Certifies H = [g~_i^T, 0]: zero outside
    tensor i, with entries exactly g~ after g -> g~ - wd·x.
    """
    s, b = m.s, m.blocks[i]
    checks: list[Check] = []
    h_i = loss_observation(m.assumptions, m.sizes, i, s.L, m.g, m.xh, s.wd)
    observed = h_i(m.s_hat)[0, 0]
    z = sp.Matrix([[fractional_target(m.assumptions, s.lr, observed)]])
    upd = ekf.update(m.s_hat, prior.P_hat, h_i, sp.Matrix([[s.R]]), z)

    # H = [g~_i^T (block i of x), 0]: read the direction g~ = dh/dx off the Jacobian.
    direction = upd.H[0, b.start].subs({m.g[b.start]: s.g, m.xh[b.start]: s.x})
    zero_elsewhere = all(upd.H[0, j] == 0 for j in range(m.k * m.n) if not (b.start <= j < b.stop))
    checks.append(Check(
        f"{m.variant}.observation-{i}-sees-own-tensor",
        f"tensor {i}'s observation has H = [g~_{i}^T, 0]: zero outside its own weights",
        zero_elsewhere))

    # Change variables g_j -> tau_j - wd*xh_j so that H's entries are the symbols tau_j.
    H_tau = upd.H.subs(m.to_tau)
    checks.append(Check(
        f"{m.variant}.observation-{i}-direction",
        "after g -> g~ - wd*x the Jacobian's entries are exactly g~",
        all(is_zero(H_tau[0, j] - m.tau[j]) for j in range(b.start, b.stop))))
    return Observation(i=i, upd=upd, observed=observed, direction=direction,
                       L_tilde=sp.expand(m.invariants(observed)), checks=checks)


@dataclass
class GainAndStep:
    """Tensor i's gain and steps, in (prior block, G_i, X2_i, L, lr, wd, R).

    S      the innovation covariance H P^ H^T + R (a scalar)
    gains  {"x": K_x/g~, "u": K_u/g~}: one scalar per state block
    steps  {"x": c_x, "u": c_u} with Δx = -c_x·g~ and Δu = -c_u·g~
    """

    S: sp.Expr
    gains: dict
    steps: dict
    checks: list


def derive_gain_and_step(m: SymbolicModel, obs: Observation) -> GainAndStep:
    """Gain and step of tensor i, from the EKF's S = H P^ H^T + R, K = P^ H^T S^-1 and
    x = x^ + K (z - h(x^)) (Table 1).

    Because P^ = B^ ⊗ I and H = [g~_i^T, 0], K is g~_i times one scalar per state block, so
    each block moves along -g~_i by one coefficient. Certifies both: K_name/g~ and the step
    coefficient are the same for every coordinate of tensor i, and K is zero outside it.
    """
    upd, b = obs.upd, m.blocks[obs.i]
    checks: list[Check] = []
    gains, steps = {}, {}
    for bb, name in enumerate(m.names):
        coeff = [m.invariants(upd.K[bb * m.n + j, 0] / m.tau[j]) for j in range(b.start, b.stop)]
        same = all(is_zero(c - coeff[0]) for c in coeff)
        moved_elsewhere = [upd.K[bb * m.n + j, 0] for j in range(m.n)
                           if not (b.start <= j < b.stop)]
        checks.append(Check(
            f"{m.variant}.gain-{name}-{obs.i}-one-scalar",
            f"K_{name} / g~ is the same scalar for every coordinate of tensor {obs.i}, "
            f"and K_{name} is zero outside tensor {obs.i}",
            same and all(is_zero(e) for e in moved_elsewhere), f"K_{name}/g~ = {coeff[0]}"))
        gains[name] = coeff[0]
        step = [m.invariants(-(upd.x[bb * m.n + j, 0] - m.s_hat[bb * m.n + j, 0]) / m.tau[j])
                for j in range(b.start, b.stop)]
        steps[name] = step[0]
        checks.append(Check(
            f"{m.variant}.step-{name}-{obs.i}-one-scalar",
            f"Δ{name} = -c_{name}·g~ with the same c_{name} for every coordinate of tensor {obs.i}",
            all(is_zero(c - step[0]) for c in step), f"c_{name} = {step[0]}"))
    return GainAndStep(S=m.invariants(upd.S[0, 0]), gains=gains, steps=steps, checks=checks)


def derive_layerwise_batch(m: SymbolicModel, prior: Prior, observations: list) -> list:
    """Certify that the per-tensor steps are exact EKF steps of the layer-wise model.

    Starts from x = x^ + K (z - h(x^)) (Table 1) with all tensors observed at once: stacked
    h = [h_0; h_1; ...], noise R·I. Because P^ = B^ ⊗ I and H_i is zero outside tensor i, the
    stacked update moves each tensor exactly as its own single observation does.
    """
    s, k, n = m.s, m.k, m.n
    obs = [loss_observation(m.assumptions, m.sizes, i, s.L, m.g, m.xh, s.wd)
           for i in range(len(m.sizes))]

    def stacked(st):
        return sp.Matrix([o(st)[0, 0] for o in obs])

    z_all = sp.Matrix([fractional_target(m.assumptions, s.lr, o(m.s_hat)[0, 0]) for o in obs])
    batch = ekf.update(m.s_hat, prior.P_hat, stacked, s.R * sp.eye(len(m.sizes)), z_all)
    per_tensor_x = m.s_hat.copy()
    for t, b in zip(observations, m.blocks):
        for bb in range(k):
            for j in range(b.start, b.stop):
                per_tensor_x[bb * n + j] = t.upd.x[bb * n + j]
    return [Check(
        f"{m.variant}.layerwise-batch-decouples",
        "the EKF with all tensors observed at once (noise R·I) moves each tensor exactly as "
        "its own single-tensor observation does", is_zero(batch.x - per_tensor_x))]
