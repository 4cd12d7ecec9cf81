"""Checks of user-supplied hyper-parameters and parameters.

Every check raises ``ValueError`` (bad value) or ``TypeError`` (bad type) naming the argument,
so a typo fails at construction time instead of corrupting weights later.
"""

from __future__ import annotations

import math
from numbers import Real

import torch


def as_float(name: str, value) -> float:
    """``value`` as a float (a real number or a one-element real tensor), or a TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point scalar tensor")
        # Construction time only: reading a device scalar here is not inside a step.
        return float(value.detach().cpu())
    return float(value)


def check_nonnegative(name: str, value) -> float:
    """Return ``value`` as a float after checking that it is finite and >= 0."""
    x = as_float(name, value)
    if not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def check_in_interval(name: str, value, low: float, high: float, *, high_open: bool) -> float:
    """Return ``value`` as a float after checking ``low <= value <= high`` (or ``< high``)."""
    x = as_float(name, value)
    upper_ok = x < high if high_open else x <= high
    if not (math.isfinite(x) and x >= low and upper_ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")
    return x


def check_finite(name: str, value) -> float:
    """Return ``value`` as a float after checking that it is finite (any sign)."""
    x = as_float(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return x


def check_optional_nonnegative(name: str, value) -> float | None:
    return None if value is None else check_nonnegative(name, value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_fused(value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"fused must be None, True or False, got {value!r}")
    return value


def measurement_settings(*, r, alpha_r, loss_floor) -> dict:
    """The measurement settings every KOALA variant shares, checked: a fixed noise ``r`` (or
    None: estimated), the estimator's ``alpha_r`` in [0, 1), a finite ``loss_floor``."""
    return dict(
        r=check_optional_nonnegative("r", r),
        alpha_r=check_in_interval("alpha_r", alpha_r, 0.0, 1.0, high_open=True),
        loss_floor=check_finite("loss_floor", loss_floor),
    )


def random_walk_settings(*, sigma, q) -> dict:
    """KOALA-V's and KOALA++'s prior variance ``sigma`` and process noise ``q`` (>= 0)."""
    return dict(sigma=check_nonnegative("sigma", sigma), q=check_nonnegative("q", q))


def check_psd_2x2(sw: float, sc: float, sv: float) -> None:
    """The initial KOALA-M covariance [[sw, sc], [sc, sv]] must be positive semi-definite."""
    if sw < 0.0 or sv < 0.0 or sw * sv - sc * sc < 0.0:
        raise ValueError(
            "the initial covariance [[sw, sc], [sc, sv]] must be positive semi-definite "
            f"(sw >= 0, sv >= 0, sw*sv >= sc**2); got sw={sw}, sc={sc}, sv={sv}"
        )


def check_param(p) -> None:
    """A parameter KOALA can optimise: a real floating-point tensor."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"params must contain tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError("params: complex parameters are not supported by KOALA")
    if not p.is_floating_point():
        raise ValueError(f"params: parameters must be floating point, got dtype {p.dtype}")
    if p.is_sparse:
        raise ValueError("params: sparse parameters are not supported by KOALA")
