"""Functional API: one entry point, :func:`normalize`, and the four modes as special cases.

All functions validate their arguments here (clear ``TypeError``/``ValueError`` messages), then
call the ``groupnorm::forward`` custom op, which picks a backend by device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as v
from . import export
from ._eager import PLAIN_TYPES, plain_eager_context
from .kernels import check_backend, cpu_ext
from .kernels.cpu import fast_batch_forward, fast_forward
from .ops import normalize_op

__all__ = ["normalize", "group_norm", "batch_norm", "layer_norm", "instance_norm"]

# Modes the no-autograd fast path (kernels.cpu.fast_forward) takes, by the names check_mode
# accepts in lower case
_FAST_MODES = {
    "group": "group",
    "gn": "group",
    "layer": "layer",
    "ln": "layer",
    "instance": "instance",
    "in": "instance",
}


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
        momentum: batch mode only; ``None`` means a cumulative average is not supported here, use
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
    fast_mode = _FAST_MODES.get(mode) if type(mode) is str else None
    if (
        fast_mode is not None
        and group_size is None
        and residual is None
        and running_mean is None
        and running_var is None
        and training is True
        and not return_sum
        and (num_groups is None) != (fast_mode == "group")
    ):
        y = fast_forward(
            input,
            num_groups if fast_mode == "group" else 1,
            weight,
            bias,
            eps,
            activation,
            backend,
            per_channel=fast_mode == "instance",
        )
        if y is not None:
            return y
    return _normalize(
        input,
        mode,
        num_groups=num_groups,
        group_size=group_size,
        weight=weight,
        bias=bias,
        eps=eps,
        activation=activation,
        residual=residual,
        running_mean=running_mean,
        running_var=running_var,
        training=training,
        momentum=momentum,
        return_sum=return_sum,
        backend=backend,
    )


def _normalize(
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
    """:func:`normalize` without its fast path: full validation, then the op."""
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
    given_mean = given_var = None
    update_running = False
    if pool:
        running_mean = v.check_stat(running_mean, "running_mean", num_channels, input)
        running_var = v.check_stat(running_var, "running_var", num_channels, input)
        if (running_mean is None) != (running_var is None):
            raise ValueError("pass both running_mean and running_var, or neither")
        momentum = v.check_momentum(momentum)
        if not training:
            if running_mean is None:
                raise ValueError(
                    "batch norm with training=False needs running_mean and running_var; pass "
                    "them, or training=True to use the batch's own statistics"
                )
            given_mean, given_var = running_mean, running_var
        else:
            per_channel = input.numel() // num_channels if num_channels else 0
            if per_channel == 1:
                raise ValueError(
                    f"batch norm in training needs more than 1 value per channel, got input of "
                    f"shape {tuple(input.shape)}; use a larger batch, eval mode, or group norm"
                )
            update_running = running_mean is not None and input.numel() > 0
            if update_running and momentum is None:
                raise ValueError(
                    "momentum=None (a cumulative average) needs a batch counter: use "
                    "groupnorm.BatchNorm(momentum=None), or pass a momentum in [0, 1] here"
                )
    elif running_mean is not None or running_var is not None or not training:
        raise ValueError(
            f"running_mean/running_var/training apply to mode='batch' only, not {mode!r}; "
            f"group, layer and instance norm never use batch statistics"
        )

    if export.is_exporting():  # standard ATen ops instead of the custom op: see export.py
        y, total = export.decomposed_normalize(
            input,
            weight,
            bias,
            residual,
            groups,
            pool,
            eps,
            act,
            given_mean,
            given_var,
            running_mean if update_running else None,
            running_var if update_running else None,
            momentum or 0.0,
        )
        return (y, total) if return_sum else y
    y, total, mean, rstd = normalize_op(
        input, weight, bias, residual, given_mean, given_var, groups, pool, eps, act, backend
    )
    if update_running:
        update_running_stats(
            running_mean, running_var, mean, rstd, eps, momentum, input.numel() // num_channels
        )
    return (y, total) if return_sum else y


_LOW = (torch.bfloat16, torch.float16)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    momentum: float,
    count: int,
) -> None:
    """In-place exponential update with the unbiased variance, as ``torch.nn.BatchNorm`` does.

    bfloat16/float16 statistics on CPU, in plain eager mode, are updated by the C++ extension
    (one call instead of eight tensor operations, in double, rounded once; the fast path calls
    the same function, so both give the same bits)."""
    if running_mean.dtype in _LOW and running_mean.device.type == "cpu" and plain_eager_context():
        ext = cpu_ext.extension()
        if ext is not None and all(
            type(t) in PLAIN_TYPES for t in (running_mean, running_var, mean, rstd)
        ):
            if ext.update_running_low(running_mean, running_var, mean, rstd, eps, momentum, count):
                return
    with torch.no_grad():
        # few, in-place ops: this runs on every training call and was a tenth of a BN forward
        var = torch.pow(rstd, -2).sub_(eps).clamp_min_(0).mul_(count / max(count - 1, 1))
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(var.to(running_var.dtype), momentum)


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
    if group_size is None and residual is None and not return_sum:
        y = fast_forward(input, num_groups, weight, bias, eps, activation, backend)
        if y is not None:
            return y
    return _normalize(
        input,
        "group",
        num_groups=num_groups,
        group_size=group_size,
        weight=weight,
        bias=bias,
        eps=eps,
        activation=activation,
        residual=residual,
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

    >>> x = torch.randn(8, 3, 5)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = batch_norm(x, rm, rv, training=True)
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-6)
    True
    """
    if residual is None:
        y = fast_batch_forward(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation,
            backend,
        )
        if y is not None:
            return y
    return _normalize(
        input,
        "batch",
        weight=weight,
        bias=bias,
        eps=eps,
        activation=activation,
        residual=residual,
        running_mean=running_mean,
        running_var=running_var,
        training=training,
        momentum=momentum,
        backend=backend,
    )


def layer_norm(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """The paper's layer norm: statistics over (C, \\*) of each sample, affine per channel.

    This is group norm with one group. It is *not* ``torch.nn.functional.layer_norm``, which
    normalizes over trailing dims given by ``normalized_shape`` and has an elementwise affine of
    that shape; over (C, H, W) the two agree only when the affine is constant per channel.

    >>> x = torch.randn(2, 4, 3, 3)
    >>> torch.allclose(layer_norm(x), torch.nn.functional.layer_norm(x, x.shape[1:]), atol=1e-5)
    True
    """
    if residual is None:
        y = fast_forward(input, 1, weight, bias, eps, activation, backend)
        if y is not None:
            return y
    return _normalize(
        input,
        "layer",
        weight=weight,
        bias=bias,
        eps=eps,
        activation=activation,
        residual=residual,
        backend=backend,
    )


def instance_norm(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Instance norm: statistics per sample and channel (group norm with C groups).

    >>> x = torch.randn(2, 4, 5, 5)
    >>> torch.allclose(instance_norm(x), torch.nn.functional.instance_norm(x), atol=1e-5)
    True
    """
    if residual is None:
        y = fast_forward(input, 1, weight, bias, eps, activation, backend, per_channel=True)
        if y is not None:
            return y
    return _normalize(
        input,
        "instance",
        weight=weight,
        bias=bias,
        eps=eps,
        activation=activation,
        residual=residual,
        backend=backend,
    )
