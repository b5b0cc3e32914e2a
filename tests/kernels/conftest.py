"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET=1`` is set once, in the root ``tests/conftest.py`` (pytest loads it before any
test module); the kernels compile at their first launch, so they are built for the interpreter.
``test_dispatch.py`` checks that they are.
"""

from __future__ import annotations

import pytest
import torch

# Design section 5: relative error against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (0 when both are all zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff if scale == 0 else diff / scale


@pytest.fixture
def rel_err():
    """The relative-error function ``rel_err(actual, expected) -> float``."""
    return _rel_err


@pytest.fixture
def tol():
    """Tolerance per dtype (design section 5): fp32 1e-5, bf16 2e-2."""
    return TOLERANCE
