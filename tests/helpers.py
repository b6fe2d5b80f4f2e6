"""Shared test helpers: random inputs in every layout, and comparisons with the float64 reference.

Tolerances follow one rule: our error against the float64 reference may be at most about twice
what torch's own kernel makes on the same input (when torch has the op), plus a small absolute
slack per dtype. Without a torch counterpart a fixed per-dtype bound is used.
"""

from __future__ import annotations

import torch

import groupnorm

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
