"""Conformance suite: koala_triton against the formal oracle (``oracle/``).

Every test collected from this directory carries the ``conformance`` marker (select the suite
with ``python -m pytest -m conformance``).

``IMPLEMENTATIONS`` lists the constructor kwargs of every implementation the suite runs; tests
take one through the ``impl`` fixture and tensors go on the ``device`` fixture. The PyTorch path
is always there. The Triton path joins when ``koala_triton.triton_available()`` and it can run
here: on a CUDA device (real kernels), or on the CPU under ``TRITON_INTERPRET=1`` (Triton's
interpreter; the suite's sizes are tiny for that reason). Kernel authors: extend this list if
a new path appears.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import koala_triton
from tests.conformance.harness import interpreter_enabled

_HERE = Path(__file__).resolve().parent


def _implementations() -> list:
    out = [pytest.param({"fused": False}, id="torch")]
    available = getattr(koala_triton, "triton_available", None)
    if available is not None and available():
        if torch.cuda.is_available():
            out.append(pytest.param({"fused": True}, id="triton", marks=pytest.mark.gpu))
        elif interpreter_enabled():
            out.append(pytest.param({"fused": True}, id="triton-interpreter",
                                    marks=pytest.mark.interpreter))
    return out


#: Constructor kwargs of each implementation under test (see the module docstring).
IMPLEMENTATIONS = _implementations()


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request) -> dict:
    return dict(request.param)


@pytest.fixture
def device(impl) -> torch.device:
    """Where the implementation's tensors live: CUDA for the Triton kernels on a GPU."""
    if impl.get("fused") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees every collected item of the session: mark only this directory's.
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.conformance)
