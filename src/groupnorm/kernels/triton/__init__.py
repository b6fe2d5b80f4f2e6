"""Triton backend: fused GPU kernels for every mode of the core (see ``docs/triton.md``).

Implements the backend interface documented in :mod:`groupnorm.kernels`. Importing this package
does not import Triton; the kernels are loaded on the first call, so CPU-only installs work and
:mod:`groupnorm.kernels.triton.plan` can be used anywhere.

On CPU tensors the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set
before Triton is imported); otherwise a clear ``RuntimeError`` says so.
"""

from __future__ import annotations

from .plan import Plan, TritonConfig, config_from_env, make_plan

__all__ = ["forward", "backward", "Plan", "TritonConfig", "config_from_env", "make_plan"]


def forward(
    x, weight, bias, residual, given_mean, given_var, num_groups, pool_batch, eps, activation
):
    """The backend ``forward`` (see :mod:`groupnorm.kernels`), planned from the environment."""
    from .launch import norm_forward

    return norm_forward(
        x, weight, bias, residual, given_mean, given_var, num_groups, pool_batch, eps, activation
    )


def backward(
    dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation, needs
):
    """The backend ``backward`` (see :mod:`groupnorm.kernels`), planned from the environment."""
    from .launch import norm_backward

    return norm_backward(
        dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation, needs
    )
