"""Model converters: BatchNorm -> GroupNorm, ``torch.nn.GroupNorm`` -> ours, Conv -> WSConv.

Both converters walk the model, build new modules and put them where the old ones were (as
``SyncBatchNorm.convert_sync_batchnorm`` does): the model is changed in place and also returned;
``copy.deepcopy`` it first to keep the original. Affine Parameters are moved over as the same
``Parameter`` objects, so an optimizer built before the conversion still updates them.

What counts as what (see ``docs/moving-from-bn-to-gn.md`` for the list of known layers):

* batch norm: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and :class:`groupnorm.BatchNorm` as they
  are; a subclass of torch's ``_BatchNorm`` whose only submodules are ``act`` and/or ``drop``
  (timm's ``BatchNormAct2d``, ``SyncBatchNormAct``; detectron2's ``NaiveSyncBatchNorm``); and a
  module that is not a ``_BatchNorm`` but has its structure: 1-D ``running_mean`` and
  ``running_var`` buffers and ``weight``/``bias`` (Parameters or buffers) of one size, no other
  Parameters, submodules only ``act``/``drop`` (torchvision's and detectron2's
  ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``, mmcv's ``SyncBatchNorm``);
* group norm (for :func:`replace_group_norm`): ``torch.nn.GroupNorm`` as it is, and a subclass
  with no buffers and submodules only ``act``/``drop`` (timm's ``GroupNorm``, ``GroupNorm1``,
  ``GroupNormAct``, ``GroupNorm1Act``);
* every layer above whose ``forward`` is not torch's own is *checked*: in eval mode, on a small
  random input, its output must equal the norm followed by its ``drop`` and ``act`` (computed
  here from its own tensors). A subclass that fails the check, or has other submodules, Parameters
  or buffers, is *unknown*: it is left alone and named in one warning, or converted as a plain
  norm with ``convert_unknown=True`` (and named in a warning saying so);
* activation: a layer's own ``act`` is carried over, fused into :class:`groupnorm.GroupNormAct`
  when it is an exact ``nn.ReLU``, ``nn.SiLU`` or ``nn.GELU`` with ``approximate="none"`` and no
  dropout sits between, else kept as the same module after the norm; ``drop`` is kept too. With
  ``activation_fusion=True``, the next child of the same ``nn.Sequential`` is fused when it is
  one of those three;
* residual block (for ``zero_init_last``): see :func:`find_last_norms`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _act
from . import _validation as v
from .kernels.activations import BY_NAME
from .modules import BatchNorm, GroupNorm, GroupNormAct
from .weight_standardization import DEFAULT_EPS, WSConv1d, WSConv2d, WSConv3d

__all__ = ["convert_batchnorm", "replace_group_norm", "choose_num_groups", "find_last_norms"]


class _DefaultGroups(int):
    """The default ``num_groups=32``, told apart from an explicit 32 (to reject both options)."""

    def __repr__(self) -> str:
        return "32"


_DEFAULT_GROUPS = _DefaultGroups(32)
_CARRIED = frozenset(("act", "drop"))
_BN_PARAMS = frozenset(("weight", "bias"))
_BN_BUFFERS = frozenset(("running_mean", "running_var", "num_batches_tracked"))
_TORCH_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, BatchNorm.forward)
_CONVS = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
_BLOCK_WORDS = ("block", "bottleneck")
_SHORTCUT_NAMES = frozenset(
    ("downsample", "shortcut", "skip", "skip_connection", "conv_shortcut", "identity", "proj")
)


def choose_num_groups(
    num_channels: int,
    num_groups: int | None = None,
    group_size: int | None = None,
    *,
    min_group_size: int = 1,
) -> int:
    """The valid group count for ``num_channels`` nearest to the one asked for.

    With ``num_groups``: the divisor of ``num_channels`` closest to it (on a tie, the smaller
    count, i.e. larger groups, further from instance norm). With ``group_size``: the divisor of
    ``num_channels`` closest to that group size (on a tie, the larger size), turned into a count.
    When the request is valid it is returned unchanged. ``min_group_size`` leaves out counts
    whose groups would have fewer channels (the converter passes 2 for ``BatchNorm1d``); a
    ValueError when no count qualifies.

    >>> choose_num_groups(10, 32, min_group_size=2)  # 5 groups of 2, not 10 groups of 1
    5
    >>> choose_num_groups(64, 32), choose_num_groups(48, 32), choose_num_groups(30, 32)
    (32, 24, 30)
    >>> choose_num_groups(96, group_size=20)  # sizes 16 and 24 are both 4 away: take 24
    4
    """
    num_channels = v._check_int(num_channels, "num_channels")
    if num_channels <= 0:
        raise ValueError(f"num_channels must be positive, got {num_channels}")
    _check_group_args(num_groups, group_size)
    divs = [d for d in v.divisors(num_channels) if num_channels // d >= min_group_size]
    if not divs:
        raise ValueError(
            f"no group count gives groups of at least {min_group_size} channels for "
            f"num_channels={num_channels}"
        )
    if group_size is not None:
        sizes = [num_channels // d for d in divs]
        size = min(sizes, key=lambda d: (abs(d - group_size), -d))
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


def _carried(m: nn.Module) -> tuple[nn.Module | None, nn.Module | None] | None:
    """(act, drop) when the only submodules are ``act``/``drop`` (an Identity counts as none)."""
    children = dict(m.named_children())
    if set(children) - _CARRIED:
        return None
    act, drop = children.get("act"), children.get("drop")
    return (
        None if isinstance(act, nn.Identity) else act,
        None if isinstance(drop, nn.Identity) else drop,
    )


def _own_names(m: nn.Module) -> tuple[set[str], set[str]]:
    params = {n for n, p in m.named_parameters(recurse=False) if p is not None}
    buffers = {n for n, b in m.named_buffers(recurse=False) if b is not None}
    return params, buffers


def _bn_tensor(m: nn.Module, name: str) -> Tensor | None:
    t = getattr(m, name, None)
    return t if isinstance(t, Tensor) else None


def _is_bn_like(m: nn.Module) -> bool:
    """Batch norm by structure, for modules that are not torch's ``_BatchNorm`` (frozen BN...)."""
    if isinstance(m, (_BatchNorm, nn.GroupNorm)) or _carried(m) is None:
        return False
    params, buffers = _own_names(m)
    if params - _BN_PARAMS or not {"running_mean", "running_var"} <= buffers:
        return False
    tensors = [_bn_tensor(m, n) for n in ("weight", "bias", "running_mean", "running_var")]
    shapes = {t.shape for t in tensors if t is not None}
    return len(shapes) == 1 and next(iter(shapes)) != () and len(next(iter(shapes))) == 1


