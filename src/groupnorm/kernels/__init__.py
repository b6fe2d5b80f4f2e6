"""Compute backends behind the ``groupnorm`` custom op.

Every backend module exposes the same two plain functions (tensors in, tensors out, no autograd):

``forward(x, weight, bias, residual, given_mean, given_var, num_groups, pool_batch, eps,
activation) -> (y, sum, mean, rstd)``
    ``sum`` is ``x + residual`` when a residual is given, else an empty tensor. ``mean`` and
    ``rstd`` have shape (N, G), or (C,) when ``pool_batch`` (batch norm), in float32 (float64
    for float64 input).

``backward(dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation,
needs) -> (dx, dweight, dbias)``
    ``x`` is what was normalized (the sum when there was a residual); ``needs`` says which of the
    three gradients to compute; the others come back as ``None``.

Backends: ``portable`` (the core in plain torch ops, any device), ``cpu`` (portable plus calls into
torch's native kernels where they are the fastest thing measured), ``triton`` (fused GPU kernels;
also runs on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

BACKENDS = ("auto", "cpu", "portable", "triton")


def check_backend(name: object) -> str:
    if name is None:
        name = os.environ.get("GROUPNORM_BACKEND", "auto") or "auto"
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend(name: str, device: torch.device) -> ModuleType:
    """Resolve a backend name for tensors on ``device`` to the module that implements it."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "cpu":
        from . import cpu

        return cpu
    if name == "portable":
        from . import portable

        return portable
    if name == "triton":
        try:
            from . import triton as triton_backend
        except ImportError as err:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the triton backend needs the 'triton' package (pip install triton); "
                f"import failed with: {err}"
            ) from err
        return triton_backend
    raise ValueError(f"unknown backend {name!r}")
