"""Tensors with more than 2^31 elements: no 32-bit index overflow on the CPU path.

A float16 tensor of 2^31 + 2^21 elements is 4 GiB; the forward holds input and output (8.6 GiB),
the backward x, dy and dx (13 GiB). That fits the 24 GiB machine this project is
developed on but not a shared CI runner, so these tests run only with ``GROUPNORM_LARGE_TESTS=1``
(``make test-large``). The portable backend is not tested at this size: it computes in float32
(an 8.6 GiB copy of the input, plus temporaries of the same size), which does not fit.

The sets are 2^20 + 1 values long, so set boundaries are not aligned to powers of two and one
set straddles element 2^31; it and the last set are checked against the float64 reference
computed on their own slice.
"""

from __future__ import annotations

import os

import pytest
import torch

from groupnorm import normalize, reference_norm
from groupnorm.kernels import Call, GradCall, select

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("GROUPNORM_LARGE_TESTS") != "1",
        reason="needs ~13 GiB of RAM; set GROUPNORM_LARGE_TESTS=1 (make test-large)",
    ),
]

SET = 2**20 + 1
CHANNELS = 2050  # 2050 * (2^20 + 1) = 2^31 + 2^21 + 2050 elements
STRADDLING = (2**31) // SET  # the set that holds element 2^31


def _input(dtype: torch.dtype) -> torch.Tensor:
    x = torch.empty(1, CHANNELS, SET, dtype=dtype)
    assert x.numel() > 2**31
    # Fill channel by channel (a 4 GiB float32 temporary would not be welcome): each channel
    # gets its own offset and scale so a mix-up between sets shows in the statistics.
    g = torch.Generator().manual_seed(30)
    for c in range(CHANNELS):
        x[0, c].normal_(mean=float(c % 7) - 3.0, std=1.0 + (c % 5), generator=g)
    return x


def _check_set(y: torch.Tensor, x: torch.Tensor, c: int, w, b) -> None:
    ref = reference_norm(x[:, c : c + 1], "instance", weight=w[c : c + 1], bias=b[c : c + 1]).output
    err = (y[:, c : c + 1].double() - ref).abs().max().item()
    # A few roundings of the output in its dtype (unit roundoff 2^-11 / 2^-8).
    unit = 2.0**-11 if y.dtype == torch.float16 else 2.0**-8
    assert err < 4 * unit * ref.abs().max().item(), f"set {c}: max error {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_forward_beyond_2_pow_31_elements(dtype):
    x = _input(dtype)
    w = torch.linspace(0.5, 1.5, CHANNELS).to(dtype)
    b = torch.linspace(-1.0, 1.0, CHANNELS).to(dtype)
    y = normalize(x, "instance", weight=w, bias=b, backend="cpu")
    assert y.shape == x.shape and torch.isfinite(y[0, -1]).all()
    for c in (0, STRADDLING - 1, STRADDLING, STRADDLING + 1, CHANNELS - 1):
        _check_set(y, x, c, w, b)


def test_backward_beyond_2_pow_31_elements():
    """The backend's backward launcher (no autograd graph, so the output need not stay alive:
    peak is x, dy and dx, 13 GiB)."""
    x = _input(torch.float16)
    impl = select("cpu", x, CHANNELS, False)
    y, _, mean, rstd = impl.forward(
        Call(x, None, None, None, None, None, CHANNELS, False, 1e-5, "")
    )
    del y
    # dy is zero except on the straddling set and the last one: their dx must match the
    # reference gradient of their own slice, and every other set's dx must be exactly zero (an
    # index wrap would put gradient on the wrong set).
    g = torch.Generator().manual_seed(31)
    picked = (STRADDLING, CHANNELS - 1)
    dy = torch.zeros_like(x)
    for c in picked:
        dy[0, c] = torch.randn(SET, generator=g).half()
    dx, _, _ = impl.backward(
        GradCall(dy, x, None, None, mean, rstd, CHANNELS, False, False, "", (True, False, False))
    )
    for c in picked:
        leaf = x[:, c : c + 1].double().requires_grad_()
        ref = reference_norm(leaf, "instance").output
        (want,) = torch.autograd.grad(ref, leaf, dy[:, c : c + 1].double())
        err = (dx[:, c : c + 1].double() - want).abs().max().item()
        assert err < 2e-3 * max(want.abs().max().item(), 1.0), f"set {c}: {err}"
    others = torch.ones(CHANNELS, dtype=torch.bool)
    others[list(picked)] = False
    assert not dx[0, others].any()
