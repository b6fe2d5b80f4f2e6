"""Norm layers by name, for configs and for models that take a ``norm_layer=`` argument.

==========================  =====================================================
name                        layer
==========================  =====================================================
``gn`` (``group``)          :class:`GroupNorm`, ``num_groups=32`` unless given
``gn_silu/gelu/relu``       :class:`GroupNormAct` with that activation
``bn`` (``batch``)          :class:`BatchNorm`
``bn_silu/gelu/relu``       :class:`BatchNorm` with that fused activation
``ln`` (``layer``)          :class:`LayerNorm` (the paper's: over C and positions)
``in`` (``instance``)       :class:`InstanceNorm`
==========================  =====================================================

Examples:
    >>> create_norm_layer("gn_silu", 64, num_groups=16)
    GroupNormAct(16, 64, eps=1e-05, affine=True, bias=True, activation=silu)
    >>> norm_layer = get_norm_layer("gn", group_size=8)
    >>> norm_layer(32)
    GroupNorm(4, 32, eps=1e-05, affine=True, bias=True)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .modules import BatchNorm, GroupNorm, GroupNormAct, InstanceNorm, LayerNorm

__all__ = ["create_norm_layer", "get_norm_layer", "NORM_LAYERS"]

_COMMON = frozenset(("eps", "affine", "device", "dtype"))
_GN_KWARGS = _COMMON | {"num_groups", "group_size", "bias"}
_BN_KWARGS = _COMMON | {"momentum", "track_running_stats", "bias"}

#: name -> (class, fused activation or None, keyword arguments it accepts)
NORM_LAYERS: dict[str, tuple[type[nn.Module], str | None, frozenset[str]]] = {
    "gn": (GroupNorm, None, _GN_KWARGS),
    "gn_silu": (GroupNormAct, "silu", _GN_KWARGS),
    "gn_gelu": (GroupNormAct, "gelu", _GN_KWARGS),
    "gn_relu": (GroupNormAct, "relu", _GN_KWARGS),
    "bn": (BatchNorm, None, _BN_KWARGS),
    "bn_silu": (BatchNorm, "silu", _BN_KWARGS),
    "bn_gelu": (BatchNorm, "gelu", _BN_KWARGS),
    "bn_relu": (BatchNorm, "relu", _BN_KWARGS),
    "ln": (LayerNorm, None, _COMMON),
    "in": (InstanceNorm, None, _COMMON),
}
_ALIASES = {"group": "gn", "batch": "bn", "layer": "ln", "instance": "in"}


def _resolve(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"norm layer name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in NORM_LAYERS:
        names = ", ".join(repr(n) for n in NORM_LAYERS)
        raise ValueError(f"unknown norm layer {name!r}; choose one of {names}")
    return key


def _check_kwargs(key: str, kwargs: dict[str, Any]) -> None:
    allowed = NORM_LAYERS[key][2]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        hint = ""
        if "activation" in unknown:
            hint = f"; the name fixes the activation (use e.g. '{key.split('_')[0]}_silu')"
        raise TypeError(
            f"norm layer {key!r} does not take {', '.join(unknown)}; it accepts "
            f"{', '.join(sorted(allowed))}{hint}"
        )


def create_norm_layer(name: str, num_channels: int, **kwargs: Any) -> nn.Module:
    """Build the norm layer called ``name`` for ``num_channels`` channels.

    Args:
        name: one of the names in :data:`NORM_LAYERS` (case-insensitive), or an alias
            ``"group"``, ``"batch"``, ``"layer"``, ``"instance"``.
        num_channels: C.
        **kwargs: passed to the layer: ``eps``, ``affine``, ``device``, ``dtype``; for group norm
            ``num_groups`` (default 32) or ``group_size``, ``bias``; for batch norm
            ``momentum``, ``track_running_stats``, ``bias``.

    Raises:
        ValueError: unknown name (the message lists the names) or bad values.
        TypeError: a keyword the layer does not take.

    >>> bn = create_norm_layer("bn_relu", 8, momentum=0.01)
    >>> type(bn).__name__, bn.momentum, "activation=relu" in repr(bn)
    ('BatchNorm', 0.01, True)
    >>> create_norm_layer("ln", 8)
    LayerNorm(1, 8, eps=1e-05, affine=True, bias=True)
    """
    key = _resolve(name)
    _check_kwargs(key, kwargs)
    cls, activation, _ = NORM_LAYERS[key]
    if cls in (GroupNorm, GroupNormAct):
        num_groups = kwargs.pop("num_groups", None)
        if num_groups is None and kwargs.get("group_size") is None:
            num_groups = 32
        if activation is not None:
            kwargs["activation"] = activation
        return cls(num_groups, num_channels, **kwargs)
    if activation is not None:
        kwargs["activation"] = activation
    return cls(num_channels, **kwargs)


def get_norm_layer(name: str, **defaults: Any) -> Callable[..., nn.Module]:
    """A callable ``f(num_channels, **overrides)`` making the layer ``name``, for ``norm_layer=``.

    The name and the keyword names are checked now, so a typo fails where it is written.

    >>> norm_layer = get_norm_layer("gn_relu", num_groups=4)
    >>> norm_layer(16)
    GroupNormAct(4, 16, eps=1e-05, affine=True, bias=True, activation=relu)
    >>> norm_layer(8, num_groups=2)
    GroupNormAct(2, 8, eps=1e-05, affine=True, bias=True, activation=relu)
    """
    key = _resolve(name)
    _check_kwargs(key, defaults)
    return functools.partial(create_norm_layer, key, **defaults)