def _probe(m: nn.Module, kind: str, act: nn.Module | None, drop: nn.Module | None) -> bool:
    """Whether ``m`` (in eval mode) computes the plain norm, then ``drop``, then ``act``.

    Run on a small random input with ``m``'s own tensors; no buffer changes (eval mode), and the
    modes of ``m`` and its submodules are restored afterwards.
    """
    weight, bias = _bn_tensor(m, "weight"), _bn_tensor(m, "bias")
    rm, rv = _bn_tensor(m, "running_mean"), _bn_tensor(m, "running_var")
    like = next((t for t in (weight, bias, rm) if t is not None), None)
    device = like.device if like is not None else torch.device("cpu")
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    if device.type == "meta":
        return False
    channels = m.num_channels if kind == "group" else like.numel() if like is not None else 0
    if channels <= 0:
        return False
    rank = 4
    if isinstance(m, nn.BatchNorm1d):
        rank = 3
    elif isinstance(m, nn.BatchNorm3d):
        rank = 5
    gen = torch.Generator().manual_seed(0)
    shape = (2, channels) + (3,) * (rank - 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).mul(1.5).add(0.3)
    x = x.to(device=device, dtype=dtype)
    eps = float(getattr(m, "eps", 1e-5))
    modes = [(mod, mod.training) for mod in m.modules()]
    try:
        m.eval()
        with torch.no_grad():
            y = m(x.clone())
            if kind == "group":
                ref = torch.nn.functional.group_norm(x, m.num_groups, weight, bias, eps)
            else:
                ref = torch.nn.functional.batch_norm(x, rm, rv, weight, bias, rm is None, 0.0, eps)
            own = getattr(m, "_activation", "")
            if own:
                ref = BY_NAME[own].function(ref)
            if drop is not None:
                ref = drop(ref)
            if act is not None:
                ref = act(ref)
    except Exception:  # any failure means: not the layer we know how to replace
        return False
    finally:
        for mod, training in modes:
            mod.training = training
    if not isinstance(y, Tensor) or y.shape != ref.shape:
        return False
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return torch.allclose(y.double(), ref.double(), atol=tol, rtol=tol)


