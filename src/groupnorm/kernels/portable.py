r"""The one core, in plain torch operations: every mode, layout, rank and dtype.

The input (N, C, \*) is viewed as (N, G, C/G, S) with S the product of the spatial sizes. For a
contiguous tensor this is a free reshape, and for channels-last too (C has stride 1 and the
spatial dims flatten onto one stride), so no layout copy is made. Statistics reduce over dims
(2, 3) for layer/instance/group norm and over (0, 2, 3) when the batch is pooled (batch norm,
where G = C).

Forward, with :math:`\hat x = (x - \mu)\,r` and :math:`r = 1/\sqrt{\sigma^2 + \epsilon}`:
:math:`z = \gamma \hat x + \beta`, :math:`y = f(z)`.

Backward, with :math:`g = \gamma \cdot f'(z) \cdot dy` and means taken over each set:
:math:`dx = r\,(g - \overline{g} - \hat x\,\overline{g \hat x})`,
:math:`d\gamma = \sum f'(z)\,dy\,\hat x`, :math:`d\beta = \sum f'(z)\,dy` over (N, S).
When the statistics are given (batch norm at inference) they are constants and
:math:`dx = r\,g`.

Statistics and arithmetic run in float32 (float64 for float64 input); the output is cast back to
the input dtype at the end.
"""

from __future__ import annotations

import math

import torch

from . import GradCall
from .activations import BY_NAME as _ACTIVATIONS


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for an input of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def set_view(t: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(N, C, *) -> (N, G, C/G, S). A view whenever strides allow (contiguous, channels-last)."""
    n, c = t.shape[0], t.shape[1]
    s = math.prod(t.shape[2:])
    return t.reshape(n, num_groups, c // num_groups, s)


def match_layout(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Give ``out`` the channels-last layout of ``like`` when ``like`` has one."""
    if like.is_contiguous():
        return out
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if like.dim() == dim and like.is_contiguous(memory_format=fmt):
            return out.contiguous(memory_format=fmt)
    return out


def stats_view(stat: torch.Tensor, pool_batch: bool) -> torch.Tensor:
    """Per-set statistics shaped to broadcast against the (N, G, C/G, S) view."""
    if pool_batch:
        return stat.view(1, -1, 1, 1)
    return stat.view(stat.shape[0], stat.shape[1], 1, 1)


def channel_view(p: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    return p.to(dtype).view(1, num_groups, -1, 1)


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "":
        return z
    act = _ACTIVATIONS.get(activation)
    if act is None:
        raise ValueError(f"unknown activation {activation!r}")
    return act.function(z)


def activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """f'(z), recomputed from z so that the forward saves nothing extra."""
    act = _ACTIVATIONS.get(activation)
    if act is None:
        raise ValueError(f"unknown activation {activation!r}")
    return act.grad(z)


def _normalized(x, mean, rstd, num_groups, pool_batch, acc):
    v = set_view(x, num_groups).to(acc)
    return (v - stats_view(mean, pool_batch)) * stats_view(rstd, pool_batch)


def _affine(xhat, weight, bias, num_groups):
    z = xhat
    if weight is not None:
        z = z * channel_view(weight, num_groups, xhat.dtype)
    if bias is not None:
        z = z + channel_view(bias, num_groups, xhat.dtype)
    return z


def compute_stats(src, given_mean, given_var, num_groups, pool_batch, eps):
    """Per-set mean and rstd in the accumulation dtype (centred variance, never E[x²]-E[x]²)."""
    acc = acc_dtype(src.dtype)
    if given_mean is not None:
        mean = given_mean.to(acc).clone()
        rstd = torch.rsqrt(given_var.to(acc) + eps)
        return mean, rstd
    v = set_view(src, num_groups).to(acc)
    dims = (0, 2, 3) if pool_batch else (2, 3)
    if v.numel() == 0:
        shape = (v.shape[1],) if pool_batch else (v.shape[0], v.shape[1])
        nan = torch.full(shape, float("nan"), dtype=acc, device=src.device)
        return nan, nan.clone()
    var, mean = torch.var_mean(v, dim=dims, correction=0)
    return mean, torch.rsqrt(var + eps)


def forward(call):
    """The backend ``forward``: (y, x + residual or empty, mean, rstd)."""
    x, residual, num_groups, pool_batch = call.x, call.residual, call.num_groups, call.pool_batch
    src = x + residual if residual is not None else x
    acc = acc_dtype(x.dtype)
    mean, rstd = compute_stats(
        src, call.given_mean, call.given_var, num_groups, pool_batch, call.eps
    )
    xhat = _normalized(src, mean, rstd, num_groups, pool_batch, acc)
    y = apply_activation(_affine(xhat, call.weight, call.bias, num_groups), call.activation)
    y = match_layout(y.to(x.dtype).reshape(x.shape), x)
    total = src if residual is not None else x.new_empty(0)
    return y, total, mean, rstd


def backward(grad: GradCall):
    x, weight, bias, mean, rstd = grad.x, grad.weight, grad.bias, grad.mean, grad.rstd
    num_groups, pool_batch, activation = grad.num_groups, grad.pool_batch, grad.activation
    need_dx, need_dw, need_db = grad.wanted()
    acc = mean.dtype
    xhat = _normalized(x, mean, rstd, num_groups, pool_batch, acc)
    dz = set_view(grad.dy, num_groups).to(acc)
    if activation:
        dz = dz * activation_grad(_affine(xhat, weight, bias, num_groups), activation)
    c = x.shape[1]
    dw = db = dx = None
    if need_db:
        db = dz.sum(dim=(0, 3)).reshape(c).to(bias.dtype)
    if need_dw:
        dw = (dz * xhat).sum(dim=(0, 3)).reshape(c).to(weight.dtype)
    if need_dx:
        g = dz * channel_view(weight, num_groups, acc) if weight is not None else dz
        r = stats_view(rstd, pool_batch)
        if grad.stats_given:
            dx = g * r
        else:
            dims = (0, 2, 3) if pool_batch else (2, 3)
            mean_g = g.mean(dim=dims, keepdim=True)
            mean_gx = (g * xhat).mean(dim=dims, keepdim=True)
            dx = (g - mean_g - xhat * mean_gx) * r
        dx = match_layout(dx.to(x.dtype).reshape(x.shape), x)
    return dx, dw, db


def differentiable_backward(grad: GradCall, eps: float):
    """:func:`backward` as a differentiable function of ``dy``, ``x``, ``weight`` and ``bias``:
    the backward every backend takes when its gradients must carry a graph themselves
    (``create_graph=True``, a gradient penalty, Hessian-vector products).

    The saved statistics are constants of the first backward only: here they are computed
    again from ``x`` with ``eps`` (unless they were given, as batch norm's running statistics
    at inference, which are constants), so that their dependence on ``x`` is part of the
    graph. The values equal :func:`backward`'s; the cost is one more pass over ``x``.
    """
    with torch.enable_grad():
        if not grad.stats_given:
            mean, rstd = compute_stats(grad.x, None, None, grad.num_groups, grad.pool_batch, eps)
            grad = grad._replace(mean=mean, rstd=rstd)
        return backward(grad)


def eager(call):
    """The backend ``eager`` entry: :func:`forward` with autograd on. Its torch operations carry
    gradients, forward-mode tangents and higher-order derivatives."""
    return forward(call)
