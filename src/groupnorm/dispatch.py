"""The route of every call: one function, :func:`run`, decides it.

The functional API and the modules describe a call by a :class:`NormSpec` (its fixed scalars,
resolved once: by a module at construction, by the functional API per call) plus its tensors,
and hand both to :func:`run`::

    plain eager CPU call,       -> the C++ extension takes the whole call   (the common case;
      no residual                  it checks the tensors and declines what it cannot take)
    otherwise                   -> validation (the API's messages), then
      plain eager               -> the selected backend's ``eager`` entry, which owns its
                                   autograd                         (kernels/__init__.select)
      exporting                 -> the decomposed form in standard ATen ops      (export.py)
      forward-mode AD,          -> the portable core in torch ops (carries tangents, nests
      torch.func transforms        under grad of grad)
      compiling, tracing,       -> the ``groupnorm::forward`` custom op: fake implementation
      tensor subclasses, modes     and registered autograd (ops.py), or on CUDA Triton's
                                   ``triton_op``

Batch norm's running statistics are updated here, once, from the statistics the route
returned (``kernels/running.py``); the C++ extension applies the same formula inside its call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor as _is_wrapped
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import export, ops
from ._validation import PLAIN_TYPES
from .kernels import Call, check_backend, cpu, decide, portable, select
from .kernels.running import update_running_stats


@dataclass(frozen=True, slots=True)
class NormSpec:
    """The fixed scalars of a call, already validated.

    Attributes:
        num_groups: sets per sample; ``None`` for one set per channel (instance norm, batch
            norm), whose count is the input's C.
        pool_batch: batch norm: each channel's set spans the whole batch.
        eps: added to the variance.
        activation: ``""`` or the fused activation's name (``"silu"``, ``"gelu"``, ``"relu"``).
        backend: a name from ``kernels.BACKENDS``, or ``None`` to read ``GROUPNORM_BACKEND`` at
            each call.
    """

    num_groups: int | None
    pool_batch: bool
    eps: float
    activation: str
    backend: str | None = None


def plain_eager_context() -> bool:
    """No compiler, exporter, JIT tracer, torch-function or dispatch mode, functorch transform
    or forward-AD level is active: a call may go straight to a backend's kernels.

    >>> plain_eager_context()
    True
    """
    return not (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch._C._is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or _get_current_dispatch_mode() is not None
        or _forward_ad._current_level >= 0
    )


def _functorch_transform() -> bool:
    """A torch.func transform (grad, vmap, jvp, jacrev, hessian...) is active, outside a
    compiler."""
    return torch._C._are_functorch_transforms_active() and not (
        torch.compiler.is_compiling() or torch.compiler.is_exporting()
    )


def _plain_tensors(*tensors: Tensor | None) -> bool:
    for t in tensors:
        if t is not None and (type(t) not in PLAIN_TYPES or _is_wrapped(t)):
            return False
    return True


# A NamedTuple's own __new__ is a Python function; tuple.__new__ builds the same value in C in
# half its time (every field given, in order).
_new_call = tuple.__new__


def run(
    spec: NormSpec,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    validate: Callable[[], object],
    running: tuple[Tensor, Tensor, float] | None = None,
    training: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Normalize ``x`` as ``spec`` says; returns (y, x + residual or None).

    ``validate`` runs the calling API's full checks, raising its messages (what it returns is
    not used); it runs unless the C++ extension took the call as given. ``running`` and
    ``training`` are batch norm's: the (running_mean, running_var, momentum) to update
    (training) or to normalize with (not training).
    """
    # (the context first: under torch.compile it is False before anything untraceable runs)
    plain = plain_eager_context() and _plain_tensors(x, weight, bias, residual)
    name = check_backend(spec.backend)
    if plain and residual is None and x.is_cpu and (name == "auto" or name == "cpu"):
        num_groups = spec.num_groups or (x.shape[1] if x.dim() >= 2 else 0)
        y = cpu.whole_call(
            x,
            weight,
            bias,
            num_groups,
            spec.pool_batch,
            spec.eps,
            spec.activation,
            running,
            training,
        )
        if y is not None:
            return y, None

    validate()
    given_mean = given_var = update = None
    if running is not None:
        if not training:
            given_mean, given_var, _momentum = running
        elif x.numel() > 0:
            update = running
    num_groups = spec.num_groups or x.shape[1]
    call = _new_call(
        Call,
        (
            x,
            weight,
            bias,
            residual,
            given_mean,
            given_var,
            num_groups,
            spec.pool_batch,
            spec.eps,
            spec.activation,
            update,
        ),
    )
    if plain:  # (no exporter records a plain eager call: the exporters trace or compile)
        y, total, mean, rstd = select(name, x, num_groups, spec.pool_batch).eager(call)
    elif export.is_exporting():
        return export.decomposed_normalize(call)
    elif _forward_ad._current_level >= 0 or _functorch_transform():
        # neither the op nor the kernels carry tangents, and the autograd torch.library
        # registers for the op is not nestable under torch.func transforms (grad of grad)
        y, total, mean, rstd = portable.forward(call)
    else:  # compiling, tracing, subclasses, modes: a registered op
        y, total, mean, rstd = _recorded_op(call, decide(name, x, num_groups, spec.pool_batch))
    if update is not None:
        running_mean, running_var, momentum = update
        update_running_stats(
            running_mean,
            running_var,
            mean,
            rstd,
            spec.eps,
            momentum,
            x.numel() // x.shape[1],
            native=plain and x.is_cpu,
        )
    return y, (total if residual is not None else None)


def _recorded_op(call: Call, backend: str):
    """The op a tracer records for ``call`` on ``backend`` (the name ``kernels.decide`` gave):
    on CUDA with Triton, the Triton kernels registered with ``torch.library.triton_op``
    (Inductor launches them itself) where this torch and Triton allow it; otherwise the opaque
    ``groupnorm::forward`` op, which runs ``backend``."""
    if backend == "triton" and call.x.is_cuda:
        from .kernels import triton as triton_backend

        out = triton_backend.call_triton_op(call)
        if out is not None:
            return out
    return ops.record(call, backend)
