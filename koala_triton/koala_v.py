"""KOALA-V: the vanilla KOALA optimizer (identity dynamics, isotropic covariance p·I)."""

from __future__ import annotations

from . import _validation
from ._optimizer import KoalaOptimizer


class KoalaV(KoalaOptimizer):
    r"""KOALA-V (Davtyan et al., AAAI 2022, arXiv 2107.03331): a Kalman filter whose state is
    the weights. The contract: koala_triton/ALGORITHM.md §2, §4 and §5.

    Each iteration: :meth:`predict` (p̂ = p + q) before the forward pass, then a measurement
    update with the loss (:meth:`step` / :meth:`update`). Every parameter tensor i with a
    gradient (‖grad_i‖ >= eps) steps

        x_i ← x_i − lr · L̃_i · p̂ / (p̂·‖g̃_i‖² + R) · g̃_i,   g̃_i = grad_i + wd·x_i,
        L̃_i = L + ½·wd·‖x_i‖²,

    and the one global filter contracts p ← p̂·R / (p̂·G + R), G the largest ‖g̃_i‖².

    Args:
        params: iterable of tensors or param-group dicts (groups may set lr, weight_decay, eps).
        lr: fraction of the current loss the step aims to remove (target = (1 − lr)·L).
        sigma: initial covariance p.
        q: process noise added by each predict.
        r: fixed measurement noise R, or None to estimate it as an EMA of the mean squared
            per-sample loss with factor ``alpha_r`` (R starts at 1).
        weight_decay: L2 regularisation strength (as a loss term, as in the paper).
        eps: tensors whose gradient norm is below eps are skipped this step.
        raw_grad_step: step along the raw gradient instead of g̃ (the official code's KOALA-V;
            identical when weight_decay = 0).
        loss_floor: a known lower bound f of the loss (default 0, as in the paper). KOALA aims
            each step at the fraction ``1 − lr`` of the loss above it, observing L − f; a step
            whose loss is below f moves *up* the gradient, and is counted in
            ``filter_state["below_floor_steps"]`` (for losses that can be negative, e.g.
            log-likelihoods of densities, set f to their bound).
        fused: None (Triton kernels for CUDA params when available), True (require them),
            False (PyTorch path).
        process_group: torch.distributed: the group whose ranks' losses one update observes
            together (default: the default group, once torch.distributed is initialised). See
            "Distributed training" in the README: DDP and FSDP2 take one process's steps.
        reduce_loss: False: each rank observes its own losses (independent replicas, or losses
            already reduced by the caller). DTensor (FSDP2) parameters' norms are reduced anyway.

    A non-finite loss, ``loss_var`` or gradient skips the measurement update on the device:
    weights and filter stay as predicted and ``filter_state["skipped_steps"]`` increments.

    Example::

        opt = KoalaV(model.parameters())
        for x, y in data:
            opt.predict()
            losses = F.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
    """

    _FILTER_KEYS = ("sigma", "q", "r", "alpha_r", "raw_grad_step", "loss_floor")

    def __init__(
        self,
        params,
        lr=1.0,
        *,
        sigma: float = 0.1,
        q: float = 1.0,
        r: float | None = None,
        alpha_r: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        raw_grad_step: bool = False,
        loss_floor: float = 0.0,
        fused: bool | None = None,
        process_group=None,
        reduce_loss: bool = True,
    ):
        hyper = dict(**_validation.random_walk_settings(sigma=sigma, q=q),
                     raw_grad_step=_validation.check_bool("raw_grad_step", raw_grad_step),
                     **_validation.measurement_settings(r=r, alpha_r=alpha_r, loss_floor=loss_floor))
        super().__init__(params, lr=lr, weight_decay=weight_decay, eps=eps, hyper=hyper, fused=fused,
                         process_group=process_group, reduce_loss=reduce_loss)

    def _initial_filter(self) -> dict[str, float]:
        h = self._hyper
        return {"p": h["sigma"], "R": 1.0 if h["r"] is None else h["r"]}

    def _predict(self) -> None:
        # PyTorch path: p += q now. Triton path: deferred into the next filter kernel (or
        # applied by settle when filter_state / state_dict is read first).
        self._backend.koala_v_predict(self._filter, self._state, q=self._hyper["q"])

    def _measure(self, loss) -> None:
        h = self._hyper
        self._backend.koala_v_update(
            self._plan(), self._filter, loss, self._state,
            r=h["r"], alpha_r=h["alpha_r"], raw_grad_step=h["raw_grad_step"],
        )
