"""Argument checks shared by the functional API, the modules and the tools.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
value) with a message that says what to change. Nothing here touches tensor data, so the checks
cost microseconds and are safe to run under ``torch.compile`` tracing.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from .kernels.activations import ACTIVATION_NAMES, FUSED

#: Modes of the one core, with the short names people also use for them (lowercase:
#: :func:`check_mode` also takes other cases).
MODE_ALIASES = {
    "batch": "batch",
    "bn": "batch",
    "layer": "layer",
    "ln": "layer",
    "instance": "instance",
    "in": "instance",
    "group": "group",
    "gn": "group",
}

#: Spellings of the activations that can be fused after the affine step ("" means none).
_ACTIVATION_ALIASES = ACTIVATION_NAMES
_ACTIVATION_CHOICES = ", ".join(["None", *(repr(a.name) for a in FUSED)])

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _format_choices(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def check_mode(mode: object) -> str:
    """Return the canonical mode name for ``mode`` or raise a ValueError listing the choices."""
    if not isinstance(mode, str) or mode.lower() not in MODE_ALIASES:
        raise ValueError(
            f"unknown normalization mode {mode!r}; choose one of "
            f"'batch' ('bn'), 'layer' ('ln'), 'instance' ('in') or 'group' ('gn')"
        )
    return MODE_ALIASES[mode.lower()]


def check_activation(activation: object) -> str:
    """Return the canonical activation name ('' for none) or raise a ValueError."""
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in _ACTIVATION_ALIASES:
        raise ValueError(f"unknown activation {activation!r}; choose one of {_ACTIVATION_CHOICES}")
    return _ACTIVATION_ALIASES[key]


def check_input(x: object, name: str = "input") -> torch.Tensor:
    """The input must be a floating-point tensor of shape (N, C, *)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(x).__name__}; convert it with "
            f"torch.as_tensor(...)"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; normalization needs float16, bfloat16, float32 or "
            f"float64 input (convert it first, e.g. {name}.float())"
        )
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape (N, C, *) with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}; add a batch dimension with {name}.unsqueeze(0) for one sample"
        )
    if x.shape[1] == 0:
        raise ValueError(
            f"{name} has no channels: shape {tuple(x.shape)} has size 0 in dim 1 (C); "
            f"normalization needs C >= 1, so skip the layer for empty channel dims"
        )
    return x


def check_eps(eps: object) -> float:
    """``eps`` must be a real number, finite and >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float such as 1e-5, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) eps can be a
    # symbolic float, which comparisons handle and math.isfinite does not. NaN fails both.
    if not (0.0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0 (typically 1e-5), got {eps}")
    return eps


def _check_int(value: object, name: str) -> int:
    # Anything with __index__ (int, numpy integers) counts; bool and float do not.
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(
        f"{name} must be an int, got {type(value).__name__} {value!r}; pass an integer, "
        f"e.g. {name}=int(...)"
    )


def resolve_num_groups(
    num_channels: int, num_groups: int | None = None, group_size: int | None = None
) -> int:
    """Turn ``num_groups`` or ``group_size`` (exactly one of them) into a valid group count."""
    if (num_groups is None) == (group_size is None):
        which = "both" if num_groups is not None else "neither"
        raise ValueError(
            f"pass exactly one of num_groups or group_size (got {which}); e.g. num_groups=32 or "
            f"group_size=16 for {num_channels} channels"
        )
    if group_size is None and type(num_groups) is int and 0 < num_groups <= num_channels:
        if num_channels % num_groups == 0:  # the common, valid call: skip building the message
            return num_groups
    valid = _format_choices(divisors(num_channels)) if num_channels > 0 else "none"
    if group_size is not None:
        group_size = _check_int(group_size, "group_size")
        if group_size <= 0 or group_size > num_channels or num_channels % group_size:
            raise ValueError(
                f"group_size ({group_size}) must be a positive divisor of num_channels "
                f"({num_channels}); choose group_size from {valid}"
            )
        return num_channels // group_size
    num_groups = _check_int(num_groups, "num_groups")
    if num_groups <= 0:
        raise ValueError(
            f"num_groups must be positive, got {num_groups}; choose num_groups from {valid}"
        )
    if num_groups > num_channels:
        raise ValueError(
            f"num_groups ({num_groups}) cannot exceed num_channels ({num_channels}); "
            f"choose num_groups from {valid}"
        )
    if num_channels % num_groups:
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
            f"pass group_size=... or choose num_groups from {valid}"
        )
    return num_groups


def _check_per_channel(
    t: object, name: str, num_channels: int, x: torch.Tensor, dtype_error
) -> torch.Tensor | None:
    """Shared checks for a per-channel tensor: kind, shape (C,), dtype (``dtype_error`` returns
    a message when the dtype is wrong, else None) and device, in that order."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or None, got {type(t).__name__}; wrap it with "
            f"torch.tensor(...)"
        )
    if t.shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},) to match the input's {num_channels} "
            f"channels, got shape {tuple(t.shape)}"
        )
    message = dtype_error(t)
    if message:
        raise TypeError(message)
    if t.device != x.device:
        raise ValueError(
            f"{name} is on {t.device} but the input is on {x.device}; move both to one device"
        )
    return t


