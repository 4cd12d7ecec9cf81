"""The loss a measurement update observes: validated on the host, reduced by the backend.

KOALA's observation is the minibatch loss L (its mean) and, when the measurement noise R is
estimated, the mean of the squared per-sample losses. Both backends take a ``LossInput``:
the PyTorch backend reduces it with torch ops (``LossInput.moments``), the Triton backend
inside its filter kernel (no extra launch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT = torch.float64


@dataclass
class LossInput:
    """A validated loss, before its moments are taken.

    Attributes:
        loss: the per-sample losses [B] (B >= 1) or the mean loss [], detached, on the
            parameters' device, in the dtype it was given (a Python float becomes float64).
        loss_var: with a scalar loss and adaptive R, the mean of squared per-sample losses []
            (same conventions); else None.
        adaptive: R is estimated (``r=None``): the second moment is needed.
        floor: the loss's known lower bound f (``loss_floor``): the update observes L − f.
    """

    loss: Tensor
    loss_var: Tensor | None
    adaptive: bool
    floor: float = 0.0

    @property
    def per_sample(self) -> bool:
        return self.loss.dim() == 1

    def moments(self) -> tuple[Tensor, Tensor | None]:
        """(mean, mean of squares or None) of the loss above its floor, l − f, as float64
        0-dim tensors, with torch ops (the Triton filter kernel evaluates the same
        expressions)."""
        f = self.floor
        if self.per_sample:
            shifted = self.loss.to(FLOAT) - f
            return shifted.mean(), (shifted * shifted).mean() if self.adaptive else None
        raw = self.loss.to(FLOAT)
        if not self.adaptive:
            return raw - f, None
        # mean of (l − f)² = mean of l² − 2f·mean of l + f²
        return raw - f, (self.loss_var.to(FLOAT) - raw * (2.0 * f)) + f * f


def _scalar(name: str, value, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor, got {value.dtype}")
        # The dtype is kept: the backend converts to float64 (the Triton backend inside its
        # filter kernel, so that no conversion op runs).
        return value.detach().to(device=device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a tensor or a float, got {type(value).__name__}")
    # torch.full is a device fill (no host-to-device copy, no synchronisation).
    return torch.full((), float(value), dtype=FLOAT, device=device)


def validate(loss, loss_var, *, adaptive: bool, device: torch.device, floor: float = 0.0) -> LossInput:
    """Check ``loss`` (per-sample [B], or a mean: 0-dim tensor or float) and ``loss_var``.

    Raises:
        TypeError, ValueError: naming the argument; nothing has changed yet.
    """
    loss_t = _scalar("loss", loss, device)
    if loss_t.dim() == 1:
        if loss_t.numel() == 0:
            raise ValueError("loss: the per-sample loss vector is empty")
        if loss_var is not None:
            raise ValueError("loss_var must not be given with per-sample losses (it is computed from them)")
        return LossInput(loss_t, None, adaptive, floor)
    if loss_t.dim() != 0:
        raise ValueError(f"loss must be a scalar or a 1-D tensor of per-sample losses, got shape {tuple(loss_t.shape)}")
    if not adaptive:
        return LossInput(loss_t, None, adaptive, floor)
    if loss_var is None:
        raise ValueError(
            "loss_var is required with a scalar loss when R is estimated (r=None): pass the "
            "per-sample losses as loss (or to observe()), or loss_var = mean of squared "
            "per-sample losses, or set r"
        )
    var_t = _scalar("loss_var", loss_var, device)
    if var_t.dim() != 0:
        raise ValueError(f"loss_var must be a scalar, got shape {tuple(var_t.shape)}")
    return LossInput(loss_t, var_t, adaptive, floor)


def combine(first: LossInput, second: LossInput) -> LossInput:
    """Two observations of one update (gradient accumulation): per-sample vectors concatenated,
    scalar losses and their ``loss_var`` averaged with equal weights (on the device).

    Raises:
        ValueError: one is per-sample and the other a scalar.
    """
    if first.per_sample != second.per_sample:
        raise ValueError("observe(): per-sample losses and scalar losses cannot be combined for one update; "
                         "hand over the same form every time")
    if first.per_sample:
        return LossInput(torch.cat([first.loss.to(FLOAT), second.loss.to(FLOAT)]), None, first.adaptive, first.floor)
    var = None if first.loss_var is None else (first.loss_var.to(FLOAT) + second.loss_var.to(FLOAT)) / 2
    return LossInput((first.loss.to(FLOAT) + second.loss.to(FLOAT)) / 2, var, first.adaptive, first.floor)
