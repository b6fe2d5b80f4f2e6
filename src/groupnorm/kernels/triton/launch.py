"""Host launchers for the Triton kernels: tensors in, tensors out, no autograd.

A call is planned once per (shape, strides, dtypes, flags, device) and the result kept in a
dictionary: the device and dtype checks, the layout analysis, the choice of path and tiles, and
the kernels' integer arguments and grids all live in a :class:`_ForwardPlan` or
:class:`_BackwardPlan`. A repeated call is one dictionary lookup, the output allocations and the
launches (each a :class:`~.handle.Launch`, which calls the compiled launcher directly after the
first time where Triton allows it).

Both launchers take an optional :class:`TritonConfig` that forces the path, tile size and split
count (tests do); without one they use the configuration read once from the environment
(:func:`.settings.settings`; :func:`.settings.reload_config` re-reads it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import Call, GradCall, portable
from .handle import Launch, direct_launch_declined
from .plan import Plan, TritonConfig, make_plan
from .settings import on_reload, settings

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SET_BLOCK = 256  # entries of a multi-channel set merged at a time by the apply kernels
_COLUMN_BLOCK_R = 16
_COLUMN_BLOCK_C = 128

_forward_plans: dict[tuple, _ForwardPlan] = {}
_backward_plans: dict[tuple, _BackwardPlan] = {}
_explicit: dict[TritonConfig, tuple[dict, dict]] = {}  # plans made under a given config
_wrapped_plans: tuple[dict, dict] = ({}, {})  # the triton_op bodies' (may hold fake tensors)
#: Most plans kept per cache before it is emptied (a program with ever-changing shapes).
MAX_PLANS = 1024


def clear_plans() -> None:
    """Forget every planned call (the next call of each shape plans again)."""
    _forward_plans.clear()
    _backward_plans.clear()
    _explicit.clear()
    _wrapped_plans[0].clear()
    _wrapped_plans[1].clear()


on_reload(clear_plans)


def _kernels():
    """Import the kernel module on first use (imports Triton)."""
    from . import kernels

    return kernels


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, read once)."""
    return settings().interpret


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


_sms: dict[int, int] = {}


def _num_sms(t: torch.Tensor, config: TritonConfig) -> int:
    if config.num_sms is not None:
        return config.num_sms
    if t.device.type == "cuda":
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if index not in _sms:
            _sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return _sms[index]
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


def _layout(t: torch.Tensor) -> tuple[bool, tuple[int, int, int]]:
    """(needs a contiguous copy, its (n, c, s) strides as the kernels will see it)."""
    strides = nc_s_strides(t)
    if strides is not None:
        return False, strides
    shape = t.shape
    s = math.prod(shape[2:])
    return True, (shape[1] * s, s, 1)


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


def plan_for(
    x: torch.Tensor,
    num_groups: int,
    pool_batch: bool,
    stats_given: bool,
    config: TritonConfig | None = None,
    backward: bool = False,
) -> Plan:
    """The :class:`Plan` the launchers use for ``x`` (a thin wrapper over :func:`make_plan`)."""
    config = config or settings().config
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    strides = _layout(x)[1]
    channel_contiguous = strides[1] == 1 and (c > 1 or s == 1)
    cfg = TritonConfig(
        path=config.path,
        block=config.block,
        split=config.split,
        batch_block=config.batch_block,
        num_sms=_num_sms(x, config),
        poison=config.poison,
    )
    return make_plan(
        n,
        c,
        s,
        num_groups,
        pool_batch,
        stats_given,
        channel_contiguous,
        cfg,
        backward=backward,
        wide=x.dtype == torch.float64,
    )


def _caches(config: TritonConfig | None) -> tuple[TritonConfig, dict, dict]:
    if config is None:
        return settings().config, _forward_plans, _backward_plans
    pair = _explicit.get(config)
    if pair is None:
        pair = _explicit[config] = ({}, {})
    return config, pair[0], pair[1]


