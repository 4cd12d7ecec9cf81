"""Parameter sets of real models, rebuilt from their architectures as lists of shapes.

No torchvision or transformers here: each builder lists the trainable tensors exactly as
``model.parameters()`` yields them (weights and biases, no buffers), so the optimizer sees the
same tensor count and sizes as it would on the real model.

====================  ===========  =======  ======================================
set                   parameters   tensors  source
====================  ===========  =======  ======================================
resnet18               11,689,512       62  torchvision ``resnet18()`` (1000 classes)
resnet50               25,557,032      161  torchvision ``resnet50()``
gpt2-small            124,439,808      148  HF ``GPT2Model`` (lm_head tied to wte)
gpt2-medium           354,823,168      292  HF ``GPT2Model``, 24 layers, d = 1024
many-small-NxK           N * K * 1024    N  N tensors of K*1024 elements (launch-bound)
huge-1xM                 M * 2**20       1  one tensor (bandwidth-bound)
====================  ===========  =======  ======================================

The smoke sets keep the tensor counts (what launch overhead scales with) and shrink the sizes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


def resnet_shapes(blocks: tuple[int, ...], bottleneck: bool, width: int = 64,
                  num_classes: int = 1000) -> list[Shape]:
    """torchvision ResNet: conv1 7x7, bn1, four stages of Basic/Bottleneck blocks, fc."""
    expansion = 4 if bottleneck else 1
    shapes: list[Shape] = [(width, 3, 7, 7), (width,), (width,)]  # conv1 (no bias), bn1 w, b
    in_ch = width
    for stage, n_blocks in enumerate(blocks):
        planes = width * 2 ** stage
        for b in range(n_blocks):
            stride = 2 if (stage > 0 and b == 0) else 1
            if bottleneck:
                shapes += [(planes, in_ch, 1, 1), (planes,), (planes,),
                           (planes, planes, 3, 3), (planes,), (planes,),
                           (planes * expansion, planes, 1, 1),
                           (planes * expansion,), (planes * expansion,)]
            else:
                shapes += [(planes, in_ch, 3, 3), (planes,), (planes,),
                           (planes, planes, 3, 3), (planes,), (planes,)]
            if stride != 1 or in_ch != planes * expansion:  # downsample: conv1x1 + bn
                shapes += [(planes * expansion, in_ch, 1, 1),
                           (planes * expansion,), (planes * expansion,)]
            in_ch = planes * expansion
    shapes += [(num_classes, in_ch), (num_classes,)]  # fc weight, bias
    return shapes


def gpt2_shapes(n_layer: int, d_model: int, vocab: int = 50257, n_ctx: int = 1024) -> list[Shape]:
    """HF GPT2Model: wte, wpe, per block (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
    mlp.c_proj; Conv1D weights are [in, out]) and ln_f. The LM head is tied to wte."""
    d = d_model
    shapes: list[Shape] = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,),                 # ln_1
                   (d, 3 * d), (3 * d,),       # attn.c_attn
                   (d, d), (d,),               # attn.c_proj
                   (d,), (d,),                 # ln_2
                   (d, 4 * d), (4 * d,),       # mlp.c_fc
                   (4 * d, d), (d,)]           # mlp.c_proj
    shapes += [(d,), (d,)]                     # ln_f
    return shapes


_NAMED = {
    "resnet18": lambda: resnet_shapes((2, 2, 2, 2), bottleneck=False),
    "resnet50": lambda: resnet_shapes((3, 4, 6, 3), bottleneck=True),
    "gpt2-small": lambda: gpt2_shapes(12, 768),
    "gpt2-medium": lambda: gpt2_shapes(24, 1024),
    # Smoke-size twins: same tensor counts, fewer parameters.
    "resnet18-w16": lambda: resnet_shapes((2, 2, 2, 2), bottleneck=False, width=16),
    "gpt2-tiny": lambda: gpt2_shapes(12, 64, vocab=4096, n_ctx=256),
}


def shapes_of(name: str) -> list[Shape]:
    """Shapes of a named set; ``many-small-NxK`` and ``huge-1xM`` are generated."""
    if name in _NAMED:
        return _NAMED[name]()
    m = re.fullmatch(r"many-small-(\d+)x(\d+)K", name)
    if m:
        return [(int(m.group(2)) * 1024,)] * int(m.group(1))
    m = re.fullmatch(r"huge-1x(\d+)M", name)
    if m:
        return [(int(m.group(1)) * 2 ** 20,)]
    raise KeyError(f"unknown parameter set {name!r}; known: {sorted(_NAMED)}, "
                   "many-small-<N>x<K>K, huge-1x<M>M")


@dataclass
class ParamSet:
    """Leaf parameter tensors with random gradients already attached."""

    name: str
    dtype: torch.dtype
    params: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def build(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> ParamSet:
    """Random weights (N(0, 0.02)) and random, nonzero gradients (N(0, 1e-2)).

    Gradients are set once and never zeroed: every benchmark iteration sees the same random
    gradient, so no step is ever timed on zeros.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes_of(name):
        p = torch.empty(shape, device=device, dtype=dtype)
        p.normal_(0.0, 0.02, generator=gen)
        g = torch.empty_like(p).normal_(0.0, 1e-2, generator=gen)
        p.requires_grad_(True)
        p.grad = g
        params.append(p)
    return ParamSet(name, dtype, params)


def count(name: str) -> tuple[int, int]:
    """(parameters, tensors) of a named set, without allocating it."""
    shapes = shapes_of(name)
    return sum(math.prod(s) for s in shapes), len(shapes)
