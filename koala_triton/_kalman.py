"""The scalar part of KOALA: one global Kalman filter shared by every parameter tensor.

All quantities are 0-dim or 1-D float64 tensors on the parameters' device, so nothing here
synchronises with the host; "branches" on device values are ``torch.where`` masks.
The closed forms are derived in ``oracle/`` (see oracle/README.md); this module only evaluates
them. Per-tensor vectors have one entry per parameter tensor that has a gradient
this step, in the order the caller chose.

Filter state keys (``filter_state`` of the optimizers):
    KOALA-V: ``p`` (isotropic covariance), ``R``, and the counters
    KOALA-M: ``Pxx``, ``Pxu``, ``Puu`` (the 2x2 covariance), ``qx``, ``R``, and the counters
Counters (int64): ``step`` counts measurement updates attempted; ``skipped_steps`` those
skipped because the loss, its second moment or a gradient was not finite (or a GradScaler
found an inf); ``below_floor_steps`` the others whose mean loss was below the loss floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT = torch.float64
COUNT = torch.int64

#: The EMA factor of the official code for qx and for the weight average xavg.
QX_BETA = 0.9


#: The counters every filter has, after its float64 values: measurement updates attempted, those
#: skipped (a non-finite loss or gradient, or a GradScaler's inf), and those whose loss was below
#: the loss floor (KOALA aims the loss at the floor: an update from below it ascends).
COUNTERS = ("step", "skipped_steps", "below_floor_steps")


class Filter(dict):
    """The global filter: name -> a live 0-dim view into one of two vectors.

    ``value_vector`` [m] float64 holds the filter's scalars in the order they were given,
    ``counter_vector`` [2] int64 the step counters (``COUNTERS``). Reading works as with any dict of tensors;
    writing goes through ``store``, which replaces a whole vector with one ``copy_``. (That is
    what ``torch.compile`` keeps: it drops in-place writes into 0-dim inputs and into views of
    them, but not a ``copy_`` into a 1-D input.) Kernels write through the views' addresses.
    """

    def __init__(self, device: torch.device, **values: float):
        self.value_vector = torch.tensor([float(v) for v in values.values()], dtype=FLOAT, device=device)
        self.counter_vector = torch.zeros(len(COUNTERS), dtype=COUNT, device=device)
        self.value_names = tuple(values)
        super().__init__({name: self.value_vector[i] for i, name in enumerate(self.value_names)})
        self.update({name: self.counter_vector[i] for i, name in enumerate(COUNTERS)})

    def store(self, **new: Tensor) -> None:
        """Write the named entries (0-dim tensors or numbers); the others keep their values."""
        values = [new[n] if n in new else self[n] for n in self.value_names]
        self.value_vector.copy_(torch.stack([torch.as_tensor(v, dtype=FLOAT, device=self.value_vector.device) for v in values]))
        if any(n in new for n in COUNTERS):
            counts = [new[n] if n in new else self[n] for n in COUNTERS]
            self.counter_vector.copy_(torch.stack([torch.as_tensor(c, dtype=COUNT, device=self.counter_vector.device)
                                             for c in counts]))


def new_filter(device: torch.device, **values: float) -> Filter:
    """Create the filter state eagerly: float64 scalars plus int64 step counters."""
    return Filter(device, **values)


def predict_v(filt: Filter, q: float) -> None:
    """KOALA-V time update: p̂ = p + q."""
    filt.store(p=filt["p"] + q)


def predict_m(filt: dict[str, Tensor], distance: Tensor, *, a: float, qv: float) -> None:
    """KOALA-M time update of the covariance, P̂ = F P Fᵀ + diag(qx, qv), F = [[1, 1], [0, a]].

    Args:
        distance: 0-dim float64, D = ‖xavg − x‖₂ / n over all parameters (the official code's
            Euclidean norm, not squared).
    """
    qx = filt["qx"] * QX_BETA + (1.0 - QX_BETA) * distance
    pxx, pxu, puu = filt["Pxx"], filt["Pxu"], filt["Puu"]
    filt.store(qx=qx, Pxx=pxx + 2.0 * pxu + puu + qx, Pxu=a * (pxu + puu), Puu=(a * a) * puu + qv)


@dataclass
class Measurement:
    """Per-step inputs of the measurement update, all float64 on the filter's device.

    Attributes:
        loss: 0-dim, the minibatch mean loss L above its floor (L − f; f = 0 by default).
        loss_sq_mean: 0-dim, mean of squared per-sample losses above the floor (ignored when R
            is fixed).
        grad_sq: [k], ‖grad_i‖² of the raw gradient (skip rule and finiteness).
        reg_grad_sq: [k], ‖g̃_i‖² with g̃_i = grad_i + wd_i·x_i.
        param_sq: [k], ‖x_i‖² (only used where wd_i ≠ 0; any finite value elsewhere).
        lr, weight_decay, eps: [k], the group values of each tensor.
        found_inf: a ``GradScaler``'s inf flag (any float dtype, non-zero: skip the whole
            update, as for a non-finite input), or None.
    """

    loss: Tensor
    loss_sq_mean: Tensor | None
    grad_sq: Tensor
    reg_grad_sq: Tensor
    param_sq: Tensor
    lr: Tensor
    weight_decay: Tensor
    eps: Tensor
    found_inf: Tensor | None = None


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
                 informative: Tensor) -> dict[str, Tensor]:
        """The posterior entries: p⁺ = ρ·p̂ (stable form of p̂ − p̂²·G/S)."""
        return {"p": filt["p"] * rho}


class MomentumCovariance:
    """KOALA-M's covariance [[Pxx, Pxu], [Pxu, Puu]] ⊗ I over the state [weights; velocities]."""

    keys = ("Pxx", "Pxu", "Puu")
    velocity = True

    @staticmethod
    def gain_terms(filt: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return filt["Pxx"], filt["Pxu"]

    @staticmethod
    def contract(filt: dict[str, Tensor], *, largest: Tensor, noise: Tensor, s_max: Tensor, rho: Tensor,
                 informative: Tensor) -> dict[str, Tensor]:
        """The posterior entries: Pxx⁺ = ρ·P̂xx, Pxu⁺ = ρ·P̂xu, Puu⁺ = (G·det P̂ + R·P̂uu)/S
        (stable forms of P̂ − P̂·diag(h, 0)·P̂)."""
        pxx, pxu, puu = filt["Pxx"], filt["Pxu"], filt["Puu"]
        det = pxx * puu - pxu * pxu
        # Nothing measured (G = 0) must leave P̂uu bit for bit: R·P̂uu/R can round.
        measured = informative & (largest > 0)
        new_puu = torch.where(measured, (largest * det + noise * puu) / s_max, puu)
        return {"Pxx": pxx * rho, "Pxu": pxu * rho, "Puu": new_puu}


#: The covariance models, one per KOALA variant.
ISOTROPIC = IsotropicCovariance()
MOMENTUM = MomentumCovariance()
Covariance = IsotropicCovariance | MomentumCovariance


def _finite_and_noise(filt, m: Measurement, r: float | None, alpha_r: float):
    finite = torch.isfinite(m.loss) & torch.isfinite(m.reg_grad_sq.sum() + m.grad_sq.sum())
    if m.found_inf is not None:
        finite = finite & (m.found_inf.reshape(()) == 0)
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

    Updates ``filt`` (R, the covariance, the counters) with one write per vector. With G the largest ‖g̃_i‖²
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
    posterior = covariance.contract(filt, largest=largest, noise=noise, s_max=s_max, rho=rho,
                                    informative=informative)
    record(filt, finite=finite, noise=noise, loss=m.loss, **posterior)
    return Gains(coef_x=coef_x, coef_u=coef_u, updated=ok.to(FLOAT))


def record(filt: dict[str, Tensor], *, finite: Tensor, noise: Tensor, loss: Tensor, **entries: Tensor) -> None:
    """Write a measurement's outcome into the filter with one write per vector: ``entries``
    (the posterior), R, and the counters (``step``; ``skipped_steps`` unless ``finite``;
    ``below_floor_steps`` if finite and the loss above its floor is negative)."""
    filt.store(**entries, R=noise, step=filt["step"] + 1,
               skipped_steps=filt["skipped_steps"] + (~finite).to(COUNT),
               below_floor_steps=filt["below_floor_steps"] + (finite & (loss < 0)).to(COUNT))
