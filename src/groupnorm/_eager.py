"""When may a call bypass the custom op? One answer for every fast path.

The eager fast paths (``ops.normalize_op`` and the CPU entry points in ``kernels/cpu.py``) run
kernels that no tracer, transform or mode can see. That is only right when nothing is watching
the call; otherwise the call must take the custom op, whose fake implementation and autograd
registration those tools understand.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

#: Tensor types a fast path may hand to a kernel: plain tensors and parameters (no subclasses,
#: whose __torch_function__ or __torch_dispatch__ would be skipped).
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def forward_ad_active() -> bool:
    """A forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``). Neither the
    custom op nor the C++ kernels carry tangents, so such calls take the portable core, whose
    plain torch ops do."""
    return _forward_ad._current_level >= 0


def plain_eager_context() -> bool:
    """No compiler, exporter, JIT tracer, torch-function or dispatch mode, functorch transform
    or forward-AD level is active: a call may go straight to a backend.

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
