"""The PyTorch path: KOALA's elementwise passes with ``torch._foreach_*`` ops.

Sync-free (no ``.item()``, every data-dependent choice is a mask on the device) and valid on
any device torch supports. It is the reference the Triton kernels are tested against.

``cache`` (a dict owned by the optimizer, for the Triton path's pointer tables) is unused here.

Precision: squared norms accumulate in float32 (float64 for float64 params); the scalar filter
runs in float64 (``_filter``); each elementwise update is computed in float32 (float64 for
float64 params) and rounded once into the parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _filter
from ._plan import StepPlan

FLOAT = _filter.FLOAT


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for a parameter dtype: float64 stays, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_compute(tensors: list[Tensor]) -> list[Tensor]:
    return [t if t.dtype == compute_dtype(t.dtype) else t.to(compute_dtype(t.dtype)) for t in tensors]


def squared_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """[k] float64 vector of ‖t‖² for each tensor, accumulated in its compute dtype."""
    if not tensors:
        return torch.zeros(0, dtype=FLOAT, device=device)
    acc = [compute_dtype(t.dtype) for t in tensors]
    if all(a == acc[0] for a in acc):
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=acc[0])).to(FLOAT)
    else:  # mixed float64 / lower precision: rare, take the per-tensor route
        norms = torch.stack([torch.linalg.vector_norm(t, dtype=a).to(FLOAT) for t, a in zip(tensors, acc)])
    return norms * norms


def _directions(plan: StepPlan) -> tuple[list[Tensor], list[Tensor]]:
    """Raw gradients and regularised gradients g̃ = grad + wd·x, both in compute dtype."""
    raw = _to_compute(plan.grads)
    plain = plan.num_plain
    if plain == len(raw):
        return raw, raw
    decayed = torch._foreach_mul(_to_compute(plan.params[plain:]), plan.decay)
    torch._foreach_add_(decayed, raw[plain:])
    return raw, list(raw[:plain]) + list(decayed)


def _measurement(plan: StepPlan, raw, regularised, loss, loss_sq_mean, device) -> _filter.Measurement:
    plain = plan.num_plain
    grad_sq = squared_norms(raw, device)
    decayed_sq = squared_norms(regularised[plain:], device)
    reg_grad_sq = torch.cat([grad_sq[:plain], decayed_sq])
    param_sq = torch.cat(
        [torch.zeros(plain, dtype=FLOAT, device=device), squared_norms(plan.params[plain:], device)]
    )
    return _filter.Measurement(
        loss=loss,
        loss_sq_mean=loss_sq_mean,
        grad_sq=grad_sq,
        reg_grad_sq=reg_grad_sq,
        param_sq=param_sq,
        lr=plan.lr,
        weight_decay=plan.weight_decay,
        eps=plan.eps,
    )


def _subtract_scaled(targets: list[Tensor], directions: list[Tensor], coef: Tensor) -> None:
    """targets[i] -= coef[i] · directions[i], with a non-finite product forced to 0.

    A coefficient is exactly 0 wherever the step is skipped, but 0·NaN is NaN: the
    ``nan_to_num_`` keeps a poisoned gradient from reaching the weights on a skipped step.
    """
    if not targets:
        return
    deltas = torch._foreach_mul(directions, list(coef.unbind()))
    for d in deltas:
        torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
    torch._foreach_sub_(targets, deltas)


def koala_v_update(plan: StepPlan, filt, loss, loss_sq_mean, *, r, alpha_r, raw_grad_step, cache=None) -> None:
    """KOALA-V measurement update of every tensor in ``plan`` and of the filter ``filt``."""
    raw, regularised = _directions(plan)
    m = _measurement(plan, raw, regularised, loss, loss_sq_mean, filt["p"].device)
    gains = _filter.measure(filt, m, r=r, alpha_r=alpha_r, momentum=False)
    _subtract_scaled(plan.params, raw if raw_grad_step else regularised, gains.coef_x)


def koala_m_predict(params, velocities, averages, filt, *, a: float, qv: float, cache=None) -> None:
    """KOALA-M time update of every parameter: x += u, u *= a, and P̂ = F P Fᵀ + Q."""
    device = filt["Pxx"].device
    numel = sum(p.numel() for p in params)
    if params:
        gaps = torch._foreach_sub(_to_compute(averages), _to_compute(params))
        distance = squared_norms(gaps, device).sum().sqrt() / max(numel, 1)
        del gaps
        torch._foreach_add_(params, velocities)
        torch._foreach_mul_(velocities, a)
    else:
        distance = torch.zeros((), dtype=FLOAT, device=device)
    _filter.predict_m(filt, distance, a=a, qv=qv)


def koala_m_update(plan: StepPlan, velocities, averages, filt, loss, loss_sq_mean, *, r, alpha_r, cache=None) -> None:
    """KOALA-M measurement update; ``velocities``/``averages`` align with ``plan.params``."""
    raw, regularised = _directions(plan)
    m = _measurement(plan, raw, regularised, loss, loss_sq_mean, filt["Pxx"].device)
    gains = _filter.measure(filt, m, r=r, alpha_r=alpha_r, momentum=True)
    _subtract_scaled(plan.params, regularised, gains.coef_x)
    _subtract_scaled(velocities, regularised, gains.coef_u)
    if plan.params:
        weights = list((gains.updated * (1.0 - _filter.QX_BETA)).unbind())
        torch._foreach_lerp_(averages, plan.params, weights)
