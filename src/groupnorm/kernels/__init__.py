"""Compute backends, and the choice among them.

A call reaches a backend as one :class:`Call` value (its tensors and resolved scalars), built
once by the dispatcher. Every backend module exposes the same plain functions:

``forward(call) -> (y, sum, mean, rstd)``
    No autograd. ``sum`` is ``x + residual`` when a residual is given, else an empty tensor.
    ``mean`` and ``rstd`` have shape (N, G), or (C,) when ``pool_batch`` (batch norm), in float32
    (float64 for float64 input).

``backward(grad) -> (dx, dweight, dbias)``
    ``grad`` is one :class:`GradCall`; the gradients its ``needs`` does not ask for come back
    as ``None``.

``eager(call)``
    The plain-eager entry, which owns its autograd (a C++ node, a Python Function, or torch's
    own derivatives). ``mean``/``rstd`` may be ``None`` where the
    backend kept them inside its autograd node (only for modes without running statistics).

Backends: ``cpu`` (the C++ extension, else torch's kernels), ``aten`` (torch's kernels with the
activation and residual around them; not a user-facing name), ``portable`` (the core in plain
torch ops, any device, forward-mode AD and higher derivatives), ``triton`` (fused GPU kernels;
also runs on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

#: backend names users may pass (``backend=`` or ``GROUPNORM_BACKEND``)
BACKENDS = ("auto", "cpu", "portable", "triton")


class Call(NamedTuple):
    """One validated call: its tensors and its resolved scalars, read by name.

    The dispatcher builds it once per call (after the C++ extension's whole-call route) and
    hands it whole to a backend's ``forward``/``eager`` and to the exporters' form; it is
    spread into arguments only where ``torch.library`` needs a schema (the custom op, the
    ``triton_op``).

    Attributes:
        x: the input (N, C, *).
        weight, bias: per-channel affine (C,), or None.
        residual: a tensor like ``x`` added before normalizing, or None.
        given_mean, given_var: (C,) statistics to normalize with (batch norm at inference),
            or None to take the sets' own.
        num_groups: sets per sample (C for instance and batch norm, 1 for layer norm).
        pool_batch: batch norm: each channel's set spans the whole batch.
        eps: added to the variance.
        activation: ``""`` or the fused activation's name.
        running_update: batch norm in training: (running_mean, running_var, momentum) that
            the dispatcher moves towards the batch's statistics after the call, or None.
            Backends never read it.
    """

    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    residual: Tensor | None
    given_mean: Tensor | None
    given_var: Tensor | None
    num_groups: int
    pool_batch: bool
    eps: float
    activation: str
    running_update: tuple[Tensor, Tensor, float] | None = None

    def schema_args(self) -> tuple:
        """The fields the ops' schemas take, in their order: all but ``running_update``."""
        return self[:10]


class GradCall(NamedTuple):
    """One backward call: the output's gradient, what the forward kept, and which gradients to
    compute. Built by each autograd (and by the backward ops from their schema arguments) and
    handed whole to a backend's ``backward``.

    Attributes:
        dy: the gradient of the output.
        x: what was normalized (``x + residual`` where the forward had a residual).
        weight, bias: the forward's per-channel affine, or None.
        mean, rstd: the forward's statistics: (N, G), or (C,) for batch norm.
        num_groups, pool_batch, activation: as in :class:`Call`.
        stats_given: the forward normalized with given statistics (batch norm at inference),
            which are constants rather than functions of ``x``.
        needs: (dx, dweight, dbias): which gradients to compute.
    """

    dy: Tensor
    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor
    rstd: Tensor
    num_groups: int
    pool_batch: bool
    stats_given: bool
    activation: str
    needs: tuple[bool, bool, bool]

    def wanted(self) -> tuple[bool, bool, bool]:
        """``needs`` as the kernels take it: booleans, dweight and dbias False where there is
        no weight or bias to differentiate."""
        need_dx, need_dw, need_db = self.needs
        return (
            bool(need_dx),
            bool(need_dw) and self.weight is not None,
            bool(need_db) and self.bias is not None,
        )

    def schema_args(self) -> tuple:
        """The arguments of the backward ops' schemas, in their order: the fields, with
        ``needs`` spread into need_dx, need_dweight, need_dbias."""
        return (*self[:10], *self.needs)

    @classmethod
    def from_schema_args(cls, args) -> GradCall:
        """The inverse of :meth:`schema_args`."""
        return cls(*args[:10], tuple(args[10:]))


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


def save_for_backward(ctx, call: Call, output) -> None:
    """What every autograd around a backend keeps of a forward ``call`` and its ``output`` (y,
    sum, mean, rstd): the tensors (x, or x + residual where there was one; weight, bias, mean,
    rstd) in ``ctx``'s saved tensors, the scalars :func:`input_grads` reads in ``ctx.meta``."""
    _y, total, mean, rstd = output
    has_residual = call.residual is not None
    ctx.save_for_backward(total if has_residual else call.x, call.weight, call.bias, mean, rstd)
    stats_given = call.given_mean is not None
    ctx.meta = (
        call.num_groups,
        call.pool_batch,
        stats_given,
        call.activation,
        has_residual,
        call.eps,
    )
    ctx.mark_non_differentiable(mean, rstd)


def input_grads(grad_y, grad_total, saved, meta, needs, backward):
    """The gradients of a norm call's inputs, for every autograd around a backend (the custom
    op's registered autograd, Triton's Function and triton_op), whose first four inputs are
    (x, weight, bias, residual): (dx, dweight, dbias, dresidual), then None for each input
    after them.

    ``saved`` is what the forward saved, (x or x + residual, weight, bias, mean, rstd), and
    ``meta`` its scalars, (num_groups, pool_batch, stats_given, activation, has_residual, eps);
    ``needs`` (``ctx.needs_input_grad``) says which inputs want a gradient. ``backward(grad)``
    runs the backend's backward for one :class:`GradCall`; under ``create_graph=True`` (grad
    mode on here), where the gradients must carry a graph themselves, the portable core's
    differentiable backward runs instead. With a residual, x + residual was normalized (and
    returned as the sum): x and the residual get the same gradient, the sum's own gradient
    ``grad_total`` added. ``grad_y``/``grad_total`` may be None (outputs not used).
    """
    _x, weight, bias, _mean, _rstd = saved
    num_groups, pool_batch, stats_given, activation, has_residual, eps = meta
    need_dx = needs[0] or (has_residual and needs[3])
    need_dw = weight is not None and needs[1]
    need_db = bias is not None and needs[2]
    dx = dw = db = None
    if grad_y is not None and (need_dx or need_dw or need_db):
        asked = (need_dx, need_dw, need_db)
        grad = GradCall(grad_y, *saved, num_groups, pool_batch, stats_given, activation, asked)
        if torch.is_grad_enabled():
            from .portable import differentiable_backward

            dx, dw, db = differentiable_backward(grad, eps)
        else:
            dx, dw, db = backward(grad)
        dx, dw, db = (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None)
    if has_residual and need_dx and grad_total is not None:
        dx = grad_total if dx is None else dx + grad_total
    grads = (dx if needs[0] else None), dw, db, (dx if has_residual and needs[3] else None)
    return grads + (None,) * (len(needs) - 4)


def decide(name: str, x: Tensor, num_groups: int, pool_batch: bool) -> str:
    """The backend that runs a call on ``x`` given the name asked for: every route's choice
    (plain eager, the op recorded under tracing, the custom op's own implementation).

    A name other than ``auto`` is kept. ``auto`` is ``cpu`` on CPU. On CUDA it is ``triton``
    where Triton is installed and its kernels are measured faster than torch's at this size
    (``triton.prefers_triton``; see ``docs/triton.md``), else ``aten`` (torch's own kernels),
    so that ``auto`` never makes a call slower than torch.nn's, nor fails for want of Triton.
    Elsewhere it is ``aten``.
    """
    if name != "auto":
        return name
    if x.is_cpu:
        return "cpu"
    if x.is_cuda:
        triton_backend = _load("triton")
        if triton_backend.prefers_triton(x, num_groups, pool_batch) and triton_backend.INSTALLED:
            return "triton"
    return "aten"


def select(name: str, x: Tensor, num_groups: int, pool_batch: bool) -> ModuleType:
    """The module of the backend :func:`decide` picks for a call on ``x``."""
    return _load(decide(name, x, num_groups, pool_batch))
