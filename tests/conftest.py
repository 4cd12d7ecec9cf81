"""Shared fixtures: small parameter sets with the awkward cases KOALA must handle."""

from __future__ import annotations

import pytest
import torch


def make_params(dtype=torch.float64, seed=0):
    """Eight leaf tensors: matrices, a bias, a 0-dim scalar, an empty tensor, a
    non-contiguous (transposed) matrix, and a large-ish vector."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (), (0,), (7, 2), (11,), (4, 4), (257,)]
    params = []
    for i, shape in enumerate(shapes):
        if i == 4:  # non-contiguous: a transposed (2, 7) buffer
            base = torch.randn(2, 7, generator=g, dtype=torch.float64).t()
            t = torch.empty_strided(shape, (1, 7), dtype=dtype).copy_(base)
            assert not t.is_contiguous()
        else:
            t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        params.append(t.requires_grad_())
    return params


@pytest.fixture
def params64():
    return make_params(torch.float64)
