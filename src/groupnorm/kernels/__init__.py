"""Compute backends, and the choice among them.

Every backend module exposes the same plain functions (tensors in, tensors out):

``forward(x, weight, bias, residual, given_mean, given_var, num_groups, pool_batch, eps,
activation) -> (y, sum, mean, rstd)``
    No autograd. ``sum`` is ``x + residual`` when a residual is given, else an empty tensor.
    ``mean`` and ``rstd`` have shape (N, G), or (C,) when ``pool_batch`` (batch norm), in float32
    (float64 for float64 input).

``backward(dy, x, weight, bias, mean, rstd, num_groups, pool_batch, stats_given, activation,
needs) -> (dx, dweight, dbias)``
    ``x`` is what was normalized (the sum when there was a residual); ``needs`` says which of the
    three gradients to compute; the others come back as ``None``.

``eager(...)``
    The arguments of ``forward``; the plain-eager entry, which owns its autograd (a C++ node, a
    Python Function, or torch's own derivatives). ``mean``/``rstd`` may be ``None`` where the
    backend kept them inside its autograd node (only for modes without running statistics).

Backends: ``cpu`` (the C++ extension, else torch's kernels), ``aten`` (torch's kernels with the
activation and residual around them; not a user-facing name), ``portable`` (the core in plain
torch ops, any device, forward-mode AD and higher derivatives), ``triton`` (fused GPU kernels;
also runs on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

#: backend names users may pass (``backend=`` or ``GROUPNORM_BACKEND``)
BACKENDS = ("auto", "cpu", "portable", "triton")

# CPython keeps os.environ in a dict of encoded keys; a membership test there costs 0.02 us
# against 0.5 us for os.environ.get (which encodes the key on every call). The variable is read
# on every call that does not name a backend, so that it can be changed at run time.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey("GROUPNORM_BACKEND")
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _ENV_DATA = None


def check_backend(name: object) -> str:
    """The backend name to use: ``name``, or for ``None`` the ``GROUPNORM_BACKEND`` environment
    variable (default ``"auto"``); a ValueError for anything else."""
    if name is None:
        if _ENV_DATA is not None and _ENV_KEY not in _ENV_DATA:
            return "auto"
        name = os.environ.get("GROUPNORM_BACKEND", "auto") or "auto"
    if type(name) is not str or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_LOADED: dict[str, ModuleType] = {}


def _load(name: str) -> ModuleType:
    module = _LOADED.get(name)  # (an import statement costs about a microsecond, even cached)
    if module is None:
        module = _LOADED[name] = _import(name)
    return module


def _import(name: str) -> ModuleType:
    if name == "cpu":
        from . import cpu

        return cpu
    if name == "aten":
        from . import aten

        return aten
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
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The module behind backend ``name`` for tensors on ``device``, for the custom op (which
    sees no sizes): ``auto`` is ``cpu`` on CPU, ``triton`` on CUDA, torch's kernels elsewhere."""
    if name == "auto":
        name = "cpu" if device.type == "cpu" else "triton" if device.type == "cuda" else "aten"
    return _load(name)


def input_grads(grad_y, grad_total, weight, bias, has_residual, needs, backward):
    """The gradients (dx, dweight, dbias, dresidual) of a norm call, for every autograd
    around a backend (the custom ops' registered autograd, Triton's Function and triton_op).

    ``needs`` says which of (x, weight, bias, residual) want a gradient; ``backward(need_dx,
    need_dweight, need_dbias)`` runs the backend's backward for ``grad_y`` and returns three
    tensors, those not asked for unused. With a residual, x + residual was normalized (and
    returned as the sum): x and the residual get the same gradient, the sum's own gradient
    ``grad_total`` added. ``grad_y``/``grad_total`` may be None (outputs not used).
    """
    need_dx = needs[0] or (has_residual and needs[3])
    need_dw = weight is not None and needs[1]
    need_db = bias is not None and needs[2]
    dx = dw = db = None
    if grad_y is not None and (need_dx or need_dw or need_db):
        dx, dw, db = backward(need_dx, need_dw, need_db)
        dx, dw, db = (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None)
    if has_residual and need_dx and grad_total is not None:
        dx = grad_total if dx is None else dx + grad_total
    return (dx if needs[0] else None), dw, db, (dx if has_residual and needs[3] else None)


def select(name: str, x: torch.Tensor, num_groups: int, pool_batch: bool) -> ModuleType:
    """The module behind backend ``name`` for a plain eager call on ``x``.

    ``auto`` is ``cpu`` on CPU. On CUDA it is ``triton`` where the Triton kernels are measured
    faster than torch's at this size (``triton.prefers_triton``; see ``docs/triton.md``), else
    torch's own kernels, so that ``auto`` never makes a call slower than torch.nn's."""
    if name != "auto":
        return _load(name)
    if x.is_cpu:
        return _load("cpu")
    if x.is_cuda:
        try:
            triton_backend = _load("triton")
        except RuntimeError:  # no Triton installed: torch's kernels
            return _load("aten")
        if triton_backend.prefers_triton(x, num_groups, pool_batch):
            return triton_backend
    return _load("aten")
