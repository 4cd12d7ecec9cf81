"""Choosing between the PyTorch path and the Triton kernels (the ``fused`` argument)."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is never imported at package import)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(fused: bool | None, device: torch.device) -> bool:
    """Return True for the Triton path, False for the PyTorch path.

    ``None``: Triton for CUDA parameters when triton is importable, else PyTorch.
    ``False``: always PyTorch. ``True``: Triton or a clear error.
    """
    if fused is False:
        return False
    if fused is None:
        return device.type == "cuda" and triton_available() and kernels_implemented()
    if not kernels_implemented():
        raise NotImplementedError(
            "fused=True: the Triton kernels are not implemented yet; use fused=None or fused=False "
            "for the PyTorch path"
        )
    return True


def kernels_implemented() -> bool:
    """Whether the Triton path exists in this version of the package."""
    return False


def implementation(use_triton: bool):
    """The module that runs the passes: ``_triton_impl`` or ``_torch_impl``.

    Both expose ``koala_v_update``, ``koala_m_predict`` and ``koala_m_update`` with identical
    signatures; triton is imported only here, on first use of the Triton path.
    """
    if use_triton:
        from . import _triton_impl

        return _triton_impl
    from . import _torch_impl

    return _torch_impl
