"""The ``torch.optim.Optimizer`` face shared by KoalaV and KoalaM.

Owns what every KOALA variant needs: param-group validation, the one global filter (float64
device scalars) and its checkpointing, the predict/update protocol, turning a loss into its
mean and second moment on the device, and choosing the PyTorch or the Triton path.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _dispatch, _filter, _validation
from ._plan import StepLayout, StepPlan

FLOAT = _filter.FLOAT
_IS_SPARSE = operator.attrgetter("is_sparse")


@dataclass
class LossInput:
    """A validated loss, before its moments are taken (each implementation takes them itself).

    Attributes:
        loss: the per-sample losses [B] (B >= 1) or the mean loss [], detached, on the
            parameters' device, in the dtype it was given (a Python float becomes float64).
        loss_var: with a scalar loss and adaptive R, the mean of squared per-sample losses []
            (same conventions); else None.
        adaptive: R is estimated (``r=None``): the second moment is needed.
    """

    loss: Tensor
    loss_var: Tensor | None
    adaptive: bool

    @property
    def per_sample(self) -> bool:
        return self.loss.dim() == 1

    def moments(self) -> tuple[Tensor, Tensor | None]:
        """(mean, mean of squares or None) as float64 0-dim tensors, with torch ops (the
        PyTorch path; the Triton path computes them inside its filter kernel)."""
        loss_t = self.loss.to(FLOAT)
        if self.per_sample:
            return loss_t.mean(), (loss_t * loss_t).mean() if self.adaptive else None
        if not self.adaptive:
            return loss_t, None
        return loss_t, self.loss_var.to(FLOAT)


#: Hyper-parameters that may differ between param groups; all others belong to the filter.
GROUP_KEYS = ("lr", "weight_decay", "eps")


class KoalaOptimizer(Optimizer):
    """Base class: subclasses define ``_FILTER_KEYS``, ``_initial_filter``, ``_predict``,
    ``_measure`` and, optionally, ``_init_param_state``."""

    #: Names of the global (filter) hyper-parameters of the subclass.
    _FILTER_KEYS: tuple[str, ...] = ()

    def __init__(self, params, *, lr, weight_decay, eps, hyper: dict, fused):
        _validation.check_nonnegative("lr", lr)
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
        self._impl = _dispatch.implementation(self._use_triton)
        self._filter = _filter.new_filter(self._device, **self._initial_filter())
        self._predicted = False
        self._warned_implicit_predict = False
        #: Host-side bookkeeping cached between steps (flat parameter list, step layouts, the
        #: per-tensor group vectors, KOALA-M's state lists); see ``_plan``. Never checkpointed.
        self._host_cache: dict = {}
        #: Scratch owned by the implementation (e.g. cached pointer tables); never checkpointed.
        self._impl_cache: dict = {}

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
        for p in params:
            _validation.check_param(p)
            if self._device is None:
                self._device = p.device
            elif p.device != self._device:
                raise ValueError(
                    f"params: all parameters must be on one device (KOALA has one global filter); "
                    f"found {self._device} and {p.device}"
                )
        param_group["params"] = params
        super().add_param_group(param_group)
        for p in params:
            self._init_param_state(p)

    def _init_param_state(self, p: Tensor) -> None:
        """Create per-parameter state eagerly (none for KOALA-V)."""

    def _all_params(self) -> list[Tensor]:
        """Every parameter in flat order (a cached list: do not mutate it)."""
        return self._flat()[0]

    def _flat(self) -> tuple[list[Tensor], list[int]]:
        """(params, group index of each) in flat order, rebuilt when a group's params list
        is replaced or changes length (``add_param_group``, or a user editing the list).

        The cache holds the groups' list objects, so their ids cannot be reused while cached.
        Rebuilding drops every cached step layout.
        """
        lists = [group["params"] for group in self.param_groups]
        key = tuple([(id(ps), len(ps)) for ps in lists])
        cached = self._host_cache.get("flat")
        if cached is not None and cached[0] == key:
            return cached[2]
        params, group_index = [], []
        for gi, ps in enumerate(lists):
            params.extend(ps)
            group_index.extend([gi] * len(ps))
        self._host_cache.clear()
        self._host_cache["flat"] = (key, lists, (params, group_index))
        return params, group_index

    # ------------------------------------------------------------------ public protocol
    @property
    def filter_state(self) -> dict[str, Tensor]:
        """The global filter: live 0-dim float64 tensors (int64 counters ``step``, ``skipped_steps``).

        Between ``predict()`` and the update they hold the prior; afterwards the posterior.
        (The Triton path defers the scalar part of KOALA-M's predict into the next kernel;
        reading this property applies it first, so read it again after ``predict()`` rather
        than keeping the dict from before.)
        """
        self._settle_filter()
        return self._filter

    def _settle_filter(self) -> None:
        """Let the implementation finish deferred scalar filter work (no-op on the PyTorch path)."""
        settle = getattr(self._impl, "settle_filter", None)
        if settle is not None:
            settle(self._filter, self._impl_cache)

    @property
    def uses_triton(self) -> bool:
        """True when steps run the fused Triton kernels, False for the PyTorch path."""
        return self._use_triton

    @torch.no_grad()
    def predict(self) -> None:
        """Time update (KOALA's predict): call before the forward pass of each iteration."""
        self._predict()
        self._predicted = True

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
                iteration: predict (if needed), closure, update.
            loss: without a closure, the per-sample losses ``[B]`` (mean and mean of squares
                are taken on the device) or the mean loss (a 0-dim tensor or a float).
            loss_var: with a scalar loss and adaptive R (``r=None``), the mean of the squared
                per-sample losses.

        Returns:
            The closure's result, or ``loss`` as given.
        """
        if closure is not None:
            if loss is not None:
                raise ValueError("step(): pass either a closure or loss=..., not both")
            if not self._predicted:
                self.predict()
            with torch.enable_grad():
                result = closure()
            if result is None:
                raise ValueError("step(closure): the closure must return the loss (per-sample or mean)")
            loss = result
        else:
            if loss is None:
                raise ValueError(
                    f"{type(self).__name__}.step() needs the loss: step(loss=per_sample_losses), "
                    "update(loss, loss_var) or step(closure); KOALA's update is driven by the loss value"
                )
            result = loss
        # Validate the loss before the implicit predict, so bad input changes no state.
        loss_in = self._loss_moments(loss, loss_var)
        if not self._predicted:
            self._implicit_predict()
        # The PyTorch path takes (mean, mean of squares) with torch ops; the Triton path hands
        # the LossInput to its filter kernel, which reduces it there (no extra launches).
        self._measure(*self._impl.loss_moments(loss_in))
        self._predicted = False
        return result

    def _implicit_predict(self) -> None:
        self.predict()

    # ------------------------------------------------------------------ losses
    def _scalar(self, name: str, value) -> Tensor:
        if isinstance(value, Tensor):
            if value.is_complex() or not value.is_floating_point():
                raise TypeError(f"{name} must be a real floating-point tensor, got {value.dtype}")
            # The dtype is kept: the implementation converts to float64 (the Triton path inside
            # its filter kernel, so that no conversion op runs).
            return value.detach().to(device=self._device)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a tensor or a float, got {type(value).__name__}")
        # torch.full is a device fill (no host-to-device copy, no synchronisation).
        return torch.full((), float(value), dtype=FLOAT, device=self._device)

    def _loss_moments(self, loss, loss_var) -> LossInput:
        """Validate the loss (before any state changes); the moments are taken by the
        implementation (``LossInput.moments`` on the PyTorch path, the filter kernel on the
        Triton path)."""
        adaptive = self._hyper["r"] is None
        loss_t = self._scalar("loss", loss)
        if loss_t.dim() == 1:
            if loss_t.numel() == 0:
                raise ValueError("loss: the per-sample loss vector is empty")
            if loss_var is not None:
                raise ValueError("loss_var must not be given with per-sample losses (it is computed from them)")
            return LossInput(loss_t, None, adaptive)
        if loss_t.dim() != 0:
            raise ValueError(f"loss must be a scalar or a 1-D tensor of per-sample losses, got shape {tuple(loss_t.shape)}")
        if not adaptive:
            return LossInput(loss_t, None, adaptive)
        if loss_var is None:
            raise ValueError(
                "loss_var is required with a scalar loss when R is estimated (r=None): pass the "
                "per-sample losses as loss, or loss_var = mean of squared per-sample losses, or set r"
            )
        var_t = self._scalar("loss_var", loss_var)
        if var_t.dim() != 0:
            raise ValueError(f"loss_var must be a scalar, got shape {tuple(var_t.shape)}")
        return LossInput(loss_t, var_t, adaptive)

    # ------------------------------------------------------------------ plan of a step
    def _plan(self) -> StepPlan:
        """Collect the tensors with a gradient (zero-weight-decay groups first) and their
        per-tensor group values as device vectors.

        Host cost per step is a few list passes: the layout (which tensors, in which order) is
        cached under the pattern of present gradients and of zero weight decays per group, and
        the device vectors under the groups' (lr, weight_decay, eps). Gradients are checked
        (dense, the parameter's shape) when a layout is built; later steps with the same
        pattern check density only (torch's ``.grad`` setter already refuses another shape,
        dtype or device).
        """
        params, group_index = self._flat()
        grads = [p.grad for p in params]
        groups = self.param_groups
        for grp in groups:
            for name in ("weight_decay", "eps"):
                if isinstance(grp[name], Tensor):  # comparing or converting it would sync
                    raise TypeError(
                        f"param group {name} must be a float, got a tensor: {name} is read on "
                        "the host; only lr may be a device tensor (e.g. for CUDA graphs)"
                    )
        key = (tuple([g is not None for g in grads]), tuple([grp["weight_decay"] == 0 for grp in groups]))
        layouts = self._host_cache.setdefault("layouts", {})
        layout = layouts.get(key)
        if layout is None:
            layout = self._new_layout(params, grads, group_index)
            if len(layouts) >= 8:  # patterns churn only with changing frozen sets: keep a few
                layouts.clear()
            layouts[key] = layout
        step_grads = [grads[i] for i in layout.indices]
        if any(map(_IS_SPARSE, step_grads)):  # a layout built from dense ones is reused
            self._refuse_sparse_gradients()
        lr, wd, eps, decay = self._group_vectors(layout)
        return StepPlan(
            params=layout.params,
            grads=step_grads,
            indices=layout.indices,
            num_plain=layout.num_plain,
            decay=decay,
            lr=lr,
            weight_decay=wd,
            eps=eps,
            layout=layout,
        )

    def _new_layout(self, params: list[Tensor], grads: list[Tensor | None], group_index: list[int]) -> StepLayout:
        plain, decayed = [], []
        for flat, (p, g, gi) in enumerate(zip(params, grads, group_index)):
            if g is None:
                continue
            if g.is_sparse:
                self._refuse_sparse_gradients()
            if g.shape != p.shape:
                raise RuntimeError(f"grad of shape {tuple(g.shape)} for a param of shape {tuple(p.shape)}")
            (plain if self.param_groups[gi]["weight_decay"] == 0 else decayed).append(flat)
        indices = plain + decayed
        return StepLayout(
            indices=indices,
            params=[params[i] for i in indices],
            group_of=[group_index[i] for i in indices],
            num_plain=len(plain),
        )

    def _refuse_sparse_gradients(self):
        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    def _upload(self, values: list[float]) -> Tensor:
        """A float64 device vector of ``values`` (pinned source, asynchronous copy)."""
        host = torch.tensor(values, dtype=FLOAT)
        if self._device.type == "cuda":
            host = host.pin_memory()
        return host.to(self._device, non_blocking=True)

    def _group_vectors(self, layout: StepLayout) -> tuple[Tensor, Tensor, Tensor, list[float]]:
        """(lr, weight_decay, eps) as [k] float64 device vectors and the host weight decays of
        the decayed tensors. Float values are uploaded only when they change (an lr schedule
        uploads one vector per step, weight decay and eps stay); tensor learning rates (e.g.
        for graph capture) stay on the device and are gathered every step (a tensor is never
        compared on the host)."""
        groups = self.param_groups
        vectors = layout.vectors
        wd_eps = tuple([(grp["weight_decay"], grp["eps"]) for grp in groups])
        cached = vectors.get("wd_eps")
        if cached is None or cached[0] != wd_eps:
            wd = [float(groups[g]["weight_decay"]) for g in layout.group_of]
            eps = [float(groups[g]["eps"]) for g in layout.group_of]
            cached = (wd_eps, self._upload(wd), self._upload(eps), wd[layout.num_plain:])
            vectors["wd_eps"] = cached
        _, wd, eps, decay = cached
        lrs = tuple([grp["lr"] for grp in groups])
        if any(isinstance(v, Tensor) for v in lrs):
            per_group = [
                v.detach().to(device=self._device, dtype=FLOAT).reshape(())
                if isinstance(v, Tensor)
                else torch.full((), float(v), dtype=FLOAT, device=self._device)
                for v in lrs
            ]
            lr = torch.stack([per_group[g] for g in layout.group_of]) if layout.group_of else wd.new_zeros(0)
            return lr, wd, eps, decay
        cached = vectors.get("lr")
        if cached is None or cached[0] != lrs:
            cached = (lrs, self._upload([float(groups[g]["lr"]) for g in layout.group_of]))
            vectors["lr"] = cached
        return cached[1], wd, eps, decay

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The usual ``Optimizer`` state dict plus a ``"koala"`` entry with the global filter
        (float64, never cast to a parameter's dtype), the filter hyper-parameters and whether
        a predict is pending."""
        self._settle_filter()
        state = super().state_dict()
        state["koala"] = {
            "filter": {k: v.detach().clone() for k, v in self._filter.items()},
            "hyper": dict(self._hyper),
            "predicted": self._predicted,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        koala = state_dict.pop("koala", None)
        if koala is None:
            raise ValueError(f"state_dict has no 'koala' entry: it was not saved by {type(self).__name__}")
        if set(koala["filter"]) != set(self._filter) or set(koala["hyper"]) != set(self._hyper):
            raise ValueError(f"state_dict was saved by a different optimizer than {type(self).__name__}")
        super().load_state_dict(state_dict)
        for key, value in koala["filter"].items():
            # copy_ into the existing tensors keeps their dtype (float64) and identity.
            self._filter[key].copy_(value.to(self._filter[key].dtype))
        self._hyper.update(koala["hyper"])
        self._predicted = bool(koala["predicted"])
        # Deferred work of the implementation (a pending predict tail) belonged to the replaced
        # filter; tables and buffers are rebuilt on the next step. The state tensors were
        # replaced too, so cached lists of them go.
        self._impl_cache.clear()
        self._host_cache.clear()

    # ------------------------------------------------------------------ subclass hooks
    def _initial_filter(self) -> dict[str, float]:
        raise NotImplementedError

    def _predict(self) -> None:
        raise NotImplementedError

    def _measure(self, loss: Tensor, loss_sq_mean: Tensor | None) -> None:
        raise NotImplementedError

