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

Group norm layers also take an activation the way timm's norm-act layers do: ``act_layer``
(a name, an ``nn.Module`` class, a callable or a module), ``act_kwargs``, ``inplace``,
``apply_act`` and ``drop_layer`` (see :class:`GroupNormAct`).

:func:`get_norm_layer` returns a ``functools.partial`` with keyword arguments only, so frameworks
that take ``norm_layer=`` can call it as ``norm_layer(num_channels)`` (torchvision, detectron2)
or take it apart and bind their own keywords (timm).

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

from .kernels.activations import FUSED
from .modules import BatchNorm, GroupNorm, GroupNormAct, InstanceNorm, LayerNorm

__all__ = ["create_norm_layer", "get_norm_layer", "NORM_LAYERS"]

_COMMON = frozenset(("eps", "affine", "device", "dtype"))
_ACT_KWARGS = frozenset(("act_layer", "act_kwargs", "apply_act", "inplace", "drop_layer"))
_GN_KWARGS = _COMMON | {"num_groups", "group_size", "bias"} | _ACT_KWARGS
_BN_KWARGS = _COMMON | {"momentum", "track_running_stats", "bias"}

#: name -> (class, fused activation or None, keyword arguments it accepts); a ``gn_`` and a
#: ``bn_`` name for each activation the kernels fuse
NORM_LAYERS: dict[str, tuple[type[nn.Module], str | None, frozenset[str]]] = {
    "gn": (GroupNorm, None, _GN_KWARGS),
    **{f"gn_{a.name}": (GroupNormAct, a.name, _GN_KWARGS) for a in FUSED},
    "bn": (BatchNorm, None, _BN_KWARGS),
    **{f"bn_{a.name}": (BatchNorm, a.name, _BN_KWARGS) for a in FUSED},
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
    fixed = NORM_LAYERS[key][1]
    if fixed is not None and kwargs.keys() & {"act_layer", "act_kwargs"}:
        raise TypeError(
            f"norm layer {key!r} fixes the activation to {fixed}; use 'gn' with act_layer= to "
            f"choose another"
        )
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        hint = ""
        if "activation" in unknown and key.startswith("gn"):
            hint = "; the name fixes the activation (use e.g. 'gn_silu' or 'gn' with act_layer=)"
        elif "activation" in unknown:
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
            ``num_groups`` (default 32) or ``group_size``, ``bias``, and timm's ``act_layer``,
            ``act_kwargs``, ``inplace`` (added to ``act_kwargs``), ``apply_act`` (False: no
            activation, even for ``gn_silu``...), ``drop_layer``; for batch norm
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
        act_layer = kwargs.pop("act_layer", activation)
        act_kwargs = dict(kwargs.pop("act_kwargs", None) or {})
        apply_act = kwargs.pop("apply_act", None)
        if "inplace" in kwargs:
            act_kwargs.setdefault("inplace", kwargs.pop("inplace"))
        if apply_act is False:
            act_layer = None
        elif act_layer is None and (apply_act or "inplace" in act_kwargs):
            raise TypeError(
                f"norm layer {key!r} was called as a norm-act layer (apply_act/inplace given) "
                f"but has no activation; timm passes act_layer only to its own classes, so bind "
                f"it: get_norm_layer('gn', act_layer=...), or build the model with batch norm "
                f"and use groupnorm.convert_batchnorm, which keeps each layer's activation"
            )
        if act_layer is None:
            act_kwargs = {}
        if act_layer is None and kwargs.get("drop_layer") is None:
            kwargs.pop("drop_layer", None)
            return GroupNorm(num_groups, num_channels, **kwargs)
        return GroupNormAct(
            num_groups,
            num_channels,
            activation=None,
            act_layer=act_layer,
            act_kwargs=act_kwargs or None,
            **kwargs,
        )
    if activation is not None:
        kwargs["activation"] = activation
    return cls(num_channels, **kwargs)


def _build_norm_layer(num_channels: int, *, layer: str, **kwargs: Any) -> nn.Module:
    """``create_norm_layer(layer, num_channels, **kwargs)``, with the name as a keyword."""
    return create_norm_layer(layer, num_channels, **kwargs)


def get_norm_layer(name: str, **defaults: Any) -> Callable[..., nn.Module]:
    """A callable ``f(num_channels, **overrides)`` making the layer ``name``, for ``norm_layer=``.

    It is a ``functools.partial`` holding keyword arguments only (the name included), so it works
    where frameworks take a norm layer: torchvision and detectron2 call ``f(num_channels)``;
    timm takes a partial apart and binds its keywords again, which keeps all of them. The name
    and the keyword names are checked now, so a typo fails where it is written.

    >>> norm_layer = get_norm_layer("gn_relu", num_groups=4)
    >>> norm_layer(16)
    GroupNormAct(4, 16, eps=1e-05, affine=True, bias=True, activation=relu)
    >>> norm_layer(8, num_groups=2)
    GroupNormAct(2, 8, eps=1e-05, affine=True, bias=True, activation=relu)
    >>> norm_layer.args, sorted(norm_layer.keywords)
    ((), ['layer', 'num_groups'])
    """
    key = _resolve(name)
    _check_kwargs(key, defaults)
    return functools.partial(_build_norm_layer, layer=key, **defaults)
