"""Host launchers for the Triton kernels: validate, allocate, plan, launch; tensors in and out.

They can be called without autograd (tests do) and take an optional :class:`TritonConfig` to
force the path, the tile size and the split count.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .. import portable
from .plan import Plan, TritonConfig, config_from_env, make_plan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FINALIZE_BLOCK = 1024
_COLUMN_BLOCK_R = 16
_COLUMN_BLOCK_C = 128


def _kernels():
    """Import the kernel module on first use (imports Triton)."""
    from . import kernels

    return kernels


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def check_device(t: torch.Tensor) -> None:
    """CUDA tensors, or CPU tensors under the Triton interpreter; anything else is an error."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter_enabled():
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            "the triton backend needs CUDA tensors; for CPU tensors use backend='cpu' (or 'auto'),"
            " or run the kernels in Triton's interpreter by setting TRITON_INTERPRET=1 before "
            "triton is imported (slow, for tests)"
        )
    raise RuntimeError(
        f"the triton backend supports CUDA tensors only, got a tensor on {t.device}; "
        f"use backend='portable' for other devices"
    )


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(t: torch.Tensor, config: TritonConfig) -> int:
    if config.num_sms is not None:
        return config.num_sms
    if t.device.type == "cuda":
        return _device_sms(t.device.index if t.device.index is not None else 0)
    return 4


