"""CPU backend: the fastest thing measured on CPU for each case.

What runs where (``benchmarks/README.md`` has the numbers behind each choice):

* group/layer/instance norm (no given statistics) in float32, bfloat16 or float16, contiguous or
  channels-last, forward and backward, with or without a fused activation -> the fused C++
  kernels of :mod:`groupnorm.kernels.cpu_ext` (compiled on first use, cached on disk). The fused
  backward recomputes the activation's input from x, mean and rstd, so nothing else is saved;
* batch norm forward (training or eval, same dtypes and layouts) -> the fused C++ kernel too
  (torch's CPU batch norm kernel is several times slower here); its backward ->
  ``aten::native_batch_norm_backward`` with the kernel's mean and rstd;
* plain eager calls (no compile/export/tracing, modes or functorch transforms, weight/bias in
  float32 or the input's dtype) enter through :func:`fast_forward` / :func:`fast_batch_forward`,
  which skip the custom op and most of the Python around it and give the same results;
* when those kernels are unavailable (no compiler, failed build, ``GROUPNORM_CPU_EXT=0``) or the
  case is outside them (float64, other strides, empty tensors):
  group/layer/instance forward -> ``aten::native_group_norm`` then the activation in place;
  batch norm -> ``aten::native_batch_norm``;
  backward without an activation -> ``aten::native_group_norm_backward`` /
  ``aten::native_batch_norm_backward``;
* everything else (activation backward off the fused path, given statistics with mixed dtypes)
  -> the portable core in :mod:`groupnorm.kernels.portable`.

Every path is checked against the float64 reference in ``tests/test_cpu_fast.py``.
"""

from __future__ import annotations

import math
import os

import torch
from torch._C._functorch import is_functorch_wrapped_tensor as _is_wrapped

from .._eager import PLAIN_TYPES, plain_eager_context
from . import cpu_ext, portable
from .portable import acc_dtype, apply_activation

_INPLACE = {
    "silu": lambda t: torch.nn.functional.silu(t, inplace=True),
    "gelu": lambda t: t.copy_(torch.nn.functional.gelu(t)),
    "relu": torch.relu_,
}

_EXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# CPython keeps os.environ in a dict of encoded keys; a membership test there costs 0.02 us
# against 0.5 us for os.environ.get (it encodes the key on every call). Only used to see that
# neither variable is set; when one is, or elsewhere, os.environ is read as usual.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEYS = tuple(os.environ.encodekey(k) for k in ("GROUPNORM_BACKEND", "GROUPNORM_CPU_EXT"))
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _ENV_DATA = None


def _use_ext() -> bool:
    if _ENV_DATA is not None and _ENV_KEYS[1] not in _ENV_DATA:
        return True  # (see _env_allows_fast)
    return os.environ.get("GROUPNORM_CPU_EXT", "1") != "0"


def _ext_layout(x: torch.Tensor) -> int | None:
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
    if p is None or (p.dtype == torch.float32 and p.is_contiguous()):
        return p
    return p.float().contiguous()


def _ext_params(x, weight, bias):
    """(library, layout, weight32, bias32) when the fused kernels take this call, else None."""
    if x.dtype not in _EXT_DTYPES or x.numel() == 0 or not _use_ext():
        return None
    layout = _ext_layout(x)
    if layout is None:
        return None
    lib = cpu_ext.library()
    if lib is None:
        return None
    return lib, layout, _as_float32(weight), _as_float32(bias)


_FAST_ACT = {None: "", "": "", "silu": "silu", "gelu": "gelu", "relu": "relu"}
_F32 = torch.float32


def _env_allows_fast() -> bool:
    """Neither GROUPNORM_BACKEND nor GROUPNORM_CPU_EXT steers calls away from the kernels."""
    data = _ENV_DATA
    if data is not None and _ENV_KEYS[0] not in data and _ENV_KEYS[1] not in data:
        return True
    backend = os.environ.get("GROUPNORM_BACKEND")
    return (not backend or backend == "auto" or backend == "cpu") and _use_ext()


def _plain_param(p, c: int, dtype=_F32) -> bool:
    """``p`` is None or a plain contiguous CPU tensor of shape (c,) in float32 or ``dtype``."""
    return p is None or (
        type(p) in PLAIN_TYPES
        and (p.dtype == _F32 or p.dtype == dtype)
        and p.shape == (c,)
        and p.is_cpu
        and p.is_contiguous()
    )


