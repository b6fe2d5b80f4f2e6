"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
from helpers import ext_or_skip

from groupnorm.kernels import cpu_ext


@pytest.fixture
def fast_path():
    """The fast-path tests need the C++ extension, which takes the whole call (a C++ autograd
    node when gradients are needed)."""
    ext_or_skip()
    if cpu_ext.extension() is None:
        pytest.skip(f"extension unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    return "extension"
