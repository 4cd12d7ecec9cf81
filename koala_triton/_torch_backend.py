"""The PyTorch backend: KOALA's elementwise passes with ``torch._foreach_*`` ops.

Implements the ``_backend.Backend`` interface (fold mode excepted). Sync-free (no ``.item()``, every data-dependent choice is a mask on the device) and valid on
any device torch supports. It is the reference the Triton kernels are tested against.

Precision: squared norms accumulate in float32 (float64 for float64 params); the scalar filter
runs in float64 (``_filter``); each elementwise update is computed in float32 (float64 for
float64 params) and rounded once into the parameter's dtype.

Memory: every pass is in place except one scaled copy of the step direction per tensor, which
is written into a scratch buffer (compute dtype, the parameter's shape). On CPU the buffers are
kept in the backend state and reused, because a fresh allocation of that size costs more than the
arithmetic (page faults); on CUDA the caching allocator already makes them cheap, so they are
allocated per step and the optimizer holds no extra memory between steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _kalman, _kalman_pp
from ._kalman import ISOTROPIC, MOMENTUM
from ._loss import LossInput
from ._plan import StepPlan
from ._predict_state import PredictState

FLOAT = _kalman.FLOAT


@dataclass
class TorchState:
    """The PyTorch backend's state: the shared predict state and, on CPU, one scratch buffer
    per parameter tensor (keyed by its flat index; ``unscaled`` holds a second one per tensor
    for gradients unscaled from a ``GradScaler``'s scale)."""

    predict: PredictState
    scratch: dict[int, Tensor] = field(default_factory=dict)
    unscaled: dict[int, Tensor] = field(default_factory=dict)
    #: KOALA++: the new surrogate v of each tensor, formed in the compute dtype.
    surrogate: dict[int, Tensor] = field(default_factory=dict)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for a parameter dtype: float64 stays, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def scratch(state: TorchState, keys: list[int], like: list[Tensor], *, store: dict | None = None,
            same_dtype: bool = False) -> list[Tensor]:
    """One buffer per tensor of ``like`` (same shape; compute dtype, or ``like``'s own with
    ``same_dtype``), reused on CPU (kept in ``store``, by default ``state.scratch``)."""
    store = state.scratch if store is None else store
    keep = like[0].device.type == "cpu" if like else False
    out = []
    for key, t in zip(keys, like):
        dtype = t.dtype if same_dtype else compute_dtype(t.dtype)
        buf = store.get(key) if keep else None
        if buf is None or buf.shape != t.shape or buf.dtype != dtype or buf.device != t.device:
            buf = torch.empty(t.shape, dtype=dtype, device=t.device)
            if keep:
                store[key] = buf
        out.append(buf)
    return out


def _regularised_directions(plan: StepPlan, buffers: list[Tensor]) -> list[Tensor]:
    """g̃_i = grad_i + wd_i·x_i in compute dtype: the grad itself where no copy is needed,
    else written into ``buffers[i]`` with its non-finite elements zeroed (see ``_sanitised``:
    a buffer written here is ready to step with; the raw gradient's norm still detects them).

    The sanitising copy is the copy itself (one pass: read g, write the buffer), and weight
    decay adds one more (read the buffer and x, write the buffer).
    """
    directions = []
    for i, (p, g, buf) in enumerate(zip(plan.params, plan.grads, buffers)):
        decayed = i >= plan.num_plain
        if not decayed and g.dtype == buf.dtype:
            directions.append(g)
            continue
        _sanitise_into(g, buf)
        if decayed:
            buf.add_(p, alpha=plan.decay[i - plan.num_plain])
        directions.append(buf)
    return directions


def _sanitise_into(d: Tensor, buf: Tensor) -> None:
    """buf = d with every non-finite element replaced by 0 (widening a 16-bit d)."""
    if d.dtype == buf.dtype:
        torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0, out=buf)
    else:
        torch.nan_to_num_(buf.copy_(d), nan=0.0, posinf=0.0, neginf=0.0)


