"""KOALA++: KOALA with a directional covariance surrogate carried per tensor (Xia et al., 2025)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _kalman_pp, _validation
from ._optimizer import KoalaOptimizer


class KoalaPlusPlus(KoalaOptimizer):
    r"""KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025): one Kalman filter per parameter tensor that
    carries the product v = H·P of the gradient with the weights' covariance instead of P.

    Every parameter tensor with a gradient (‖grad‖ >= eps) takes, with H = grad + wd·x (its
    regularised gradient, flattened), h and v its previous H and surrogate, and S0 its previous
    innovation variance:

        λ = (H·v + Q·H·h)/S0,  α = H·h/‖h‖²,  r = H·v/‖h‖² − (H·h)(h·v)/‖h‖⁴  (0 if not symmetric)
        v ← (α − λ)·v + Q·(H − λ·h) + r·h,        S = (v + Q·H)·H + R
        x ← x − lr·L̃·(v + Q·H)/S,                 L̃ = L + ½·wd·‖x‖²

    and stores v, h ← H and S. A tensor's first step starts from h = H, v = σ·H,
    S0 = (σ + Q)·‖H‖² + R. Only three new dot products per tensor are computed per step
    (H·H, H·h, H·v); ‖h‖², h·v and S0 are the last step's (``tensor_filters``). The forms are
    derived from the EKF in ``oracle/`` (with what the recursion drops: it is exact when the
    gradient keeps its direction).

    Args:
        params: iterable of tensors or param-group dicts (groups may set lr, weight_decay, eps).
        lr: fraction of the current loss the step aims to remove (target = (1 − lr)·L).
        sigma: initial covariance σ (v of a first step is σ·H).
        q: process noise Q.
        r: fixed measurement noise R, or None to estimate it as an EMA of the mean squared
            per-sample loss with factor ``alpha_r`` (R starts at 1), as KOALA.
        weight_decay: L2 regularisation strength (as a loss term).
        eps: tensors whose gradient norm is below eps are skipped this step (state untouched).
        symmetric: the symmetric least-squares estimate of the covariance (the authors'
            default), or the plain one (r = 0).
        loss_floor: a known lower bound f of the loss (default 0): the update observes L − f
            (see :class:`KoalaV`).
        fused: None (Triton kernels for CUDA params when available), True (require them),
            False (PyTorch path).
        process_group, reduce_loss: as in :class:`KoalaV` (DDP and FSDP2 take one process's
            steps; under FSDP2 the dot products are reduced over the shards with the norms).

    Defaults are the authors' training scripts' (σ = 0.1, Q = 0.1, lr = 1; their class defaults
    are σ = Q = 1). ``predict()`` does nothing (KOALA++'s time update is inside its update) but
    keeps the protocol: calling it, or not, gives the same steps.

    State: ``state[p]["v"]`` (the surrogate) and ``state[p]["h"]`` (the previous H), in the
    parameter's dtype; each tensor's float64 scalars in ``tensor_filters``; the global R and
    the counters in ``filter_state``. A non-finite loss, ``loss_var`` or gradient skips the
    whole update on the device (nothing changes but ``filter_state["skipped_steps"]``).
    """

    _FILTER_KEYS = ("sigma", "q", "r", "alpha_r", "symmetric", "loss_floor")
    _STATE_KEYS = ("v", "h")

    def __init__(
        self,
        params,
        lr=1.0,
        *,
        sigma: float = 0.1,
        q: float = 0.1,
        r: float | None = None,
        alpha_r: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        symmetric: bool = True,
        loss_floor: float = 0.0,
        fused: bool | None = None,
        process_group=None,
        reduce_loss: bool = True,
    ):
        hyper = dict(**_validation.random_walk_settings(sigma=sigma, q=q),
                     symmetric=_validation.check_bool("symmetric", symmetric),
                     **_validation.measurement_settings(r=r, alpha_r=alpha_r, loss_floor=loss_floor))
        super().__init__(params, lr=lr, weight_decay=weight_decay, eps=eps, hyper=hyper, fused=fused,
                         process_group=process_group, reduce_loss=reduce_loss)

    # ------------------------------------------------------------------ per-tensor state
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        n = sum(len(group["params"]) for group in self.param_groups)
        current = getattr(self, "_tensors", None)
        grown = _kalman_pp.new_tensor_filters(n, self._device)
        if current is not None:
            grown[: current.shape[0]] = current
        self._tensors = grown

    def _init_param_state(self, p: Tensor) -> None:
        state = self.state[p]
        state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["h"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @property
    def tensor_filters(self) -> dict[str, Tensor]:
        """Each tensor's filter scalars: name -> [n] float64 view (flat parameter order: the
        param groups' tensors in order). ``S`` the last innovation variance, ``hh`` = ‖h‖²,
        ``hv`` = h·v, ``updates`` the steps taken (0: not yet stepped)."""
        return {key: self._tensors[:, i] for i, key in enumerate(_kalman_pp.TENSOR_KEYS)}

    # ------------------------------------------------------------------ the variant's hooks
    def _initial_filter(self) -> dict[str, float]:
        return {"R": 1.0 if self._hyper["r"] is None else self._hyper["r"]}

    def _predict(self) -> None:
        """Nothing: P^ = P + Q·I enters S and the gain inside the update."""

    def _measure(self, loss) -> None:
        plan = self._plan()
        h = self._hyper
        surrogates, previous = self._planner.state_lists(plan, self.state, self._STATE_KEYS)
        self._backend.koala_pp_update(
            plan, surrogates, previous, self._tensors, self._planner.index_vector(plan, self._device),
            self._filter, loss, self._state, sigma=h["sigma"], q=h["q"], symmetric=h["symmetric"], r=h["r"],
            alpha_r=h["alpha_r"],
        )

    def _checkpoint_extra(self) -> dict:
        return {"tensors": self._tensors.detach().clone()}

    def _check_checkpoint_mode(self, koala: dict) -> None:
        saved = koala.get("tensors")
        if saved is None or tuple(saved.shape) != tuple(self._tensors.shape):
            raise ValueError(
                f"state_dict: KoalaPlusPlus needs its per-tensor filters for {self._tensors.shape[0]} tensors "
                f"(got {None if saved is None else tuple(saved.shape)})"
            )

    def _load_checkpoint_extra(self, koala: dict) -> None:
        self._tensors.copy_(koala["tensors"].to(device=self._device, dtype=self._tensors.dtype))
