"""The one-program filter kernel's serial work does not grow with the number of tensors.

Each tensor's sums are finished in parallel by the norms pass (the last of its programs adds
its chunk partials), so the filter kernel only reads [k, 3] sums, ``block_t`` tensors per step.
With the CUDA geometry (``block_t`` = 1024) every model up to 1024 tensors takes the same
number of steps. Counted here under Triton's interpreter, where the kernel's loops run as
Python ``range`` loops: every loop iteration of the filter kernel is counted, with the CUDA
``block_t`` and ``block_f`` and the interpreter's small chunks (so tensors span chunks).
"""

from __future__ import annotations

import builtins
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from koala_triton import _triton_backend  # noqa: E402
from koala_triton.kernels import kalman  # noqa: E402
from koala_triton.kernels.launch import CUDA_BLOCKS, INTERPRETER_BLOCKS  # noqa: E402
from tests.variants import VARIANTS  # noqa: E402


def _filter_loop_iterations(cls, n_tensors: int, monkeypatch) -> int:
    counted = [0]

    def counting_range(*args):
        r = builtins.range(*args)
        counted[0] += len(r)
        return r

    geometry = dataclasses.replace(INTERPRETER_BLOCKS, block_t=CUDA_BLOCKS.block_t, block_f=CUDA_BLOCKS.block_f)
    monkeypatch.setattr(_triton_backend, "blocks_for", lambda device: geometry)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(150 + i % 7, generator=gen).requires_grad_() for i in range(n_tensors)]  # 2 chunks each
    opt = cls(params, fused=True)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.predict()
    with monkeypatch.context() as m:
        m.setattr(kalman, "range", counting_range, raising=False)
        opt.step(loss=torch.rand(16, generator=gen))
    return counted[0]


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_filter_kernel_steps_do_not_grow_with_the_number_of_tensors(variant, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cls = VARIANTS[variant].cls
    few = _filter_loop_iterations(cls, 4, monkeypatch)
    many = _filter_loop_iterations(cls, 300, monkeypatch)
    assert few > 0
    assert many == few, f"filter-kernel loop iterations: {few} with 4 tensors, {many} with 300"
