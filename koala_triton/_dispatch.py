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
    ``False``: always PyTorch. ``True``: Triton (CUDA parameters, or CPU parameters with
    ``TRITON_INTERPRET=1``: the kernels then run in Triton's interpreter, slowly, for tests)
    or a clear error.
    """
    if fused is False:
        return False
    if fused is None:
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise NotImplementedError(
            "fused=True needs the triton package, which is not installed; use fused=None or "
            "fused=False for the PyTorch path"
        )
    if device.type == "cuda":
        return True
    if device.type == "cpu" and interpreter_enabled():
        return True
    raise NotImplementedError(
        f"fused=True runs Triton kernels on CUDA parameters, but these are on {device}: move "
        "the model to a GPU, use fused=None or fused=False for the PyTorch path, or set "
        "TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter (slow; meant for "
        "tests)"
    )


def backend(use_triton: bool):
    """The backend that runs the passes (``_backend.Backend``): ``TritonBackend`` or
    ``TorchBackend``. triton is imported only here, on first use of the Triton path."""
    if use_triton:
        from ._triton_backend import TritonBackend

        return TritonBackend()
    from ._torch_backend import TorchBackend

    return TorchBackend()
