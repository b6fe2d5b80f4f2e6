"""``groupnorm::triton_forward`` / ``groupnorm::triton_backward``: the Triton path as
``torch.library.triton_op``\\ s, so that ``torch.compile`` (Inductor) sees the kernels instead of
an opaque call.

The ops' bodies are the launchers' plans with every launch through
``torch.library.wrap_triton``; traced with fake tensors they record the kernels with their
arguments. Two details the tracing needs:

* planning works on plain ints: symbolic sizes (``dynamic=True``) are specialized with ``int()``
  (:func:`.launch._concrete`), so a new shape recompiles, as the planner's tiles depend on it;
* ``eps`` reaches the kernels as a Python float (the plans pass ``float(eps)``), which Triton
  passes as float32, never as a float64 tensor; the accumulation dtype is a constexpr
  ``tl.float32``/``tl.float64`` that Inductor writes back into its generated code.

Registered on first use (:func:`register`), which imports Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import Call, GradCall, input_grads, save_for_backward

_registered: bool | None = None  # None: not tried; False: unavailable here


def register() -> bool:
    """Define the two ops (once). False when this torch or Triton cannot."""
    global _registered
    if _registered is not None:
        return _registered
    try:
        import triton  # noqa: F401
        from torch.library import triton_op, wrap_triton  # noqa: F401
    except ImportError:
        _registered = False
        return False
    forward_op = triton_op("groupnorm::triton_forward", mutates_args=())(_forward)
    triton_op("groupnorm::triton_backward", mutates_args=())(_backward)
    forward_op.register_autograd(_grads, setup_context=_setup_context)
    _registered = True
    return True


def _forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    given_mean: Tensor | None,
    given_var: Tensor | None,
    num_groups: int,
    pool_batch: bool,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of ``groupnorm::triton_forward``."""
    from .launch import wrapped_forward

    call = Call(
        x, weight, bias, residual, given_mean, given_var, num_groups, pool_batch, eps, activation
    )
    return wrapped_forward(call)


def _backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    pool_batch: bool,
    stats_given: bool,
    activation: str,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The body of ``groupnorm::triton_backward``: (dx, dweight, dbias), an empty tensor for
    each gradient not asked for."""
    from .launch import wrapped_backward

    needs = (need_dx, need_dweight, need_dbias)
    grad = GradCall(
        dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation, needs
    )
    grads = wrapped_backward(grad)
    # Outputs may not alias: a fresh empty tensor for each gradient not computed.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _setup_context(ctx, inputs, output):
    save_for_backward(ctx, Call(*inputs), output)


def _grads(ctx, grad_y, grad_total, _grad_mean, _grad_rstd):
    """The autograd of ``groupnorm::triton_forward``, through ``groupnorm::triton_backward``."""
    saved, needs = ctx.saved_tensors, ctx.needs_input_grad
    return input_grads(grad_y, grad_total, saved, ctx.meta, needs, _backward_op)


def _backward_op(grad):
    return torch.ops.groupnorm.triton_backward(*grad.schema_args())


def available_for(x: Tensor) -> bool:
    """Whether the triton_op route can trace a call on ``x``: registered, and the kernels are
    compiled ones (the interpreter's cannot run on fake tensors)."""
    if x.device.type != "cuda" or not register():
        return False
    from .settings import settings

    return not settings().interpret


def call_triton_op(call):
    """See :func:`groupnorm.kernels.triton.call_triton_op`: the op's outputs, or None."""
    if not available_for(call.x):
        return None
    return torch.ops.groupnorm.triton_forward(*call.schema_args())