def nc_s_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides (n, c, s) of ``t`` seen as (N, C, S), or None when the spatial dims do not
    collapse into one stride (then the caller makes a contiguous copy).

    Contiguous and channels-last tensors of any rank always collapse.

    >>> nc_s_strides(torch.empty(2, 3, 4, 5))
    (60, 20, 1)
    >>> nc_s_strides(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
    (60, 1, 3)
    """
    spatial = [
        (size, stride)
        for size, stride in zip(t.shape[2:], t.stride()[2:], strict=True)
        if size != 1
    ]
    for (_, outer), (size, inner) in zip(spatial, spatial[1:], strict=False):
        if outer != inner * size:
            return None
    s_stride = spatial[-1][1] if spatial else 1
    return t.stride(0), t.stride(1), s_stride


def _as_nc_s(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = nc_s_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = nc_s_strides(t)
    return t, strides


def _out_like(x: torch.Tensor, config: TritonConfig) -> torch.Tensor:
    """An output with x's memory format (what the op's fake implementation promises)."""
    out = torch.empty_like(x)
    if nc_s_strides(out) is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if config.poison:
        out.fill_(float("nan"))
    return out


def _buffer(shape, dtype, device, config: TritonConfig) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    if config.poison:
        buf.fill_(float("nan"))
    return buf


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"the triton backend takes float16, bfloat16, float32 or float64 input, got {x.dtype}"
        )


_plan_cached = functools.lru_cache(maxsize=4096)(make_plan)  # pure and called on every launch


def plan_for(
    x: torch.Tensor,
    num_groups: int,
    pool_batch: bool,
    stats_given: bool,
    config: TritonConfig | None = None,
    backward: bool = False,
) -> Plan:
    """The :class:`Plan` the launchers use for ``x`` (a thin wrapper over :func:`make_plan`)."""
    config = config or config_from_env()
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    strides = nc_s_strides(x) or (c * s, s, 1)
    channel_contiguous = strides[1] == 1 and (c > 1 or s == 1)
    cfg = TritonConfig(
        path=config.path,
        block=config.block,
        split=config.split,
        batch_block=config.batch_block,
        num_sms=_num_sms(x, config),
        poison=config.poison,
    )
    wide = x.dtype == torch.float64
    return _plan_cached(
        n,
        c,
        s,
        num_groups,
        pool_batch,
        stats_given,
        channel_contiguous,
        cfg,
        backward=backward,
        wide=wide,
    )


def norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    given_mean: torch.Tensor | None,
    given_var: torch.Tensor | None,
    num_groups: int,
    pool_batch: bool,
    eps: float,
    activation: str,
    config: TritonConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the backend interface: returns (y, x + residual or empty, mean, rstd).

    Args:
        x: (N, C, *) input, contiguous or channels-last (other layouts are copied first).
        weight, bias: (C,) in float32 or x's dtype, or None.
        residual: tensor like x added before normalizing, or None.
        given_mean, given_var: (C,) batch-norm statistics to use instead of the batch's.
        num_groups: sets per sample (C for instance/batch norm, 1 for layer norm).
        pool_batch: batch norm: one set per channel over the whole batch.
        eps: added to the variance.
        activation: "" (none), "silu", "gelu" or "relu".
        config: planner overrides; default read from ``GROUPNORM_TRITON_*`` variables.
    """
    check_device(x)
    _check_dtype(x)
    config = config or config_from_env()
    if x.numel() == 0:
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
    k = _kernels()
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    cg = c // num_groups
    acc = _acc(x.dtype)
    xv, xs = _as_nc_s(x)
    y = _out_like(x, config)
    ys = nc_s_strides(y)
    has_res = residual is not None
    if has_res:
        rv, rs = _as_nc_s(residual)
        total = _out_like(x, config)
        ts = nc_s_strides(total)
    else:
        rv, rs = xv, xs
        total = x.new_empty(0)
        ts = ys
    stats_given = given_mean is not None
    plan = plan_for(x, num_groups, pool_batch, stats_given, config)
    sets = c if pool_batch else n * num_groups
    code = k.ACTIVATION_CODES[activation]
    tl_acc = _tl_acc(x.dtype)
    w = weight if weight is not None else xv
    b = bias if bias is not None else xv
    t_arg = total if has_res else y
    flags = dict(
        HAS_RESIDUAL=has_res,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ACTIVATION=code,
        ACC=tl_acc,
        BLOCK_C=plan.block_c,
        BLOCK_S=plan.block_s,
        num_warps=plan.num_warps,
    )

    if plan.path == "fused":
        mean = _buffer((n, num_groups), acc, x.device, config)
        rstd = _buffer((n, num_groups), acc, x.device, config)
        k._fwd_fused_kernel[(sets,)](
            xv,
            rv,
            y,
            t_arg,
            w,
            b,
            mean,
            rstd,
            s,
            num_groups,
            cg,
            float(cg * s),
            eps,
            *xs,
            *rs,
            *ys,
            *ts,
            ONE_TILE=plan.one_tile,
            **flags,
        )
        return y, total, mean, rstd

    rows = triton_cdiv(n, plan.batch_block) * plan.split
    if stats_given:
        mean = given_mean.to(acc).contiguous().clone()
        rstd = torch.rsqrt(given_var.to(acc) + eps).contiguous()
    else:
        pmean = _buffer((rows, c), acc, x.device, config)
        pm2 = _buffer((rows, c), acc, x.device, config)
        k._fwd_partial_kernel[(rows, plan.c_tiles)](
            xv,
            rv,
            pmean,
            pm2,
            n,
            c,
            s,
            cg,
            plan.batch_block,
            plan.chunk_s,
            plan.split,
            *xs,
            *rs,
            HAS_RESIDUAL=has_res,
            POOL=pool_batch,
            ACC=tl_acc,
            BLOCK_C=plan.block_c,
            BLOCK_S=plan.block_s,
            num_warps=plan.num_warps,
        )
        stat_shape = (c,) if pool_batch else (n, num_groups)
        mean = _buffer(stat_shape, acc, x.device, config)
        rstd = _buffer(stat_shape, acc, x.device, config)
        set_size = float(n * s if pool_batch else cg * s)
        k._fwd_finalize_kernel[(sets,)](
            xv,
            rv,
            pmean,
            pm2,
            mean,
            rstd,
            n,
            c,
            s,
            num_groups,
            cg,
            plan.batch_block,
            plan.chunk_s,
            plan.split,
            set_size,
            eps,
            xs[0],
            xs[1],
            rs[0],
            rs[1],
            HAS_RESIDUAL=has_res,
            POOL=pool_batch,
            ACC=tl_acc,
            BLOCK=_FINALIZE_BLOCK,
            num_warps=4,
        )
    k._fwd_apply_kernel[(rows, plan.c_tiles)](
        xv,
        rv,
        y,
        t_arg,
        w,
        b,
        mean,
        rstd,
        n,
        c,
        s,
        num_groups,
        cg,
        plan.batch_block,
        plan.chunk_s,
        plan.split,
        *xs,
        *rs,
        *ys,
        *ts,
        POOL=pool_batch,
        **flags,
    )
    return y, total, mean, rstd


