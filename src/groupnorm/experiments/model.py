"""A small ResNet whose normalization layer is picked by name, plus the two data-parallel BNs.

Normalization names (see :data:`NORMS`):

* ``bn``: :class:`GhostBatchNorm`, this library's batch norm; with ``virtual_workers = W`` it
  splits a training batch of W*B images into W chunks of B and normalizes each chunk with its
  own statistics, which is what W data-parallel workers with per-worker BN compute.
* ``bn-sync``: :class:`SyncBatchNorm`, batch statistics over all workers (all-reduced with
  ``torch.distributed``, any backend including gloo on CPU); with virtual workers the whole
  W*B batch is one BN batch, which is the same thing.
* ``gn``: :class:`groupnorm.GroupNorm` with ``groups`` groups (or ``group_size`` channels each).
* ``ln``: :class:`groupnorm.LayerNorm` (one group); ``in``: :class:`groupnorm.InstanceNorm`
  (one channel per group); ``none``: no normalization (the convolutions get a bias).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import normalize
from ..kernels.running import update_running_stats
from ..modules import BatchNorm, GroupNorm, InstanceNorm, LayerNorm

__all__ = [
    "NORMS",
    "GhostBatchNorm",
    "SyncBatchNorm",
    "make_norm",
    "SmallResNet",
    "set_virtual_workers",
    "average_bn_buffers",
]

NORMS = ("bn", "bn-sync", "gn", "ln", "in", "none")


class GhostBatchNorm(BatchNorm):
    r"""Batch norm whose training statistics are taken per chunk of ``N / virtual_workers``.

    With ``virtual_workers = W`` and an input of W*B samples, sample block ``k`` (rows
    ``k*B .. (k+1)*B-1``) is normalized with the mean and biased variance of that block only.
    The per-chunk computation is the library's instance norm on a view in which each chunk is
    one "sample" and its B*H*W values per channel are the "positions": the same formula, a
    different set :math:`S_i`. The running statistics are updated with the average over
    chunks of each chunk's mean and unbiased variance, which is what averaging the running
    buffers of W workers gives (the update is linear). Eval mode uses the running statistics.

    >>> bn = GhostBatchNorm(3)
    >>> bn.virtual_workers = 2
    >>> x = torch.randn(8, 3, 5, 5)
    >>> y = bn(x)
    >>> ref = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True)
    ...                  for c in x.chunk(2)])
    >>> torch.allclose(y, ref, atol=1e-5)
    True
    """

    virtual_workers: int = 1

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        chunks = self.virtual_workers
        if chunks == 1 or not self.training or residual is not None:
            return super().forward(input, residual)
        self._check_input_dim(input)
        n, c = input.shape[0], input.shape[1]
        if n % chunks:
            raise ValueError(
                f"batch of {n} samples does not split into {chunks} virtual workers; use a "
                f"batch that is a multiple of the number of workers"
            )
        per = n // chunks
        # (W*B, C, *) -> (W, C, B * prod(*)): each chunk becomes one instance-norm sample.
        grouped = input.reshape(chunks, per, c, -1).transpose(1, 2).reshape(chunks, c, -1)
        if self.track_running_stats:
            count = grouped.shape[-1]
            if count < 2:
                raise ValueError(
                    f"batch norm in training needs more than 1 value per channel and worker, "
                    f"got {per} sample(s) of shape {tuple(input.shape[1:])}"
                )
            with torch.no_grad():
                var, mean = torch.var_mean(grouped.detach(), dim=-1, correction=0)
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1 - momentum).add_(mean.mean(0), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.mean(0), alpha=momentum)
        out = normalize(
            grouped,
            "instance",
            weight=self.weight,
            bias=self.bias,
            eps=self.eps,
            activation=self._activation,
        )
        return out.reshape(chunks, c, per, -1).transpose(1, 2).reshape(input.shape)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of every worker's batch; statistics all-reduced in float64."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world_size):  # noqa: D102
        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // c
        # Local centred statistics, then Chan et al.'s pairwise merge in float64 over workers.
        var_l, mean_l = torch.var_mean(x, dim=dims, correction=0)
        local = torch.stack(
            [
                torch.full((c,), float(count), dtype=torch.float64, device=x.device),
                mean_l.double(),
                var_l.double() * count,
            ]
        )
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (W, 3, C)
        counts, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        var = m2 / total
        rstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (x - mean.to(x.dtype).view(shape)) * rstd.to(x.dtype).view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        ctx.save_for_backward(x, weight, mean.to(x.dtype), rstd.to(x.dtype))
        ctx.total = total[0].item()
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable()
        return y, mean, var, total

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dtotal):  # noqa: D102
        x, weight, mean, rstd = ctx.saved_tensors
        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (x - mean.view(shape)) * rstd.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        # The gradient w.r.t. this worker's x needs the sums over every worker's dy.
        both = torch.stack([sum_dy, sum_dy_xhat]).double()
        dist.all_reduce(both, group=ctx.group)
        g_dy = (both[0] / ctx.total).to(x.dtype).view(shape)
        g_dy_xhat = (both[1] / ctx.total).to(x.dtype).view(shape)
        scale = rstd.view(shape)
        if weight is not None:
            scale = scale * weight.view(shape)
        dx = scale * (dy - g_dy - xhat * g_dy_xhat)
        dweight = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        dbias = sum_dy.to(dx.dtype) if ctx.has_bias else None
        return dx, dweight, dbias, None, None, None


class SyncBatchNorm(BatchNorm):
    """Batch norm whose training statistics span all workers of a ``torch.distributed`` group.

    Works with any backend (gloo on CPU included), unlike ``torch.nn.SyncBatchNorm``, which
    needs CUDA. Forward: each worker computes its per-channel count, mean and centred sum of
    squares; the workers exchange them (float64) and merge them exactly. Backward: the
    per-channel sums of ``dy`` and ``dy * x_hat`` are all-reduced, since every worker's output
    depends on every worker's input through the shared statistics. ``weight``/``bias`` get
    this worker's share of their gradient (DistributedDataParallel averages the shares).
    Without an initialized process group (or with one worker) it is ordinary batch norm.
    """

    process_group: Any = None

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(self.process_group) if distributed else 1
        if not self.training or world == 1:
            return super().forward(input, residual)
        self._check_input_dim(input)
        x = input + residual if residual is not None else input
        y, mean, var, total = _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.eps, self.process_group, world
        )
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            count = int(total[0].item())
            rstd = torch.rsqrt(var + self.eps)
            update_running_stats(
                self.running_mean, self.running_var, mean, rstd, self.eps, momentum, count
            )
        if self._activation:
            y = getattr(torch.nn.functional, self._activation)(y)
        return y


def make_norm(
    name: str, channels: int, *, groups: int | None = 32, group_size: int | None = None
) -> nn.Module:
    """Build the normalization layer called ``name`` for ``channels`` channels.

    Args:
        name: one of ``bn``, ``bn-sync``, ``gn``, ``ln``, ``in``, ``none``.
        channels: number of channels C.
        groups: for ``gn``, the number of groups G (capped at C, so a thin layer gets one
            channel per group rather than an error).
        group_size: for ``gn``, channels per group instead of ``groups``.

    >>> make_norm("gn", 64, groups=32)
    GroupNorm(32, 64, eps=1e-05, affine=True, bias=True)
    >>> make_norm("ln", 16)
    LayerNorm(1, 16, eps=1e-05, affine=True, bias=True)
    """
    if name == "bn":
        return GhostBatchNorm(channels)
    if name == "bn-sync":
        return SyncBatchNorm(channels)
    if name == "gn":
        if group_size is not None:
            return GroupNorm(None, channels, group_size=min(group_size, channels))
        if groups is None:
            raise ValueError("gn needs groups or group_size")
        return GroupNorm(min(groups, channels), channels)
    if name == "ln":
        return LayerNorm(channels)
    if name == "in":
        return InstanceNorm(channels)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {name!r}; choose from {', '.join(NORMS)}")


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a norm after each and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Any) -> None:
        super().__init__()
        use_bias = norm("probe") is None
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=use_bias)
        self.norm1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=use_bias)
        self.norm2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=use_bias), norm(cout)
            )
        # As in the paper: the last norm of each residual branch starts with gamma = 0, so
        # every block starts as the identity.
        if getattr(self.norm2, "weight", None) is not None:
            nn.init.zeros_(self.norm2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 28x28 grey images: a stem, three stages of basic blocks, a linear head.

    Stage ``s`` (0, 1, 2) has ``width * 2**s`` channels; stages 1 and 2 halve the resolution.
    The stem is a 3x3 convolution with stride ``stem_stride`` (2 makes it four times cheaper).

    Args:
        norm: normalization name (see :data:`NORMS`).
        width: channels of the first stage.
        blocks: basic blocks per stage.
        groups / group_size: for ``gn``.
        stem_stride: stride of the stem convolution.
        num_classes: outputs.

    >>> net = SmallResNet("gn", width=8, groups=4)
    >>> net(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        norm: str,
        *,
        width: int = 16,
        blocks: int = 1,
        groups: int | None = 32,
        group_size: int | None = None,
        stem_stride: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown normalization {norm!r}; choose from {', '.join(NORMS)}")

        def factory(c: int | str) -> Any:
            if c == "probe":
                return None if norm == "none" else True
            return make_norm(norm, int(c), groups=groups, group_size=group_size)

        self.norm_name = norm
        self.stem = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=norm == "none")
        self.stem_norm = factory(width)
        layers: list[nn.Module] = []
        cin = width
        for stage in range(3):
            cout = width * 2**stage
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(_BasicBlock(cin, cout, stride, factory))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_norm(self.stem(x)))
        x = self.layers(x)
        return self.head(x.mean(dim=(2, 3)))


def set_virtual_workers(model: nn.Module, workers: int) -> None:
    """Make every :class:`GhostBatchNorm` in ``model`` compute statistics per ``workers`` chunks."""
    for m in model.modules():
        if isinstance(m, GhostBatchNorm):
            m.virtual_workers = workers


def average_bn_buffers(model: nn.Module, group: Any = None) -> None:
    """Average the running statistics of every batch norm over the workers of ``group``.

    Per-worker BN leaves each worker with running statistics of its own batches; the average
    is the model evaluated (and, with virtual workers, exactly what :class:`GhostBatchNorm`
    keeps, since the exponential update is linear).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf, group=group)
                buf.div_(world)
