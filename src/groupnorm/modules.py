"""Drop-in modules over the one dispatcher, :func:`groupnorm.dispatch.run`.

Each module resolves its call's fixed scalars (groups, eps, fused activation) into a
:class:`~groupnorm.dispatch.NormSpec`, kept until one of them is set again, and hands every
call to ``run`` with its tensors and a validator that raises the module's own messages; ``run``
decides the route (the C++ extension, a backend's kernels, the exporter's decomposed form, the
portable core or the registered op; see ``dispatch.py``).

``GroupNorm`` subclasses ``torch.nn.GroupNorm`` and ``BatchNorm`` subclasses torch's
``_BatchNorm``, so code that checks ``isinstance`` (weight-decay rules, freezing helpers) and
state_dicts keep working; only ``forward`` is ours.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _act
from . import _validation as v
from .dispatch import NormSpec, run

__all__ = ["GroupNorm", "GroupNormAct", "BatchNorm", "LayerNorm", "InstanceNorm"]


def _check_channels(count: object, arg: str) -> int:
    count = v._check_int(count, arg)
    if count <= 0:
        raise ValueError(f"{arg} must be positive (the size of the input's dim 1), got {count}")
    return count


class _Norm:
    """What the norm modules share: the call's :class:`NormSpec`, kept in ``__dict__["_spec"]``
    until one of the attributes it is made from (``_SPEC_FIELDS``) is set (``m.eps = 1e-3``),
    after which the next call resolves it again; and a hint after torch's "size mismatch" when a
    checkpoint has another channel count than ``_CHANNELS`` (the constructor argument)."""

    _SPEC_FIELDS: frozenset[str] = frozenset()
    _CHANNELS = ""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self._SPEC_FIELDS:
            self.__dict__.pop("_spec", None)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        arg, error_msgs = self._CHANNELS, args[-1]
        count = getattr(self, arg)
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = state_dict.get(prefix + key)
            if isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] != count:
                error_msgs.append(
                    f"{prefix}{key} in the checkpoint has {t.shape[0]} channels but this "
                    f"{type(self).__name__} has {arg}={count}; build it with {arg}={t.shape[0]} "
                    f"to load this checkpoint"
                )
                return


class GroupNorm(_Norm, nn.GroupNorm):
    r"""Group Normalization (Wu & He, ECCV 2018): a drop-in for ``torch.nn.GroupNorm``.

    The C channels are split into ``num_groups`` groups; each sample's group is normalized with
    its own mean and (biased) variance over the group's channels and all positions, then scaled
    and shifted per channel:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The result never depends on other samples, so it is the same at batch size 1 and 64.

    Args:
        num_groups: number of groups G, dividing ``num_channels``; ``None`` when ``group_size``
            is given.
        num_channels: C, the size of dim 1 of the input.
        eps: added to the variance. Default 1e-5.
        affine: learn per-channel ``weight`` (ones) and ``bias`` (zeros). Default True.
        group_size: channels per group (C/G), an alternative to ``num_groups``.

    Shape:
        input (N, C, \*) of any rank >= 2 and memory layout; output the same shape, dtype and
        layout.

    Examples:
        >>> x = torch.randn(2, 6, 10, 10)
        >>> gn = GroupNorm(3, 6)
        >>> gn(x).shape
        torch.Size([2, 6, 10, 10])
        >>> GroupNorm(None, 64, group_size=16)
        GroupNorm(4, 64, eps=1e-05, affine=True, bias=True)
        >>> # One group is the paper's layer norm over (C, H, W); C groups is instance norm.
        >>> torch.allclose(GroupNorm(1, 6, affine=False)(x),
        ...                torch.nn.functional.layer_norm(x, x.shape[1:]), atol=1e-5)
        True
        >>> torch.allclose(GroupNorm(6, 6, affine=False)(x),
        ...                torch.nn.functional.instance_norm(x), atol=1e-5)
        True
        >>> # Loads torch's state_dict as is.
        >>> _ = gn.load_state_dict(torch.nn.GroupNorm(3, 6).state_dict())
    """

    _activation = ""

    def __init__(
        self,
        num_groups: int | None,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        group_size: int | None = None,
        bias: bool = True,
    ) -> None:
        num_channels = _check_channels(num_channels, "num_channels")
        groups = v.resolve_num_groups(num_channels, num_groups, group_size)
        super().__init__(groups, num_channels, v.check_eps(eps), affine, device=device, dtype=dtype)
        if not bias:  # torch >= 2.5 has this flag; set it the same way on older releases
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )

    _SPEC_FIELDS = frozenset({"num_groups", "num_channels", "eps", "_activation"})
    _CHANNELS = "num_channels"

    def _resolve_spec(self) -> NormSpec:
        """The call's fixed scalars, checked once: (groups, eps, activation)."""
        groups = v.resolve_num_groups(self.num_channels, self.num_groups, None)
        spec = NormSpec(groups, False, v.check_eps(self.eps), v.check_activation(self._activation))
        self.__dict__["_spec"] = spec
        return spec

    def _validate(self, input: Tensor, weight, bias, residual: Tensor | None, num_groups: int):
        """The checks of a call, with the module's messages: a shortcut for tensors that
        certainly pass, else the full checks."""
        if v.tensors_ok(input, weight, bias, residual, num_groups, self.num_channels):
            return
        v.check_input(input)
        if input.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_channels} channels in dim 1, got "
                f"input of shape {tuple(input.shape)}; build the layer with "
                f"num_channels={input.shape[1]} or fix the layer that feeds it"
            )
        v.check_param(weight, "weight", self.num_channels, input)
        v.check_param(bias, "bias", self.num_channels, input)
        v.check_residual(residual, input)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        spec = self.__dict__.get("_spec") or self._resolve_spec()
        if self.training and spec.num_groups == self.num_channels:
            _warn_single_element_sets(self, input)
        params = self._parameters  # (nn.Module.__getattr__ is the slow way to reach these)
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        # (the validator's arguments as defaults: a closure would make each a cell per call)
        call = (input, weight, bias, residual, spec.num_groups)
        validate = lambda m=self, a=call: m._validate(*a)  # noqa: E731
        return run(spec, input, weight, bias, residual, validate)[0]


