"""Functional API: one entry point, :func:`normalize`, and the four modes as special cases.

All functions hand their call to the dispatcher (:func:`groupnorm.dispatch.run`) with the
argument checks here (clear ``TypeError``/``ValueError`` messages) as its validator; the common
spellings of the scalars resolve to a cached spec without them (:func:`_quick_spec`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation as v
from .dispatch import NormSpec, run
from .kernels import BACKENDS, check_backend
from .kernels.activations import FUSED

__all__ = ["normalize", "group_norm", "batch_norm", "layer_norm", "instance_norm"]

# The common spellings of the scalar arguments, which the road takes without the full checks.
_QUICK_ACTIVATIONS = {None: "", "": "", **{a.name: a.name for a in FUSED}}
_QUICK_BACKENDS = (None, *BACKENDS)
_SPECS: dict[tuple, NormSpec] = {}


def _quick_spec(
    mode: object, num_groups: object, eps: object, activation: object, backend: object
) -> NormSpec | None:
    """The spec of a call whose scalars have the common types and valid values (one dictionary
    look-up once seen), else None: such calls take the full checks, which explain. ``mode`` is
    taken in the spellings of ``_validation.MODE_ALIASES``; ``num_groups`` is given for group
    norm only."""
    if type(mode) is not str or type(eps) is not float:
        return None
    if num_groups is not None and (type(num_groups) is not int or num_groups <= 0):
        return None
    if activation is not None and type(activation) is not str:
        return None
    if backend is not None and type(backend) is not str:
        return None
    key = (mode, num_groups, eps, activation, backend)
    spec = _SPECS.get(key)
    if spec is None:
        name = v.MODE_ALIASES.get(mode)
        act = _QUICK_ACTIVATIONS.get(activation)
        if name is None or act is None or backend not in _QUICK_BACKENDS:
            return None
        if not 0.0 <= eps < math.inf:
            return None
        if (name == "group") != (num_groups is not None):
            return None  # (group norm without a count, or a count for another mode)
        groups = 1 if name == "layer" else num_groups
        if len(_SPECS) >= 1024:  # many distinct eps values: start over rather than grow
            _SPECS.clear()
        spec = _SPECS[key] = NormSpec(groups, name == "batch", eps, act, backend)
    return spec


def _check_tensors(input, weight, bias, residual, num_groups: int | None, args: tuple) -> None:
    """The validator of a group, layer or instance norm call whose spec came from the cache
    (so its scalars are good): the tensors only, where they certainly pass; else the full
    checks of ``_check_call(*args)``, which raise the messages."""
    if not v.tensors_ok(input, weight, bias, residual, num_groups):
        _check_call(*args)


def _checked() -> None:
    """The validator of a call whose full checks already ran."""


def _run(
    input: Tensor,
    mode: object,
    num_groups: object = None,
    group_size: object = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: object = 1e-5,
    activation: object = None,
    residual: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: object = True,
    momentum: object = 0.1,
    return_sum: bool = False,
    backend: object = None,
    quick: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Hand a functional call to the dispatcher: with the quick spec where the scalars allow
    one (the C++ extension may then take the call unchecked) and the full checks as the
    validator; otherwise (or with ``quick=False``) the checks run first and build the spec."""
    # (the validators below take what they need as default arguments: a closure over this
    # function's parameters would make each of them a cell on every call, ~0.5 us here)
    args = (
        input,
        mode,
        num_groups,
        group_size,
        weight,
        bias,
        eps,
        activation,
        residual,
        running_mean,
        running_var,
        training,
        momentum,
        return_sum,
        backend,
    )
    spec = None
    if quick and group_size is None and not return_sum:
        spec = _quick_spec(mode, num_groups, eps, activation, backend)
    running = None
    if spec is not None and not spec.pool_batch:  # group, layer or instance norm (most calls)
        if running_mean is None and running_var is None and training is True:

            def validate(x=input, w=weight, b=bias, r=residual, g=spec.num_groups, a=args):
                _check_tensors(x, w, b, r, g, a)

            return run(spec, input, weight, bias, residual, validate)[0]
        spec = None  # (the checks explain)
    elif spec is not None:  # batch norm
        if type(training) is not bool or (running_mean is None) != (running_var is None):
            spec = None
        elif momentum is not None and (type(momentum) is not float or not 0.0 <= momentum <= 1.0):
            spec = None  # (the checks explain)
        elif running_mean is not None:
            if momentum is None:
                spec = None  # (the checks decide and explain)
            else:
                running = (running_mean, running_var, momentum)
    if spec is None:
        spec, running = _check_call(*args)
        validate = _checked
    else:
        validate = lambda a=args: _check_call(*a)  # noqa: E731

    y, total = run(spec, input, weight, bias, residual, validate, running, training is True)
    return (y, total) if return_sum else y


