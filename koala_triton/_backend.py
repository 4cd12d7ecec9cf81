"""The interface every backend implements: the PyTorch path and the Triton path.

A *backend* runs KOALA's passes over the parameters and the scalar filter. The optimizer face
(``_optimizer.py``, ``koala_v.py``, ``koala_m.py``) decides *what* to run (which tensors, which
hyper-parameters, where the iteration stands); a backend decides *how*. Both backends take the
same arguments of the same types in every method, like torch.optim's single-tensor / foreach /
fused implementations of one optimizer.

Arguments shared by the methods:
    filt: the global filter, name -> live 0-dim tensor (float64 values, int64 counters) on the
        parameters' device (``_kalman.new_filter``).
    plan: the step's ``_plan.StepPlan`` (the tensors with a gradient, in update order, and
        their per-tensor group values as [k] float64 device vectors).
    loss: the validated ``_loss.LossInput`` (each backend takes its moments its own way).
    state: what ``new_state`` returned: the backend's own scratch and caches, plus the shared
        ``PredictState`` (``state.predict``). Never checkpointed; a new one after
        ``load_state_dict``.
    params, velocities, averages: [n] every parameter and KOALA-M's ``velocity`` / ``xavg``
        state of each, in the optimizer's flat order.
    collective: with DTensor parameters on several ranks (FSDP2), the sum over ranks of
        KOALA-M's distance ‖xavg − x‖² (``_distributed.SumReduction``: the owned entries, and
        the global element count n); else None. The update's reduction is ``plan.collective``.

Tensors are this rank's: for DTensor parameters the optimizer hands over their local shards.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ._loss import LossInput
from ._plan import StepPlan
from ._predict_state import PredictState


class BackendState(Protocol):
    predict: PredictState


class Backend(Protocol):
    """What ``_dispatch.backend`` returns: ``TorchBackend`` or ``TritonBackend``."""

    #: "torch" or "triton".
    name: str
    #: Whether the KOALA-M fold mode (``koala_m_*_folded`` / ``_deferred``) is implemented.
    supports_fold: bool

    def new_state(self, predict: PredictState, device: torch.device) -> BackendState: ...

    # KOALA-V
    def koala_v_predict(self, filt: dict[str, Tensor], state: BackendState, *, q: float) -> None:
        """Time update p̂ = p + q (or its deferral into the next filter kernel)."""

    def koala_v_update(self, plan: StepPlan, filt: dict[str, Tensor], loss: LossInput, state: BackendState, *,
                       r: float | None, alpha_r: float, raw_grad_step: bool) -> None:
        """Measurement update of every tensor of ``plan`` and of the filter."""

    # KOALA-M
    def koala_m_predict(self, params: list[Tensor], velocities: list[Tensor], averages: list[Tensor],
                        filt: dict[str, Tensor], state: BackendState, *, a: float, qv: float,
                        collective=None) -> None:
        """Time update of every parameter (x += u, u *= a) and of the covariance."""

    def koala_m_update(self, plan: StepPlan, velocities: list[Tensor], averages: list[Tensor],
                       filt: dict[str, Tensor], loss: LossInput, state: BackendState, *,
                       r: float | None, alpha_r: float) -> None:
        """Measurement update; ``velocities``/``averages`` align with ``plan.params``."""

    def koala_m_predict_deferred(self, params: list[Tensor], velocities: list[Tensor], averages: list[Tensor],
                                 filt: dict[str, Tensor], state: BackendState, *, a: float, qv: float,
                                 position_scale: float, collective=None) -> None:
        """Fold mode's explicit predict: x += position_scale·u, the velocity buffer kept."""

    def koala_m_update_folded(self, plan: StepPlan, params: list[Tensor], velocities: list[Tensor],
                              averages: list[Tensor], filt: dict[str, Tensor], loss: LossInput,
                              state: BackendState, *, r: float | None, alpha_r: float, a: float, qv: float,
                              velocity_scale: float) -> None:
        """Measurement update fused with the next predict's elementwise part."""

    # both
    def settle(self, filt: dict[str, Tensor], state: BackendState) -> None:
        """Apply deferred scalar filter work now (before anyone reads ``filt``)."""

    def cache_info(self, state: BackendState) -> dict[str, int]:
        """Counters of the backend's host-side caches (empty where it has none)."""
