"""Batch norm's running statistics: the one update every route uses.

After a training call, each channel's running mean and variance move towards the batch's values
as ``torch.nn.BatchNorm`` moves them (the variance unbiased with ``count / (count - 1)``)::

    var     = max(rstd**-2 - eps, 0) * count / max(count - 1, 1)
    running = running + momentum * (batch value - running)

computed in float64 from the batch's mean and rstd (float32, or float64 for float64 input) and
rounded to float32 (then to bfloat16/float16 for statistics in those dtypes; float64 statistics
keep the float64 value). The CPU extension has the same formula in C++
(``update_running`` in ``cpu_ext/gn_ops.cpp``), which its batch-norm entry calls; this module
calls it too for CPU tensors in plain eager mode, and ``tests/test_dispatch.py`` checks that the
torch form below gives the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    momentum: float,
    count: int,
    *,
    native: bool = False,
) -> None:
    """Move ``running_mean``/``running_var`` (in place) towards the batch's ``mean``/``rstd``.

    ``count`` is the number of values each channel's statistics were taken over. With
    ``native=True`` (plain eager CPU calls; the caller knows) the C++ twin runs when it takes the
    tensors, which costs one call instead of a dozen tensor operations.
    """
    if native:
        from . import cpu_ext

        ext = cpu_ext.extension()
        if ext is not None and ext.update_running(
            running_mean, running_var, mean, rstd, eps, momentum, count
        ):
            return
    with torch.no_grad():
        r = rstd.detach().to(torch.float64)
        var = (1.0 / (r * r) - eps).clamp_min(0.0) * (count / max(count - 1, 1))
        old_mean = running_mean.to(torch.float64)
        old_var = running_var.to(torch.float64)
        new_mean = old_mean + (mean.detach().to(torch.float64) - old_mean) * momentum
        new_var = old_var + (var - old_var) * momentum
        if running_mean.dtype != torch.float64:  # through float32, as the C++ twin rounds
            new_mean, new_var = new_mean.float(), new_var.float()
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
