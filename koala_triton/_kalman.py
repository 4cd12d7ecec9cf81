"""The scalar part of KOALA: one global Kalman filter shared by every parameter tensor.

All quantities are 0-dim or 1-D float64 tensors on the parameters' device, so nothing here
synchronises with the host; "branches" on device values are ``torch.where`` masks.
The closed forms are derived in ``oracle/`` (see oracle/README.md); this module only evaluates
them. Per-tensor vectors have one entry per parameter tensor that has a gradient
this step, in the order the caller chose.

Filter state keys (``filter_state`` of the optimizers):
    KOALA-V: ``p`` (isotropic covariance), ``R``, ``step``, ``skipped_steps``
    KOALA-M: ``Pxx``, ``Pxu``, ``Puu`` (the 2x2 covariance), ``qx``, ``R``, ``step``,
             ``skipped_steps``
``step`` counts measurement updates attempted; ``skipped_steps`` those skipped because the
loss, its second moment or a gradient was not finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT = torch.float64
COUNT = torch.int64

#: The EMA factor of the official code for qx and for the weight average xavg.
QX_BETA = 0.9


def new_filter(device: torch.device, **values: float) -> dict[str, Tensor]:
    """Create the filter state eagerly: float64 scalars plus int64 step counters."""
    filt = {k: torch.tensor(float(v), dtype=FLOAT, device=device) for k, v in values.items()}
    filt["step"] = torch.zeros((), dtype=COUNT, device=device)
    filt["skipped_steps"] = torch.zeros((), dtype=COUNT, device=device)
    return filt


def predict_v(filt: dict[str, Tensor], q: float) -> None:
    """KOALA-V time update: p̂ = p + q."""
    filt["p"].add_(q)


def predict_m(filt: dict[str, Tensor], distance: Tensor, *, a: float, qv: float) -> None:
    """KOALA-M time update of the covariance, P̂ = F P Fᵀ + diag(qx, qv), F = [[1, 1], [0, a]].

    Args:
        distance: 0-dim float64, D = ‖xavg − x‖₂ / n over all parameters (the official code's
            Euclidean norm, not squared).
    """
    qx = filt["qx"]
    qx.mul_(QX_BETA).add_((1.0 - QX_BETA) * distance)
    pxx, pxu, puu = filt["Pxx"], filt["Pxu"], filt["Puu"]
    new_pxx = pxx + 2.0 * pxu + puu + qx
    new_pxu = a * (pxu + puu)
    new_puu = (a * a) * puu + qv
    pxx.copy_(new_pxx)
    pxu.copy_(new_pxu)
    puu.copy_(new_puu)


@dataclass
class Measurement:
    """Per-step inputs of the measurement update, all float64 on the filter's device.

    Attributes:
        loss: 0-dim, the minibatch mean loss L.
        loss_sq_mean: 0-dim, mean of squared per-sample losses (ignored when R is fixed).
        grad_sq: [k], ‖grad_i‖² of the raw gradient (skip rule and finiteness).
        reg_grad_sq: [k], ‖g̃_i‖² with g̃_i = grad_i + wd_i·x_i.
        param_sq: [k], ‖x_i‖² (only used where wd_i ≠ 0; any finite value elsewhere).
        lr, weight_decay, eps: [k], the group values of each tensor.
    """

    loss: Tensor
    loss_sq_mean: Tensor | None
    grad_sq: Tensor
    reg_grad_sq: Tensor
    param_sq: Tensor
    lr: Tensor
    weight_decay: Tensor
    eps: Tensor


@dataclass
class Gains:
    """What the elementwise pass needs: x_i -= coef_x[i]·d_i (and u_i -= coef_u[i]·d_i).

    ``updated[i]`` is 1.0 where tensor i took a step (skip rule passed and the whole step was
    finite), else 0.0. Coefficients are exactly 0 where ``updated`` is 0.
    """

    coef_x: Tensor
    coef_u: Tensor | None
    updated: Tensor


class IsotropicCovariance:
    """KOALA-V's covariance P = p·I (filter entry ``p``): the weights alone are the state."""

    keys = ("p",)
    velocity = False

    @staticmethod
    def gain_terms(filt: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(P̂xx, P̂ux or None): the prior terms of the weight and velocity gains."""
        return filt["p"], None

    @staticmethod
    def contract(filt: dict[str, Tensor], *, largest: Tensor, noise: Tensor, s_max: Tensor, rho: Tensor,
                 informative: Tensor) -> None:
        """p⁺ = ρ·p̂ (stable form of p̂ − p̂²·G/S)."""
        filt["p"].mul_(rho)


class MomentumCovariance:
    """KOALA-M's covariance [[Pxx, Pxu], [Pxu, Puu]] ⊗ I over the state [weights; velocities]."""

    keys = ("Pxx", "Pxu", "Puu")
    velocity = True

    @staticmethod
    def gain_terms(filt: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return filt["Pxx"], filt["Pxu"]

    @staticmethod
    def contract(filt: dict[str, Tensor], *, largest: Tensor, noise: Tensor, s_max: Tensor, rho: Tensor,
                 informative: Tensor) -> None:
        """Pxx⁺ = ρ·P̂xx, Pxu⁺ = ρ·P̂xu, Puu⁺ = (G·det P̂ + R·P̂uu)/S (stable forms of
        P̂ − P̂·diag(h, 0)·P̂)."""
        pxx, pxu, puu = filt["Pxx"], filt["Pxu"], filt["Puu"]
        det = pxx * puu - pxu * pxu
        # Nothing measured (G = 0) must leave P̂uu bit for bit: R·P̂uu/R can round.
        measured = informative & (largest > 0)
        new_puu = torch.where(measured, (largest * det + noise * puu) / s_max, puu)
        pxx.mul_(rho)
        pxu.mul_(rho)
        puu.copy_(new_puu)


#: The covariance models, one per KOALA variant.
ISOTROPIC = IsotropicCovariance()
MOMENTUM = MomentumCovariance()
Covariance = IsotropicCovariance | MomentumCovariance


def _finite_and_noise(filt, m: Measurement, r: float | None, alpha_r: float):
    finite = torch.isfinite(m.loss) & torch.isfinite(m.reg_grad_sq.sum() + m.grad_sq.sum())
    if r is None:
        finite = finite & torch.isfinite(m.loss_sq_mean)
        ema = alpha_r * filt["R"] + (1.0 - alpha_r) * m.loss_sq_mean
        noise = torch.where(finite, ema, filt["R"])
    else:
        noise = filt["R"]
    return finite, noise


def _active(m: Measurement, finite: Tensor) -> Tensor:
    # Skip rule of the official code: ‖grad_i‖ < eps means "no information in this tensor".
    return (m.grad_sq.sqrt() >= m.eps) & finite


def measure(
    filt: dict[str, Tensor],
    m: Measurement,
    covariance: Covariance,
    *,
    r: float | None,
    alpha_r: float,
) -> Gains:
    """Measurement update of the global filter; returns the per-tensor step coefficients.

    Updates ``filt`` in place (R, the covariance, the counters). With G the largest ‖g̃_i‖²
    among updated tensors, S = P̂xx·G + R and ρ = R/S, the covariance contracts by
    ``covariance.contract`` (the stable forms derived in ``oracle/``).
    """
    finite, noise = _finite_and_noise(filt, m, r, alpha_r)
    ok = _active(m, finite)
    pxx, pux = covariance.gain_terms(filt)
    zero = torch.zeros((), dtype=FLOAT, device=pxx.device)
    one = torch.ones((), dtype=FLOAT, device=pxx.device)

    # Where a tensor is not updated, substitute harmless finite values before dividing so
    # that NaN/inf inputs never leak into coefficients through 0·NaN.
    g_sq = torch.where(ok, m.reg_grad_sq, zero)
    reg_loss = m.loss + 0.5 * m.weight_decay * torch.where(m.weight_decay != 0, m.param_sq, zero)
    reg_loss = torch.where(ok, reg_loss, zero)
    innovation_scale = m.lr * reg_loss / torch.where(ok, pxx * g_sq + noise, one)
    coef_x = innovation_scale * pxx
    coef_u = innovation_scale * pux if pux is not None else None

    largest = g_sq.max() if g_sq.numel() else zero
    s_max = pxx * largest + noise
    # S = 0 only when R = 0 and nothing was measured: no information, P̂ passes through.
    informative = s_max > 0
    s_max = torch.where(informative, s_max, one)
    rho = torch.where(informative, noise / s_max, one)
    covariance.contract(filt, largest=largest, noise=noise, s_max=s_max, rho=rho, informative=informative)
    filt["R"].copy_(noise)
    filt["step"].add_(1)
    filt["skipped_steps"].add_((~finite).to(COUNT))
    return Gains(coef_x=coef_x, coef_u=coef_u, updated=ok.to(FLOAT))