def _fast_args(x, eps, activation, backend):
    """The activation ('' or its name) when the scalar arguments and the context let a call on
    ``x`` take a fast path (plain eager mode, no functorch wrapper, no environment override),
    else None (the full path then runs and explains)."""
    if type(eps) is not float or not 0.0 <= eps < math.inf:
        return None
    if activation is not None and type(activation) is not str:
        return None
    act = _FAST_ACT.get(activation)
    if act is None or (backend is not None and backend != "auto" and backend != "cpu"):
        return None
    if not plain_eager_context() or _is_wrapped(x) or not _env_allows_fast():
        return None
    return act


def _fast_kernel(x, eps, activation, backend):
    """The checks the ctypes fast paths end with: (library, layout, activation) when the fused
    kernels may take this plain eager call on ``x``, else None."""
    act = _fast_args(x, eps, activation, backend)
    if act is None:
        return None
    layout = _ext_layout(x)
    if layout is None:
        return None
    lib = cpu_ext.library()
    if lib is None:
        return None
    return lib, layout, act


def fast_forward(x, num_groups, weight, bias, eps, activation, backend, per_channel=False):
    """The output of a plain eager group/layer/instance norm call on CPU, computed by the fused
    kernels with as little Python around them as possible; ``None`` for any other call, which
    then takes the full path (validation, custom op or eager path, backend).

    Each check only lets through arguments that the full validation accepts, in plain eager
    mode, and the kernels are the ones the full path calls, so both give the same output bit
    for bit. ``per_channel`` (instance norm) means one group per channel. Python checks the
    context and the scalar arguments; the tensors are checked by the torch operator of
    ``cpu_ext/gn_ops.cpp`` (which returns None when it cannot take them), or here when that
    operator is unavailable and the kernels are called through ctypes (:class:`_FusedNorm`).
    This is what makes small calls cost about what torch's own group_norm costs
    (benchmarks/README.md, approaches 18 and 43).
    """
    if torch.compiler.is_compiling() or type(x) not in PLAIN_TYPES:
        return None  # (compiling first: under torch.compile the rest is not traced)
    if (weight is not None and type(weight) not in PLAIN_TYPES) or (
        bias is not None and type(bias) not in PLAIN_TYPES
    ):
        return None
    if x.dim() < 2:
        return None
    c = x.shape[1]
    if per_channel:
        num_groups = c
    if type(num_groups) is not int or not 0 < num_groups <= c:
        return None  # (also keeps a huge int from pybind11's int64 conversion)
    act = _fast_args(x, eps, activation, backend)
    if act is None:
        return None
    op = _FUSED_OP[0] if _FUSED_OP else _load_fused_op()
    if op is not None:
        return op(x, weight, bias, num_groups, eps, cpu_ext.ACT_CODES[act])
    return _ctypes_forward(x, num_groups, weight, bias, eps, act)


_FUSED_OP: list = []  # [op or None] once looked up (a list: no global statement on the hot path)
_BATCH_OP: list = []


def _load_fused_op():
    op = cpu_ext.fused_op() if cpu_ext.library() is not None else None
    _FUSED_OP[:] = [op]
    return op


def _load_batch_op():
    op = cpu_ext.fused_batch_op() if cpu_ext.library() is not None else None
    _BATCH_OP[:] = [op]
    return op


def _ctypes_forward(x, num_groups, weight, bias, eps, act):
    """:func:`fast_forward` through ctypes, when the torch operator is unavailable: the tensor
    checks the operator makes, then :class:`_FusedNorm` or a plain kernel call."""
    if x.dtype not in _EXT_DTYPES or not x.is_cpu or x.numel() == 0:
        return None  # (x.dim() >= 2 and num_groups <= C: checked by fast_forward)
    c = x.shape[1]
    if c % num_groups:
        return None
    # params in float32 or in x's dtype (a model moved to float16 or bfloat16 has both in it)
    if not _plain_param(weight, c, x.dtype) or not _plain_param(bias, c, x.dtype):
        return None
    layout = _ext_layout(x)
    lib = cpu_ext.library()
    if layout is None or lib is None:
        return None
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return _FusedNorm.apply(x, weight, bias, (lib, num_groups, eps, act, layout))
    w, b = _as_float32(weight), _as_float32(bias)
    return cpu_ext.forward(lib, x, w, b, num_groups, eps, act, layout, statistics=False)[0]


