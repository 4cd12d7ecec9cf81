"""The PyTorch path never reads a device value on the host inside predict/step.

On CPU there is no CUDA sync-debug mode, so the test forbids the host reads themselves:
``Tensor.item``, ``tolist``, ``__bool__`` (a Python ``if`` on a tensor), ``__float__``,
``__int__`` and ``__index__`` raise while a step runs. Each of them is a device-to-host
synchronisation on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import forbid_host_reads
from tests.variants import variant_params


def test_the_guard_itself_catches_a_host_read():
    t = torch.ones(())
    with forbid_host_reads(), pytest.raises(AssertionError, match="host read"):
        if t > 0:  # noqa: SIM108 - the point is the implicit __bool__
            pass


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("r", [None, 0.5], ids=["adaptive-R", "fixed-R"])
def test_predict_and_step_do_not_read_device_values(variant, r):
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    c = torch.randn(4, requires_grad=True)
    opt = variant.cls([{"params": [a, b]}, {"params": [c], "weight_decay": 0.1, "lr": torch.tensor(0.5)}], r=r)
    for step in range(3):
        a.grad = torch.randn(5, 3)
        b.grad = None if step == 1 else torch.full((3,), float("nan") if step == 2 else 1.0)
        c.grad = torch.randn(4)
        losses = torch.rand(6)
        with forbid_host_reads():
            opt.predict()
            opt.step(loss=losses)
    assert int(opt.filter_state["skipped_steps"]) == 1
