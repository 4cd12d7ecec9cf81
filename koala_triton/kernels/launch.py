"""Compile-or-interpret a kernel for a device, launch it, and count the launches.

Kernels are written as plain Python functions and wrapped here, per device, instead of with
``@triton.jit`` at import: ``@triton.jit`` reads ``TRITON_INTERPRET`` once, at decoration time,
so a process that runs both CUDA kernels and CPU-interpreter checks (a GPU CI job) would get
one of them wrong. CUDA tensors get a ``JITFunction``; CPU tensors get Triton's interpreter,
which ``_dispatch`` only allows when ``TRITON_INTERPRET=1`` is set.

Block sizes are fixed per device (no autotuning, so in-place kernels are never re-run by a
tuner and need no ``restore_value``). Under the interpreter they are small, so that tiny test
tensors still cover several tiles and several chunks per tensor at interpreter speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from . import direct


@dataclass(frozen=True)
class Blocks:
    """Fixed launch geometry of the multi-tensor passes.

    Attributes:
        block: elements per tile of a 4-byte dtype (one vector op over ``block`` lanes).
        scale_block: CUDA geometry per dtype (``elementwise``); else ``block`` and the warps
            below for every dtype (the interpreter).
        chunk: elements per program; a tensor of n elements owns ceil(n / chunk) programs
            (and as many partial-sum slots). A multiple of ``block``.
        block_t: the one-program filter kernel reads block_t tensors' sums per step.
        block_f: it sweeps flat arrays (losses, distance partials) block_f elements per step.
        sum_c: the norms pass's last program of a tensor adds sum_c of its chunk partials
            per step.
        num_warps: warps per program of the elementwise passes.
        fold_warps: warps per program of the fold pass (it keeps x, u, xavg and g of a tile in
            registers: twice the warps halve each thread's share, and its registers).
    """

    block: int
    chunk: int
    block_t: int
    block_f: int
    sum_c: int
    num_warps: int
    fold_warps: int
    scale_block: bool

    def elementwise(self, element_size: int, *, fold: bool = False) -> tuple[int, int]:
        """(elements per tile, warps) of an elementwise pass over parameters of
        ``element_size`` bytes; the tile divides ``chunk``.

        CUDA: a tile is 4 KiB of each array (1024 fp32, 2048 bf16/fp16, 512 fp64 elements),
        32 bytes (two 128-bit loads) per thread and array with 4 warps, 16 bytes (one) with 8
        warps for 16-bit dtypes, whose 2048-element tiles would need too many registers at 4.
        The fold pass keeps four arrays of a tile live: 8 warps, and 1024-element tiles for
        16-bit dtypes (8-byte accesses: a 2048-element tile needs 154–160 registers with
        triton 3.6). Register counts: kernels/NOTES.md.
        """
        if not self.scale_block:
            return self.block, self.fold_warps if fold else self.num_warps
        if fold:
            return (self.block if element_size <= 4 else self.block * 4 // element_size), self.fold_warps
        return self.block * 4 // element_size, (8 if element_size == 2 else self.num_warps)


#: CUDA: 4-warp programs over tiles of 4 KiB per array (1024 fp32, 2048 bf16/fp16, 512 fp64
#: elements: 32 bytes, two 128-bit loads, per thread and array), 16,384 elements per program
#: (64 KiB of fp32 per tensor array, like torch's multi-tensor apply chunk of 65,536 elements).
#: The fold pass runs 8 warps (its registers: kernels/NOTES.md, "16-bit dtypes").
#: The filter kernel reads 1024 tensors' sums per step (one step for every model up to 1024
#: tensors) and sweeps losses and distance partials 1024 at a time; a tensor's last norms
#: program adds 1024 of its chunk partials per step (GPT-2 small's embedding, ~2,400 chunks: 3).
CUDA_BLOCKS = Blocks(block=1024, chunk=16384, block_t=1024, block_f=1024, sum_c=1024, num_warps=4, fold_warps=8,
                     scale_block=True)
#: Interpreter: 64-element tiles, 128-element chunks: a 257-element test tensor spans 3 chunks
#: (full tiles, a masked tail, a 1-element last chunk) while the interpreter's cost, which is
#: per program and per tile, stays small.
#: Tensors 32 per filter step (the 152-tensor tests take several), flat sweeps of 256, chunk
#: partials 2 per step (test tensors span up to 3 chunks: several steps, partial last steps).
INTERPRETER_BLOCKS = Blocks(block=64, chunk=128, block_t=32, block_f=256, sum_c=2, num_warps=1, fold_warps=1,
                            scale_block=False)


def blocks_for(device: torch.device) -> Blocks:
    return CUDA_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


#: Kernel launches issued by this package since import (tests read it to check that the
#: launch count per step does not depend on the number of tensors).
LAUNCHES = {"count": 0}

_wrapped: dict[tuple[int, bool], object] = {}


def kernel(fn, device: torch.device):
    """The launchable form of the plain kernel function ``fn`` for tensors on ``device``."""
    interpret = device.type != "cuda"
    key = (id(fn), interpret)
    k = _wrapped.get(key)
    if k is None:
        k = InterpretedFunction(fn) if interpret else JITFunction(fn)
        _wrapped[key] = k
    return k


_CUDA = torch.device("cuda")


def launch(fn, grid: tuple[int, ...], device: torch.device, **kwargs) -> None:
    """Launch ``fn`` on ``grid`` programs (keyword arguments only) and count it."""
    LAUNCHES["count"] += 1
    if device.type == "cuda":
        if device.index is None or device.index == torch.cuda.current_device():
            launch_compiled(fn, grid, **kwargs)  # (entering the device context costs µs)
        else:
            with torch.cuda.device(device):
                launch_compiled(fn, grid, **kwargs)
    else:
        kernel(fn, device)[grid](**kwargs)


def launch_compiled(fn, grid: tuple[int, ...], **kwargs) -> None:
    """The compiled kernel's launch on the current CUDA device: through ``JITFunction.run`` the
    first time its argument key is seen, directly afterwards (``direct.py``).
    ``tests/dry_launch.py`` runs this same call without a GPU."""
    # No fused multiply-add contraction: every product is rounded as written, like the
    # PyTorch path's separate ops (and independent of triton's changing default).
    direct.launch(fn, kernel(fn, _CUDA), grid, dict(kwargs, enable_fp_fusion=False))
