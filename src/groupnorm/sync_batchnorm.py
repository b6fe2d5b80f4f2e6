r"""Batch norm whose training statistics span every worker of a ``torch.distributed`` group.

:class:`SyncBatchNorm` is a drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU tensors
(gloo), inside ``DistributedDataParallel`` on CPU modules, and carries an optional activation
the way :class:`groupnorm.GroupNormAct` does. :func:`convert_sync_batchnorm` swaps the batch
norms of a model for it (timm's ``BatchNormAct2d`` keeps its activation and dropout), and
:func:`revert_sync_batchnorm` goes back to plain batch norm for export or single-process use.

How a training call computes (W workers, worker k holding n_k values per channel):

* forward: the worker's per-channel mean and biased variance come from this library's batch
  norm kernels (the fused C++ ones on CPU, Triton or torch's on CUDA). One ``all_gather``
  exchanges (n_k, mean_k, M2_k = n_k var_k) in float64, and every worker merges them exactly
  (Chan et al.): ``n = sum n_k``, ``mean = sum n_k mean_k / n``,
  ``M2 = sum M2_k + sum n_k (mean_k - mean)^2``. The input is then normalized with these
  statistics by the same kernels (activation fused), and the running statistics move towards
  them (unbiased variance over all n values, as one batch norm over the whole batch would);
* backward: the kernels' backward for given statistics returns this worker's ``sum(dz)`` and
  ``sum(dz * x_hat)`` (``dz`` the gradient after the activation); one ``all_reduce`` (float64)
  sums them over workers, and ``dx`` gets the two terms that flow through the shared mean and
  variance: ``dx = gamma * rstd * (dz - sum_all(dz)/n - x_hat * sum_all(dz x_hat)/n)``.
  ``weight``/``bias`` get this worker's share of their gradient; the shares add up to the
  gradient of one batch norm over the whole batch (DDP averages them, as for any parameter).

Never ``E[x^2] - E[x]^2``: each worker's variance is centred, and the merge is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _validation as v
from . import kernels
from .convert import _check_model, _classify_bn, _replace_all, _Unrecognised, _walk
from .kernels.aten import dense, like
from .kernels.portable import acc_dtype
from .kernels.running import update_running_stats
from .modules import BatchNorm, _ActTail

__all__ = ["SyncBatchNorm", "BatchNormAct", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class BatchNormAct(_ActTail, BatchNorm):
    """:class:`groupnorm.BatchNorm` followed by dropout and an activation module.

    What :func:`revert_sync_batchnorm` makes of a :class:`SyncBatchNorm` that carries an
    activation the kernels do not fuse (or a dropout): the same ``act``/``drop`` submodules, so
    the state_dict keys do not move. Arguments as :class:`SyncBatchNorm` without
    ``process_group``.

    >>> m = BatchNormAct(8, act_layer="hard_swish")
    >>> m(torch.randn(4, 8, 3, 3)).shape
    torch.Size([4, 8, 3, 3])
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
        act_layer: Any = None,
        act_kwargs: dict[str, Any] | None = None,
        drop_layer: Any = None,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self._init_act_drop(activation, act_layer, act_kwargs, drop_layer, device, dtype)

    def extra_repr(self) -> str:
        text, act = _BatchNorm.extra_repr(self), self._act_label()
        return f"{text}, activation={act}" if act else text


