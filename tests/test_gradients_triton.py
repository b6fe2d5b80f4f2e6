"""The gradient grid of ``test_gradients_grid.py`` on the Triton backend.

First-order gradients come from the Triton backward kernels; under ``create_graph=True`` the
backend's autograd computes them with differentiable torch operations, so the second-order
ones are checked too. All against float64. On CPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, slow), so the shapes are tiny and the grid is: every functional x
weight/bias x dtype in one layout, the other layouts and the fused activation with a residual
for float32 with both params, and gradgradcheck in float64.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import test_gradients_grid as grid  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from groupnorm.kernels.triton import kernels as tk  # noqa: E402

if not isinstance(tk._fwd_fused_kernel, InterpretedFunction):
    pytest.skip(
        "the Triton gradient grid runs in the interpreter: set TRITON_INTERPRET=1 before "
        "Triton is imported (make test does)",
        allow_module_level=True,
    )


@pytest.mark.parametrize("dtype", grid.DTYPES, ids=str)
@pytest.mark.parametrize("affine", grid.AFFINES)
@pytest.mark.parametrize("name", grid.FUNCTIONALS)
def test_backward_and_double_backward(name, affine, dtype):
    grid._compare(name, affine, dtype, "contiguous", "triton", second=True)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("name", grid.FUNCTIONALS)
def test_layouts(name, layout):
    grid._compare(name, "weight_bias", torch.float32, layout, "triton", second=True)


@pytest.mark.parametrize("name", grid.FUNCTIONALS)
def test_activation_and_residual(name):
    grid._compare(name, "weight_bias", torch.float32, "channels_last", "triton", True, "silu", True)


@pytest.mark.parametrize("affine", ["weight_bias", "bias"])
@pytest.mark.parametrize("name", ["group", "batch"])
def test_gradgradcheck(name, affine):
    grid.test_gradgradcheck(name, affine, "silu", False, "triton")
