"""CPU backend: torch's native kernels where they are the fastest thing measured, else the core.

What runs where (see ``benchmarks/README.md`` for the numbers behind each choice):

* group/layer/instance forward without given statistics -> ``aten::native_group_norm``
  (vectorised, parallel, channels-last aware, float32 statistics for low-precision input), then
  the activation in place on its output;
* batch-norm forward -> ``aten::native_batch_norm`` in training or inference form;
* backward without an activation -> ``aten::native_group_norm_backward`` /
  ``aten::native_batch_norm_backward``;
* everything else (fused activation backward, empty tensors, mixed weight/bias dtypes) -> the
  portable core in :mod:`groupnorm.kernels.portable`.

Every path is checked against the float64 reference in the tests.
"""

from __future__ import annotations

import math

import torch

from . import portable
from .portable import acc_dtype, apply_activation

_INPLACE = {
    "silu": lambda t: torch.nn.functional.silu(t, inplace=True),
    "gelu": lambda t: t.copy_(torch.nn.functional.gelu(t)),
    "relu": torch.relu_,
}


def _dense(t):
    """native_group_norm(_backward) reads x as contiguous or channels-last only; other strides
    (slices, transposes, zero strides) are copied to contiguous first."""
    if t.is_contiguous():
        return t
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dim and t.is_contiguous(memory_format=fmt):
            return t
    return t.contiguous()


def _like(t, x):
    """``t`` in the memory format of ``x`` (already made dense by ``_dense``).

    torch's native backward kernels read dy with x's strides: a contiguous dy with a
    channels-last x gives silently wrong gradients (torch's own autograd converts dy first).
    """
    if x.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _native_ok(x, weight, bias):
    """torch's kernels accept params in the input dtype, or float32 for all of them together."""
    if x.numel() == 0:
        return False
    dtypes = {p.dtype for p in (weight, bias) if p is not None}
    return len(dtypes) <= 1


def _float32_params(x, weight, bias):
    """For float16/bfloat16 input, the params handed to torch's kernels, in float32.

    Given params in the input dtype, torch's CPU kernels return mean/rstd rounded to that dtype
    (rstd off by up to 4e-4 in float16, 4e-3 in bfloat16) and the backward then works from the
    rounded values; with float32 params they keep float32 statistics, as this backend's
    interface promises. A missing weight becomes ones (exact), so that path is taken too.
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        return weight, bias
    w = weight.float() if weight is not None else torch.ones(x.shape[1], device=x.device)
    return w, bias.float() if bias is not None else None


def forward(
    x, weight, bias, residual, given_mean, given_var, num_groups, pool_batch, eps, activation
):
    if not _native_ok(x, weight, bias) or (
        given_mean is not None
        and given_mean.dtype != acc_dtype(x.dtype)
        or given_var is not None
        and given_var.dtype != acc_dtype(x.dtype)
    ):
        return portable.forward(
            x,
            weight,
            bias,
            residual,
            given_mean,
            given_var,
            num_groups,
            pool_batch,
            eps,
            activation,
        )
    src = x + residual if residual is not None else x
    n, c = src.shape[0], src.shape[1]
    weight, bias = _float32_params(x, weight, bias)
    if pool_batch:
        training = given_mean is None
        y, mean, rstd = torch.ops.aten.native_batch_norm(
            src, weight, bias, given_mean, given_var, training, 0.0, eps
        )
        if not training:
            mean = given_mean.clone()
            rstd = torch.rsqrt(given_var + eps)
    else:
        hw = math.prod(src.shape[2:])
        y, mean, rstd = torch.ops.aten.native_group_norm(
            _dense(src), weight, bias, n, c, hw, num_groups, eps
        )
    if activation:
        if y.dtype == torch.float32 or y.dtype == torch.float64:
            _INPLACE[activation](y)
        else:  # low precision: apply in float32, round once
            y = apply_activation(y.float(), activation).to(y.dtype)
        y = portable.match_layout(y, x)
    total = src if residual is not None else x.new_empty(0)
    return y, total, mean, rstd


def backward(
    dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation, needs
):
    # torch's native_group_norm_backward crashes when asked for dbias without a weight
    # ("tensor does not have a device", torch 2.13): that case goes to the portable core.
    bias_only = weight is None and bias is not None and needs[2]
    if (
        activation
        or stats_given
        or bias_only
        or not _native_ok(x, weight, bias)
        or dy.dtype != x.dtype
        or mean.dtype != acc_dtype(x.dtype)
    ):
        return portable.backward(
            dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation, needs
        )
    need_dx, need_dw, need_db = needs
    mask = [need_dx, need_dw and weight is not None, need_db and bias is not None]
    native_weight, _ = _float32_params(x, weight, bias)
    dense_x = _dense(x)
    dy = _like(dy, dense_x)
    if pool_batch:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, dense_x, native_weight, None, None, mean, rstd, True, 0.0, mask
        )
    else:
        n, c = x.shape[0], x.shape[1]
        hw = math.prod(x.shape[2:])
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy, dense_x, mean, rstd, native_weight, n, c, hw, num_groups, mask
        )
    if dw is not None and mask[1]:
        dw = dw.to(weight.dtype)
    if db is not None and mask[2]:
        db = db.to(bias.dtype)
    if dx is not None and mask[0]:
        dx = portable.match_layout(dx, x)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None)