def _column_sums(k, pdw, pdb, weight, bias, need_dw, need_db, config: TritonConfig):
    """dweight, dbias (or None) from the partial buffers, in one launch."""
    rows, c = pdw.shape
    dw = _buffer((c,), weight.dtype, pdw.device, config) if need_dw else None
    db = _buffer((c,), bias.dtype, pdw.device, config) if need_db else None
    if need_dw or need_db:
        k._column_sum_kernel[(triton_cdiv(c, _COLUMN_BLOCK_C),)](
            pdw,
            pdb,
            dw if need_dw else pdw,
            db if need_db else pdb,
            rows,
            c,
            HAS_DW=need_dw,
            HAS_DB=need_db,
            BLOCK_R=_COLUMN_BLOCK_R,
            BLOCK_C=_COLUMN_BLOCK_C,
            num_warps=4,
        )
    return dw, db


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    pool_batch: bool,
    stats_given: bool,
    activation: str,
    needs: tuple[bool, bool, bool],
    config: TritonConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of the backend interface: (dx, dweight, dbias), None for what is not needed.

    ``x`` is what was normalized (x + residual when there was one); ``mean``/``rstd`` are the
    forward's. dweight/dbias are column sums of per-program float partials: deterministic.
    """
    check_device(x)
    _check_dtype(x)
    config = config or config_from_env()
    need_dx, need_dw, need_db = needs
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    if x.numel() == 0:
        return portable.backward(
            dy,
            x,
            weight,
            bias,
            mean,
            rstd,
            num_groups,
            pool_batch,
            stats_given,
            activation,
            (need_dx, need_dw, need_db),
        )
    k = _kernels()
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    cg = c // num_groups
    acc = _acc(x.dtype)
    tl_acc = _tl_acc(x.dtype)
    xv, xs = _as_nc_s(x)
    dyv, ds = _as_nc_s(dy)
    mean = mean.to(acc).contiguous()
    rstd = rstd.to(acc).contiguous()
    w = weight if weight is not None else xv
    b = bias if bias is not None else xv
    code = k.ACTIVATION_CODES[activation]
    sets = c if pool_batch else n * num_groups
    plan = plan_for(x, num_groups, pool_batch, stats_given, config, backward=True)
    if plan.path == "fused" and not need_dx:
        split_config = _with_path(config, "split", x)
        plan = plan_for(x, num_groups, pool_batch, stats_given, split_config, backward=True)
    flags = dict(
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ACTIVATION=code,
        ACC=tl_acc,
        BLOCK_C=plan.block_c,
        BLOCK_S=plan.block_s,
        num_warps=plan.num_warps,
    )
    dx = _out_like(x, config) if need_dx else None
    os_ = nc_s_strides(dx) if need_dx else xs
    dx_arg = dx if need_dx else xv

    if plan.path == "fused":
        pdw = _buffer((n, c), acc, x.device, config)
        pdb = _buffer((n, c), acc, x.device, config)
        k._bwd_fused_kernel[(sets,)](
            dyv,
            xv,
            w,
            b,
            mean,
            rstd,
            pdw,
            pdb,
            dx_arg,
            c,
            s,
            num_groups,
            cg,
            float(cg * s),
            *xs,
            *ds,
            *os_,
            **flags,
        )
    else:
        rows = triton_cdiv(n, plan.batch_block) * plan.split
        need_partials = need_dw or need_db or (need_dx and not stats_given)
        if need_partials:
            pdw = _buffer((rows, c), acc, x.device, config)
            pdb = _buffer((rows, c), acc, x.device, config)
            k._bwd_partial_kernel[(rows, plan.c_tiles)](
                dyv,
                xv,
                w,
                b,
                mean,
                rstd,
                pdw,
                pdb,
                n,
                c,
                s,
                num_groups,
                cg,
                plan.batch_block,
                plan.chunk_s,
                plan.split,
                *xs,
                *ds,
                POOL=pool_batch,
                **flags,
            )
        if need_dx:
            if stats_given:
                c1 = c2 = mean  # unused by the kernel
            else:
                c1 = _buffer((sets,), acc, x.device, config)
                c2 = _buffer((sets,), acc, x.device, config)
                set_size = float(n * s if pool_batch else cg * s)
                k._bwd_finalize_kernel[(sets,)](
                    pdw,
                    pdb,
                    w,
                    c1,
                    c2,
                    n,
                    c,
                    num_groups,
                    cg,
                    plan.batch_block,
                    plan.split,
                    set_size,
                    HAS_WEIGHT=weight is not None,
                    POOL=pool_batch,
                    ACC=tl_acc,
                    BLOCK=_FINALIZE_BLOCK,
                    num_warps=4,
                )
            k._bwd_apply_kernel[(rows, plan.c_tiles)](
                dyv,
                xv,
                w,
                b,
                mean,
                rstd,
                c1,
                c2,
                dx_arg,
                n,
                c,
                s,
                num_groups,
                cg,
                plan.batch_block,
                plan.chunk_s,
                plan.split,
                *xs,
                *ds,
                *os_,
                POOL=pool_batch,
                STATS_GIVEN=stats_given,
                **flags,
            )
    if not (need_dw or need_db):
        return dx, None, None
    dw, db = _column_sums(k, pdw, pdb, weight, bias, need_dw, need_db, config)
    return dx, dw, db


def _with_path(config: TritonConfig, path: str, x: torch.Tensor) -> TritonConfig:
    return TritonConfig(
        path=path,
        block=config.block,
        split=config.split,
        batch_block=config.batch_block,
        num_sms=config.num_sms,
        poison=config.poison,
    )