def _classify_bn(m: nn.Module) -> tuple[str, nn.Module | None, nn.Module | None]:
    """("known" | "unknown" | "", act, drop) for a batch norm to convert; "" = not one."""
    if isinstance(m, _BatchNorm):
        extras = _carried(m)
        if extras is None:
            return "unknown", None, None
        act, drop = extras
        if type(m).forward in _TORCH_BN_FORWARDS and next(m.children(), None) is None:
            return "known", None, None
        params, buffers = _own_names(m)
        if params - _BN_PARAMS or buffers - _BN_BUFFERS or not _probe(m, "batch", act, drop):
            return "unknown", None, None
        return "known", act, drop
    if _is_bn_like(m):
        act, drop = _carried(m)
        return ("known", act, drop) if _probe(m, "batch", act, drop) else ("unknown", None, None)
    return "", None, None


def _classify_gn(m: nn.Module) -> tuple[str, nn.Module | None, nn.Module | None]:
    """("known" | "unknown" | "", act, drop) for a torch or foreign group norm to swap."""
    if type(m) is nn.GroupNorm:
        return "known", None, None
    if not isinstance(m, nn.GroupNorm) or isinstance(m, GroupNorm):
        return "", None, None
    extras = _carried(m)
    params, buffers = _own_names(m)
    if extras is None or params - _BN_PARAMS or buffers:
        return "unknown", None, None
    act, drop = extras
    return ("known", act, drop) if _probe(m, "group", act, drop) else ("unknown", None, None)


def _new_group_norm(
    weight: Tensor | None,
    bias: Tensor | None,
    num_channels: int,
    num_groups: int,
    eps: float,
    activation: str,
    training: bool,
    like: Tensor | None,
    act: nn.Module | None = None,
    drop: nn.Module | None = None,
) -> GroupNorm:
    """A GroupNorm(Act) taking over ``weight``/``bias`` (Parameters are shared, buffers cloned).

    ``activation`` is a fused name; ``act``/``drop`` are modules carried over (the same objects;
    an ``act`` that is exactly a fused activation, with no ``drop``, is fused instead).
    """
    affine = weight is not None or bias is not None
    device = like.device if like is not None else None
    dtype = like.dtype if like is not None and like.is_floating_point() else None
    common = dict(eps=eps, affine=affine, device=device, dtype=dtype, bias=bias is not None)
    if act is not None or drop is not None:
        gn = GroupNormAct(
            num_groups,
            num_channels,
            act_layer=act if act is not None else activation or None,
            drop_layer=drop,
            activation=None,
            **common,
        )
    elif activation:
        gn = GroupNormAct(num_groups, num_channels, activation=activation, **common)
    else:
        gn = GroupNorm(num_groups, num_channels, **common)
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
    return "" if m is None else _act.fused_name(m)


def _describe(name: str, m: nn.Module) -> str:
    return f"{name or 'model'} ({type(m).__name__} from {type(m).__module__})"


class _Unrecognised:
    """The subclasses a conversion does not recognise (``kind == "unknown"`` from
    :func:`_classify_bn`/:func:`_classify_gn`), and the one warning that names them."""

    def __init__(self, convert: bool) -> None:
        self.convert = convert  # convert_unknown: swap them as plain norms
        self.names: list[str] = []

    def skip(self, kind: str, name: str, m: nn.Module) -> bool:
        """Whether to leave ``m`` alone: not a norm the conversion takes (no ``kind``), or an
        unrecognised subclass (noted) without ``convert_unknown``."""
        if kind == "unknown":
            self.names.append(_describe(name, m))
            return not self.convert
        return not kind

    def warn(self, left: str, converted: str | None = None) -> None:
        """Warns with ``left``, or ``converted`` under ``convert_unknown``, and the names, if
        any subclass was met; ``stacklevel`` points at the caller of the conversion."""
        if self.names:
            msg = converted if self.convert else left
            warnings.warn(msg + ", ".join(self.names), UserWarning, stacklevel=3)


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


