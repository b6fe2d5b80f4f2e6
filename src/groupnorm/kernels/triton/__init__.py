"""Triton backend: fused GPU kernels for every mode of the core (see ``docs/triton.md``).

Entry points (inputs already validated by the caller):

* :func:`forward` / :func:`backward`: the plain backend interface of :mod:`groupnorm.kernels`
  (a :class:`~groupnorm.kernels.Call` in, tensors out, no autograd), used by the
  ``groupnorm::forward`` custom op;
* :func:`eager`: plain eager mode; owns its autograd (one ``torch.autograd.Function``), or
  launches directly when no gradient is needed;
* :func:`call_triton_op`: under ``torch.compile``: the ``groupnorm::triton_forward`` op built
  with ``torch.library.triton_op``, so Inductor sees the Triton kernels;
* :func:`prefers_triton`: whether ``backend="auto"`` should use Triton for a CUDA call, and
  :data:`INSTALLED`: whether the ``triton`` package is there at all;
* :func:`reload_config`: re-read the ``GROUPNORM_TRITON_*`` variables (read once otherwise).

Importing this package does not import Triton; the kernels are loaded on the first launch, so
CPU-only installs work and :mod:`groupnorm.kernels.triton.plan` can be used anywhere. On CPU
tensors the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported); otherwise a clear ``RuntimeError`` says so.
"""

from __future__ import annotations

import importlib.util

import torch

from .plan import Plan, TritonConfig, config_from_env, make_plan
from .settings import reload_config

__all__ = [
    "forward",
    "backward",
    "eager",
    "call_triton_op",
    "prefers_triton",
    "INSTALLED",
    "reload_config",
    "Plan",
    "TritonConfig",
    "config_from_env",
    "make_plan",
]

#: whether the ``triton`` package is installed (found, not imported: importing it is slow)
INSTALLED = importlib.util.find_spec("triton") is not None

_impl = None  # the launch and autograd modules, imported on the first call (they import torch)


def _load():
    global _impl
    from . import autograd, launch

    _impl = (launch.launch_forward, launch.launch_backward, autograd.eager)
    return _impl


def forward(call):
    """The backend ``forward`` (see :mod:`groupnorm.kernels`): (y, x + residual or empty,
    mean, rstd)."""
    return (_impl or _load())[0](call)


def backward(grad):
    """The backend ``backward`` (see :mod:`groupnorm.kernels`): (dx, dweight, dbias)."""
    return (_impl or _load())[1](grad)


def eager(call):
    """Plain-eager entry: (y, x + residual or empty, mean, rstd), differentiable in x, weight,
    bias and residual (mean and rstd are not).

    With no gradient needed (``no_grad``, or no input requiring grad) this is the launcher
    alone; otherwise the forward kernels are launched first, and one
    ``torch.autograd.Function`` then records them, saving x (or x + residual), weight, bias,
    mean and rstd for :func:`backward`. Inputs must already be validated, and plain (the
    dispatcher's plain eager context: no functorch transform, no tensor subclass).
    """
    return (_impl or _load())[2](call)


def call_triton_op(call):
    """The call to record under ``torch.compile`` when the backend is Triton:
    ``torch.ops.groupnorm.triton_forward`` (a ``torch.library.triton_op``, whose kernels
    Inductor sees), with registered autograd through ``groupnorm::triton_backward``.

    Returns ``None`` when that route is unavailable, and the caller then records the opaque
    ``groupnorm::forward`` op instead: when this torch has no ``torch.library.triton_op``, when
    Triton cannot be imported, or when the kernels run in Triton's interpreter (CPU tensors,
    ``TRITON_INTERPRET=1``), whose kernels cannot be traced with fake tensors.
    """
    from .library import call_triton_op as call_op

    return call_op(call)


def prefers_triton(x: torch.Tensor, num_groups: int, pool_batch: bool) -> bool:
    """For ``backend="auto"`` on CUDA: whether Triton is expected to beat torch's native kernels
    on ``x`` (True from ``GROUPNORM_AUTO_TRITON_MIN_NUMEL`` elements up, default 2**26).

    The default comes from the H100 measurements in docs/triton.md ("backend='auto'"): in a
    plain eager loop, every measured shape below 2**26 elements had a forward or
    forward+backward ratio under 0.95x of torch, and both shapes above it were faster. The
    grouping does not change the threshold yet (one size for every mode), but is part of the
    signature so that a measured per-mode rule can replace it without touching the caller.

    >>> prefers_triton(torch.empty(0), 1, False)
    False
    """
    from .settings import settings  # a local name: the package attribute stays the module

    del num_groups, pool_batch  # one threshold for every mode until measured otherwise
    return x.numel() >= max(1, settings().auto_min_numel)