def _launch(name: str, grid: tuple[int, ...], options: dict[str, Any]) -> Launch:
    k = _kernels()
    s = settings()
    fn = getattr(k, name)
    direct = direct_launch_declined(fn, s.launch, s.interpret) is None
    # The JIT path looks the kernel up on every call, so code that swaps the module attribute
    # (the compile check records launches that way) sees its replacement.
    return Launch(lambda: getattr(k, name), grid, options, direct)


def _check(x: torch.Tensor) -> bool:
    """The checks every plan assumes of a new call's ``x`` (device, dtype), raising what to fix;
    True where ``x`` is empty (nothing to launch: the portable core answers)."""
    check_device(x)
    _check_dtype(x)
    return x.numel() == 0


def _keep(plans: dict, key: tuple, plan):
    """``plan``, now kept in ``plans`` under ``key`` (a full cache is emptied first)."""
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plans[key] = plan
    return plan


def _apply_launch(
    name: str, rows: int, plan: Plan, flags: dict[str, Any], pool: bool, given: bool, cg: int
) -> Launch:
    """The launch of a split path's apply kernel (the forward's or the backward's): one program
    per (row block, channel tile), merging a multi-channel set's partials _SET_BLOCK at a time;
    ``PER_CHANNEL`` where each set is one channel's (batch norm, or ``cg``, the channels a
    group, is 1)."""
    options = dict(
        flags,
        POOL=pool,
        STATS_GIVEN=given,
        PER_CHANNEL=pool or cg == 1,
        BLOCK_F=_SET_BLOCK,
        num_warps=plan.num_warps,
    )
    return _launch(name, (rows, plan.c_tiles), options)


def _new(like: torch.Tensor, poison: bool, wrapped: bool = False) -> torch.Tensor:
    """A fresh tensor like the kept ``like`` (shape, dtype, device): ``empty_like`` is the
    cheapest allocation from Python. The triton_op bodies' plans may keep fake tensors: there,
    plain ``empty``."""
    if wrapped:
        buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    else:
        buf = torch.empty_like(like)
    if poison:
        buf.fill_(float("nan"))
    return buf


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


class _Plan:
    """What the forward and backward plans keep alike of a call's ``x``."""

    def _geometry(self, x, num_groups: int, config: TritonConfig) -> tuple:
        """Sets the accumulation dtype, the poisoning option, whether x is copied first, and
        the outputs' memory format: empty_like(x) (x's format, what the ops' fakes promise)
        unless x's spatial dims do not collapse; then contiguous (the same strides on every
        call). Returns (n, c, s, channels a group, x's strides, the outputs' strides)."""
        n, c = x.shape[0], x.shape[1]
        self.acc = _acc(x.dtype)
        self.poison = config.poison
        self.copy_x, xs = _layout(x)
        self.out_format = torch.contiguous_format if self.copy_x else torch.preserve_format
        os_ = nc_s_strides(torch.empty_like(x, device="meta", memory_format=self.out_format))
        if os_ is None:
            self.out_format = torch.contiguous_format
            os_ = nc_s_strides(torch.empty_like(x, device="meta", memory_format=self.out_format))
        return n, c, math.prod(x.shape[2:]), c // num_groups, xs, os_


