"""CPU backend: the fused C++ kernels of :mod:`groupnorm.kernels.cpu_ext`, else torch's kernels.

What runs where (``benchmarks/README.md`` has the measurements behind each choice):

* group/layer/instance norm and batch norm in float32, bfloat16 or float16, contiguous or
  channels-last, forward and backward, with or without a fused activation -> the C++ extension
  (compiled at install for each instruction-set level; the CPU's best is loaded). In plain
  eager mode :func:`whole_call` hands the whole call to it: one pybind11 call that checks the
  tensors, runs the kernel, keeps a C++ autograd node when gradients are needed and updates
  batch norm's running statistics. Batch norm's backward is
  torch's ``native_batch_norm_backward`` (batch statistics) or one line of arithmetic (given
  statistics), after the activation's derivative;
* the extension unavailable (no compiler, failed build, ``GROUPNORM_CPU_EXT=0``) or the case
  outside it (float64, other strides, empty tensors, mixed param dtypes) -> torch's kernels
  through :mod:`groupnorm.kernels.aten`, which falls back on the portable core for what those
  do not take.

Every path is checked against the float64 reference in ``tests/test_cpu_kernels.py``.
"""

from __future__ import annotations

import torch

from . import GradCall, aten, cpu_ext, portable
from .activations import CODES

#: activation codes of the C++ extension (from the activation table)
ACT_CODES = CODES
_ACT_NAMES = {code: name for name, code in ACT_CODES.items()}
_EXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_F32 = torch.float32


def layout(x: torch.Tensor) -> int | None:
    """0 when x is (N, C, S) in memory, 1 when (N, S, C) (channels-last), else None."""
    if x.is_contiguous():
        return 0
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return 1
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return 1
    if x.dim() == 3 and x.transpose(1, 2).is_contiguous():
        return 1
    return None


def _as_float32(p):
    if p is None or (p.dtype == _F32 and p.is_contiguous()):
        return p
    return p.float().contiguous()


def _extension_for(x, weight, bias):
    """The extension when its kernels take ``x`` and these params, else None."""
    if x.dtype not in _EXT_DTYPES or x.numel() == 0 or layout(x) is None:
        return None
    for p in (weight, bias):
        if p is not None and p.dtype != _F32 and p.dtype != x.dtype:
            return None
    return cpu_ext.extension()


def whole_call(x, weight, bias, num_groups, pool_batch, eps, activation, running, training):
    """The whole call in the C++ extension, or ``None`` when it cannot take it.

    For plain eager calls without a residual, whose scalar arguments are valid. The extension
    checks the tensors (dtype, layout, param shapes and dtypes) and declines what its kernels do
    not take; the caller then validates fully and takes :func:`eager`. ``running`` is batch
    norm's (running_mean, running_var, momentum) to update in training, or to normalize with
    when ``training`` is False.
    """
    ext = cpu_ext.extension()
    if ext is None:
        return None
    if not pool_batch:
        return ext.fused_norm(x, weight, bias, num_groups, eps, ACT_CODES[activation])
    rm, rv, momentum = running if running is not None else (None, None, 0.0)
    out = ext.batch_norm(x, weight, bias, rm, rv, training, momentum, eps, ACT_CODES[activation])
    return out[0] if out is not None else None


def eager(call):
    """The backend ``eager`` entry, for what :func:`whole_call` declined: ``x + residual``
    normalized through the extension (its C++ autograd node), everything else through torch's
    kernels with torch's autograd. Returns (y, x + residual or empty, mean, rstd), the
    statistics ``None`` when the extension kept them inside its autograd node
    (group/layer/instance norm)."""
    x, weight, bias, residual = call.x, call.weight, call.bias, call.residual
    if _extension_for(x, weight, bias) is not None:
        src = x + residual if residual is not None else x
        total = src if residual is not None else x.new_empty(0)
        code = ACT_CODES[call.activation]
        if layout(src) is not None and not call.pool_batch:
            y = cpu_ext.extension().fused_norm(src, weight, bias, call.num_groups, call.eps, code)
            if y is not None:
                return y, total, None, None
        elif layout(src) is not None:
            given_mean = call.given_mean
            out = cpu_ext.extension().batch_norm(
                src, weight, bias, given_mean, call.given_var, given_mean is None, 0.0, call.eps,
                code,
            )  # fmt: skip
            if out is not None:
                return out[0], total, out[1], out[2]
    return aten.eager(call)


def forward(call):
    """The backend ``forward`` (no autograd): the extension's kernels, else torch's."""
    x, given_mean, given_var = call.x, call.given_mean, call.given_var
    if given_mean is None or (
        given_mean.dtype in (_F32, x.dtype) and given_var.dtype in (_F32, x.dtype)
    ):
        ext = _extension_for(x, call.weight, call.bias)
        residual = call.residual
        src = x + residual if residual is not None else x
        if ext is not None and layout(src) is not None:
            total = src if residual is not None else x.new_empty(0)
            w, b = _as_float32(call.weight), _as_float32(call.bias)
            code = ACT_CODES[call.activation]
            if call.pool_batch:
                y, mean, rstd = ext.batch_forward(
                    src, w, b, _as_float32(given_mean), _as_float32(given_var), call.eps, code
                )
            else:
                y, mean, rstd = ext.forward(src, w, b, call.num_groups, call.eps, code)
            return y, total, mean, rstd
    return aten.forward(call)


def backward(grad):
    """The backend ``backward``: the extension's kernels for group/layer/instance norm, else
    torch's kernels (batch norm) or the portable core."""
    if not grad.pool_batch and not grad.stats_given and grad.mean.dtype == _F32:
        x, weight, bias = grad.x, grad.weight, grad.bias
        ext = _extension_for(x, weight, bias)
        if ext is not None:
            need_dx, need_dw, need_db = grad.wanted()
            dx, dw, db = ext.backward(
                grad.dy,
                x,
                _as_float32(weight),
                _as_float32(bias),
                grad.mean,
                grad.rstd,
                grad.num_groups,
                ACT_CODES[grad.activation],
                need_dx,
                need_dw,
                need_db,
            )
            dw = dw.to(weight.dtype) if dw is not None else None
            db = db.to(bias.dtype) if db is not None else None
            return dx, dw, db
    return aten.backward(grad)


def differentiable_backward(
    dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, act, eps, *needs
):
    """The backward of the extension's autograd nodes under ``create_graph=True`` (called from
    C++ with the activation's code): :func:`portable.differentiable_backward`, torch
    operations whose graph gives second and higher derivatives. Without ``create_graph`` the
    nodes run the fused kernels and never call this."""
    activation = _ACT_NAMES[act]
    grad = GradCall(
        dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation, needs
    )
    return portable.differentiable_backward(grad, eps)