def _unscaled(plan: StepPlan, state: TorchState) -> StepPlan:
    """``plan`` with its gradients divided by a ``GradScaler``'s scale S (into buffers of the
    gradients' dtype; exact when S is a power of two, as the scaler's always is)."""
    if plan.grad_scale is None:
        return plan
    inv = 1.0 / plan.grad_scale.to(FLOAT).reshape(())
    bufs = scratch(state, plan.indices, plan.grads, store=state.unscaled, same_dtype=True)
    for g, buf in zip(plan.grads, bufs):
        torch.mul(g, inv.to(g.dtype), out=buf)
    return dataclasses.replace(plan, grads=bufs, grad_scale=None)


def _measurement(plan: StepPlan, directions, loss: LossInput, device,
                 extra: tuple[Tensor, ...] = ()) -> tuple[_kalman.Measurement, tuple[Tensor, ...]]:
    """The ``_kalman.Measurement`` of a step, and the [k] per-tensor sums of ``extra`` (KOALA++'s
    dot products): with DTensor shards on several ranks (``plan.collective``) all of them are
    reduced over the ranks together with the loss, in one all-reduce."""
    plain = plan.num_plain
    grad_sq = squared_norms(plan.grads, device)
    reg_grad_sq = torch.cat([grad_sq[:plain], squared_norms(directions[plain:], device)])
    param_sq = torch.cat(
        [torch.zeros(plain, dtype=FLOAT, device=device), squared_norms(plan.params[plain:], device)]
    )
    columns = (grad_sq, reg_grad_sq, param_sq, *extra)
    if plan.collective is not None:  # DTensor shards on several ranks: the tensors' sums, and the loss
        loss, sums = plan.collective.reduce(loss, torch.stack(columns, 1))
        columns = sums.unbind(1)
    grad_sq, reg_grad_sq, param_sq, *extra = columns
    loss_mean, loss_sq_mean = loss.moments()
    m = _kalman.Measurement(
        loss=loss_mean,
        loss_sq_mean=loss_sq_mean,
        grad_sq=grad_sq,
        reg_grad_sq=reg_grad_sq,
        param_sq=param_sq,
        lr=plan.lr,
        weight_decay=plan.weight_decay,
        eps=plan.eps,
        found_inf=plan.found_inf,
    )
    return m, tuple(extra)


def _sanitised(step_directions, buffers) -> list[Tensor]:
    """buffers[i] = step_directions[i] with every non-finite element replaced by 0.

    On a finite step this is an exact copy. On a skipped step every coefficient is exactly 0,
    but 0·NaN is NaN: zeroing non-finite elements is what keeps a poisoned gradient from
    reaching the weights. Folding the coefficient into the following ``addcmul_`` keeps the
    whole step at two passes over the gradient.
    """
    for d, buf in zip(step_directions, buffers):
        if d is not buf:  # a buffer is sanitised when written (_regularised_directions)
            _sanitise_into(d, buf)
    return buffers


def _directions(plan: StepPlan, state: TorchState):
    """What every variant's update starts from: the plan with unscaled gradients, one scratch
    buffer per tensor, and the directions g̃_i (in those buffers where a copy is needed)."""
    plan = _unscaled(plan, state)
    buffers = scratch(state, plan.indices, plan.params)
    return plan, buffers, _regularised_directions(plan, buffers)


def _measure_and_step_weights(plan, filt, loss: LossInput, covariance, state: TorchState, *, r, alpha_r,
                              raw_grad_step):
    """Shared by KOALA-V and KOALA-M: norms, the filter's measurement update, and x -= coef_x·d.

    Returns the gains and the sanitised step directions d_i (so KOALA-M can reuse them)."""
    plan, buffers, directions = _directions(plan, state)
    m, _ = _measurement(plan, directions, loss, filt["R"].device)
    gains = _kalman.measure(filt, m, covariance, r=r, alpha_r=alpha_r)
    steps = _sanitised(plan.grads if raw_grad_step else directions, buffers)
    if steps:
        torch._foreach_addcmul_(plan.params, steps, list((-gains.coef_x).unbind()))
    return gains, steps


