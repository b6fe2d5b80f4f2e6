"""Shared test helpers: random inputs in every layout, and comparisons with the float64 reference.

Tolerances follow one rule: our error against the float64 reference may be at most about twice
what torch's own kernel makes on the same input (when torch has the op), plus a small absolute
slack per dtype. Without a torch counterpart a fixed per-dtype bound is used.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import functional as gf
from groupnorm.kernels import cpu_ext
from groupnorm.kernels.activations import FUSED

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Absolute slack per dtype, roughly a few units in the last place of O(1) values.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def make_input(shape, dtype, layout="contiguous", seed=0, scale=2.0, shift=0.5):
    """Fresh random data (never zeros) of ``shape`` in the given layout.

    layout: "contiguous", "channels_last" (rank 4/5 only) or "strided" (a non-contiguous view
    made by slicing every other element of the last dim of a larger tensor).
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        big = list(shape)
        big[-1] = big[-1] * 2
        base = torch.randn(big, generator=g, dtype=torch.float64) * scale + shift
        x = base[..., ::2]
        assert not x.is_contiguous() or x.numel() <= 1
        return x.to(dtype) if dtype == torch.float64 else _cast_view(x, dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _cast_view(x, dtype):
    # Cast while keeping a non-contiguous view: allocate the parent in dtype, then slice.
    parent = torch.empty(x.shape[:-1] + (x.shape[-1] * 2,), dtype=dtype)
    view = parent[..., ::2]
    view.copy_(x)
    return view


def params(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return w, b


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - ref.detach().double()).abs().max().item()


def assert_close(ours, ref, dtype, torch_out=None, what="output", scale=1.0, mag=None):
    """ours vs the float64 ref: within 2x torch's own error + atol (or a fixed bound).

    The slack is relative to ``mag``, the size of the terms that make up the value (by default
    the largest reference value, at least 1).
    """
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(ours).any() or torch.isnan(ref).any(), f"{what}: NaN in ours only"
    err = max_err(ours, ref)
    if mag is None:
        mag = max(ref.detach().abs().max().item(), 1.0) if ref.numel() else 1.0
    bound = ATOL[dtype] * mag * scale
    if torch_out is not None:
        bound = max(bound, 2.0 * max_err(torch_out, ref) + ATOL[dtype] * 0.1 * mag)
    assert err <= bound, f"{what} ({dtype}): error {err:.3e} > bound {bound:.3e}"


def reference_with_grads(x, mode, weight=None, bias=None, residual=None, dy=None, **kw):
    """float64 reference output and gradients w.r.t. x, weight, bias, residual."""
    leaves = {}

    def leaf(name, t):
        if t is None:
            return None
        t64 = t.detach().double().requires_grad_(True)
        leaves[name] = t64
        return t64

    out = groupnorm.reference_norm(
        leaf("x", x),
        mode,
        weight=leaf("weight", weight),
        bias=leaf("bias", bias),
        residual=leaf("residual", residual),
        **kw,
    ).output
    if dy is not None:
        out.backward(dy.double())
    grads = {k: v.grad for k, v in leaves.items()}
    return out.detach(), grads


def dx_magnitude(x, mode, dy, weight=None, **kw):
    """Size of the terms in dx: |dy| * |gamma| * rstd, the scale its rounding error follows."""
    rstd = groupnorm.reference_norm(x, mode, **kw).rstd
    w = weight.abs().max().item() if weight is not None else 1.0
    return max(dy.abs().max().item() * w * rstd.max().item(), 1.0)


def torch_counterpart(x, mode, weight=None, bias=None, eps=1e-5, num_groups=None):
    """torch's own result for the same op, or None when torch has no equivalent."""
    f = torch.nn.functional
    c = x.shape[1]
    try:
        if mode == "group":
            return f.group_norm(x, num_groups, weight, bias, eps)
        if mode == "layer":
            return f.group_norm(x, 1, weight, bias, eps)
        if mode == "instance":
            return f.group_norm(x, c, weight, bias, eps)
        if mode == "batch":
            return f.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    except (RuntimeError, ValueError):
        return None
    return None


# ---- the CPU backend's fast paths against the float64 reference -------------------------------
# Tolerance: at most twice torch's own error against float64 on the same data (torch's unfused
# group_norm then activation, in the same dtype), plus a small absolute slack per dtype.

KERNEL_ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


#: every activation the kernels fuse, from the package's table; TORCH_ACT is the tests' own
#: torch spelling of each, so a new entry there needs one here too
FUSED_NAMES = [a.name for a in FUSED]
TORCH_ACT = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, C) in memory


def kernel_data(shape, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = to_layout(
        (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7).to(dtype), layout
    )
    res = to_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    dy = to_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, res, dy, w, b


def value_and_grads(fn, dy, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    return out.detach(), grads


def abs_err(a, ref):
    return (a.double() - ref).abs().max().item()


def check_against_reference(shape, groups, dtype, layout, activation, residual, seed=0):
    x, res, dy, w, b = kernel_data(shape, dtype, layout, seed)
    args = (x, w, b, res) if residual else (x, w, b)

    def ours(x_, w_, b_, r_=None):
        return gf.group_norm(x_, groups, w_, b_, activation=activation, residual=r_)

    def ref(x_, w_, b_, r_=None):
        return groupnorm.reference_norm(
            x_,
            "group",
            num_groups=groups,
            weight=w_,
            bias=b_,
            activation=activation,
            residual=r_,
        ).output

    def torch_fn(x_, w_, b_, r_=None):
        src = x_ + r_ if r_ is not None else x_
        return TORCH_ACT[activation](F.group_norm(src, groups, w_, b_))

    out, grads = value_and_grads(ours, dy, *args)
    ref_out, ref_grads = value_and_grads(ref, dy.double(), *(t.double() for t in args))
    try:
        t_out, t_grads = value_and_grads(torch_fn, dy, *args)
    except RuntimeError:  # torch lacks this dtype on CPU
        t_out, t_grads = None, None
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == x.stride(), "output must keep the input's memory layout"
    names = ["y", "dx", "dweight", "dbias", "dresidual"][: 1 + len(args)]
    for i, (name, got, want) in enumerate(
        zip(names, (out, *grads), (ref_out, *ref_grads), strict=True)
    ):
        torch_err = 0.0
        if t_out is not None:
            torch_err = abs_err((t_out, *t_grads)[i], want)
        scale = want.abs().max().item()
        tol = 2 * torch_err + KERNEL_ATOL[dtype] * max(1.0, scale)
        assert torch.isfinite(got).all(), name
        assert abs_err(got, want) <= tol, (
            f"{name}: error {abs_err(got, want):.3g} > tolerance {tol:.3g}"
            f" (torch's {torch_err:.3g})"
        )


def ext_or_skip():
    """The extension module of the fused kernels, or a skip naming why it is unavailable."""
    ext = cpu_ext.extension()
    if ext is None:
        pytest.skip(f"C++ kernels unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    return ext


def full_path_calls(monkeypatch):
    """A list that grows by one for each functional call that misses the fast road (the
    dispatcher then runs the full checks before it routes the call)."""
    calls = []
    real = gf._check_call

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gf, "_check_call", counting)
    return calls