class _ForwardPlan(_Plan):
    """Everything about a forward call that depends only on its key (see module docstring)."""

    def __init__(self, call: Call, x, residual, config: TritonConfig) -> None:
        """``x`` and ``residual`` are the call's, or stand-ins with plain-int sizes."""
        num_groups, pool_batch = call.num_groups, call.pool_batch
        k = _kernels()
        n, c, s, cg, xs, ys = self._geometry(x, num_groups, config)
        self.has_res = residual is not None
        if self.has_res:
            self.copy_r, rs = _layout(residual)
        else:
            self.copy_r, rs = False, xs
        ts = ys  # the sum is allocated like the output
        stats_given = call.given_mean is not None
        self.plan = plan = plan_for(x, num_groups, pool_batch, stats_given, config)
        self.path = plan.path
        self.set_size = float(n * s if pool_batch else cg * s)
        stat_shape = (c,) if pool_batch else (n, num_groups)
        # empty_like of a kept tensor is the cheapest allocation torch offers from Python.
        self.stats_like = torch.empty(stat_shape, dtype=self.acc, device=x.device)
        self.has_w = call.weight is not None
        self.has_b = call.bias is not None
        flags = dict(
            HAS_RESIDUAL=self.has_res,
            HAS_WEIGHT=self.has_w,
            HAS_BIAS=self.has_b,
            ACTIVATION=k.ACTIVATION_CODES[call.activation],
            ACC=_tl_acc(x.dtype),
            BLOCK_C=plan.block_c,
            BLOCK_S=plan.block_s,
        )
        if plan.path == "fused":
            self.ints = (s, num_groups, cg, *xs, *rs, *ys, *ts)
            self.main = _launch(
                "_fwd_fused_kernel",
                (n * num_groups,),
                dict(flags, ONE_TILE=plan.one_tile, num_warps=plan.num_warps),
            )
            return
        rows = _cdiv(n, plan.batch_block) * plan.split
        # One workspace for both partials: means in the first half, M2 in the second.
        self.ws_like = torch.empty((2, rows, c), dtype=self.acc, device=x.device)
        self.half = rows * c
        geometry = (n, c, s, cg, plan.batch_block, plan.chunk_s, plan.split)
        self.partial = None
        if not stats_given:
            self.partial = _launch(
                "_fwd_partial_kernel",
                (rows, plan.c_tiles),
                dict(
                    HAS_RESIDUAL=self.has_res,
                    POOL=pool_batch,
                    ACC=flags["ACC"],
                    BLOCK_C=plan.block_c,
                    BLOCK_S=plan.block_s,
                    num_warps=plan.num_warps,
                ),
            )
            self.partial_ints = (*geometry, *xs, *rs)
        self.ints = (n, c, s, num_groups, cg, plan.batch_block, plan.chunk_s, plan.split)
        self.ints += (*xs, *rs, *ys, *ts)
        self.main = _apply_launch(
            "_fwd_apply_kernel", rows, plan, flags, pool_batch, stats_given, cg
        )

    def __call__(self, call, wrapped=False):
        x, weight, bias, residual = call.x, call.weight, call.bias, call.residual
        main = self.main.wrapped if wrapped else self.main
        if self.copy_x:
            x = x.contiguous()
        y = torch.empty_like(x, memory_format=self.out_format)
        if self.poison:
            y.fill_(float("nan"))
        if self.has_res:
            r = residual.contiguous() if self.copy_r else residual
            total = torch.empty_like(y)
            if self.poison:
                total.fill_(float("nan"))
            t = total
        else:
            r, total, t = x, x.new_empty(0), y
        mean = _new(self.stats_like, self.poison, wrapped)
        rstd = _new(self.stats_like, self.poison, wrapped)
        w = weight if self.has_w else x
        b = bias if self.has_b else x
        eps = float(call.eps)
        if self.path == "fused":
            main(x, r, y, t, w, b, mean, rstd, eps, self.set_size, *self.ints)
            return y, total, mean, rstd
        if self.partial is not None:
            ws = _new(self.ws_like, self.poison, wrapped)
            partial = self.partial.wrapped if wrapped else self.partial
            partial(x, r, ws, ws, self.half, *self.partial_ints)
            main(x, r, y, t, w, b, ws, ws, self.half, mean, rstd, eps, self.set_size, *self.ints)
        else:  # statistics given: the apply kernel reads them in place of the partials
            main(x, r, y, t, w, b, call.given_mean, call.given_var, 0, mean, rstd, eps,
                 self.set_size, *self.ints)  # fmt: skip
        return y, total, mean, rstd


def _forward_key(call: Call, x: torch.Tensor, residual: torch.Tensor | None) -> tuple:
    weight, bias, given_mean = call.weight, call.bias, call.given_mean
    return (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
        None if residual is None else (residual.stride(), residual.dtype),
        None if given_mean is None else (given_mean.dtype, call.given_var.dtype),
        call.num_groups,
        call.pool_batch,
        call.activation,
    )


