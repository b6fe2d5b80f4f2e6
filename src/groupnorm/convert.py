"""Model converters: BatchNorm -> GroupNorm, ``torch.nn.GroupNorm`` -> ours, Conv -> WSConv.

Both converters walk the model, build new modules and put them where the old ones were (as
``SyncBatchNorm.convert_sync_batchnorm`` does): the model is changed in place and also returned;
``copy.deepcopy`` it first to keep the original. Affine Parameters are moved over as the same
``Parameter`` objects, so an optimizer built before the conversion still updates them.

What counts as what:

* batch norm: any ``torch.nn.modules.batchnorm._BatchNorm`` (``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm``, ``groupnorm.BatchNorm``), and *frozen* batch norm, recognised by its
  buffers: a leaf module with no Parameters and 1-D buffers ``weight``, ``bias``,
  ``running_mean`` and ``running_var`` of one size (torchvision's and detectron2's
  ``FrozenBatchNorm2d``);
* activation that can be fused: an exact ``nn.ReLU``, ``nn.SiLU`` or ``nn.GELU`` with
  ``approximate="none"``, the next child of the same ``nn.Sequential``;
* residual block (for ``zero_init_last``): see :func:`find_last_norms`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _validation as v
from .modules import GroupNorm, GroupNormAct
from .weight_standardization import DEFAULT_EPS, WSConv1d, WSConv2d, WSConv3d

__all__ = ["convert_batchnorm", "replace_group_norm", "choose_num_groups", "find_last_norms"]


class _DefaultGroups(int):
    """The default ``num_groups=32``, told apart from an explicit 32 (to reject both options)."""

    def __repr__(self) -> str:
        return "32"


_DEFAULT_GROUPS = _DefaultGroups(32)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_FUSABLE = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}
_CONVS = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
_BLOCK_WORDS = ("block", "bottleneck")
_SHORTCUT_NAMES = frozenset(
    ("downsample", "shortcut", "skip", "skip_connection", "conv_shortcut", "identity", "proj")
)


def choose_num_groups(
    num_channels: int, num_groups: int | None = None, group_size: int | None = None
) -> int:
    """The valid group count for ``num_channels`` nearest to the one asked for.

    With ``num_groups``: the divisor of ``num_channels`` closest to it (on a tie, the smaller
    count, i.e. larger groups, further from instance norm). With ``group_size``: the divisor of
    ``num_channels`` closest to that group size (on a tie, the larger size), turned into a count.
    When the request is valid it is returned unchanged.

    >>> choose_num_groups(64, 32), choose_num_groups(48, 32), choose_num_groups(30, 32)
    (32, 24, 30)
    >>> choose_num_groups(96, group_size=20)  # sizes 16 and 24 are both 4 away: take 24
    4
    """
    num_channels = v._check_int(num_channels, "num_channels")
    if num_channels <= 0:
        raise ValueError(f"num_channels must be positive, got {num_channels}")
    _check_group_args(num_groups, group_size)
    divs = v.divisors(num_channels)
    if group_size is not None:
        size = min(divs, key=lambda d: (abs(d - group_size), -d))
        return num_channels // size
    return min(divs, key=lambda d: (abs(d - num_groups), d))


def _check_group_args(num_groups: object, group_size: object) -> None:
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"pass num_groups or group_size, not both (got num_groups={num_groups}, "
            f"group_size={group_size})"
        )
    if num_groups is None and group_size is None:
        raise ValueError("pass num_groups (e.g. 32) or group_size (e.g. 16)")
    for name, value in (("num_groups", num_groups), ("group_size", group_size)):
        if value is not None:
            v._check_int(value, name)
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value}")


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"model is wrapped in {type(model).__name__}; convert model.module and wrap it again "
            f"(the wrapper holds references to the old Parameters)"
        )
    return model


def _is_frozen_bn(m: nn.Module) -> bool:
    if isinstance(m, (_BatchNorm, nn.GroupNorm)):
        return False
    if next(m.parameters(recurse=False), None) is not None or next(m.children(), None):
        return False
    bufs = dict(m.named_buffers(recurse=False))
    if any(bufs.get(name) is None for name in _FROZEN_BUFFERS):
        return False
    shapes = {bufs[name].shape for name in _FROZEN_BUFFERS}
    return len(shapes) == 1 and bufs["weight"].dim() == 1


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) or _is_frozen_bn(m)


def _new_group_norm(
    weight: Tensor | None,
    bias: Tensor | None,
    num_channels: int,
    num_groups: int,
    eps: float,
    activation: str,
    training: bool,
    like: Tensor | None,
) -> GroupNorm:
    """A GroupNorm(Act) taking over ``weight``/``bias`` (Parameters are shared, buffers cloned)."""
    affine = weight is not None or bias is not None
    device = like.device if like is not None else None
    dtype = like.dtype if like is not None and like.is_floating_point() else None
    kwargs = {"activation": activation} if activation else {}
    cls = GroupNormAct if activation else GroupNorm
    gn = cls(
        num_groups,
        num_channels,
        eps=eps,
        affine=affine,
        device=device,
        dtype=dtype,
        bias=bias is not None,
        **kwargs,
    )
    if affine:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None:
                gn.register_parameter(name, None)
            elif isinstance(t, nn.Parameter):
                setattr(gn, name, t)
            else:  # a frozen BN's buffer becomes an ordinary trainable Parameter
                setattr(gn, name, nn.Parameter(t.detach().clone()))
    gn.train(training)
    return gn


def _fusable_activation(m: nn.Module | None) -> str:
    if m is None or type(m) not in _FUSABLE:
        return ""
    if isinstance(m, nn.GELU) and m.approximate != "none":
        return ""  # the fused GELU is the exact (erf) one
    return _FUSABLE[type(m)]


def _walk(
    module: nn.Module,
    prefix: str,
    replace: Callable[[str, nn.Module, str], tuple[nn.Module | None, bool]],
    fuse: bool,
) -> None:
    """Replace each child for which ``replace(name, child, next_activation)`` gives a module.

    ``replace`` returns (new module or None, whether it took over the next child's activation).
    """
    children = list(module.named_children())
    sequential = isinstance(module, nn.Sequential)
    skip_next = False
    for i, (name, child) in enumerate(children):
        full = f"{prefix}{name}"
        if skip_next:
            skip_next = False
            setattr(module, name, nn.Identity())
            continue
        activation = ""
        if fuse and sequential and i + 1 < len(children):
            activation = _fusable_activation(children[i + 1][1])
        new, fused = replace(full, child, activation)
        if new is None:
            _walk(child, full + ".", replace, fuse)
            continue
        setattr(module, name, new)
        skip_next = fused


def convert_batchnorm(
    model: nn.Module,
    num_groups: int | None = _DEFAULT_GROUPS,
    *,
    group_size: int | None = None,
    activation_fusion: bool = False,
    weight_standardization: bool = False,
    zero_init_last: bool = False,
    eps: float | None = None,
    strict: bool = False,
    ws_eps: float = DEFAULT_EPS,
) -> nn.Module:
    """Replace every batch norm in ``model`` by :class:`groupnorm.GroupNorm`; returns the model.

    Converted: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, :class:`groupnorm.BatchNorm` and frozen
    batch norm (see the module docstring). Each new layer gets the old layer's affine
    :math:`\\gamma, \\beta` (the same Parameter objects; a frozen BN's weight/bias buffers become
    trainable Parameters), its eps, device, dtype and train/eval mode. Running statistics are
    dropped: group norm has none, so the converted model computes a different function and needs
    training or fine-tuning. The model is changed in place (the root is returned new when it is
    itself a batch norm).

    When a layer's channel count is not divisible by the requested groups, the nearest valid
    count is used (:func:`choose_num_groups`) and one ``UserWarning`` per call names every such
    layer; ``strict=True`` raises instead.

    Args:
        model: the ``nn.Module`` to convert (not a DDP/DataParallel wrapper).
        num_groups: groups per layer (default 32, the paper's choice).
        group_size: channels per group instead of ``num_groups`` (pass one of them).
        activation_fusion: a batch norm directly followed by ``nn.ReLU``/``nn.SiLU``/``nn.GELU``
            in an ``nn.Sequential`` becomes one :class:`groupnorm.GroupNormAct`, and the
            activation an ``nn.Identity`` (indices and state_dict keys do not move).
        weight_standardization: also swap every ``nn.Conv1d/2d/3d`` (exact types) for
            :class:`groupnorm.WSConv1d/2d/3d` sharing its weight and bias.
        zero_init_last: zero :math:`\\gamma` of the last norm in each residual block (see
            :func:`find_last_norms` for how blocks and their last norm are found).
        eps: overrides every layer's eps; by default each batch norm's own eps is kept.
        strict: raise a ValueError instead of adjusting a group count.
        ws_eps: eps of the weight standardization.

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64),
        ...                           torch.nn.ReLU())
        >>> convert_batchnorm(net, activation_fusion=True)
        Sequential(
          (0): Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1))
          (1): GroupNormAct(32, 64, eps=1e-05, affine=True, bias=True, activation=relu)
          (2): Identity()
        )
        >>> convert_batchnorm(torch.nn.BatchNorm2d(64), group_size=16)
        GroupNorm(4, 64, eps=1e-05, affine=True, bias=True)
    """
    model = _check_model(model)
    if group_size is not None and num_groups is _DEFAULT_GROUPS:
        num_groups = None
    _check_group_args(num_groups, group_size)
    if eps is not None:
        eps = v.check_eps(eps)
    ws_eps = v.check_eps(ws_eps)
    adjusted: list[str] = []

    def replace(name: str, m: nn.Module, activation: str) -> tuple[nn.Module | None, bool]:
        if weight_standardization and type(m) in _CONVS:
            return _CONVS[type(m)].from_conv(m, eps=ws_eps), False
        if not _is_batchnorm(m):
            return None, False
        return _bn_to_gn(name or type(m).__name__, m, activation)

    def _bn_to_gn(name: str, m: nn.Module, activation: str) -> tuple[GroupNorm, bool]:
        frozen = not isinstance(m, _BatchNorm)
        if frozen:
            weight, bias = m.weight, m.bias
            channels = weight.numel()
        else:
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                raise ValueError(
                    f"{name} is a lazy batch norm that has not seen an input yet; run one "
                    f"forward pass before converting"
                )
            weight, bias = m.weight, m.bias
            channels = m.num_features
        own = getattr(m, "_activation", "") if isinstance(m, _BatchNorm) else ""
        fused = bool(activation) and not own
        if own:  # groupnorm.BatchNorm with a fused activation keeps it, and fuses nothing more
            activation = own
        groups = choose_num_groups(channels, num_groups, group_size)
        asked = num_groups if num_groups is not None else f"group_size={group_size}"
        if (num_groups is not None and groups != num_groups) or (
            group_size is not None and groups * group_size != channels
        ):
            msg = f"{name} (C={channels}): {asked} -> num_groups={groups}"
            if strict:
                raise ValueError(
                    f"cannot use {asked} for {name} with {channels} channels (strict=True); "
                    f"valid group counts: {', '.join(map(str, v.divisors(channels)))}"
                )
            adjusted.append(msg)
        layer_eps = eps if eps is not None else v.check_eps(float(getattr(m, "eps", 1e-5)))
        like = weight if weight is not None else getattr(m, "running_mean", None)
        gn = _new_group_norm(
            weight, bias, channels, groups, layer_eps, activation, m.training, like
        )
        return gn, fused

    new_root, _ = replace("", model, "")
    if new_root is not None:
        model = new_root
    else:
        _walk(model, "", replace, activation_fusion)
    if adjusted:
        warnings.warn(
            "convert_batchnorm: channel count not divisible by the requested groups, used the "
            "nearest valid group count for " + "; ".join(adjusted),
            UserWarning,
            stacklevel=2,
        )
    if zero_init_last:
        for _, norm in find_last_norms(model):
            with torch.no_grad():
                norm.weight.zero_()
    return model


def replace_group_norm(model: nn.Module, *, fuse_activation: bool = False) -> nn.Module:
    """Swap every ``torch.nn.GroupNorm`` in ``model`` for :class:`groupnorm.GroupNorm`.

    The new layers compute the same function (same groups, eps, Parameters shared), so outputs
    agree to float rounding. Only modules whose type is exactly ``torch.nn.GroupNorm`` are swapped;
    other subclasses may override ``forward``, so they are left alone with a warning naming them.
    With ``fuse_activation=True``, a group norm (torch's or our plain one) directly followed by
    ``nn.SiLU``/``nn.GELU``/``nn.ReLU`` in an ``nn.Sequential`` becomes one
    :class:`groupnorm.GroupNormAct` and the activation an ``nn.Identity``. The model is changed in
    place and returned.

    >>> net = torch.nn.Sequential(torch.nn.GroupNorm(4, 8), torch.nn.SiLU())
    >>> replace_group_norm(net, fuse_activation=True)
    Sequential(
      (0): GroupNormAct(4, 8, eps=1e-05, affine=True, bias=True, activation=silu)
      (1): Identity()
    )
    """
    model = _check_model(model)
    skipped: list[str] = []

    def replace(name: str, m: nn.Module, activation: str) -> tuple[nn.Module | None, bool]:
        if type(m) is not nn.GroupNorm and not (activation and type(m) is GroupNorm):
            if isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm):
                skipped.append(f"{name or 'model'} ({type(m).__name__})")
            return None, False
        like = m.weight if m.weight is not None else m.bias
        gn = _new_group_norm(
            m.weight, m.bias, m.num_channels, m.num_groups, m.eps, activation, m.training, like
        )
        return gn, bool(activation)

    new_root, _ = replace("", model, "")
    if new_root is not None:
        model = new_root
    else:
        _walk(model, "", replace, fuse_activation)
    if skipped:
        warnings.warn(
            "replace_group_norm left these subclasses of torch.nn.GroupNorm alone (they may "
            "override forward): " + ", ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return model


def _is_block(m: nn.Module) -> bool:
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    name = type(m).__name__.lower()
    return any(word in name for word in _BLOCK_WORDS)


def _is_affine_norm(m: nn.Module) -> bool:
    weight = getattr(m, "weight", None)
    return isinstance(m, (nn.GroupNorm, _BatchNorm)) and isinstance(weight, nn.Parameter)


def find_last_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of the last norm in each residual block of ``model``.

    The rule, meant for torchvision/timm-style ResNets (check it on your model by printing the
    names):

    * a *residual block* is a module whose class name contains ``"Block"`` or ``"Bottleneck"``
      (any case; e.g. ``BasicBlock``, ``Bottleneck``, ``ResnetBlock2D``), is not an
      ``nn.Sequential``/``ModuleList``/``ModuleDict``, and contains no other such block (so stage
      containers holding blocks are not blocks themselves);
    * its *norms* are the group/batch norms with an affine weight among its descendants, leaving
      out those under a child named ``downsample``, ``shortcut``, ``skip``, ``skip_connection``,
      ``conv_shortcut``, ``identity`` or ``proj`` (the shortcut path);
    * the *last* norm is the one registered last (the order of ``named_modules()``, which is the
      order of assignment in ``__init__``; for usual blocks the order of use too).

    Zeroing that norm's :math:`\\gamma` makes a post-activation block (conv-norm-act-conv-norm,
    then add) start as the identity. In a pre-activation block (norm-act-conv-norm-act-conv, as in
    diffusion UNets) the last norm is followed by a convolution, so zeroing it makes the branch
    constant, not zero; zero that last convolution instead.

    >>> class BasicBlock(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.bn1, self.bn2 = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    ...         self.downsample = torch.nn.Sequential(torch.nn.BatchNorm2d(4))
    >>> [name for name, _ in find_last_norms(torch.nn.Sequential(BasicBlock(), BasicBlock()))]
    ['0.bn2', '1.bn2']
    """
    _check_model(model)
    found = []
    for name, m in model.named_modules():
        if not _is_block(m) or any(_is_block(d) for d in m.modules() if d is not m):
            continue
        last = None
        for sub, d in m.named_modules():
            if d is m or not _is_affine_norm(d):
                continue
            if any(part in _SHORTCUT_NAMES for part in sub.split(".")):
                continue
            last = (f"{name}.{sub}" if name else sub, d)
        if last is not None:
            found.append(last)
    return found