def fast_batch_forward(
    x, running_mean, running_var, weight, bias, training, momentum, eps, activation, backend
):
    """:func:`fast_forward` for batch norm: the fused kernel, through the extension's
    ``batch_norm`` without autograd (tensors checked in C++) or :class:`_FusedBatchNorm` when
    autograd is needed (training, no activation); ``None`` for any other call. float32 running
    statistics are updated inside the kernel; running statistics in x's dtype (a model moved to
    bfloat16) by the full path's ``update_running_stats`` after it (its C++ update, which the
    extension's batch_norm calls too), so both paths give the same bits."""
    if torch.compiler.is_compiling() or type(x) not in PLAIN_TYPES:
        return None
    for t in (running_mean, running_var, weight, bias):
        if t is not None and type(t) not in PLAIN_TYPES:
            return None
    if (running_mean is None) != (running_var is None) or type(training) is not bool:
        return None
    if training and running_mean is not None and momentum is None:
        return None
    if momentum is not None and (type(momentum) is not float or not 0 <= momentum <= 1):
        return None  # (the full path checks momentum on every call, and explains the error)
    act = _fast_args(x, eps, activation, backend)
    if act is None:
        return None
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        op = _BATCH_OP[0] if _BATCH_OP else _load_batch_op()
        if op is not None:
            m = 0.0 if momentum is None else momentum
            code = cpu_ext.ACT_CODES[act]
            return op(x, weight, bias, running_mean, running_var, training, m, eps, code)
    return _ctypes_batch_forward(
        x, running_mean, running_var, weight, bias, training, momentum, eps, act, needs_grad
    )


