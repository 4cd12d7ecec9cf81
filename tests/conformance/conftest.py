"""Conformance suite: koala_triton against the formal oracle (``oracle/``).

Every test collected from this directory carries the ``conformance`` marker (select the suite
with ``python -m pytest -m conformance``).

``IMPLEMENTATIONS`` lists the constructor kwargs of every implementation the suite runs; tests
take one through the ``impl`` fixture and tensors go on the ``device`` fixture. The PyTorch path
is always there. The Triton path joins when ``koala_triton.triton_available()`` and it can run
here: on a CUDA device (real kernels), or on the CPU under ``TRITON_INTERPRET=1`` (Triton's
interpreter; the suite's sizes are tiny for that reason). Kernel authors: extend this list if
a new path appears.

``IMPLEMENTATIONS_M`` (fixtures ``impl_m``, ``device_m``) adds what only KoalaM has: its
Triton-only modes (``tests/variants.py``: fold mode, ``fold_predict=True``), wherever the Triton
path joins. The KoalaM conformance tests run it (``harness`` knows its state layout between
steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import koala_triton
from tests.conformance.harness import interpreter_enabled
from tests.variants import VARIANTS

_HERE = Path(__file__).resolve().parent


def _triton_runs_here() -> str | None:
    """"cuda", "interpreter", or None when the Triton path cannot run here."""
    available = getattr(koala_triton, "triton_available", None)
    if available is None or not available():
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "interpreter" if interpreter_enabled() else None


def _triton(kwargs: dict, suffix: str = "") -> list:
    where = _triton_runs_here()
    if where == "cuda":
        return [pytest.param({"fused": True, **kwargs}, id="triton" + suffix, marks=pytest.mark.gpu)]
    if where == "interpreter":
        return [pytest.param({"fused": True, **kwargs}, id="triton-interpreter" + suffix,
                             marks=pytest.mark.interpreter)]
    return []


#: Constructor kwargs of each implementation under test (see the module docstring).
IMPLEMENTATIONS = [pytest.param({"fused": False}, id="torch")] + _triton({})


def implementations(variant) -> list:
    """``IMPLEMENTATIONS`` and the variant's Triton-only modes (id suffix: the mode's name)."""
    return IMPLEMENTATIONS + [param for mode in variant.modes if mode.triton_only
                              for param in _triton(dict(mode.kwargs), f"-{mode.name}")]


#: KoalaM's: the above and fold mode (Triton path only).
IMPLEMENTATIONS_M = implementations(VARIANTS["M"])


def _device_of(impl: dict) -> torch.device:
    """Where the implementation's tensors live: CUDA for the Triton kernels on a GPU."""
    if impl.get("fused") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request) -> dict:
    return dict(request.param)


@pytest.fixture
def device(impl) -> torch.device:
    return _device_of(impl)


@pytest.fixture(params=IMPLEMENTATIONS_M)
def impl_m(request) -> dict:
    return dict(request.param)


@pytest.fixture
def device_m(impl_m) -> torch.device:
    return _device_of(impl_m)


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees every collected item of the session: mark only this directory's.
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.conformance)
