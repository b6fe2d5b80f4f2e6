"""The ``groupnorm::forward`` / ``groupnorm::backward`` custom ops and their autograd.

Registering the core with :mod:`torch.library` gives one opaque node that ``torch.compile``
(``fullgraph=True``) traces through with the fake implementations below, instead of breaking
the graph on a Python-level autograd.Function. The ops take validated arguments only; the
dispatcher (:mod:`groupnorm.dispatch`) sends calls here while a compiler, tracer, mode, functorch
transform or tensor subclass watches; plain eager calls go to a backend's own eager entry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import Call, GradCall, input_grads, save_for_backward, select
from .kernels.portable import acc_dtype


def record(call: Call, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``groupnorm::forward`` op on ``call``, with ``backend`` the name of the backend its
    implementation and its backward take (what ``kernels.decide`` chose for the call)."""
    return forward_op(*call.schema_args(), backend)


@torch.library.custom_op("groupnorm::forward", mutates_args=())
def forward_op(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``x``; returns (y, x + residual or an empty tensor, mean, rstd). ``backend``
    names a backend, or is ``auto`` to let ``kernels.decide`` choose from ``x``."""
    call = Call(
        x, weight, bias, residual, given_mean, given_var, num_groups, pool_batch, eps, activation
    )
    return select(backend, x, num_groups, pool_batch).forward(call)


@forward_op.register_fake
def _(*args):
    *fields, _backend = args
    call = Call(*fields)
    x = call.x
    shape = (x.shape[1],) if call.pool_batch else (x.shape[0], call.num_groups)
    acc = acc_dtype(x.dtype)
    total = torch.empty_like(x) if call.residual is not None else x.new_empty(0)
    return (
        torch.empty_like(x),
        total,
        x.new_empty(shape, dtype=acc),
        x.new_empty(shape, dtype=acc),
    )


@torch.library.custom_op("groupnorm::backward", mutates_args=())
def backward_op(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias); a gradient not asked for comes back as an empty tensor."""
    needs = (need_dx, need_dweight, need_dbias)
    grad = GradCall(
        dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation, needs
    )
    grads = select(backend, x, num_groups, pool_batch).backward(grad)
    # Outputs may not alias each other: a fresh empty tensor for each gradient not computed.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@backward_op.register_fake
def _(*args):
    *fields, _backend = args
    grad = GradCall.from_schema_args(fields)
    x, weight, bias = grad.x, grad.weight, grad.bias
    need_dx, need_dw, need_db = grad.needs
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = torch.empty_like(weight) if need_dw and weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if need_db and bias is not None else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    *fields, backend = inputs
    save_for_backward(ctx, Call(*fields), output)
    ctx.backend = backend


def _backward(ctx, grad_y, grad_total, _grad_mean, _grad_rstd):
    """Input gradients of the forward op, through the ``groupnorm::backward`` op; under
    ``create_graph=True`` (grad mode on in the backward) through the portable core's torch
    operations, whose gradients are differentiable again."""

    def backward(grad):
        return backward_op(*grad.schema_args(), ctx.backend)

    saved, needs = ctx.saved_tensors, ctx.needs_input_grad
    return input_grads(grad_y, grad_total, saved, ctx.meta, needs, backward)


torch.library.register_autograd("groupnorm::forward", _backward, setup_context=_setup_context)
