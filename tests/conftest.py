"""Shared fixtures: small parameter sets with the awkward cases KOALA must handle (the helpers
themselves are in ``tests/helpers.py``)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import reference_params


@pytest.fixture
def params64():
    return reference_params(torch.float64)