class SyncBatchNorm(BatchNormAct):
    r"""Batch norm over the union of every worker's batch: ``torch.nn.SyncBatchNorm`` for any
    ``torch.distributed`` backend (gloo on CPU, NCCL on CUDA) and any input rank >= 2.

    In training with an initialized process group of more than one worker, the mean and
    variance of each channel are those of all workers' inputs together (see the module
    docstring for the arithmetic: one collective in the forward, one in the backward). Every
    worker must call it the same number of times, as with torch's. A worker may hold fewer
    samples than another, or none (it still joins both collectives). In eval mode, without a
    process group, or with one worker it is :class:`groupnorm.BatchNorm` and communicates
    nothing. Statistics are float32 for float16/bfloat16 inputs (float64 for float64), the
    layout (channels-last included) is kept, and the activation is fused as in
    :class:`groupnorm.GroupNormAct`.

    The state_dict (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) is that of ``torch.nn.BatchNorm1d/2d/3d`` and
    ``torch.nn.SyncBatchNorm``.

    Args:
        num_features: C, the size of dim 1 of the input.
        eps, momentum, affine, track_running_stats: as ``torch.nn.SyncBatchNorm``.
        process_group: the group whose workers share statistics (default: the whole world).
        activation: a fused ``"silu"``, ``"gelu"`` or ``"relu"``, or None (default).
        act_layer, act_kwargs: the activation the way timm gives it (a name, an ``nn.Module``
            class, factory or instance); exact SiLU/ReLU/erf-GELU modules are fused, any other
            is kept as the submodule ``act``. Pass this or ``activation``.
        drop_layer: dropout between the norm and the activation (then not fused).
        bias: False drops ``bias`` (keeps ``weight``).

    >>> bn = SyncBatchNorm(16, act_layer=torch.nn.ReLU)
    >>> bn.activation
    'relu'
    >>> x = torch.randn(4, 16, 8, 8)
    >>> # no process group: ordinary batch norm followed by the activation
    >>> torch.allclose(bn(x), torch.relu(torch.nn.BatchNorm2d(16)(x)), atol=1e-5)
    True
    >>> _ = bn.load_state_dict(torch.nn.SyncBatchNorm(16).state_dict())
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        activation: str | None = None,
        act_layer: Any = None,
        act_kwargs: dict[str, Any] | None = None,
        drop_layer: Any = None,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            activation=activation,
            act_layer=act_layer,
            act_kwargs=act_kwargs,
            drop_layer=drop_layer,
            bias=bias,
        )
        self.process_group = process_group

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if not self.training:
            return super().forward(input, residual)
        world = self._world_size()
        if world == 1:
            return super().forward(input, residual)
        return self._drop_act(self._sync_forward(input, residual, world))

    def _sync_forward(self, input: Tensor, residual: Tensor | None, world: int) -> Tensor:
        self._check_input_dim(input)
        c = self.num_features
        v.check_param(self.weight, "weight", c, input)
        v.check_param(self.bias, "bias", c, input)
        v.check_residual(residual, input)
        x = input + residual if residual is not None else input
        stats: dict[str, Any] = {}
        y = _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.eps, self._activation, self.process_group, world, stats
        )
        if self.track_running_stats:
            momentum = self._count_step()
            if stats["count"] > 0:
                update_running_stats(
                    self.running_mean,
                    self.running_var,
                    stats["mean"],
                    stats["rstd"],
                    self.eps,
                    momentum,
                    stats["count"],
                )
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """The classmethod spelling of :func:`convert_sync_batchnorm`, as torch's."""
        return convert_sync_batchnorm(module, process_group)


