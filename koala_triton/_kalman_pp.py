"""The scalar part of KOALA++: one small filter per parameter tensor, in float64 on the device.

KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025) carries per tensor the directional surrogate
v = H·P (a row as long as the tensor) and the previous H; the scalars of each tensor's filter
live in one float64 matrix ``tensors`` [n, 4] (n = parameter tensors, flat order), columns
``TENSOR_KEYS``:

    S        S_{k-1}, the innovation variance of the tensor's last step
    hh       ‖H_{k-1}‖² (the last step's ‖H‖²)
    hv       H_{k-1}·v_{k-1} (the last step's v·H)
    updates  steps this tensor took (0: its next step is its first)

A step needs three new dot products per tensor, H·H, H·H_{k-1} and H·v_{k-1} (with ‖grad‖²
for the skip rule and ‖x‖² for weight decay); λ, α, r, the new v, S and the step follow from
them and the stored scalars (forms derived in ``oracle/kpp_derive.py``; in the authors' code
``koalap.py`` the dot products of the previous step are recomputed from the vectors, which is
the same in exact arithmetic, certified in the oracle). Nothing here synchronises with the host:
every choice is a ``torch.where``.

Per tensor, with h = H_{k-1}:

    λ = (Hv + Q·Hh)/S0,  α = Hh/hh,  r = Hv/hh − Hh·hv/(hh·hh) (symmetric) or 0 (plain)
    v ← (α − λ)·v + Q·H + (r − Q·λ)·h
    v·H = (α − λ)·Hv + Q·HH + (r − Q·λ)·Hh,   S = (v·H + Q·HH) + R
    x ← x − lr·L̃/S · (v + Q·H),   L̃ = L + ½·wd·‖x‖²

and a tensor's first step uses h = H, v = σ·H (so Hh = hh = HH, Hv = hv = σ·HH and
S0 = (σ·HH + Q·HH) + R): the authors' start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._kalman import FLOAT, Measurement, _active, _finite_and_noise, record

#: The columns of the per-tensor matrix (see the module docstring).
TENSOR_KEYS = ("S", "hh", "hv", "updates")
COL_S, COL_HH, COL_HV, COL_UPDATES = range(len(TENSOR_KEYS))


def new_tensor_filters(n: int, device: torch.device) -> Tensor:
    """[n, 4] float64 zeros: n tensors that have not stepped yet."""
    return torch.zeros(n, len(TENSOR_KEYS), dtype=FLOAT, device=device)


@dataclass
class PlusPlusMeasurement(Measurement):
    """A ``_kalman.Measurement`` (``reg_grad_sq`` is ‖H‖², H = grad + wd·x) plus the two dot
    products with the tensor's previous step, [k] float64 each (any value on a first step):

    Attributes:
        h_prev: H·H_{k-1}.
        v_prev: H·v_{k-1}.
    """

    h_prev: Tensor | None = None
    v_prev: Tensor | None = None


@dataclass
class PlusPlusGains:
    """What the elementwise pass needs, [k] float64 each, per tensor:

    v ← a·v + b·H + c·h,   x ← x − step·(v_new + q·H),   h ← H   (where ``updated`` is 1).

    A first step has a = c = 0 (its v and h are not read: the code's start v = σ·H, h = H is
    folded into b). Where ``updated`` is 0: a = 1, b = c = 0, step = 0 (applied to finite values
    these leave v and x as they are; the Triton kernels do not touch such tensors at all).
    """

    a: Tensor
    b: Tensor
    c: Tensor
    step: Tensor
    updated: Tensor


def measure_pp(filt: dict[str, Tensor], rows: Tensor, m: PlusPlusMeasurement, *, sigma: float, q: float,
               symmetric: bool, r: float | None, alpha_r: float) -> tuple[PlusPlusGains, Tensor]:
    """KOALA++'s measurement update of the global R and the counters, and of each tensor's filter.

    Args:
        rows: [k, 4] the stored scalars of the step's tensors (``tensors[index]``).

    Returns:
        The step coefficients and the new rows [k, 4] (the old ones where a tensor did not step).
    """
    finite, noise = _finite_and_noise(filt, m, r, alpha_r)
    ok = _active(m, finite)
    zero = torch.zeros((), dtype=FLOAT, device=noise.device)
    one = torch.ones((), dtype=FLOAT, device=noise.device)
    # Where a tensor does not step, harmless finite values go in before any division, so that
    # NaN/inf inputs never reach a coefficient.
    HH = torch.where(ok, m.reg_grad_sq, one)
    first = rows[:, COL_UPDATES] == 0
    sHH = sigma * HH
    hh = torch.where(first, HH, rows[:, COL_HH])
    Hh = torch.where(first, HH, m.h_prev)
    Hv = torch.where(first, sHH, m.v_prev)
    hv = torch.where(first, sHH, rows[:, COL_HV])
    S0 = torch.where(first, (sHH + q * HH) + noise, rows[:, COL_S])
    hh = torch.where(ok, hh, one)
    S0 = torch.where(ok, S0, one)
    Hh, Hv, hv = (torch.where(ok, t, zero) for t in (Hh, Hv, hv))

    lam = (Hv + q * Hh) / S0
    alpha = Hh / hh
    a = alpha - lam
    c = -q * lam
    if symmetric:
        c = (Hv / hh - (Hh * hv) / (hh * hh)) + c
    vH = (a * Hv + q * HH) + c * Hh
    S = (vH + q * HH) + noise
    reg_loss = m.loss + 0.5 * m.weight_decay * torch.where(m.weight_decay != 0, m.param_sq, zero)
    step = m.lr * reg_loss / S
    # a first step: v = a·(σ·H) + q·H + c·H
    b = torch.where(first, (a * sigma + q) + c, torch.full_like(a, q))
    a = torch.where(first, zero, a)
    c = torch.where(first, zero, c)

    new_rows = torch.stack([S, HH, vH, rows[:, COL_UPDATES] + 1], dim=1)
    new_rows = torch.where(ok[:, None], new_rows, rows)
    gains = PlusPlusGains(a=torch.where(ok, a, one), b=torch.where(ok, b, zero), c=torch.where(ok, c, zero),
                          step=torch.where(ok, step, zero), updated=ok.to(FLOAT))
    record(filt, finite=finite, noise=noise, loss=m.loss)
    return gains, new_rows