def normalize(
    input: Tensor,
    mode: str,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    return_sum: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Normalize ``input`` of shape (N, C, \*) over the sets of one of the paper's four modes.

    Computes :math:`y = f(\gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta)` with mean and
    biased variance taken over the set :math:`S_i` of each element:

    * ``"batch"``: same channel, all samples and positions (statistics per channel);
    * ``"layer"``: same sample, all channels and positions (the paper's LN; ``num_groups=1``);
    * ``"instance"``: same sample, same channel (``num_groups=C``);
    * ``"group"``: same sample, each of ``num_groups`` groups of C/G channels.

    Args:
        input: floating tensor (N, C, \*) of rank >= 2, any memory layout.
        mode: ``"batch"``, ``"layer"``, ``"instance"`` or ``"group"`` (``"bn"``, ``"ln"``,
            ``"in"``, ``"gn"`` also work).
        num_groups / group_size: for ``"group"`` only, exactly one of them.
        weight, bias: per-channel :math:`\gamma`, :math:`\beta` of shape (C,), in the input dtype
            or float32.
        eps: added to the variance; must be >= 0.
        activation: ``None``, ``"silu"``, ``"gelu"`` or ``"relu"``, applied after the affine step
            in the same op (its gradient is recomputed, so nothing extra is saved).
        residual: a tensor like ``input`` added before normalizing: ``norm(input + residual)``.
        running_mean, running_var: batch mode only. In training they are updated in place with
            ``momentum`` (unbiased variance, as torch does); with ``training=False`` they are the
            statistics used.
        training: batch mode only; ``False`` normalizes with the running statistics.
        momentum: batch mode only, used to update the running statistics in training (and
            range-checked, [0, 1], only then; torch ignores it otherwise, and so do we).
            ``None`` means a cumulative average, not supported here: use
            :class:`groupnorm.BatchNorm` for that.
        return_sum: with a residual, also return ``input + residual`` (the value a pre-norm
            residual stream carries on).
        backend: ``"auto"`` (default; or the ``GROUPNORM_BACKEND`` environment variable),
            ``"cpu"``, ``"portable"`` or ``"triton"``.

    Returns:
        The output in the input's dtype, shape and memory format; ``(output, sum)`` with
        ``return_sum=True``.

    Examples:
        >>> x = torch.randn(4, 6, 8, 8)
        >>> gn = normalize(x, "group", num_groups=3)
        >>> ln = normalize(x, "layer")
        >>> torch.allclose(ln, normalize(x, "group", num_groups=1))
        True
        >>> torch.allclose(normalize(x, "instance"), normalize(x, "group", num_groups=6))
        True
        >>> y, s = normalize(x, "group", num_groups=3, residual=x, activation="silu",
        ...                  return_sum=True)
        >>> torch.equal(s, 2 * x)
        True
    """
    return _run(
        input,
        mode,
        num_groups,
        group_size,
        weight,
        bias,
        eps,
        activation,
        residual,
        running_mean,
        running_var,
        training,
        momentum,
        return_sum,
        backend,
    )


def _check_call(
    input,
    mode,
    num_groups,
    group_size,
    weight,
    bias,
    eps,
    activation,
    residual,
    running_mean,
    running_var,
    training,
    momentum,
    return_sum,
    backend,
):
    """The full checks of a functional call, in a fixed order (a call with several mistakes
    always names the same one first). Returns (spec, running), running being batch norm's
    (running_mean, running_var, momentum) for the dispatcher: to update (training, a non-empty
    input), to normalize with (not training), or None."""
    mode = v.check_mode(mode)
    v.check_input(input)
    num_channels = input.shape[1]
    if mode == "group":
        groups = v.resolve_num_groups(num_channels, num_groups, group_size)
    else:
        if num_groups is not None or group_size is not None:
            raise ValueError(
                f"num_groups/group_size apply to mode='group' only; mode={mode!r} fixes the sets "
                f"itself"
            )
        groups = 1 if mode == "layer" else num_channels
    eps = v.check_eps(eps)
    act = v.check_activation(activation)
    weight = v.check_param(weight, "weight", num_channels, input)
    bias = v.check_param(bias, "bias", num_channels, input)
    residual = v.check_residual(residual, input)
    backend = check_backend(backend)
    if return_sum and residual is None:
        raise ValueError(
            "return_sum=True needs a residual to add; pass residual=... or drop return_sum"
        )
    if not isinstance(training, bool):
        raise TypeError(
            f"training must be True or False, got {type(training).__name__} {training!r}; "
            f"pass bool(...)"
        )

    pool = mode == "batch"
    running = None
    if pool:
        running_mean = v.check_stat(running_mean, "running_mean", num_channels, input)
        running_var = v.check_stat(running_var, "running_var", num_channels, input)
        if (running_mean is None) != (running_var is None):
            raise ValueError("pass both running_mean and running_var, or neither")
        # (momentum is range-checked only where an update uses it, as torch ignores it
        # otherwise: in eval, or in training without running statistics)
        used = training and running_mean is not None and input.numel() > 0
        momentum = v.check_momentum(momentum, used)
        if not training:
            if running_mean is None:
                raise ValueError(
                    "batch norm with training=False needs running_mean and running_var; pass "
                    "them, or training=True to use the batch's own statistics"
                )
            running = (running_mean, running_var, 0.0)
        else:
            per_channel = input.numel() // num_channels if num_channels else 0
            if per_channel == 1:
                raise ValueError(
                    f"batch norm in training needs more than 1 value per channel, got input of "
                    f"shape {tuple(input.shape)}; use a larger batch, eval mode, or group norm"
                )
            if running_mean is not None and input.numel() > 0:
                if momentum is None:
                    raise ValueError(
                        "momentum=None (a cumulative average) needs a batch counter: use "
                        "groupnorm.BatchNorm(momentum=None), or pass a momentum in [0, 1] here"
                    )
                running = (running_mean, running_var, momentum)
    elif running_mean is not None or running_var is not None or not training:
        raise ValueError(
            f"running_mean/running_var/training apply to mode='batch' only, not {mode!r}; "
            f"group, layer and instance norm never use batch statistics"
        )

    spec = NormSpec(None if mode in ("instance", "batch") else groups, pool, eps, act, backend)
    return spec, running


def group_norm(
    input: Tensor,
    num_groups: int | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
    return_sum: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Group norm with the positional arguments of ``torch.nn.functional.group_norm``.

    Extra keyword-only options: ``group_size`` (instead of ``num_groups``, which is then
    ``None``), a fused ``activation``, a ``residual`` added first, ``return_sum``, ``backend``.

    >>> x = torch.randn(2, 30, 7, 9)
    >>> w, b = torch.randn(30), torch.randn(30)
    >>> torch.allclose(group_norm(x, 5, w, b), torch.nn.functional.group_norm(x, 5, w, b),
    ...                atol=1e-5)
    True
    >>> torch.allclose(group_norm(x, None, group_size=6), group_norm(x, 5))
    True
    """
    return _run(
        input,
        "group",
        num_groups,
        group_size,
        weight,
        bias,
        eps,
        activation,
        residual,
        return_sum=return_sum,
        backend=backend,
    )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Batch norm with the positional arguments of ``torch.nn.functional.batch_norm``.

    Args:
        input: floating tensor (N, C, \\*).
        running_mean, running_var: per-channel statistics (C,), or None. In training they are
            updated in place with ``momentum`` (unbiased variance, as torch does); with
            ``training=False`` they are the statistics used (then required).
        weight, bias: per-channel affine (C,), or None.
        training: normalize with the batch's statistics (and update the running ones).
        momentum: the update factor, in [0, 1] where an update uses it; ignored (not
            range-checked, as by torch) with ``training=False`` or without running statistics.
        eps: added to the variance.
        activation, residual, backend: keyword-only, as in :func:`normalize`.

    >>> x = torch.randn(8, 3, 5)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = batch_norm(x, rm, rv, training=True)
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-6)
    True
    """
    return _run(
        input,
        "batch",
        None,
        None,
        weight,
        bias,
        eps,
        activation,
        residual,
        running_mean,
        running_var,
        training,
        momentum,
        backend=backend,
    )


def layer_norm(
    input: Tensor,
    *positional: object,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""The paper's layer norm: statistics over (C, \*) of each sample, affine per channel.

    This is group norm with one group. It is **not** ``torch.nn.functional.layer_norm``, which
    normalizes over the trailing dims named by ``normalized_shape`` and has an elementwise
    affine of that shape. To keep the two from being confused, every argument after ``input``
    is keyword-only: a call written torch's way, ``layer_norm(x, normalized_shape, w, b)``,
    raises a ``TypeError`` instead of taking ``normalized_shape`` as something else. Over
    (C, H, W) the two agree only when the affine is constant per channel.

    Args:
        input: floating tensor (N, C, \*).
        weight, bias: keyword-only, per-channel :math:`\gamma`, :math:`\beta` of shape (C,).
        eps: keyword-only, added to the variance.
        activation, residual, backend: as in :func:`normalize`.

    >>> x = torch.randn(2, 4, 3, 3)
    >>> torch.allclose(layer_norm(x), torch.nn.functional.layer_norm(x, x.shape[1:]), atol=1e-5)
    True
    >>> w, b = torch.randn(4), torch.randn(4)
    >>> torch.allclose(layer_norm(x, weight=w, bias=b), group_norm(x, 1, w, b))
    True
    """
    if positional:
        raise TypeError(
            "groupnorm.layer_norm is the paper's layer norm (statistics over (C, *) of each "
            "sample, a per-channel weight and bias), not torch.nn.functional.layer_norm: it "
            "takes no normalized_shape, and its arguments after the input are keyword-only; "
            "write layer_norm(x, weight=w, bias=b, eps=eps), or call "
            "torch.nn.functional.layer_norm for torch's layer norm over trailing dims"
        )
    return _run(
        input, "layer", None, None, weight, bias, eps, activation, residual, backend=backend
    )


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Instance norm with the arguments of ``torch.nn.functional.instance_norm``: statistics
    per sample and channel (group norm with C groups).

    Args:
        input: floating tensor (N, C, \*).
        running_mean, running_var: optional per-channel statistics (C,). With
            ``use_input_stats=True`` they are updated in place with ``momentum`` (the batch
            average of each sample's mean and unbiased variance, as torch does); with
            ``use_input_stats=False`` they are the statistics used.
        weight, bias: per-channel :math:`\gamma`, :math:`\beta` of shape (C,).
        use_input_stats: normalize with each sample's own statistics (default) or with the
            running ones.
        momentum: the running statistics' update factor, in [0, 1] where it is used.
        eps: added to the variance.
        activation, residual, backend: keyword-only, as in :func:`normalize`.

    >>> x = torch.randn(2, 4, 5, 5)
    >>> torch.allclose(instance_norm(x), torch.nn.functional.instance_norm(x), atol=1e-5)
    True
    >>> w, b = torch.randn(4), torch.randn(4)
    >>> torch.allclose(instance_norm(x, weight=w, bias=b), group_norm(x, 4, w, b))
    True
    """
    if running_mean is None and running_var is None and use_input_stats is True:
        return _run(
            input,
            "instance",
            None,
            None,
            weight,
            bias,
            eps,
            activation,
            residual,
            backend=backend,
        )
    return _instance_norm_running(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
        activation, residual, backend,
    )  # fmt: skip


def _instance_norm_running(
    input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, activation,
    residual, backend,
):  # fmt: skip
    """Instance norm with running statistics: used (``use_input_stats=False``: per-channel
    statistics given, which is batch norm at inference) or updated after the call."""
    if not isinstance(use_input_stats, bool):
        raise TypeError(
            f"use_input_stats must be True or False, got {type(use_input_stats).__name__} "
            f"{use_input_stats!r}; pass bool(...)"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if not use_input_stats:
        if running_mean is None:
            raise ValueError(
                "instance_norm with use_input_stats=False normalizes with running_mean and "
                "running_var; pass them, or use_input_stats=True for each sample's own statistics"
            )
        return _run(
            input, "batch", None, None, weight, bias, eps, activation, residual, running_mean,
            running_var, False, momentum, backend=backend, quick=False,
        )  # fmt: skip
    v.check_input(input)
    num_channels = input.shape[1]
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        v.check_stat(stat, name, num_channels, input)
        if stat.requires_grad:
            raise ValueError(
                f"{name} requires grad, but running statistics are buffers that instance_norm "
                f"updates in place (torch's positional order: input, running_mean, "
                f"running_var, weight, bias); for an affine pass instance_norm(x, weight=w, "
                f"bias=b)"
            )
    momentum = v.check_momentum(momentum)
    if momentum is None:
        raise ValueError(
            "instance_norm updates running statistics with a momentum in [0, 1] (typically "
            "0.1); pass one, or leave running_mean and running_var out"
        )
    per_instance = input.numel() // max(input.shape[0] * num_channels, 1)
    if input.numel() > 0 and per_instance == 1:
        raise ValueError(
            f"instance norm with running statistics needs more than 1 value per channel, got "
            f"input of shape {tuple(input.shape)}; leave running_mean and running_var out"
        )
    y = _run(
        input, "instance", None, None, weight, bias, eps, activation, residual, backend=backend
    )
    if input.numel() > 0:
        src = input if residual is None else input + residual
        _update_instance_running(src, running_mean, running_var, momentum)
    return y


def _update_instance_running(src: Tensor, running_mean: Tensor, running_var: Tensor, momentum):
    """torch's update for instance norm: ``old + momentum * (batch - old)`` with the batch's
    average of each sample's mean and unbiased variance, in float64, rounded once."""
    with torch.no_grad():
        n, c = src.shape[0], src.shape[1]
        var, mean = torch.var_mean(src.detach().reshape(n, c, -1).double(), dim=2, correction=1)
        for stat, batch in ((running_mean, mean.mean(0)), (running_var, var.mean(0))):
            old = stat.double()
            stat.copy_(old + momentum * (batch - old))