def check_param(
    t: torch.Tensor | None, name: str, num_channels: int, x: torch.Tensor
) -> torch.Tensor | None:
    """A per-channel weight, bias or statistic: shape (C,), a float dtype the kernels accept,
    on the input's device. float32 is accepted with float16/bfloat16 input (mixed precision)."""
    allowed = {x.dtype, torch.float32} if x.dtype in LOW_PRECISION else {x.dtype}

    def dtype_error(t: torch.Tensor) -> str | None:
        if t.dtype in allowed:
            return None
        names = " or ".join(sorted(str(d) for d in allowed))
        return (
            f"{name} has dtype {t.dtype} but the input is {x.dtype}; {name} must be {names} "
            f"(use .to({x.dtype}) on one of them)"
        )

    return _check_per_channel(t, name, num_channels, x, dtype_error)


def check_stat(
    t: torch.Tensor | None, name: str, num_channels: int, x: torch.Tensor
) -> torch.Tensor | None:
    """A running statistic: shape (C,), any float dtype, the input's device."""

    def dtype_error(t: torch.Tensor) -> str | None:
        if t.dtype in FLOAT_DTYPES:
            return None
        return (
            f"{name} must be a floating-point tensor, got dtype {t.dtype}; convert it with "
            f"{name}.float()"
        )

    return _check_per_channel(t, name, num_channels, x, dtype_error)


def check_residual(residual: object, x: torch.Tensor) -> torch.Tensor | None:
    """A residual must match the input exactly: shape, dtype and device."""
    if residual is None:
        return None
    if not isinstance(residual, torch.Tensor):
        raise TypeError(
            f"residual must be a torch.Tensor or None, got {type(residual).__name__}; wrap it "
            f"with torch.as_tensor(...)"
        )
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}; "
            f"broadcasting is not supported, expand it first"
        )
    if residual.dtype != x.dtype:
        raise TypeError(
            f"residual has dtype {residual.dtype} but the input is {x.dtype}; convert one of them"
        )
    if residual.device != x.device:
        raise ValueError(
            f"residual is on {residual.device} but the input is on {x.device}; "
            f"move both to one device"
        )
    return residual


#: Tensor types the eager road hands to a kernel, and the tensor shortcut below takes: plain
#: tensors and parameters (a subclass's __torch_function__ or __torch_dispatch__ would be
#: skipped, so subclasses take the custom op and the full checks).
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_F32 = torch.float32


def tensors_ok(
    x: object,
    weight: object,
    bias: object,
    residual: object,
    num_groups: int | None,
    num_channels: int | None = None,
) -> bool:
    """Whether the tensors of a call pass :func:`check_input`, :func:`check_param` (weight,
    bias), :func:`check_residual`, the division of the channels into ``num_groups`` groups (a
    valid positive int, or None for one set per channel) and, if given, ``num_channels``.

    A shortcut for the calls that pass: it builds no messages and reads each attribute once.
    False means "not sure" (tensor subclasses, for instance): the caller then runs the full
    checks, which raise where something is wrong, so messages and their order stay theirs.
    """
    if type(x) not in PLAIN_TYPES:
        return False
    dtype, shape = x.dtype, x.shape
    if dtype not in FLOAT_DTYPES or len(shape) < 2:
        return False
    c = shape[1]
    if c == 0 or (num_groups is not None and c % num_groups) or c != (num_channels or c):
        return False
    device = None
    for p in (weight, bias):
        if p is not None:
            if type(p) not in PLAIN_TYPES or p.shape != (c,):
                return False
            if p.dtype is not dtype and (p.dtype is not _F32 or dtype not in LOW_PRECISION):
                return False
            device = device or x.device
            if p.device != device:
                return False
    if residual is not None:
        if (
            type(residual) not in PLAIN_TYPES
            or residual.shape != shape
            or residual.dtype is not dtype
        ):
            return False
        if residual.device != (device or x.device):
            return False
    return True


def check_momentum(momentum: object, used: bool = True) -> float | None:
    """``momentum`` must be None or a number, in [0, 1] where it is ``used`` (an update of
    running statistics); a momentum that no update uses is not range-checked, as torch
    does not check it."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}"
        )
    if used and not 0.0 <= float(momentum) <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1] (typically 0.1), got {momentum}")
    return float(momentum)