def launch_forward(
    call: Call, config: TritonConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the backend interface: returns (y, x + residual or empty, mean, rstd).

    ``call.x`` may be contiguous or channels-last (other layouts are copied first); weight and
    bias in float32 or x's dtype. ``config`` holds planner overrides; by default they are read
    once from the ``GROUPNORM_TRITON_*`` variables.
    """
    x = call.x
    key = _forward_key(call, x, call.residual)
    config, plans, _ = _caches(config)
    plan = plans.get(key)
    if plan is None:
        if _check(x):
            return portable.forward(call)
        plan = _keep(plans, key, _ForwardPlan(call, x, call.residual, config))
    return plan(call)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


class _BackwardPlan(_Plan):
    """Everything about a backward call that depends only on its key."""

    def __init__(self, grad: GradCall, x, dy, needs, config: TritonConfig) -> None:
        """``x`` and ``dy`` are the call's, or stand-ins with plain-int sizes; ``needs`` the
        gradients to compute, each False where its parameter is absent."""
        weight, bias, activation = grad.weight, grad.bias, grad.activation
        num_groups, pool_batch, stats_given = grad.num_groups, grad.pool_batch, grad.stats_given
        k = _kernels()
        n, c, s, cg, xs, os_ = self._geometry(x, num_groups, config)
        self.need_dx, self.need_dw, self.need_db = needs
        self.copy_dy, ds = _layout(dy)
        plan = plan_for(x, num_groups, pool_batch, stats_given, config, backward=True)
        if plan.path == "fused" and not self.need_dx:
            forced = TritonConfig(
                path="split",
                block=config.block,
                split=config.split,
                batch_block=config.batch_block,
                num_sms=config.num_sms,
                poison=config.poison,
            )
            plan = plan_for(x, num_groups, pool_batch, stats_given, forced, backward=True)
        self.plan = plan
        self.path = plan.path
        self.has_w = weight is not None
        self.has_b = bias is not None
        self.set_size = float(n * s if pool_batch else cg * s)
        flags = dict(
            HAS_WEIGHT=self.has_w,
            HAS_BIAS=self.has_b,
            ACTIVATION=k.ACTIVATION_CODES[activation],
            ACC=_tl_acc(x.dtype),
            BLOCK_C=plan.block_c,
            BLOCK_S=plan.block_s,
            num_warps=plan.num_warps,
        )
        self.partial = self.apply = None
        if plan.path == "fused":
            rows = n
            self.main = _launch("_bwd_fused_kernel", (n * num_groups,), flags)
            self.ints = (c, s, num_groups, cg, *xs, *ds, *os_)
        else:
            rows = _cdiv(n, plan.batch_block) * plan.split
            geometry = (n, c, s, num_groups, cg, plan.batch_block, plan.chunk_s, plan.split)
            need_partials = self.need_dw or self.need_db or (self.need_dx and not stats_given)
            if need_partials:
                self.partial = _launch(
                    "_bwd_partial_kernel", (rows, plan.c_tiles), dict(flags, POOL=pool_batch)
                )
                self.partial_ints = (*geometry, *xs, *ds)
            if self.need_dx:
                self.apply = _apply_launch(
                    "_bwd_apply_kernel", rows, plan, flags, pool_batch, stats_given, cg
                )
                self.ints = (*geometry, *xs, *ds, *os_)
        # One workspace for both partials: dweight's in the first half, dbias's in the second.
        self.ws_like = torch.empty((2, rows, c), dtype=self.acc, device=x.device)
        self.half = rows * c
        self.columns = None
        if self.need_dw or self.need_db:
            self.columns = _launch(
                "_column_sum_kernel",
                (_cdiv(c, _COLUMN_BLOCK_C),),
                dict(
                    HAS_DW=self.need_dw,
                    HAS_DB=self.need_db,
                    BLOCK_R=_COLUMN_BLOCK_R,
                    BLOCK_C=_COLUMN_BLOCK_C,
                    num_warps=4,
                ),
            )
            self.column_ints = (rows, c)

    def __call__(self, grad: GradCall, wrapped=False):
        dy, x, weight, bias = grad.dy, grad.x, grad.weight, grad.bias
        mean, rstd = grad.mean, grad.rstd

        def run(launch, *args):
            return launch.wrapped(*args) if wrapped else launch(*args)

        if self.copy_x:
            x = x.contiguous()
        if self.copy_dy:
            dy = dy.contiguous()
        if mean.dtype != self.acc or not mean.is_contiguous():
            mean = mean.to(self.acc).contiguous()
        if rstd.dtype != self.acc or not rstd.is_contiguous():
            rstd = rstd.to(self.acc).contiguous()
        w = weight if self.has_w else x
        b = bias if self.has_b else x
        dx = None
        if self.need_dx:
            dx = torch.empty_like(x, memory_format=self.out_format)
            if self.poison:
                dx.fill_(float("nan"))
        dx_arg = dx if dx is not None else x
        ws = None
        half = self.half
        if self.path == "fused":
            ws = _new(self.ws_like, self.poison, wrapped)
            run(self.main, dy, x, w, b, mean, rstd, ws, ws, half, dx_arg, self.set_size, *self.ints)
        else:
            if self.partial is not None:
                ws = _new(self.ws_like, self.poison, wrapped)
                run(self.partial, dy, x, w, b, mean, rstd, ws, ws, half, *self.partial_ints)
            if self.apply is not None:
                if ws is None:  # statistics given: no partials are read
                    p, half = mean, 0
                else:
                    p = ws
                run(self.apply, dy, x, w, b, mean, rstd, p, p, half, dx_arg, self.set_size,
                    *self.ints)  # fmt: skip
        if self.columns is None:
            return dx, None, None
        dw = _new(weight, self.poison, wrapped) if self.need_dw else None
        db = _new(bias, self.poison, wrapped) if self.need_db else None
        run(
            self.columns,
            ws,
            ws,
            self.half,
            dw if dw is not None else ws,
            db if db is not None else ws,
            *self.column_ints,
        )
        return dx, dw, db


def _backward_key(grad: GradCall, x, dy, needs) -> tuple:
    weight, bias = grad.weight, grad.bias
    return (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        dy.stride(),
        dy.dtype,
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
        grad.num_groups,
        grad.pool_batch,
        grad.stats_given,
        grad.activation,
        needs,
    )


def launch_backward(
    grad: GradCall, config: TritonConfig | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of the backend interface: (dx, dweight, dbias), None for what is not needed.

    ``grad.x`` is what was normalized (x + residual when there was one); ``grad.mean``/``rstd``
    are the forward's. dweight/dbias are column sums of per-program float partials:
    deterministic.
    """
    x, needs = grad.x, grad.wanted()
    key = _backward_key(grad, x, grad.dy, needs)
    config, _, plans = _caches(config)
    plan = plans.get(key)
    if plan is None:
        if _check(x):
            return portable.backward(grad)
        plan = _keep(plans, key, _BackwardPlan(grad, x, grad.dy, needs, config))
    return plan(grad)


def _concrete(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself, or a stand-in with plain-int sizes and strides when they are symbolic
    (``torch.compile(dynamic=True)``): planning needs ints, and specializes on them."""
    if t is None or all(type(d) is int for d in (*t.shape, *t.stride())):
        return t
    shape = [int(d) for d in t.shape]
    strides = [int(d) for d in t.stride()]
    return torch.empty_strided(shape, strides, dtype=t.dtype, device=t.device)


def wrapped_forward(call: Call):
    """:func:`launch_forward` with every launch through ``wrap_triton`` (inside a triton_op)."""
    x = call.x
    xc, rc = _concrete(x), _concrete(call.residual)
    key = _forward_key(call, xc, rc)
    config, plans = settings().config, _wrapped_plans[0]
    plan = plans.get(key)
    if plan is None:
        _check(x)
        plan = _keep(plans, key, _ForwardPlan(call, xc, rc, config))
    return plan(call, wrapped=True)


def wrapped_backward(grad: GradCall):
    """:func:`launch_backward` with every launch through ``wrap_triton`` (inside a triton_op)."""
    xc, dyc, needs = _concrete(grad.x), _concrete(grad.dy), grad.wanted()
    config, plans = settings().config, _wrapped_plans[1]
    key = _backward_key(grad, xc, dyc, needs)
    plan = plans.get(key)
    if plan is None:
        _check(grad.x)
        plan = _keep(plans, key, _BackwardPlan(grad, xc, dyc, needs, config))
    return plan(grad, wrapped=True)