class _SyncBatchNormFunction(torch.autograd.Function):
    """One training call: local statistics, the exchange, the normalization; and its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, activation, group, world, stats):  # noqa: D102
        c = x.shape[1]
        count = x.numel() // c if c else 0
        x = dense(x)
        backend = kernels.select("auto", x, c, True)
        acc = acc_dtype(x.dtype)
        f64 = torch.float64
        if count > 1:
            _, _, mean_l, rstd_l = backend.forward(
                kernels.Call(x, None, None, None, None, None, c, True, eps, "")
            )
            r = rstd_l.to(f64)
            var_l = (1.0 / (r * r) - eps).clamp_min_(0.0)
            mean_l = mean_l.to(f64)
        elif count == 1:
            mean_l = x.detach().reshape(c).to(f64)
            var_l = torch.zeros(c, dtype=f64, device=x.device)
        else:
            mean_l = var_l = torch.zeros(c, dtype=f64, device=x.device)
        local = torch.stack([torch.full_like(mean_l, float(count)), mean_l, var_l * count])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        every = torch.stack(gathered)  # (W, 3, C)
        counts, means, m2s = every[:, 0], every[:, 1], every[:, 2]
        total = int(counts[:, 0].sum().item())
        if total == 1:
            raise ValueError(
                f"batch norm in training needs more than 1 value per channel over all workers, "
                f"got 1 (input of shape {tuple(x.shape)} on this worker); use larger batches, "
                f"eval mode, or group norm"
            )
        n = counts.sum(0).clamp_min(1.0)
        mean = (counts * means).sum(0) / n
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        var = m2 / n
        rstd = torch.rsqrt(var + eps)
        stats.update(mean=mean, rstd=rstd, count=total)
        mean_k, var_k = mean.to(acc), var.to(acc)
        if count > 0:
            call = kernels.Call(x, weight, bias, None, mean_k, var_k, c, True, eps, activation)
            y = backend.forward(call)[0]
        else:
            y = torch.empty_like(x)
        ctx.save_for_backward(x, weight, bias, mean_k, rstd.to(acc))
        ctx.setup = (eps, activation, group, total, backend)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, bias, mean, rstd = ctx.saved_tensors
        eps, activation, group, total, backend = ctx.setup
        c = x.shape[1]
        acc = mean.dtype
        need_dx = ctx.needs_input_grad[0]
        # The given-statistics backward needs the affine parameters for sum(dz * x_hat) and for
        # the activation's input; without them the layer is the identity affine.
        w = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=x.device)
        b = bias.to(acc) if bias is not None else torch.zeros(c, dtype=acc, device=x.device)
        if x.numel() > 0:
            dy = like(dy, x)
            if not activation and x.dtype == acc and x.device.type == "cpu":
                # Given statistics and no activation: torch's batch norm backward in eval form
                # is one kernel for g*rstd*dy, sum(dy * x_hat) and sum(dy).
                var = rstd.to(torch.float64).pow(-2).sub_(eps).to(acc)
                dx_given, dw, db = torch.ops.aten.native_batch_norm_backward(
                    dy, x, w, mean, var, None, None, False, eps, [need_dx, True, True]
                )
            else:
                needs = (need_dx, True, True)
                grad = kernels.GradCall(dy, x, w, b, mean, rstd, c, True, True, activation, needs)
                dx_given, dw, db = backend.backward(grad)
            sums = torch.stack([db.to(torch.float64), dw.to(torch.float64)])
        else:
            dx_given = torch.zeros_like(x) if need_dx else None
            sums = torch.zeros(2, c, dtype=torch.float64, device=x.device)
        local = sums.clone()
        dist.all_reduce(sums, group=group)
        dx = None
        if need_dx:
            if x.numel() == 0:
                dx = dx_given
            else:
                # dx = g r (dz - S_dz/n - x_hat S_dzx/n), of which dx_given = g r dz.
                g_r = w.to(torch.float64) * rstd.to(torch.float64)
                shift = (-g_r * sums[0] / total).to(acc)
                slope = (-g_r * rstd.to(torch.float64) * sums[1] / total).to(acc)
                shape = [1, c] + [1] * (x.dim() - 2)
                if dx_given.dtype == acc:  # in place: two passes, no temporary
                    offset = (shift.double() - slope.double() * mean.double()).to(acc)
                    dx = dx_given.addcmul_(x, slope.view(shape)).add_(offset.view(shape))
                else:
                    dx = (x.to(acc) - mean.view(shape)).mul_(slope.view(shape))
                    dx = dx.add_(shift.view(shape)).add_(dx_given).to(x.dtype)
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = local[1].to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = local[0].to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None, None


def _sync_from(m: nn.Module, act: nn.Module | None, drop: nn.Module | None, group: Any):
    """A SyncBatchNorm holding ``m``'s Parameters and buffers (the same tensors)."""
    weight = getattr(m, "weight", None)
    bias = getattr(m, "bias", None)
    like = next((t for t in (weight, bias, m.running_mean) if t is not None), None)
    own = getattr(m, "_activation", "")
    if act is not None or drop is not None:
        act_args = {"act_layer": act if act is not None else own or None, "drop_layer": drop}
    else:
        act_args = {"activation": own or None}
    new = SyncBatchNorm(
        m.num_features,
        m.eps,
        m.momentum,
        m.affine,
        m.track_running_stats,
        group,
        device=like.device if like is not None else None,
        dtype=like.dtype if like is not None and like.is_floating_point() else None,
        bias=not m.affine or bias is not None,
        **act_args,
    )
    _take_tensors(new, m)
    return new


