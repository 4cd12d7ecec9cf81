"""The ``torch.optim.Optimizer`` face shared by KoalaV and KoalaM.

Owns what every KOALA variant needs: param-group validation, the one global filter (float64
device scalars) and its checkpointing, and the predict/update protocol. What it delegates:
which tensors a step touches (``_plan.StepPlanner``), where the iteration stands
(``_predict_state.PredictState``), validating the loss (``_loss``), running the passes (a
backend, ``_backend.Backend``: the PyTorch or the Triton path, chosen by ``_dispatch``), and,
with torch.distributed, making the loss and DTensor parameters' sums global
(``_distributed.Collectives``).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _dispatch, _distributed, _kalman, _loss, _validation
from ._loss import LossInput
from ._plan import StepPlan, StepPlanner
from ._predict_state import PredictState

#: Hyper-parameters that may differ between param groups; all others belong to the filter.
GROUP_KEYS = ("lr", "weight_decay", "eps")

#: Filter settings added after checkpoints were first written, with the value an older
#: checkpoint (without the entry) was saved under; and counters likewise (they start at 0).
_HYPER_SINCE = {"loss_floor": 0.0}
_COUNTERS_SINCE = ("below_floor_steps",)


class KoalaOptimizer(Optimizer):
    """Base class: subclasses define ``_FILTER_KEYS``, ``_initial_filter``, ``_predict``,
    ``_measure`` and, optionally, ``_init_param_state``."""

    #: Names of the global (filter) hyper-parameters of the subclass.
    _FILTER_KEYS: tuple[str, ...] = ()

    def __init__(self, params, *, lr, weight_decay, eps, hyper: dict, fused, process_group=None,
                 reduce_loss: bool = True):
        _validation.check_nonnegative("lr", lr)
        self._reduce_loss = _validation.check_bool("reduce_loss", reduce_loss)
        #: torch.distributed: the loss group and the reductions of DTensor parameters' sums
        #: (``_distributed``); never checkpointed.
        self._collectives = _distributed.Collectives(process_group, self._reduce_loss)
        defaults = dict(
            lr=lr,
            weight_decay=_validation.check_nonnegative("weight_decay", weight_decay),
            eps=_validation.check_nonnegative("eps", eps),
        )
        self._device: torch.device | None = None
        super().__init__(params, defaults)
        self._hyper = dict(hyper)
        self._fused_request = _validation.check_fused(fused)
        self._use_triton = _dispatch.resolve(self._fused_request, self._device)
        self._backend = _dispatch.backend(self._use_triton)
        self._filter = _kalman.new_filter(self._device, **self._initial_filter())
        self._predict_state = PredictState()
        self._warned_implicit_predict = False
        #: Host-side caches of the steps (flat parameter list, layouts, group vectors, state
        #: lists); never checkpointed.
        self._planner = StepPlanner(type(self).__name__)
        #: The backend's scratch and caches (tables, buffers, deferred work); never checkpointed.
        self._state = self._backend.new_state(self._predict_state, self._device)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        for key in self._FILTER_KEYS:
            if key in param_group:
                raise ValueError(
                    f"{key!r} is a hyper-parameter of KOALA's one global filter: set it on the "
                    "optimizer, not per param group (only lr, weight_decay and eps may differ)"
                )
        for key in ("weight_decay", "eps"):
            if key in param_group:
                param_group[key] = _validation.check_nonnegative(key, param_group[key])
        if "lr" in param_group:
            _validation.check_nonnegative("lr", param_group["lr"])
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        # named parameters, as torch.optim accepts them: (name, tensor) pairs
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        for i, p in enumerate(tensors):
            _validation.check_param(p)
            _distributed.check_param(f"parameter {i} of param group {len(self.param_groups)}", p)
            if self._device is None:
                self._device = p.device
            elif p.device != self._device:
                raise ValueError(
                    f"params: all parameters must be on one device (KOALA has one global filter); "
                    f"found {self._device} and {p.device}"
                )
        param_group["params"] = params
        super().add_param_group(param_group)
        for p in tensors:
            self._init_param_state(p)

    def _init_param_state(self, p: Tensor) -> None:
        """Create per-parameter state eagerly (none for KOALA-V)."""

    def _all_params(self) -> list[Tensor]:
        """Every parameter in flat order (a cached list: do not mutate it)."""
        return self._planner.flat(self.param_groups)[0]

    def _plan(self) -> StepPlan:
        """The tensors with a gradient this step and their group values (``StepPlanner.plan``),
        with the gradient scale and inf flag a ``GradScaler`` set on the optimizer, if any, and
        the reduction of DTensor parameters' sums over ranks (``_distributed``), if any."""
        plan = self._planner.plan(self.param_groups, self._device)
        plan.grad_scale = getattr(self, "grad_scale", None)
        plan.found_inf = getattr(self, "found_inf", None)
        plan.collective = self._collectives.step_reduction(plan.layout, self._all_params(), self._device)
        return plan

    def _predict_reduction(self):
        """The reduction of KOALA-M's distance sum over ranks (DTensor parameters), or None."""
        return self._collectives.predict_reduction(self._all_params())

    # ------------------------------------------------------------------ public protocol
    @property
    def filter_state(self) -> dict[str, Tensor]:
        """The global filter: live 0-dim float64 tensors (int64 counters ``step``, ``skipped_steps``).

        Between ``predict()`` and the update they hold the prior; afterwards the posterior.
        (The Triton path defers the scalar part of a predict into its next kernel; reading this
        property applies it first, so read it again after ``predict()`` rather than keeping
        the dict from before.)
        """
        self._backend.settle(self._filter, self._state)
        return self._filter

    def cache_info(self) -> dict[str, int]:
        """Hit and miss counters of the host-side caches a step consults: the step planner's
        layouts (``layout_hits``, ``layout_misses``) and, on the Triton path, the pointer
        tables (``table_hits``, ``table_misses``, ``table_layout_misses``). A training loop
        whose gradients move every step (``zero_grad(set_to_none=True)`` with a fragmented
        allocator) shows up as table misses; only new parameter sizes cost layout misses."""
        info = dict(self._planner.info())
        info.update({f"table_{k}": v for k, v in self._backend.cache_info(self._state).items()})
        return info

    @property
    def uses_triton(self) -> bool:
        """True when steps run the fused Triton kernels, False for the PyTorch path."""
        return self._use_triton

    @torch.no_grad()
    def predict(self) -> None:
        """Time update (KOALA's predict): call before the forward pass of each iteration.

        Idempotent within an iteration: a second ``predict()`` before the measurement update
        does nothing, so a framework or a skipped update can never apply two time updates.
        """
        if self._predict_state.requested:
            return
        if self._predict_state.folded:  # fold mode: the last update already performed it
            self._predict_state.to_prior(by_update=True)
            return
        self._predict()
        self._predict_state.to_prior()

    def train(self) -> None:
        """``predict()``, for frameworks that call ``optimizer.train()`` before each training
        forward pass (the Hugging Face Trainer does: it is how it supports schedule-free
        optimizers). Idempotent like ``predict()``."""
        self.predict()

    def observe(self, loss, loss_var=None) -> None:
        """Hand the loss of the coming update to the optimizer where it is computed.

        For training loops that call ``step()`` or ``step(closure)`` themselves (HF Trainer,
        Lightning, ``GradScaler.step``): call ``observe(per_sample_losses)`` after the forward
        pass, and the next update uses it. Several calls before one update (gradient
        accumulation) are combined: per-sample vectors are concatenated, scalar losses (with
        ``loss_var``) averaged with equal weights; mixing the two is refused. The losses stay
        on the device (detached); nothing is read on the host.

        Args:
            loss, loss_var: as in ``step``.
        """
        observed = _loss.validate(loss, loss_var, adaptive=self._hyper["r"] is None, device=self._device,
                                   floor=self._hyper["loss_floor"])
        self._predict_state.observe(observed)

    def update(self, loss, loss_var=None):
        """The official API: measurement update with the minibatch mean ``loss`` and
        ``loss_var``, the mean of squared per-sample losses. Runs through ``step`` so optimizer
        hooks and LR schedulers see a step."""
        return self.step(loss=loss, loss_var=loss_var)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, loss=None, loss_var=None):
        """One KOALA measurement update (and the predict before it, if not yet done).

        Args:
            closure: optional; re-evaluates the model under ``enable_grad`` and returns the
                per-sample losses ``[B]`` or the mean loss ``[]``. ``step(closure)`` is a whole
                iteration: predict (if needed), closure, update. If the closure hands the
                per-sample losses to ``observe``, those are used (its return value may then be
                anything, e.g. the mean loss a framework expects).
            loss: without a closure, the per-sample losses ``[B]`` (mean and mean of squares
                are taken on the device) or the mean loss (a 0-dim tensor or a float). Without
                it, the losses given to ``observe`` since the last update.
            loss_var: with a scalar loss and adaptive R (``r=None``), the mean of the squared
                per-sample losses.

        ``torch.amp.GradScaler.step(opt)`` works: the optimizer declares
        ``_step_supports_amp_scaling``, so the scaler hands it ``grad_scale`` and ``found_inf``;
        gradients are unscaled inside the passes, and a step with ``found_inf`` is skipped on the
        device and counted in ``filter_state["skipped_steps"]``, without a host sync.

        Returns:
            The closure's result, or ``loss`` as given.
        """
        adaptive = self._hyper["r"] is None
        floor = self._hyper["loss_floor"]
        observed = self._predict_state.observed
        if loss is not None and observed is not None:
            raise ValueError("step(loss=...) after observe(): hand the loss over one way, not both")
        # Validate a given loss before anything runs, so bad input changes no state.
        given = None if loss is None else _loss.validate(loss, loss_var, adaptive=adaptive, device=self._device,
                                                         floor=floor)
        result = loss
        if closure is not None:
            if not self._predict_state.requested:
                self.predict()
            with torch.enable_grad():
                result = closure()
            observed = self._predict_state.observed  # the closure may have observed the losses
            if given is not None and (observed is not None or result is not None):
                raise ValueError("step(): pass either a closure or loss=..., not both (a closure that "
                                 "returns None, as frameworks pass, may come with loss=...)")
        if given is not None:
            loss_in = given
        elif observed is not None:
            loss_in = observed
        elif closure is not None and result is not None:
            loss_in = _loss.validate(result, None, adaptive=adaptive, device=self._device, floor=floor)
        elif closure is not None:
            raise ValueError("step(closure): the closure must return the loss (per-sample or mean), "
                             "or hand the per-sample losses to observe()")
        else:
            raise ValueError(
                f"{type(self).__name__}.step() needs the loss: step(loss=per_sample_losses), "
                "update(loss, loss_var), step(closure), or observe(per_sample_losses) before "
                "step(); KOALA's update is driven by the loss value"
            )
        if not self._predict_state.requested:
            self._implicit_predict()
        # torch.distributed: the loss statistics of all ranks (one all-reduce; with DTensor
        # parameters it rides along with their norms inside the update instead).
        self._measure(self._collectives.observed_loss(loss_in, self._all_params()))
        self._predict_state.to_posterior(folded=self._fold_mode())
        return result

    #: ``torch.amp.GradScaler`` hands ``grad_scale`` and ``found_inf`` to ``step`` (see there).
    _step_supports_amp_scaling = True

    def _implicit_predict(self) -> None:
        self.predict()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The usual ``Optimizer`` state dict plus a ``"koala"`` entry with the global filter
        (float64, never cast to a parameter's dtype), the filter hyper-parameters and whether
        a predict is pending."""
        self._backend.settle(self._filter, self._state)
        state = super().state_dict()
        state["koala"] = {
            "filter": {k: v.detach().clone() for k, v in self._filter.items()},
            "hyper": dict(self._hyper),
            **self._predict_state.to_checkpoint(fold=self._fold_mode()),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        koala = state_dict.pop("koala", None)
        if koala is None:
            raise ValueError(f"state_dict has no 'koala' entry: it was not saved by {type(self).__name__}")
        saved_hyper = {**{k: v for k, v in _HYPER_SINCE.items() if k in self._hyper}, **koala["hyper"]}
        saved_filter = {**{k: torch.zeros((), dtype=torch.int64) for k in _COUNTERS_SINCE if k in self._filter},
                        **koala["filter"]}
        if set(saved_filter) != set(self._filter) or set(saved_hyper) != set(self._hyper):
            raise ValueError(f"state_dict was saved by a different optimizer than {type(self).__name__}")
        self._check_checkpoint_mode(koala)
        super().load_state_dict(state_dict)
        # The checkpoint's filter settings replace the constructor's, as torch.optim's
        # load_state_dict replaces the param groups' (a run resumes as it was saved); say so
        # when they differ.
        changed = [f"{k}: {self._hyper[k]!r} -> {v!r}" for k, v in saved_hyper.items() if self._hyper[k] != v]
        if changed:
            warnings.warn(f"{type(self).__name__}.load_state_dict: the checkpoint's filter settings replace "
                          f"this optimizer's ({'; '.join(changed)})", UserWarning, stacklevel=2)
        for key, value in saved_filter.items():
            # copy_ into the existing tensors keeps their dtype (float64) and identity.
            self._filter[key].copy_(value.to(self._filter[key].dtype))
        self._hyper.update(saved_hyper)
        self._predict_state.load_checkpoint(koala)
        # Deferred work of the backend (a pending predict tail) belonged to the replaced
        # filter; tables and buffers are rebuilt on the next step. The state tensors were
        # replaced too, so cached lists of them go.
        self._state = self._backend.new_state(self._predict_state, self._device)
        self._planner.clear()

    # ------------------------------------------------------------------ copies and repr
    #: Attributes rebuilt from the others when an optimizer is unpickled or deep-copied (a
    #: process group cannot be pickled: a copy reduces over the default group).
    _RUNTIME = ("_backend", "_state", "_planner", "_filter", "_predict_state", "_collectives")

    def __getstate__(self) -> dict:
        """Everything ``pickle``/``copy.deepcopy`` need: torch.optim's state and param groups,
        the settings, the filter's values and where the iteration stands. Caches and the
        backend state are rebuilt on load (as after ``load_state_dict``)."""
        self._backend.settle(self._filter, self._state)
        state = {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}
        state["_filter_values"] = {k: v.detach().clone() for k, v in self._filter.items()}
        state["_predict_checkpoint"] = self._predict_state.to_checkpoint(fold=self._fold_mode())
        return state

    def __setstate__(self, state: dict) -> None:
        if "_filter_values" not in state:  # torch.optim's load_state_dict sets state and groups this way
            super().__setstate__(state)
            return
        state = dict(state)
        values = state.pop("_filter_values")
        predict = state.pop("_predict_checkpoint")
        super().__setstate__(state)
        self._backend = _dispatch.backend(self._use_triton)
        self._filter = _kalman.new_filter(self._device, **{k: 0.0 for k in self._initial_filter()})
        for key, value in values.items():
            self._filter[key].copy_(value.to(device=self._device, dtype=self._filter[key].dtype))
        self._predict_state = PredictState()
        self._predict_state.load_checkpoint(predict)
        self._planner = StepPlanner(type(self).__name__)
        self._state = self._backend.new_state(self._predict_state, self._device)
        self._collectives = _distributed.Collectives(None, self.__dict__.setdefault("_reduce_loss", True))

    def __repr__(self) -> str:
        lines = super().__repr__().split("\n")
        settings = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        path = "triton" if self._use_triton else "torch"
        extra = ", fold_predict=True" if self._fold_mode() else ""
        if not self._reduce_loss:
            extra += ", reduce_loss=False"
        if self._collectives.process_group is not None:
            extra += ", process_group=given"
        return "\n".join([lines[0], f"Filter: {settings}, path={path}{extra}", *lines[1:]])

    # ------------------------------------------------------------------ subclass hooks
    def _fold_mode(self) -> bool:
        """Whether updates also perform the next predict (KoalaM's opt-in fold mode)."""
        return False

    def _check_checkpoint_mode(self, koala: dict) -> None:
        """Refuse a checkpoint saved in a mode this optimizer cannot continue (before loading)."""

    def _initial_filter(self) -> dict[str, float]:
        raise NotImplementedError

    def _predict(self) -> None:
        raise NotImplementedError

    def _measure(self, loss: LossInput) -> None:
        raise NotImplementedError