def _warn_single_element_sets(module: nn.Module, input: Tensor) -> None:
    """Warn once per module when each set holds one value: the output is then the bias whatever
    the input, and the input gets no gradient (torch's InstanceNorm refuses such input)."""
    if (
        isinstance(input, Tensor)
        and input.dim() >= 2
        and input.numel() > 0
        and input.numel() == input.shape[0] * input.shape[1]
        and not module.__dict__.get("_warned_single", False)
    ):
        module.__dict__["_warned_single"] = True
        warnings.warn(
            f"{type(module).__name__}({module.num_groups}, {module.num_channels}) on input of "
            f"shape {tuple(input.shape)}: each group holds a single value, so the output is the "
            f"bias whatever the input and the input gets no gradient; use fewer groups (more "
            f"channels per group) or an input with spatial dims",
            UserWarning,
            stacklevel=3,
        )


def _resolve_act_drop(
    activation: str | None, act_layer: Any, act_kwargs: Any, drop_layer: Any, device, dtype
) -> tuple[str, nn.Module | None, nn.Module | None]:
    """(fused activation name, activation module, dropout module) from the constructor's
    arguments, as :class:`GroupNormAct` and :class:`groupnorm.SyncBatchNorm` take them."""
    if act_layer is not None or act_kwargs:
        if activation is not None:
            raise ValueError(
                f"pass activation= or act_layer=, not both (got activation={activation!r}, "
                f"act_layer={act_layer!r})"
            )
        name, module = _act.resolve_act(act_layer, act_kwargs)
    else:
        name, module = v.check_activation(activation), None
    drop = drop_layer
    if drop is not None and not isinstance(drop, nn.Module):
        if not callable(drop):
            raise TypeError(
                f"drop_layer must be an nn.Module class or instance, got {type(drop).__name__}"
            )
        drop = drop()
    if isinstance(drop, nn.Identity):
        drop = None
    if drop is not None and name:  # the dropout sits between norm and activation: no fusion
        name, module = "", _act.module_for(name)
    if module is not None and (device is not None or dtype is not None):
        module = module.to(device=device, dtype=dtype)  # e.g. nn.PReLU's weight
    return name, module, drop


class _ActTail:
    """What a norm-act module applies after the norm: a fused activation named in
    ``_activation`` (run by the kernels), else an ``act`` module, after an optional ``drop``.
    Its ``forward`` is the norm's (the next class in the MRO), then ``drop`` and ``act``."""

    def _init_act_drop(self, activation, act_layer, act_kwargs, drop_layer, device, dtype):
        name, module, drop = _resolve_act_drop(
            activation, act_layer, act_kwargs, drop_layer, device, dtype
        )
        self._activation = name
        self.drop = drop
        self.act = module

    @property
    def activation(self) -> str | nn.Module | None:
        """The fused activation's name, the module applied after the norm, or None."""
        return self._activation or self.act

    def _act_label(self) -> str | None:
        return self._activation or (type(self.act).__name__ if self.act is not None else None)

    def _drop_act(self, y: Tensor) -> Tensor:
        if self.drop is not None:
            y = self.drop(y)
        return y if self.act is None else self.act(y)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._drop_act(super().forward(input, residual))


