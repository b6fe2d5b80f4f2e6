"""Torch's own kernels (``aten::native_group_norm`` / ``native_batch_norm``) behind the backend
interface, with the activation and residual composed around them.

This is where calls go when the fused kernels are not the faster choice or not available: on CPU
when the C++ extension cannot be built (or is turned off with ``GROUPNORM_CPU_EXT=0``), and on
CUDA with ``backend="auto"`` for tensors below the size where the Triton kernels win (see
``docs/triton.md``). Works on any device torch's kernels support.

``forward``/``backward`` are the plain functions of the backend interface (``kernels/__init__``);
``eager`` calls the same ATen ops with autograd on, so torch's own derivative formulas give the
backward. Cases torch's kernels do not take (mixed param dtypes, given statistics in another
dtype, empty tensors, an activation's backward) go to the portable core.
"""

from __future__ import annotations

import math

import torch

from . import portable
from .portable import acc_dtype, apply_activation, match_layout


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous or channels-last (what torch's kernels read), else a
    contiguous copy (slices, transposes, zero strides)."""
    if t.is_contiguous():
        return t
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dim and t.is_contiguous(memory_format=fmt):
            return t
    return t.contiguous()


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in the memory format of ``x`` (already dense). torch's native backward kernels read
    dy with x's strides: a contiguous dy with a channels-last x gives wrong gradients."""
    if x.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def takes(x, weight, bias, given_mean=None, given_var=None) -> bool:
    """torch's kernels take non-empty input with params of one dtype, and given statistics in the
    accumulation dtype."""
    if x.numel() == 0:
        return False
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return False
    acc = acc_dtype(x.dtype)
    return given_mean is None or (given_mean.dtype == acc and given_var.dtype == acc)


def float32_params(x, weight, bias):
    """For float16/bfloat16 input, float32 params for torch's kernels.

    Given params in the input dtype, torch's CPU kernels return mean/rstd rounded to that dtype
    and the backward then works from the rounded values; with float32 params they keep float32
    statistics, as the backend interface promises. A missing weight becomes ones (exact)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return weight, bias
    w = weight.float() if weight is not None else torch.ones(x.shape[1], device=x.device)
    return w, bias.float() if bias is not None else None


def _native_forward(src, weight, bias, given_mean, given_var, num_groups, pool_batch, eps):
    n, c = src.shape[0], src.shape[1]
    weight, bias = float32_params(src, weight, bias)
    if weight is None and bias is not None:
        # asked for dbias without a weight, torch's native_group_norm_backward fails ("tensor
        # does not have a device"), and so does batch norm's double backward; a weight of ones
        # (no gradient) is exact and avoids both
        weight = torch.ones(c, dtype=bias.dtype, device=bias.device)
    if pool_batch:
        training = given_mean is None
        y, mean, rstd = torch.ops.aten.native_batch_norm(
            src, weight, bias, given_mean, given_var, training, 0.0, eps
        )
        if not training:
            mean = given_mean.detach().clone()
            rstd = torch.rsqrt(given_var.detach() + eps)
        return y, mean, rstd
    hw = math.prod(src.shape[2:])
    return torch.ops.aten.native_group_norm(dense(src), weight, bias, n, c, hw, num_groups, eps)


def _activate(y, activation, like_x):
    if not activation:
        return y
    if y.dtype in (torch.float16, torch.bfloat16):  # in float32, rounded once
        return match_layout(apply_activation(y.float(), activation).to(y.dtype), like_x)
    return apply_activation(y, activation)


def forward(call):
    """The backend ``forward``: torch's kernels, then the activation."""
    x, weight, bias, residual = call.x, call.weight, call.bias, call.residual
    given_mean, given_var = call.given_mean, call.given_var
    if not takes(x, weight, bias, given_mean, given_var):
        return portable.forward(call)
    src = x + residual if residual is not None else x
    y, mean, rstd = _native_forward(
        src, weight, bias, given_mean, given_var, call.num_groups, call.pool_batch, call.eps
    )
    y = _activate(y, call.activation, x)
    total = src if residual is not None else x.new_empty(0)
    return y, total, mean, rstd


def eager(call):
    """The backend ``eager`` entry: the same ATen ops with autograd on (torch's derivatives)."""
    return forward(call)


def backward(grad):
    """The backend ``backward``: torch's backward kernels; the portable core where they do not
    apply (an activation, given statistics, mixed dtypes)."""
    dy, x, weight, bias = grad.dy, grad.x, grad.weight, grad.bias
    mean, rstd, num_groups = grad.mean, grad.rstd, grad.num_groups
    mask = list(grad.wanted())
    # torch's native_group_norm_backward fails when asked for dbias without a weight
    bias_only = weight is None and mask[2]
    if (
        grad.activation
        or grad.stats_given
        or bias_only
        or not takes(x, weight, bias)
        or dy.dtype != x.dtype
        or mean.dtype != acc_dtype(x.dtype)
    ):
        return portable.backward(grad)
    native_weight, _ = float32_params(x, weight, bias)
    dense_x = dense(x)
    dy = like(dy, dense_x)
    if grad.pool_batch:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, dense_x, native_weight, None, None, mean, rstd, True, 0.0, mask
        )
    else:
        n, c = x.shape[0], x.shape[1]
        hw = math.prod(x.shape[2:])
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy, dense_x, mean, rstd, native_weight, n, c, hw, num_groups, mask
        )
    dw = dw.to(weight.dtype) if mask[1] else None
    db = db.to(bias.dtype) if mask[2] else None
    dx = match_layout(dx, x) if mask[0] else None
    return dx, dw, db
