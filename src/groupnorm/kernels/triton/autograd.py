"""The Triton backend's own autograd for plain eager calls (one ``torch.autograd.Function``).

A call that needs gradients launches its forward kernels first and records the graph after:
the GPU starts on the forward while the host builds the autograd node, and the work before
the first launch is the same as without gradients.
"""

from __future__ import annotations

import torch

from .. import input_grads, save_for_backward
from .launch import launch_backward, launch_forward


class TritonNorm(torch.autograd.Function):
    """Records a forward already computed by :func:`.launch.launch_forward` (passed in as
    ``outputs``), with :func:`.launch.launch_backward` as its backward; saves only x (or
    x + residual), weight, bias, mean and rstd. Under ``create_graph=True`` the backward is
    the portable core's differentiable one (torch operations) instead of the kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call, outputs):
        # (x, weight, bias and residual are the call's tensors, passed on their own so that
        # autograd records them as the inputs)
        save_for_backward(ctx, call, outputs)
        ctx.set_materialize_grads(False)
        if residual is None:  # the empty sum carries no gradient either
            ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_y, grad_total, _grad_mean, _grad_rstd):
        saved, needs = ctx.saved_tensors, ctx.needs_input_grad
        return input_grads(grad_y, grad_total, saved, ctx.meta, needs, launch_backward)


# Function.apply without its functorch preamble, which only unwraps functorch's dead wrappers
# when no transform is active: the dispatcher sends this route plain tensors outside any
# transform, so the C++ entry that preamble ends in is called directly.
_record = super(torch.autograd.Function, TritonNorm).apply


def eager(call):
    """See :func:`groupnorm.kernels.triton.eager`."""
    x, weight, bias, residual = call.x, call.weight, call.bias, call.residual
    if not (
        torch.is_grad_enabled()
        and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad)
        )
    ):
        return launch_forward(call)
    torch._C._set_grad_enabled(False)  # (the outputs get their history from the record below)
    try:
        outputs = launch_forward(call)
    finally:
        torch._C._set_grad_enabled(True)
    return _record(x, weight, bias, residual, call, outputs)