def _take_tensors(new: nn.Module, m: nn.Module) -> None:
    for name in ("weight", "bias"):
        if name in new._parameters:
            new._parameters[name] = m._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in new._buffers:
            new._buffers[name] = m._buffers.get(name)
    if hasattr(m, "qconfig"):
        new.qconfig = m.qconfig
    new.train(m.training)


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every batch norm in ``model`` by :class:`SyncBatchNorm`; returns the model.

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``,
    :class:`groupnorm.BatchNorm` and the batch norm subclasses :func:`groupnorm.convert_batchnorm`
    recognises (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``: their activation and dropout
    are kept, the activation fused when it is an exact ReLU, SiLU or erf GELU with no dropout).
    Each new layer holds the old one's Parameters and buffers (the same tensors, so an
    optimizer built before still updates them), its eps, momentum and train/eval mode; the
    converted model computes what the original did on one worker. Frozen batch norms (not
    ``_BatchNorm`` subclasses, no batch statistics) and :class:`SyncBatchNorm` layers are left
    as they are. A batch norm subclass whose ``forward`` is not recognised is left alone and
    named in one warning. The model is changed in place (a batch norm given as the model is
    returned new).

    Args:
        model: the ``nn.Module`` to convert (before wrapping it in DistributedDataParallel).
        process_group: the group whose workers share statistics (default: the whole world).

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> [type(m).__name__ for m in convert_sync_batchnorm(net)]
    ['Conv2d', 'SyncBatchNorm']
    """
    model = _check_model(model)
    unknown = _Unrecognised(convert=False)

    def replace(name: str, m: nn.Module, _next_act: str) -> tuple[nn.Module | None, bool]:
        if not isinstance(m, _BatchNorm) or isinstance(m, SyncBatchNorm):
            return None, False
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{name or 'model'} is a lazy batch norm that has not seen an input yet; run "
                f"one forward pass before converting"
            )
        kind, act, drop = _classify_bn(m)
        if unknown.skip(kind, name, m):
            return None, False
        return _sync_from(m, act, drop, process_group), False

    new_root, _ = replace("", model, "")
    if new_root is not None:
        model = new_root
    elif not isinstance(model, _BatchNorm):
        _walk(model, "", replace, False)
    unknown.warn(
        left="convert_sync_batchnorm left these batch norm subclasses alone, since their forward "
        "or contents are not a batch norm followed by its act/drop: "
    )
    return model


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every :class:`SyncBatchNorm` (and ``torch.nn.SyncBatchNorm``) in ``model`` by
    plain batch norm; returns the model.

    For export and single-process use: the new layers never communicate. Each is a
    :class:`groupnorm.BatchNorm` (with the same fused activation), or a :class:`BatchNormAct`
    when the layer carries an activation module or dropout, holding the same Parameters and
    buffers; the state_dict keys do not change. In place, as :func:`convert_sync_batchnorm`.

    >>> net = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    >>> [type(m).__name__ for m in revert_sync_batchnorm(net)]
    ['BatchNorm']
    """
    model = _check_model(model)

    def replace(name: str, m: nn.Module, _next_act: str) -> tuple[nn.Module | None, bool]:
        if type(m) is nn.SyncBatchNorm:
            act, drop, own = None, None, ""
        elif isinstance(m, SyncBatchNorm):
            act, drop, own = m.act, m.drop, m._activation
        else:
            return None, False
        like = next((t for t in (m.weight, m.bias, m.running_mean) if t is not None), None)
        common = dict(
            device=like.device if like is not None else None,
            dtype=like.dtype if like is not None and like.is_floating_point() else None,
            bias=not m.affine or m.bias is not None,
        )
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if act is not None or drop is not None:
            new = BatchNormAct(*args, act_layer=act or own or None, drop_layer=drop, **common)
        else:
            new = BatchNorm(*args, activation=own or None, **common)
        _take_tensors(new, m)
        return new, False

    return _replace_all(model, replace, False)
