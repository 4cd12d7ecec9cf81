"""KOALA-M: KOALA with momentum dynamics (weights and velocities as the filter state)."""

from __future__ import annotations

import warnings

import torch

from . import _validation
from ._optimizer import KoalaOptimizer


class KoalaM(KoalaOptimizer):
    r"""KOALA-M (Davtyan et al., AAAI 2022): KOALA with a velocity per weight.

    State per parameter: velocity u (starts at 0) and a running average xavg (starts at 0)
    used to adapt the weights' process noise qx. One global 2×2 covariance
    P = [[Pxx, Pxu], [Pxu, Puu]] ⊗ I is shared by all tensors.

    :meth:`predict` (before the forward pass): qx ← 0.9·qx + 0.1·‖xavg − x‖₂/n; x ← x + u;
    u ← a·u; P̂ = F P Fᵀ + diag(qx, qv) with F = [[1, 1], [0, a]].
    Measurement update, for every tensor i with ‖grad_i‖ >= eps, S_i = P̂xx·‖g̃_i‖² + R:

        x_i ← x_i − lr·L̃_i·(P̂xx/S_i)·g̃_i,   u_i ← u_i − lr·L̃_i·(P̂xu/S_i)·g̃_i,
        xavg_i ← 0.9·xavg_i + 0.1·x_i,

    then P ← P̂ − P̂·diag(h, 0)·P̂ in its stable form, h the largest ‖g̃_i‖²/S_i.

    Args:
        params: iterable of tensors or param-group dicts (groups may set lr, weight_decay, eps).
        lr: fraction of the current loss the step aims to remove.
        sw, sc, sv: initial covariance [[sw, sc], [sc, sv]] (must be positive semi-definite).
        a: velocity decay in [0, 1].
        qw: initial process noise of the weights (then adapted, see above).
        qv: process noise of the velocities.
        r, alpha_r, weight_decay, eps, fused: as in :class:`KoalaV`.

    The gradient should be taken at the predicted weights: call :meth:`predict` before the
    forward pass, or use ``step(closure)``. ``step(loss=...)`` without a preceding predict
    performs the predict itself (the gradient then comes from the weights before the
    momentum move: heavy-ball form) and warns once.
    """

    _FILTER_KEYS = ("sw", "sc", "sv", "a", "qw", "qv", "r", "alpha_r")

    def __init__(
        self,
        params,
        lr=1.0,
        *,
        sw: float = 0.1,
        sc: float = 0.0,
        sv: float = 0.1,
        a: float = 0.9,
        qw: float = 1e-2,
        qv: float = 1e-2,
        r: float | None = None,
        alpha_r: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        fused: bool | None = None,
    ):
        sw_f = _validation.check_nonnegative("sw", sw)
        sv_f = _validation.check_nonnegative("sv", sv)
        sc_f = _validation._as_float("sc", sc)
        _validation.check_psd_2x2(sw_f, sc_f, sv_f)
        hyper = dict(
            sw=sw_f,
            sc=sc_f,
            sv=sv_f,
            a=_validation.check_in_interval("a", a, 0.0, 1.0, high_open=False),
            qw=_validation.check_nonnegative("qw", qw),
            qv=_validation.check_nonnegative("qv", qv),
            r=_validation.check_optional_nonnegative("r", r),
            alpha_r=_validation.check_in_interval("alpha_r", alpha_r, 0.0, 1.0, high_open=True),
        )
        super().__init__(params, lr=lr, weight_decay=weight_decay, eps=eps, hyper=hyper, fused=fused)

    def _init_param_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["xavg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _initial_filter(self) -> dict[str, float]:
        h = self._hyper
        return {
            "Pxx": h["sw"], "Pxu": h["sc"], "Puu": h["sv"], "qx": h["qw"],
            "R": 1.0 if h["r"] is None else h["r"],
        }

    def _predict(self) -> None:
        params = self._all_params()
        self._impl.koala_m_predict(
            params,
            [self.state[p]["velocity"] for p in params],
            [self.state[p]["xavg"] for p in params],
            self._filter,
            a=self._hyper["a"],
            qv=self._hyper["qv"],
            cache=self._impl_cache,
        )

    def _implicit_predict(self) -> None:
        if not self._warned_implicit_predict:
            warnings.warn(
                "KoalaM.step(loss=...) was called without predict(): predicting now, so this "
                "gradient was taken before the momentum move (heavy-ball form). Call predict() "
                "before the forward pass, or use step(closure), for KOALA-M as in the paper.",
                stacklevel=3,
            )
            self._warned_implicit_predict = True
        self.predict()

    def _measure(self, loss, loss_sq_mean) -> None:
        plan = self._plan()
        h = self._hyper
        self._impl.koala_m_update(
            plan,
            [self.state[p]["velocity"] for p in plan.params],
            [self.state[p]["xavg"] for p in plan.params],
            self._filter, loss, loss_sq_mean, r=h["r"], alpha_r=h["alpha_r"], cache=self._impl_cache,
        )
