"""The PyTorch path's steady-state steps allocate nothing of a parameter's size on the CPU
(with and without weight decay): its scratch buffers are kept between steps there, because
fresh parameter-sized allocations cost page faults that outweigh the arithmetic. (On CUDA the
caching allocator makes them cheap, and the path allocates them per step.)"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.variants import VARIANTS


class NewStorages(TorchDispatchMode):
    """Records every op output whose storage is new (not any input's, ``out=`` included) and
    holds at least ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.allocations: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        known = {t.untyped_storage().data_ptr() for t in inputs}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in known:
                self.allocations.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4], ids=["wd0", "wd"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_a_steady_state_step_allocates_no_parameter_sized_tensor(variant, weight_decay):
    info = VARIANTS[variant]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(300, 100, generator=gen).requires_grad_(), torch.randn(20_000, generator=gen).requires_grad_(),
              torch.randn(20_000, generator=gen).to(torch.bfloat16).requires_grad_()]
    groups = [{"params": params[:1]}, {"params": params[1:], "weight_decay": weight_decay}]
    opt = info.cls(groups, fused=False)
    seen = []
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        mode = NewStorages(numel=20_000)
        with mode:
            opt.predict()
            opt.step(loss=torch.rand(8, generator=gen))
        seen.append(mode.allocations)
    assert seen[0], "the first step builds the scratch buffers: the probe must see them"
    assert seen[2] == [], f"parameter-sized allocations in a steady-state step: {seen[2]}"