def _replace_all(
    model: nn.Module,
    replace: Callable[[str, nn.Module, str], tuple[nn.Module | None, bool]],
    fuse: bool,
) -> nn.Module:
    """The model with ``replace`` applied: the new root when it replaces the root itself, else
    the same model, each of whose descendants ``replace`` was offered (see :func:`_walk`)."""
    new_root, _ = replace("", model, "")
    if new_root is not None:
        return new_root
    _walk(model, "", replace, fuse)
    return model


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
    convert_unknown: bool = False,
) -> nn.Module:
    """Replace every batch norm in ``model`` by :class:`groupnorm.GroupNorm`; returns the model.

    Converted: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, :class:`groupnorm.BatchNorm`, frozen
    batch norm and the subclasses that carry an activation and dropout (timm's
    ``BatchNormAct2d``...; see the module docstring). A layer's own activation and dropout are
    kept (fused into :class:`groupnorm.GroupNormAct` when possible). Each new layer gets the old
    layer's affine :math:`\\gamma, \\beta` (the same Parameter objects; a frozen BN's weight/bias
    buffers become trainable Parameters), its eps, device, dtype and train/eval mode. Running
    statistics are dropped: group norm has none, so the converted model computes a different
    function and needs training or fine-tuning. The model is changed in place (the root is
    returned new when it is itself a batch norm).

    When a layer's channel count is not divisible by the requested groups, the nearest valid
    count is used (:func:`choose_num_groups`) and one ``UserWarning`` per call names every such
    layer; ``strict=True`` raises instead. A ``BatchNorm1d`` may see (N, C) input, where a group
    of one channel holds one element (its output would be the constant bias): its groups always
    have at least 2 channels (fewer groups than asked, in the same warning), and a
    ``BatchNorm1d(1)`` is kept as it is, with a warning.

    A batch norm subclass that is not recognised (its ``forward`` does not compute the norm, then
    its ``drop``, then its ``act``, or it has other submodules or tensors) is left alone and named
    in one warning; ``convert_unknown=True`` converts it as a plain batch norm (its own
    ``forward`` and other submodules are dropped), and a warning names those too.

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
        convert_unknown: also convert unrecognised batch norm subclasses (see above).

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
    single: list[str] = []
    unknown = _Unrecognised(convert_unknown)

    def replace(name: str, m: nn.Module, activation: str) -> tuple[nn.Module | None, bool]:
        if weight_standardization and type(m) in _CONVS:
            return _CONVS[type(m)].from_conv(m, eps=ws_eps), False
        kind, act, drop = _classify_bn(m)
        if unknown.skip(kind, name, m):
            return None, False
        return _bn_to_gn(name or type(m).__name__, m, activation, act, drop)

    def _bn_to_gn(
        name: str, m: nn.Module, activation: str, act: nn.Module | None, drop: nn.Module | None
    ) -> tuple[nn.Module | None, bool]:
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{name} is a lazy batch norm that has not seen an input yet; run one "
                f"forward pass before converting"
            )
        weight, bias = _bn_tensor(m, "weight"), _bn_tensor(m, "bias")
        rm = _bn_tensor(m, "running_mean")
        like = next((t for t in (weight, bias, rm) if t is not None), None)
        channels = m.num_features if isinstance(m, _BatchNorm) else like.numel()
        own = getattr(m, "_activation", "") if isinstance(m, _BatchNorm) else ""
        carries = bool(own) or act is not None or drop is not None
        fused = bool(activation) and not carries
        if not fused:  # its own activation (if any) is kept, the next child is left alone
            activation = own
        min_size = 2 if isinstance(m, nn.BatchNorm1d) else 1
        if channels < min_size:
            single.append(f"{name} (C={channels})")
            return None, False
        groups = choose_num_groups(channels, num_groups, group_size, min_group_size=min_size)
        asked = num_groups if num_groups is not None else f"group_size={group_size}"
        if (num_groups is not None and groups != num_groups) or (
            group_size is not None and groups * group_size != channels
        ):
            why = ""
            if groups != choose_num_groups(channels, num_groups, group_size):
                why = (
                    " (BatchNorm1d: at least 2 channels a group, as (N, C) input has no positions)"
                )
            msg = f"{name} (C={channels}): {asked} -> num_groups={groups}{why}"
            if strict:
                valid = [str(d) for d in v.divisors(channels) if channels // d >= min_size]
                raise ValueError(
                    f"cannot use {asked} for {name} with {channels} channels (strict=True); "
                    f"valid group counts: {', '.join(valid)}"
                )
            adjusted.append(msg)
        layer_eps = eps if eps is not None else v.check_eps(float(getattr(m, "eps", 1e-5)))
        gn = _new_group_norm(
            weight, bias, channels, groups, layer_eps, activation, m.training, like, act, drop
        )
        return gn, fused

    model = _replace_all(model, replace, activation_fusion)
    if adjusted:
        warnings.warn(
            "convert_batchnorm: channel count not divisible by the requested groups, used the "
            "nearest valid group count for " + "; ".join(adjusted),
            UserWarning,
            stacklevel=2,
        )
    if single:
        warnings.warn(
            "convert_batchnorm kept these BatchNorm1d layers as they are: with one channel, "
            "group norm on (N, C) input normalizes sets of one element (output = bias): "
            + ", ".join(single),
            UserWarning,
            stacklevel=2,
        )
    unknown.warn(
        converted="convert_batchnorm converted these unrecognised batch norm subclasses as plain "
        "batch norms (convert_unknown=True); their own forward and any other submodules are "
        "gone: ",
        left="convert_batchnorm left these batch norm subclasses alone, since their forward or "
        "contents are not a batch norm followed by its act/drop (pass convert_unknown=True to "
        "convert them as plain batch norms): ",
    )
    if zero_init_last:
        for _, norm in find_last_norms(model):
            with torch.no_grad():
                norm.weight.zero_()
    return model


def replace_group_norm(
    model: nn.Module,
    *,
    activation_fusion: bool = False,
    convert_unknown: bool = False,
    fuse_activation: bool | None = None,
) -> nn.Module:
    """Swap every ``torch.nn.GroupNorm`` in ``model`` for :class:`groupnorm.GroupNorm`.

    The new layers compute the same function (same groups, eps, Parameters shared), so outputs
    agree to float rounding. Swapped: modules whose type is exactly ``torch.nn.GroupNorm``, and
    subclasses with no buffers and no submodules but ``act``/``drop`` whose ``forward`` is checked
    to compute group norm, then ``drop``, then ``act`` (timm's ``GroupNorm``, ``GroupNorm1``,
    ``GroupNormAct``, ``GroupNorm1Act``; see the module docstring). Their activation and dropout
    are kept: fused into :class:`groupnorm.GroupNormAct` when it is an exact SiLU, ReLU or erf
    GELU with no dropout, else the same modules applied after the norm. Other subclasses are left
    alone with one warning naming them; ``convert_unknown=True`` swaps them as plain group norms
    (their own ``forward`` and other submodules are dropped; a warning names them).

    With ``activation_fusion=True`` (as in :func:`convert_batchnorm`), a group norm (torch's or
    our plain one) directly followed by ``nn.SiLU``/``nn.GELU``/``nn.ReLU`` in an
    ``nn.Sequential`` becomes one :class:`groupnorm.GroupNormAct` and the activation an
    ``nn.Identity``. ``fuse_activation=`` is a deprecated spelling of it. The model is changed in
    place and returned.

    >>> net = torch.nn.Sequential(torch.nn.GroupNorm(4, 8), torch.nn.SiLU())
    >>> replace_group_norm(net, activation_fusion=True)
    Sequential(
      (0): GroupNormAct(4, 8, eps=1e-05, affine=True, bias=True, activation=silu)
      (1): Identity()
    )
    """
    model = _check_model(model)
    if fuse_activation is not None:
        warnings.warn(
            "replace_group_norm(fuse_activation=) is deprecated; pass activation_fusion= (the "
            "name convert_batchnorm uses)",
            DeprecationWarning,
            stacklevel=2,
        )
        if activation_fusion:
            raise TypeError("pass activation_fusion= or fuse_activation=, not both")
        activation_fusion = bool(fuse_activation)
    unknown = _Unrecognised(convert_unknown)

    def replace(name: str, m: nn.Module, activation: str) -> tuple[nn.Module | None, bool]:
        if type(m) is GroupNorm and activation:
            kind, act, drop = "known", None, None
        else:
            kind, act, drop = _classify_gn(m)
        if unknown.skip(kind, name, m):
            return None, False
        fused = bool(activation) and act is None and drop is None
        like = m.weight if m.weight is not None else m.bias
        gn = _new_group_norm(
            m.weight,
            m.bias,
            m.num_channels,
            m.num_groups,
            m.eps,
            activation if fused else "",
            m.training,
            like,
            act,
            drop,
        )
        return gn, fused

    model = _replace_all(model, replace, activation_fusion)
    unknown.warn(
        converted="replace_group_norm swapped these unrecognised subclasses of torch.nn.GroupNorm "
        "as plain group norms (convert_unknown=True); their own forward and any other submodules "
        "are gone: ",
        left="replace_group_norm left these subclasses of torch.nn.GroupNorm alone, since their "
        "forward or contents are not a group norm followed by its act/drop (pass "
        "convert_unknown=True to swap them as plain group norms): ",
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