class GroupNormAct(_ActTail, GroupNorm):
    """Group norm followed by an activation; silu, gelu (erf) and relu are fused into the norm.

    The activation is given either as ``activation=`` (``"silu"``, ``"gelu"``, ``"relu"`` or
    ``None``) or the way timm gives it: ``act_layer=`` a name (``"silu"``, ``"hard_swish"``,
    ``"gelu_tanh"``, ...), an ``nn.Module`` class, a callable returning an ``nn.Module`` (each
    built with ``act_kwargs``) or an ``nn.Module`` instance. An exact ``nn.SiLU``, ``nn.ReLU`` or
    ``nn.GELU(approximate="none")`` is fused; any other activation is kept as the submodule
    ``act`` and applied after the norm. ``drop_layer`` (a class called with no arguments, or a
    module) is applied between the norm and the activation, as in timm's norm-act layers; with one
    the activation is not fused.

    The state_dict has the same keys as :class:`GroupNorm` (``weight``, ``bias``), plus those of
    an ``act``/``drop`` module that has some (e.g. ``nn.PReLU``). With a fused activation the
    backward recomputes the activation's input, so only x, mean and rstd are kept for backward.

    Args:
        activation: ``"silu"`` (the default when ``act_layer`` is not given, as in diffusion
            UNets), ``"gelu"``, ``"relu"`` or ``None``.
        act_layer: the activation, timm's way (see above); pass this or ``activation``.
        act_kwargs: keyword arguments to build ``act_layer`` with (e.g. ``{"inplace": True}``).
        drop_layer: dropout applied before the activation.
        The rest as :class:`GroupNorm`.

    >>> m = GroupNormAct(32, 64, activation="silu")
    >>> m
    GroupNormAct(32, 64, eps=1e-05, affine=True, bias=True, activation=silu)
    >>> x = torch.randn(2, 64, 8, 8)
    >>> ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32))
    >>> torch.allclose(m(x), ref, atol=1e-5)
    True
    >>> GroupNormAct(8, 64, act_layer=torch.nn.GELU, act_kwargs={"approximate": "tanh"})
    GroupNormAct(
      8, 64, eps=1e-05, affine=True, bias=True, activation=GELU
      (act): GELU(approximate='tanh')
    )
    """

    class _Default(str):
        """The default ``activation="silu"``, told apart from an explicit one."""

    _DEFAULT_ACT = _Default("silu")

    def __init__(
        self,
        num_groups: int | None,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        activation: str | None = _DEFAULT_ACT,
        act_layer: Any = None,
        act_kwargs: dict[str, Any] | None = None,
        drop_layer: Any = None,
        group_size: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_groups, num_channels, eps, affine, device, dtype, group_size=group_size, bias=bias
        )
        # (the default activation gives way to an act_layer; an explicit one clashes with it)
        explicit = activation
        if (act_layer is not None or act_kwargs) and isinstance(activation, GroupNormAct._Default):
            explicit = None
        self._init_act_drop(explicit, act_layer, act_kwargs, drop_layer, device, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self._act_label()}"


class LayerNorm(GroupNorm):
    r"""The paper's layer norm: per-sample statistics over (C, \*), per-channel affine.

    Same as ``GroupNorm(1, num_channels)``. It differs from ``torch.nn.LayerNorm(shape)``, which
    normalizes the trailing dims named by ``shape`` and learns an affine of that whole shape:
    this one fits any spatial size and learns one :math:`\gamma, \beta` per channel, as in the
    paper's Figure 2. The state_dict matches ``torch.nn.GroupNorm(1, C)``.

    >>> LayerNorm(8)
    LayerNorm(1, 8, eps=1e-05, affine=True, bias=True)
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(1, num_channels, eps, affine, device, dtype)


class InstanceNorm(GroupNorm):
    r"""Instance norm: per-sample, per-channel statistics, per-channel affine.

    Same as ``GroupNorm(C, C)``. Unlike ``torch.nn.InstanceNorm2d`` it works for any rank, has
    ``affine=True`` by default (the paper's IN) and keeps no running statistics.

    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.allclose(InstanceNorm(3, affine=False)(x), torch.nn.functional.instance_norm(x),
    ...                atol=1e-5)
    True
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_channels, num_channels, eps, affine, device, dtype)


