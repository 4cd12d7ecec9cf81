"""What one measurement update works on: the tensors with a gradient and their group values."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


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
    """

    params: list[Tensor]
    grads: list[Tensor]
    indices: list[int]
    num_plain: int
    decay: list[float]
    lr: Tensor
    weight_decay: Tensor
    eps: Tensor
    extras: dict = field(default_factory=dict)
