"""KOALA-M: KOALA with momentum dynamics (weights and velocities as the filter state)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import _validation
from ._optimizer import KoalaOptimizer


class KoalaM(KoalaOptimizer):
    r"""KOALA-M (Davtyan et al., AAAI 2022, arXiv 2107.03331): KOALA with a velocity per weight.
    The contract: koala_triton/ALGORITHM.md §3, §4 and §5.

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
        r, alpha_r, weight_decay, eps, loss_floor, fused, process_group, reduce_loss: as in
            :class:`KoalaV`.
        fold_predict: Triton path only (opt-in). Each update also performs the *next*
            predict's elementwise part in the same pass (36 instead of 56 bytes per fp32
            parameter per step); :meth:`predict` after an update then does nothing. Between
            steps the weights therefore hold the prediction x⁺ + u⁺, not the posterior x⁺
            (evaluate inside :meth:`posterior_weights`), ``state[p]["velocity"]`` holds the
            posterior velocity u⁺ (the predicted one is a·u⁺, formed inside the next update),
            and ``filter_state`` the prior of the next step. Checkpoints saved in this mode
            load only into ``fold_predict=True`` optimizers.

    The gradient should be taken at the predicted weights: call :meth:`predict` before the
    forward pass, or use ``step(closure)``. ``step(loss=...)`` without a preceding predict
    performs the predict itself (the gradient then comes from the weights before the
    momentum move: heavy-ball form) and warns once.
    """

    _FILTER_KEYS = ("sw", "sc", "sv", "a", "qw", "qv", "r", "alpha_r", "loss_floor")

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
        loss_floor: float = 0.0,
        fused: bool | None = None,
        fold_predict: bool = False,
        process_group=None,
        reduce_loss: bool = True,
    ):
        sw_f = _validation.check_nonnegative("sw", sw)
        sv_f = _validation.check_nonnegative("sv", sv)
        sc_f = _validation.as_float("sc", sc)
        _validation.check_psd_2x2(sw_f, sc_f, sv_f)
        hyper = dict(
            sw=sw_f,
            sc=sc_f,
            sv=sv_f,
            a=_validation.check_in_interval("a", a, 0.0, 1.0, high_open=False),
            qw=_validation.check_nonnegative("qw", qw),
            qv=_validation.check_nonnegative("qv", qv),
            **_validation.measurement_settings(r=r, alpha_r=alpha_r, loss_floor=loss_floor),
        )
        fold = _validation.check_bool("fold_predict", fold_predict)
        super().__init__(params, lr=lr, weight_decay=weight_decay, eps=eps, hyper=hyper, fused=fused,
                         process_group=process_group, reduce_loss=reduce_loss)
        if fold and not self._backend.supports_fold:
            raise ValueError(
                "fold_predict=True folds predict into the Triton update pass: it needs the Triton "
                "path (fused=True, or CUDA parameters with fused=None)"
            )
        self._fold = fold

    _STATE_KEYS = ("velocity", "xavg")

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

    def _fold_mode(self) -> bool:
        return self._fold

    def _predict(self) -> None:
        params, velocities, averages = self._planner.all_state_lists(self.param_groups, self.state, self._STATE_KEYS)
        h = self._hyper
        collective = self._predict_reduction()
        if self._fold:  # a predict the last update did not perform (the first, or a second one)
            self._backend.koala_m_predict_deferred(
                params, velocities, averages, self._filter, self._state, a=h["a"], qv=h["qv"],
                position_scale=h["a"] ** self._predict_state.time_updates, collective=collective,
            )
            return
        self._backend.koala_m_predict(params, velocities, averages, self._filter, self._state, a=h["a"], qv=h["qv"],
                                      collective=collective)

    def _implicit_predict(self) -> None:
        if self._predict_state.folded:  # fold mode: the last update already predicted, no warning
            self.predict()
            return
        if not self._warned_implicit_predict:
            warnings.warn(
                "KoalaM.step(loss=...) was called without predict(): predicting now, so this "
                "gradient was taken before the momentum move (heavy-ball form). Call predict() "
                "before the forward pass, or use step(closure), for KOALA-M as in the paper.",
                stacklevel=3,
            )
            self._warned_implicit_predict = True
        self.predict()

    def _measure(self, loss) -> None:
        plan = self._plan()
        h = self._hyper
        if self._fold:
            params, velocities, averages = self._planner.all_state_lists(self.param_groups, self.state,
                                                                         self._STATE_KEYS)
            self._backend.koala_m_update_folded(
                plan, params, velocities, averages, self._filter, loss, self._state,
                r=h["r"], alpha_r=h["alpha_r"], a=h["a"], qv=h["qv"],
                velocity_scale=h["a"] ** self._predict_state.time_updates,
            )
            return
        velocities, averages = self._planner.state_lists(plan, self.state, self._STATE_KEYS)
        self._backend.koala_m_update(
            plan, velocities, averages, self._filter, loss, self._state, r=h["r"], alpha_r=h["alpha_r"],
        )

    # ------------------------------------------------------------------ fold mode
    @contextlib.contextmanager
    def posterior_weights(self):
        """Context manager: the parameters hold the posterior weights x⁺ inside the block.

        With ``fold_predict=True`` the weights between steps are the prediction x⁺ + u⁺ (plus
        a·u⁺ per extra predict); inside the block they are x⁺ (recomputed as x − s·u⁺, one
        rounding), and the exact previous values are restored on exit (one temporary copy of
        the weights). In the default mode the weights after an update already are x⁺ and this
        is a no-op; between predict() and the update it raises.

        Example::

            with opt.posterior_weights():
                val_loss = evaluate(model)
        """
        if not self._fold:
            if self._predict_state.requested:
                raise RuntimeError("posterior_weights(): between predict() and the update the "
                                   "posterior of this step does not exist yet")
            yield
            return
        j = self._predict_state.time_updates
        if j == 0:
            yield
            return
        a = self._hyper["a"]
        shift = sum(a ** i for i in range(j))
        params = self._all_params()
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p in params:
                p.sub_(self.state[p]["velocity"], alpha=shift)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def _check_checkpoint_mode(self, koala: dict) -> None:
        fold = koala.get("fold")
        if fold is not None and fold["predicts"] > 0 and not self._fold:
            raise ValueError("this state_dict was saved by KoalaM(fold_predict=True) between steps (its "
                             "weights are predicted): load it into KoalaM(fold_predict=True)")
        if fold is None and self._fold and koala.get("predicted", False):
            raise ValueError("this state_dict was saved between predict() and the update without "
                             "fold_predict: load it into KoalaM(fold_predict=False)")