class BatchNorm(_Norm, _BatchNorm):
    r"""Batch norm for inputs of any rank (N, C, \*) through the same core as group norm.

    Statistics per channel over every sample and position. In training the batch statistics are
    used and ``running_mean``/``running_var`` updated (unbiased variance; ``momentum=None`` is a
    cumulative average, counted by ``num_batches_tracked``); in eval the running statistics are
    used. With ``track_running_stats=False`` the batch statistics are used in both modes.

    The state_dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) match ``torch.nn.BatchNorm1d/2d/3d``.

    Args:
        num_features: C. ``eps``, ``momentum``, ``affine``, ``track_running_stats`` as torch.
        activation: optional fused ``"silu"``, ``"gelu"`` or ``"relu"``.

    >>> bn = BatchNorm(3)
    >>> _ = bn.load_state_dict(torch.nn.BatchNorm2d(3).state_dict())
    >>> x = torch.randn(4, 3, 5, 5)
    >>> torch.allclose(bn(x), torch.nn.BatchNorm2d(3)(x), atol=1e-5)
    True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        activation: str | None = None,
        bias: bool = True,
    ) -> None:
        num_features = _check_channels(num_features, "num_features")
        super().__init__(
            num_features,
            v.check_eps(eps),
            v.check_momentum(momentum),
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
        )
        if not bias:
            self.register_parameter("bias", None)
        self._activation = v.check_activation(activation)

    def _check_input_dim(self, input: Tensor) -> None:
        v.check_input(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm expects {self.num_features} channels in dim 1, got input of shape "
                f"{tuple(input.shape)}; build the layer with num_features={input.shape[1]} or "
                f"fix the layer that feeds it"
            )

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, activation={self._activation}" if self._activation else base

    _SPEC_FIELDS = frozenset({"eps", "_activation"})
    _CHANNELS = "num_features"

    def _resolve_spec(self) -> NormSpec:
        spec = NormSpec(None, True, v.check_eps(self.eps), v.check_activation(self._activation))
        self.__dict__["_spec"] = spec
        return spec

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        spec = self.__dict__.get("_spec") or self._resolve_spec()
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        momentum = self.momentum
        # (parameters and buffers straight from their dicts: nn.Module.__getattr__ is slow)
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        if update:  # (_count_step, written out: this is the small-call path)
            count = buffers.get("num_batches_tracked")
            if count is not None:
                count.add_(1)  # (empty batches count too, as in torch)
                if momentum is None:  # a cumulative average
                    momentum = 1.0 / float(count)
        if update or not use_batch:
            running = (
                buffers["running_mean"] if "running_mean" in buffers else self.running_mean,
                buffers["running_var"] if "running_var" in buffers else self.running_var,
                momentum or 0.0,
            )
        else:
            running = None

        # (the validator's arguments as defaults: a closure would make each a cell per call)
        call = (input, weight, bias, residual, running, use_batch)
        validate = lambda m=self, a=call: m._validate(*a)  # noqa: E731
        return run(spec, input, weight, bias, residual, validate, running, use_batch)[0]

    def _count_step(self) -> float | None:
        """Count a training call in ``num_batches_tracked`` (every one, empty batches too, as
        torch does) and return the momentum of its running-statistics update: ``momentum``, or
        for ``momentum=None`` the cumulative average's 1 / (calls so far). For the subclasses
        that update the statistics themselves; ``forward`` has the same lines inline."""
        momentum = self.momentum
        count = self._buffers.get("num_batches_tracked")
        if count is not None:
            count.add_(1)
            if momentum is None:
                momentum = 1.0 / float(count)
        return momentum

    def _validate(self, input, weight, bias, residual, running, use_batch):
        """The checks of a call, with the module's messages (the full checks only where the
        tensor shortcut is not sure)."""
        c = self.num_features
        if not v.tensors_ok(input, weight, bias, residual, None, c) or (
            running is not None and not v.tensors_ok(input, running[0], running[1], None, None, c)
        ):
            self._check_input_dim(input)
            v.check_param(weight, "weight", c, input)
            v.check_param(bias, "bias", c, input)
            v.check_residual(residual, input)
            if running is not None:
                v.check_stat(self.running_mean, "running_mean", c, input)
                v.check_stat(self.running_var, "running_var", c, input)
        if use_batch and input.numel() == input.shape[1]:
            raise ValueError(
                f"batch norm in training needs more than 1 value per channel, got input of "
                f"shape {tuple(input.shape)}; use a larger batch, eval mode, or group norm"
            )
