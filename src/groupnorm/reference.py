r"""The normalization formula written plainly in float64: the source of truth for every test.

For an input of shape (N, C, \*) the paper's four methods share one formula. Each element i
belongs to a set :math:`S_i`; with :math:`m = |S_i|`,

.. math::

    \mu_i = \frac{1}{m}\sum_{k \in S_i} x_k, \qquad
    \sigma_i = \sqrt{\frac{1}{m}\sum_{k \in S_i} (x_k - \mu_i)^2 + \epsilon}, \qquad
    y_i = \gamma_c \frac{x_i - \mu_i}{\sigma_i} + \beta_c

(the *biased* variance). The modes differ only in :math:`S_i`:

========  =============================================
batch     same channel, every sample and position
layer     same sample, every channel and position
instance  same sample, same channel
group     same sample, same group of C/G channels
========  =============================================

This module shares no code with the kernels on purpose: it is slow and obvious, so that the
fast code can be checked against it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._validation import check_activation, check_mode, resolve_num_groups


class ReferenceResult(NamedTuple):
    """What :func:`reference_norm` returns, all in float64."""

    output: torch.Tensor
    """y, in the input's shape (contiguous)."""
    mean: torch.Tensor
    """Per-set mean: shape (N, G) for layer/instance/group, (C,) for batch."""
    rstd: torch.Tensor
    """Per-set 1/sigma, same shape as ``mean``."""
    sum: torch.Tensor | None
    """x + residual when a residual was given, else None."""


def reference_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The activations the kernels fuse, written from their definitions."""
    name = check_activation(activation)
    if name == "":
        return z
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if name == "silu":
        return z / (1.0 + torch.exp(-z))
    if name == "gelu":  # the exact (erf) form, torch's default
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    raise AssertionError(name)


def reference_norm(
    x: torch.Tensor,
    mode: str = "group",
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = True,
) -> ReferenceResult:
    """Normalize ``x`` in float64 following the formula above.

    ``mode="batch"`` with ``training=False`` uses ``running_mean``/``running_var`` (the population
    statistics of BN at inference) instead of the batch's. ``residual`` is added before
    normalizing. Works for any rank >= 2 and any memory layout (values, not strides, matter).
    The computation is differentiable: pass float64 leaves with ``requires_grad=True`` and call
    ``backward`` on the output to get reference gradients.

    >>> x = torch.randn(2, 6, 4, 4)
    >>> out = reference_norm(x, "group", num_groups=3)
    >>> out.mean.shape, out.output.dtype
    (torch.Size([2, 3]), torch.float64)
    """
    mode = check_mode(mode)
    x64 = x.to(torch.float64)
    if residual is not None:
        x64 = x64 + residual.to(torch.float64)
    n, c = x64.shape[:2]
    if mode == "group":
        groups = resolve_num_groups(c, num_groups, group_size)
    elif mode == "layer":
        groups = 1
    else:
        groups = c

    if mode == "batch":
        # One set per channel: every sample, every position.
        per_channel = x64.transpose(0, 1).reshape(c, -1)  # (C, N * spatial)
        if training or running_mean is None:
            mean = per_channel.mean(dim=1)
            var = ((per_channel - mean[:, None]) ** 2).mean(dim=1)
        else:
            mean = running_mean.detach().to(torch.float64)
            var = running_var.detach().to(torch.float64)
        rstd = 1.0 / torch.sqrt(var + eps)
        shape = (1, c) + (1,) * (x64.dim() - 2)
        xhat = (x64 - mean.view(shape)) * rstd.view(shape)
    else:
        # One set per (sample, group of C/G channels), all positions.
        sets = x64.reshape(n, groups, -1) if x64.numel() else x64.reshape(n, groups, 0)
        mean = sets.mean(dim=2)
        var = ((sets - mean[:, :, None]) ** 2).mean(dim=2)
        rstd = 1.0 / torch.sqrt(var + eps)
        xhat = ((sets - mean[:, :, None]) * rstd[:, :, None]).reshape(x64.shape)

    shape = (1, c) + (1,) * (x64.dim() - 2)
    y = xhat
    if weight is not None:
        y = y * weight.to(torch.float64).view(shape)
    if bias is not None:
        y = y + bias.to(torch.float64).view(shape)
    y = reference_activation(y, activation)
    return ReferenceResult(y, mean, rstd, x64 if residual is not None else None)