def dot_products(a: list[Tensor], b: list[Tensor], device: torch.device,
                 widened: list[Tensor] | None = None) -> Tensor:
    """[k] float64 vector of a_i·b_i, each accumulated in a_i's dtype (the compute dtype; b_i is
    converted to it, into ``widened[i]`` where given: a kept buffer of a_i's dtype and shape,
    so that no parameter-sized tensor is allocated)."""
    if not a:
        return torch.zeros(0, dtype=FLOAT, device=device)
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if y.dtype != x.dtype:
            y = widened[i].copy_(y) if widened is not None else y.to(x.dtype)
        out.append(torch.dot(x.reshape(-1), y.reshape(-1)))
    return torch.stack(out).to(FLOAT)


def _fold_unsupported():
    return NotImplementedError(
        "fold_predict=True folds predict into the Triton update pass: the PyTorch backend has no "
        "fold mode (use the Triton path: fused=True, or CUDA parameters with fused=None)"
    )


class TorchBackend:
    """The PyTorch path (any device torch supports); see the module docstring."""

    name = "torch"
    supports_fold = False

    def new_state(self, predict: PredictState, device: torch.device) -> TorchState:
        return TorchState(predict)

    def settle(self, filt, state: TorchState) -> None:
        """Nothing is ever deferred here."""

    def cache_info(self, state: TorchState) -> dict[str, int]:
        """No host-side caches of its own (scratch buffers are kept, not looked up)."""
        return {}

    # ------------------------------------------------------------------ KOALA-V
    def koala_v_predict(self, filt, state: TorchState, *, q: float) -> None:
        """KOALA-V time update: p̂ = p + q."""
        _kalman.predict_v(filt, q)

    def koala_v_update(self, plan: StepPlan, filt, loss: LossInput, state: TorchState, *, r, alpha_r,
                       raw_grad_step) -> None:
        """KOALA-V measurement update of every tensor in ``plan`` and of the filter ``filt``."""
        _measure_and_step_weights(plan, filt, loss, ISOTROPIC, state, r=r, alpha_r=alpha_r,
                                  raw_grad_step=raw_grad_step)

    # ------------------------------------------------------------------ KOALA-M
    def koala_m_predict(self, params, velocities, averages, filt, state: TorchState, *, a: float,
                        qv: float, collective=None) -> None:
        """KOALA-M time update of every parameter: x += u, u *= a, and P̂ = F P Fᵀ + Q."""
        device = filt["Pxx"].device
        numel = sum(p.numel() for p in params)
        if params:
            gaps = scratch(state, list(range(len(params))), params)
            for gap, avg, p in zip(gaps, averages, params):
                if p.dtype == gap.dtype:
                    torch.sub(avg, p, out=gap)
                else:  # low precision: form the difference in float32
                    gap.copy_(avg).sub_(p)
            gap_sq = squared_norms(gaps, device)
            if collective is None:
                total = gap_sq.sum()
            else:  # DTensor shards: the sum and the element count over all ranks
                total, numel = collective.total(gap_sq, collective.mask(device)).reshape(()), collective.numel
            distance = total.sqrt() / max(numel, 1)
            torch._foreach_add_(params, velocities)
            # A Python float would be rounded to a 16-bit velocity's dtype first (0.9 ->
            # 0.8984375 in bfloat16); a float64 device scalar keeps the product correctly
            # rounded, once.
            torch._foreach_mul_(velocities, torch.full((), a, dtype=FLOAT, device=device))
        else:
            distance = torch.zeros((), dtype=FLOAT, device=device)
        _kalman.predict_m(filt, distance, a=a, qv=qv)

    def koala_m_update(self, plan: StepPlan, velocities, averages, filt, loss: LossInput, state: TorchState, *,
                       r, alpha_r) -> None:
        """KOALA-M measurement update; ``velocities``/``averages`` align with ``plan.params``."""
        gains, steps = _measure_and_step_weights(plan, filt, loss, MOMENTUM, state, r=r, alpha_r=alpha_r,
                                                 raw_grad_step=False)
        if not steps:
            return
        torch._foreach_addcmul_(velocities, steps, list((-gains.coef_u).unbind()))
        # xavg_i += w_i·(x_i − xavg_i), w_i = 0.1 where tensor i was updated, else 0. A tensor
        # weight is rounded to the tensor's dtype by lerp (0.1 -> 0.10009765625 in bfloat16),
        # so 16-bit averages take the difference in float32 through the scratch buffer instead.
        weights = (gains.updated * (1.0 - _kalman.QX_BETA)).unbind()
        wide = [i for i, p in enumerate(plan.params) if p.dtype == compute_dtype(p.dtype)]
        if wide:
            torch._foreach_lerp_([averages[i] for i in wide], [plan.params[i] for i in wide],
                                 [weights[i] for i in wide])
        for i, p in enumerate(plan.params):
            if p.dtype != compute_dtype(p.dtype):
                gap = steps[i].copy_(p).sub_(averages[i])
                averages[i].addcmul_(gap, weights[i])

    # ------------------------------------------------------------------ KOALA++
    def koala_pp_update(self, plan: StepPlan, surrogates, previous, tensors, index, filt, loss: LossInput,
                        state: TorchState, *, sigma, q, symmetric, r, alpha_r) -> None:
        """KOALA++ measurement update: H = grad + wd·x (compute dtype), the dot products, the
        per-tensor filters (``_kalman_pp``), then per tensor v ← a·v + b·H + c·h (formed in the
        compute dtype, rounded once into v), x ← x − step·(v + q·H) and h ← H."""
        device = filt["R"].device
        plan, buffers, directions = _directions(plan, state)
        H = _sanitised(directions, buffers)  # finite wherever the step runs; zeros replace NaN/inf
        # the new surrogates' buffers serve to widen 16-bit h and v for the dot products first
        v_new = scratch(state, plan.indices, plan.params, store=state.surrogate)
        base, (h_prev, v_prev) = _measurement(
            plan, directions, loss, device,
            extra=(dot_products(H, previous, device, v_new), dot_products(H, surrogates, device, v_new)))
        m = _kalman_pp.PlusPlusMeasurement(**vars(base), h_prev=h_prev, v_prev=v_prev)
        gains, rows = _kalman_pp.measure_pp(filt, tensors.index_select(0, index), m, sigma=sigma, q=q,
                                            symmetric=symmetric, r=r, alpha_r=alpha_r)
        tensors.copy_(tensors.index_copy(0, index, rows))
        if not H:
            return
        torch._foreach_copy_(v_new, surrogates)
        torch._foreach_mul_(v_new, list(gains.a.unbind()))
        torch._foreach_addcmul_(v_new, H, list(gains.b.unbind()))
        torch._foreach_addcmul_(v_new, previous, list(gains.c.unbind()))
        torch._foreach_copy_(surrogates, v_new)
        # h ← H where the tensor stepped (the masks are exactly 0 or 1: h·0 + 1·H, h·1 + 0·H)
        updated = gains.updated.unbind()
        torch._foreach_mul_(previous, list((1.0 - gains.updated).unbind()))
        torch._foreach_addcmul_(previous, H, list(updated))
        torch._foreach_add_(v_new, H, alpha=q)  # the step direction v + q·H
        torch._foreach_addcmul_(plan.params, v_new, list((-gains.step).unbind()))

    def koala_m_predict_deferred(self, params, velocities, averages, filt, state, *, a, qv, position_scale,
                                 collective=None):
        raise _fold_unsupported()

    def koala_m_update_folded(self, plan, params, velocities, averages, filt, loss, state, *, r, alpha_r, a, qv,
                              velocity_scale):
        raise _fold_unsupported()
