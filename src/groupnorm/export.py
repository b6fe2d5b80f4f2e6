r"""Export support: the normalization in plain ATen ops while a model is being exported.

Eager and ``torch.compile`` runs go through the ``groupnorm::forward`` custom op. An exporter,
though, would keep that op as an opaque node that only this library can run: ONNX has no
translation for it, and an ``ExportedProgram`` would need ``groupnorm`` installed to load. So
while a model is being exported, :func:`groupnorm.normalize` calls :func:`decomposed_normalize`
instead, which computes the same thing with ``torch.nn.functional.group_norm`` /
``batch_norm`` and the activation functions. Exporters know those ops, so

* ``torch.onnx.export(model, args)`` works with no extra arguments, with the default
  (``dynamo=True``, based on ``torch.export``) exporter of torch >= 2.9 and with the legacy
  TorchScript one (``dynamo=False``); the graph holds only standard ONNX operators. Group norm
  becomes ``InstanceNormalization`` on a (N, G, -1) view plus a per-channel ``Mul``/``Add`` at
  every opset, on purpose not opset 21's ``GroupNormalization`` (see ``_group_norm``: ONNX
  defines it with E[x²] - E[x]², which loses digits when the mean is large);
* ``torch.export.export(model, args)`` gives a program of core ATen ops.

The export path computes in float32 for float16/bfloat16 input (as the kernels do) and casts back.
It is checked against the eager path in ``tests/test_onnx.py``.

Examples:
    >>> m = groupnorm.GroupNormAct(2, 4, activation="silu").eval()
    >>> ep = torch.export.export(m, (torch.randn(2, 4, 3, 3),))
    >>> any("groupnorm" in str(n.target) for n in ep.graph.nodes)
    False
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import Call
from .kernels.portable import apply_activation
from .kernels.running import update_running_stats

__all__ = ["is_exporting", "decomposed_normalize"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_exporting() -> bool:
    """Whether a model is being traced by ``torch.export`` or ``torch.onnx.export``.

    ``torch.compile`` is not exporting: it keeps the fused custom op.

    >>> is_exporting()
    False
    """
    if torch.compiler.is_exporting():
        return True
    if torch.compiler.is_compiling():
        return False
    return torch.onnx.is_in_onnx_export()


def _group_norm(x: Tensor, num_groups: int, w: Tensor | None, b: Tensor | None, eps: float):
    if not torch.compiler.is_exporting():  # the TorchScript ONNX exporter knows group_norm only
        return torch.nn.functional.group_norm(x, num_groups, w, b, eps)
    # Under torch.export: native_group_norm rather than group_norm. At opset >= 21 the ONNX
    # exporter maps aten.group_norm to GroupNormalization-21, whose ONNX function body takes
    # Var = E[x^2] - E[x]^2; onnxruntime's float32 results lose 1e-4..1e-3 once |mean| is 10..50
    # std. native_group_norm is lowered through InstanceNormalization at every opset (centred).
    n, c = x.shape[0], x.shape[1]
    return torch.ops.aten.native_group_norm(x, w, b, n, c, x.numel() // (n * c), num_groups, eps)[0]


def decomposed_normalize(call: Call) -> tuple[Tensor, Tensor]:
    """``groupnorm::forward`` written with standard ATen ops; returns (y, x + residual or x).

    ``call.given_mean``/``call.given_var`` are batch norm's inference statistics;
    ``call.running_update`` (batch norm in training: running mean, running var, momentum) is
    updated in place by the same update as every other route
    (:func:`groupnorm.kernels.running.update_running_stats`).
    """
    x, weight, bias, residual = call.x, call.weight, call.bias, call.residual
    eps, given_mean, given_var = call.eps, call.given_mean, call.given_var
    src = x + residual if residual is not None else x
    work = src.float() if src.dtype in _LOW_PRECISION else src
    w = weight.to(work.dtype) if weight is not None else None
    b = bias.to(work.dtype) if bias is not None else None
    if not call.pool_batch:
        z = _group_norm(work, call.num_groups, w, b, eps)
    elif given_mean is not None:
        z = torch.nn.functional.batch_norm(
            work, given_mean.to(work.dtype), given_var.to(work.dtype), w, b, False, 0.0, eps
        )
    else:
        dims = [0] + list(range(2, work.dim()))
        var, mean = torch.var_mean(work, dim=dims, correction=0)
        z = torch.nn.functional.batch_norm(work, mean, var, w, b, False, 0.0, eps)
        if call.running_update is not None:
            running_mean, running_var, momentum = call.running_update
            count = work.numel() // work.shape[1]
            rstd = torch.rsqrt(var + eps)
            update_running_stats(running_mean, running_var, mean, rstd, eps, momentum, count)
    y = apply_activation(z, call.activation).to(x.dtype)
    return y, src
