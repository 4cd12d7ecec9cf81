"""What one measurement update works on, and the planner that works it out cheaply.

``StepPlanner`` turns the optimizer's param groups into a ``StepPlan`` each step: the tensors
with a gradient (zero-weight-decay groups first) and their per-tensor group values as device
vectors. Its host cost per step is a few list passes: the flat parameter list, the layout
(which tensors, in which order) and the device vectors are cached and rebuilt only when what
they depend on changes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._distributed import any_dtensor, local_tensors

FLOAT = torch.float64
_IS_SPARSE = operator.attrgetter("is_sparse")
_MAX_LAYOUTS = 8  # patterns churn only with changing frozen sets: keep a few


@dataclass
class StepLayout:
    """Which tensors a step updates and in which order; cached while the same tensors have
    gradients and the same groups have zero weight decay.

    Attributes:
        indices: [k] position of each updated tensor in the optimizer's flat parameter list,
            zero-weight-decay groups first.
        params: [k] the parameters at those positions.
        group_of: [k] param-group index of each.
        num_plain: how many leading tensors have weight_decay == 0.
        wd_eps: cached ((weight_decay, eps) of every group, [k] weight decay vector, [k] eps
            vector, host weight decays of the decayed tensors), or None.
        lr: cached (lr of every group, [k] lr vector), or None.
        state_lists: cached per-tensor state lists of ``params`` (KOALA-M's velocities and
            averages; their local shards for DTensors), or None.
        sharded: some of ``params`` are DTensors (FSDP2): a plan holds their local shards.
    """

    indices: list[int]
    params: list[Tensor]
    group_of: list[int]
    num_plain: int
    wd_eps: tuple | None = None
    lr: tuple | None = None
    state_lists: tuple | None = None
    sharded: bool = False


@dataclass
class StepPlan:
    """The parameter tensors that have a gradient this step, in update order.

    Tensors whose group has ``weight_decay == 0`` come first (``num_plain`` of them), so the
    regularised gradient is only formed for the rest.

    Attributes:
        params, grads: [k] lists; grads[i] has params[i]'s shape (dense). For DTensor
            parameters (FSDP2), this rank's local shards (views: updating them updates the
            parameters); ``layout.params`` holds the parameters themselves.
        indices: [k] position of each tensor in the optimizer's flat parameter list.
        num_plain: how many leading tensors have weight_decay == 0.
        decay: host floats, the weight decay of each of the trailing k - num_plain tensors.
        lr, weight_decay, eps: [k] float64 device vectors, each tensor's group values.
        layout: the cached layout this plan was made from (``params`` and ``indices`` are its
            lists: read them, do not mutate them).
        grad_scale: a ``GradScaler``'s scale S (float32 device scalar): the gradients hold S·g;
            None when they are not scaled.
        found_inf: a ``GradScaler``'s inf flag (float32 device scalar, non-zero: skip the
            update); None without a scaler.
        collective: with DTensor parameters on several ranks, the ``_distributed.StepReduction``
            that makes this rank's per-tensor sums (and the loss) global; else None.
    """

    params: list[Tensor]
    grads: list[Tensor]
    indices: list[int]
    num_plain: int
    decay: list[float]
    lr: Tensor
    weight_decay: Tensor
    eps: Tensor
    layout: StepLayout | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    collective: object | None = None


@dataclass
class _Flat:
    key: tuple
    lists: list  # the groups' params lists (held so their ids cannot be reused while cached)
    params: list[Tensor]
    group_index: list[int]
    sharded: bool = False  # some parameters are DTensors


@dataclass
class StepPlanner:
    """The host-side caches of the optimizer's steps (never checkpointed).

    Attributes:
        optimizer_name: for error messages.
    """

    optimizer_name: str
    _flat: _Flat | None = None
    _layouts: dict = field(default_factory=dict)
    _all_state_lists: tuple | None = None
    #: steps whose layout came from the cache / had to be built (``info``)
    layout_hits: int = 0
    layout_misses: int = 0

    def info(self) -> dict[str, int]:
        return {"layout_hits": self.layout_hits, "layout_misses": self.layout_misses}

    def clear(self) -> None:
        """Forget everything (after ``load_state_dict``: the state tensors were replaced)."""
        self._flat = None
        self._layouts = {}
        self._all_state_lists = None

    # ------------------------------------------------------------------ parameters
    def flat(self, param_groups: list[dict]) -> tuple[list[Tensor], list[int]]:
        """(params, group index of each) in flat order, rebuilt when a group's params list
        is replaced or changes length (``add_param_group``, or a user editing the list).
        Rebuilding drops every cached layout."""
        lists = [group["params"] for group in param_groups]
        key = tuple([(id(ps), len(ps)) for ps in lists])
        if self._flat is not None and self._flat.key == key:
            return self._flat.params, self._flat.group_index
        params, group_index = [], []
        for gi, ps in enumerate(lists):
            params.extend(ps)
            group_index.extend([gi] * len(ps))
        self.clear()
        self._flat = _Flat(key, lists, params, group_index, any_dtensor(params))
        return params, group_index

    def all_state_lists(self, param_groups: list[dict], state, keys: tuple[str, ...]) -> tuple:
        """(params, then per key the list of ``state[p][key]`` of every parameter), cached; for
        DTensor parameters their local shards (the parameters' taken each call: FSDP2 may
        replace a parameter's local view)."""
        params, _ = self.flat(param_groups)  # first: a rebuilt flat list clears the caches
        sharded = self._flat.sharded
        if self._all_state_lists is None:
            lists = tuple([state[p][key] for p in params] for key in keys)
            self._all_state_lists = tuple(local_tensors(ts) for ts in lists) if sharded else lists
        return (local_tensors(params) if sharded else params, *self._all_state_lists)

    @staticmethod
    def state_lists(plan: StepPlan, state, keys: tuple[str, ...]) -> tuple:
        """Per key the list of ``state[p][key]`` of the plan's tensors (their local shards for
        DTensors), cached in its layout."""
        layout = plan.layout
        if layout.state_lists is None:
            lists = tuple([state[p][key] for p in layout.params] for key in keys)
            layout.state_lists = tuple(local_tensors(ts) for ts in lists) if layout.sharded else lists
        return layout.state_lists

    # ------------------------------------------------------------------ a step
    def plan(self, param_groups: list[dict], device: torch.device) -> StepPlan:
        """The tensors with a gradient (zero-weight-decay groups first) and their group values.

        Gradients are checked (dense, the parameter's shape) when a layout is built; later
        steps with the same pattern check density only (torch's ``.grad`` setter already
        refuses another shape, dtype or device).

        Raises:
            TypeError: a group's weight_decay or eps is a tensor (reading it would sync).
            RuntimeError: a sparse gradient, or a gradient of another shape.
        """
        params, group_index = self.flat(param_groups)
        grads = [p.grad for p in params]
        for grp in param_groups:
            for name in ("weight_decay", "eps"):
                if isinstance(grp[name], Tensor):  # comparing or converting it would sync
                    raise TypeError(
                        f"param group {name} must be a float, got a tensor: {name} is read on "
                        "the host; only lr may be a device tensor (e.g. for CUDA graphs)"
                    )
        key = (tuple([g is not None for g in grads]), tuple([grp["weight_decay"] == 0 for grp in param_groups]))
        layout = self._layouts.get(key)
        if layout is not None:
            self.layout_hits += 1
        else:
            self.layout_misses += 1
            layout = self._new_layout(param_groups, params, grads, group_index)
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            self._layouts[key] = layout
        step_grads = [grads[i] for i in layout.indices]
        if any(map(_IS_SPARSE, step_grads)):  # a layout built from dense ones is reused
            self._refuse_sparse_gradients()
        lr, wd, eps, decay = self._group_vectors(param_groups, layout, device)
        step_params = layout.params
        if layout.sharded:  # FSDP2: the passes work on this rank's shards
            step_params, step_grads = local_tensors(step_params), local_tensors(step_grads)
        return StepPlan(params=step_params, grads=step_grads, indices=layout.indices,
                        num_plain=layout.num_plain, decay=decay, lr=lr, weight_decay=wd, eps=eps,
                        layout=layout)

    def _new_layout(self, param_groups, params, grads, group_index) -> StepLayout:
        plain, decayed = [], []
        for flat, (p, g, gi) in enumerate(zip(params, grads, group_index)):
            if g is None:
                continue
            if g.is_sparse:
                self._refuse_sparse_gradients()
            if g.shape != p.shape:
                raise RuntimeError(f"grad of shape {tuple(g.shape)} for a param of shape {tuple(p.shape)}")
            (plain if param_groups[gi]["weight_decay"] == 0 else decayed).append(flat)
        indices = plain + decayed
        step_params = [params[i] for i in indices]
        return StepLayout(indices=indices, params=step_params, group_of=[group_index[i] for i in indices],
                          num_plain=len(plain), sharded=any_dtensor(step_params))

    def _refuse_sparse_gradients(self):
        raise RuntimeError(f"{self.optimizer_name} does not support sparse gradients")

    @staticmethod
    def _upload(values: list[float], device: torch.device) -> Tensor:
        """A float64 device vector of ``values`` (pinned source, asynchronous copy)."""
        host = torch.tensor(values, dtype=FLOAT)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    def _group_vectors(self, groups, layout: StepLayout, device) -> tuple[Tensor, Tensor, Tensor, list[float]]:
        """(lr, weight_decay, eps) as [k] float64 device vectors and the host weight decays of
        the decayed tensors. Float values are uploaded only when they change (an lr schedule
        uploads one vector per step, weight decay and eps stay); tensor learning rates (e.g.
        for graph capture) stay on the device and are gathered every step (a tensor is never
        compared on the host)."""
        wd_eps = tuple([(grp["weight_decay"], grp["eps"]) for grp in groups])
        cached = layout.wd_eps
        if cached is None or cached[0] != wd_eps:
            wd = [float(groups[g]["weight_decay"]) for g in layout.group_of]
            eps = [float(groups[g]["eps"]) for g in layout.group_of]
            cached = (wd_eps, self._upload(wd, device), self._upload(eps, device), wd[layout.num_plain:])
            layout.wd_eps = cached
        _, wd, eps, decay = cached
        lrs = tuple([grp["lr"] for grp in groups])
        if any(isinstance(v, Tensor) for v in lrs):
            per_group = [
                v.detach().to(device=device, dtype=FLOAT).reshape(())
                if isinstance(v, Tensor)
                else torch.full((), float(v), dtype=FLOAT, device=device)
                for v in lrs
            ]
            lr = torch.stack([per_group[g] for g in layout.group_of]) if layout.group_of else wd.new_zeros(0)
            return lr, wd, eps, decay
        cached = layout.lr
        if cached is None or cached[0] != lrs:
            cached = (lrs, self._upload([float(groups[g]["lr"]) for g in layout.group_of], device))
            layout.lr = cached
        return cached[1], wd, eps, decay
