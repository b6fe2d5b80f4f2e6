"""Activations given the way timm gives them: a name, an ``nn.Module`` type or a factory.

:func:`resolve_act` turns such an ``act_layer`` (with ``act_kwargs``) into either the name of an
activation the kernels fuse or an ``nn.Module`` to apply after the norm. Which activations fuse,
and what each one is, comes from the table in :mod:`groupnorm.kernels.activations`.
:func:`fused_name` says whether a module instance is exactly one of them: its type is the
record's module class (a subclass may compute something else) and it passes the record's
``exact`` test (``nn.GELU`` only with ``approximate="none"``; the tanh GELU is kept as a module).
``inplace`` does not change what an activation computes, only where it writes, so it does not
stop fusion.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .kernels.activations import BY_NAME, FUSED

#: activation names (timm's spellings included) -> module factory; None means no activation
ACT_NAMES: dict[str, Callable[..., nn.Module] | None] = {
    "": None,
    "none": None,
    "identity": None,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "celu": nn.CELU,
    "selu": nn.SELU,
    "prelu": nn.PReLU,
    "mish": nn.Mish,
    "hard_swish": nn.Hardswish,
    "hardswish": nn.Hardswish,
    "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}

# Tensor functions that are one of the fused activations (act_layer=torch.nn.functional.silu).
_FUNCTIONS = {fn: a.name for a in FUSED for fn in a.functions}


def fused_name(module: object) -> str:
    """The fused activation's name when ``module`` computes exactly that, else ``""``."""
    for a in FUSED:
        if type(module) is a.module and a.exact(module):
            return a.name
    return ""


def module_for(name: str) -> nn.Module:
    """The ``nn.Module`` computing the fused activation ``name``."""
    return BY_NAME[name].module()


def resolve_act(act_layer: Any, act_kwargs: dict[str, Any] | None = None) -> tuple[str, Any]:
    """(fused name, None) or ("", module to apply after the norm) or ("", None) for none.

    ``act_layer`` is a name from :data:`ACT_NAMES`, an ``nn.Module`` subclass or another callable
    returning an ``nn.Module`` (both called with ``act_kwargs``), an ``nn.Module`` instance (used
    as it is), or a tensor function of a fused activation (``torch.nn.functional.silu``...).
    """
    if act_kwargs is not None and not isinstance(act_kwargs, dict):
        raise TypeError(f"act_kwargs must be a dict or None, got {type(act_kwargs).__name__}")
    kwargs = dict(act_kwargs or {})
    if act_layer is None:
        return "", None
    if isinstance(act_layer, str):
        key = act_layer.strip().lower().replace("-", "_")
        if key not in ACT_NAMES:
            names = ", ".join(repr(n) for n in ACT_NAMES if n)
            raise ValueError(f"unknown activation {act_layer!r}; choose one of {names}")
        factory = ACT_NAMES[key]
        if factory is None:
            return "", None
        module = _build(factory, kwargs, act_layer)
    elif isinstance(act_layer, nn.Module):
        if kwargs:
            raise TypeError(
                f"act_kwargs {sorted(kwargs)} cannot be applied to an activation module that is "
                f"already built ({type(act_layer).__name__}); pass its class instead"
            )
        module = act_layer
    elif _is_hashable(act_layer) and act_layer in _FUNCTIONS:
        if set(kwargs) - {"inplace"}:
            raise TypeError(
                f"act_kwargs {sorted(kwargs)} are not taken by {act_layer.__name__} as "
                f"act_layer; pass the module class (e.g. torch.nn.GELU) instead"
            )
        return _FUNCTIONS[act_layer], None
    elif callable(act_layer):
        module = _build(act_layer, kwargs, act_layer)
    else:
        raise TypeError(
            f"act_layer must be a name (e.g. 'silu'), an nn.Module class or instance, or a "
            f"callable returning an nn.Module; got {type(act_layer).__name__}"
        )
    if isinstance(module, nn.Identity):
        return "", None
    name = fused_name(module)
    return (name, None) if name else ("", module)


def _is_hashable(obj: object) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _build(factory: Callable[..., Any], kwargs: dict[str, Any], what: object) -> nn.Module:
    try:
        module = factory(**kwargs)
    except TypeError as e:
        if "inplace" not in kwargs:  # inplace is only a memory hint: drop it where not taken
            raise TypeError(f"could not build the activation {what!r} with {kwargs}: {e}") from e
        rest = {k: val for k, val in kwargs.items() if k != "inplace"}
        try:
            module = factory(**rest)
        except TypeError as e2:
            raise TypeError(f"could not build the activation {what!r} with {kwargs}: {e2}") from e2
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"act_layer {what!r} returned {type(module).__name__}, not an nn.Module; pass an "
            f"nn.Module class or a callable that builds one"
        )
    return module
