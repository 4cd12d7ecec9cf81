"""What one measurement update works on: the tensors with a gradient and their group values."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StepLayout:
    """Which tensors a step updates and in which order; cached by the optimizer while the same
    tensors have gradients and the same groups have zero weight decay.

    Attributes:
        indices: [k] position of each updated tensor in the optimizer's flat parameter list,
            zero-weight-decay groups first.
        params: [k] the parameters at those positions.
        group_of: [k] param-group index of each.
        num_plain: how many leading tensors have weight_decay == 0.
        vectors: the optimizer's cached device vectors of this layout's group values.
        lists: cached per-tensor lists keyed by their owner (e.g. KOALA-M's state tensors).
    """

    indices: list[int]
    params: list[Tensor]
    group_of: list[int]
    num_plain: int
    vectors: dict = field(default_factory=dict)
    lists: dict = field(default_factory=dict)


@dataclass
class StepPlan:
    """The parameter tensors that have a gradient this step, in update order.

    Tensors whose group has ``weight_decay == 0`` come first (``num_plain`` of them), so the
    regularised gradient is only formed for the rest.

    Attributes:
        params, grads: [k] lists; grads[i] has params[i]'s shape (dense).
        indices: [k] position of each tensor in the optimizer's flat parameter list.
        num_plain: how many leading tensors have weight_decay == 0.
        decay: host floats, the weight decay of each of the trailing k - num_plain tensors.
        lr, weight_decay, eps: [k] float64 device vectors, each tensor's group values.
        layout: the cached layout this plan was made from (``params`` and ``indices`` are its
            lists: read them, do not mutate them).
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
    extras: dict = field(default_factory=dict)