def _ctypes_batch_forward(
    x, running_mean, running_var, weight, bias, training, momentum, eps, act, needs_grad
):
    """:func:`fast_batch_forward` through ctypes (autograd, or no extension): the tensor checks
    the extension makes, then :class:`_FusedBatchNorm` or a plain kernel call."""
    if x.dim() < 2 or x.dtype not in _EXT_DTYPES or not x.is_cpu or x.numel() == 0:
        return None
    c = x.shape[1]
    # params and running statistics in float32 or in x's dtype (a model moved to bfloat16 has
    # all of them in it): the kernel takes float32 copies
    if not (
        _plain_param(weight, c, x.dtype)
        and _plain_param(bias, c, x.dtype)
        and _plain_param(running_mean, c, x.dtype)
        and _plain_param(running_var, c, x.dtype)
    ):
        return None
    if needs_grad and (not training or act or (weight is None and bias is not None)):
        return None  # (the full path: the portable core for these backwards)
    if training:
        if x.numel() // c == 1:
            return None  # one value per channel: the full path explains the error
    elif running_mean is None:
        return None
    layout = _ext_layout(x)
    lib = cpu_ext.library()
    if layout is None or lib is None:
        return None
    rows = bool(layout) or x.numel() == x.shape[0] * c
    if needs_grad and _dense(x) is not x:  # torch's backward kernel reads contiguous or CL
        return None
    running = (running_mean, running_var, momentum) if running_mean is not None else None
    low = running is not None and (running_mean.dtype != _F32 or running_var.dtype != _F32)
    given = (None, None)
    if not training:
        running, given = None, (_as_float32(running_mean), _as_float32(running_var))
    elif low:  # the kernel updates float32 statistics only: the full path's update, after it
        running = None
    stats = []  # (mean, rstd) of the batch, when low-precision running statistics need them
    if needs_grad:
        y = _FusedBatchNorm.apply(x, weight, bias, (lib, running, eps, rows, stats))
    else:
        w, b = _as_float32(weight), _as_float32(bias)
        y, mean, rstd = cpu_ext.batch_forward(
            lib, x, w, b, *given, eps, act, rows, running, statistics=training and low
        )
        stats.extend((mean, rstd))
    if training and low:
        from ..functional import update_running_stats  # (the full path's update, bit for bit)

        update_running_stats(running_mean, running_var, *stats, eps, momentum, x.numel() // c)
    return y


def _dtypes(weight, bias):
    """The params' dtypes (None for an absent one), for :func:`_in_dtypes` in a backward."""
    return (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _in_dtypes(dw, db, dtypes):
    """The kernels' float32 dweight and dbias (or None) in their params' own dtypes."""
    w_dtype, b_dtype = dtypes
    if dw is not None and w_dtype != _F32:
        dw = dw.to(w_dtype)
    if db is not None and b_dtype != _F32:
        db = db.to(b_dtype)
    return dw, db


class _FusedBatchNorm(torch.autograd.Function):
    """Batch norm in training through the fast path: our forward kernel, torch's
    ``native_batch_norm_backward`` (as the full path), saving x, weight, mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta):
        lib, running, eps, rows, stats = meta
        w = _as_float32(weight)  # (float32 params, as the full path hands torch's backward)
        y, mean, rstd = cpu_ext.batch_forward(
            lib, x, w, _as_float32(bias), None, None, eps, "", rows, running
        )
        stats.extend((mean, rstd))  # (for a running-statistics update outside)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.param_dtypes = _dtypes(weight, bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db, _ = ctx.needs_input_grad
        mask = [need_dx, need_dw and weight is not None, need_db]
        dy = _like(dy.to(x.dtype), x)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, rstd, True, 0.0, mask
        )
        dw, db = _in_dtypes(dw if mask[1] else None, db if mask[2] else None, ctx.param_dtypes)
        return (dx if mask[0] else None, dw, db, None)


class _FusedNorm(torch.autograd.Function):
    """The fast path's autograd: the fused kernels forward and backward, saving what the op's
    autograd saves (x, weight, bias, mean, rstd), with one non-tensor argument (``meta``:
    library, groups, eps, activation, layout) instead of the op's eleven."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta):
        lib, num_groups, eps, act, layout = meta
        w, b = _as_float32(weight), _as_float32(bias)  # (the kernels take float32 params)
        y, mean, rstd = cpu_ext.forward(lib, x, w, b, num_groups, eps, act, layout)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.meta = meta
        ctx.param_dtypes = _dtypes(weight, bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        lib, num_groups, _eps, act, layout = ctx.meta
        if dy.dtype != x.dtype or dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)
        need_dx, need_dw, need_db, _ = ctx.needs_input_grad
        dx, dw, db = cpu_ext.backward(
            lib,
            dy,
            x,
            weight,
            bias,
            mean,
            rstd,
            num_groups,
            act,
            layout,
            need_dx,
            need_dw and weight is not None,
            need_db and bias is not None,
        )
        dw, db = _in_dtypes(dw, db, ctx.param_dtypes)
        return dx, dw, db, None


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
    if pool_batch and (
        given_mean is None
        or (given_mean.dtype in (_F32, x.dtype) and given_var.dtype in (_F32, x.dtype))
    ):
        ext = _ext_params(x, weight, bias)
        if ext is not None:
            lib, layout, w, b = ext
            src = x + residual if residual is not None else x
            if _ext_layout(src) == layout:
                n, c = src.shape[0], src.shape[1]
                rows = bool(layout) or src.numel() == n * c  # (N, C) is rows of C values
                # (given statistics in x's dtype as float32 copies, as the fast path passes)
                gm = _as_float32(given_mean)
                gv = _as_float32(given_var)
                y, mean, rstd = cpu_ext.batch_forward(lib, src, w, b, gm, gv, eps, activation, rows)
                total = src if residual is not None else x.new_empty(0)
                return y, total, mean, rstd
    if not pool_batch and given_mean is None:
        ext = _ext_params(x, weight, bias)
        if ext is not None:
            lib, layout, w, b = ext
            src = x + residual if residual is not None else x
            if _ext_layout(src) == layout:
                y, mean, rstd = cpu_ext.forward(lib, src, w, b, num_groups, eps, activation, layout)
                total = src if residual is not None else x.new_empty(0)
                return y, total, mean, rstd
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
    if not pool_batch and not stats_given and dy.dtype == x.dtype and mean.dtype == torch.float32:
        ext = _ext_params(x, weight, bias)
        if ext is not None:
            lib, layout, w, b = ext
            if dy.stride() != x.stride():
                dy = torch.empty_like(x).copy_(dy)
            need_dx, need_dw, need_db = needs
            dx, dw, db = cpu_ext.backward(
                lib,
                dy,
                x,
                w,
                b,
                mean.contiguous(),
                rstd.contiguous(),
                num_groups,
                activation,
                layout,
                need_dx,
                need_dw and weight is not None,
                need_db and bias is not None,
            )
            dw = dw.to(weight.dtype) if dw is not None else None
            db = db.to(bias.dtype) if db is not None else None
            return dx, dw, db
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
