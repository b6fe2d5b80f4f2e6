"""A small ResNet whose normalization layer is picked by name, plus per-worker (ghost) BN.

Normalization names (see :data:`NORMS`):

* ``bn``: :class:`GhostBatchNorm`, this library's batch norm; with ``virtual_workers = W`` it
  splits a training batch of W*B images into W chunks of B and normalizes each chunk with its
  own statistics, which is what W data-parallel workers with per-worker BN compute.
* ``bn-sync``: :class:`groupnorm.SyncBatchNorm`, batch statistics over all workers (exchanged
  with ``torch.distributed``, any backend including gloo on CPU); with virtual workers the
  whole W*B batch is one BN batch, which is the same thing.
* ``gn``: :class:`groupnorm.GroupNorm` with ``groups`` groups (or ``group_size`` channels each).
* ``ln``: :class:`groupnorm.LayerNorm` (one group); ``in``: :class:`groupnorm.InstanceNorm`
  (one channel per group); ``none``: no normalization (the convolutions get a bias).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import kernels
from ..kernels.running import update_running_stats
from ..modules import BatchNorm, GroupNorm, InstanceNorm, LayerNorm
from ..sync_batchnorm import SyncBatchNorm

__all__ = [
    "NORMS",
    "GhostBatchNorm",
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
        count = input.numel() // (chunks * c)
        if count < 2:
            raise ValueError(
                f"batch norm in training needs more than 1 value per channel and worker, "
                f"got {per} sample(s) of shape {tuple(input.shape[1:])}"
            )
        out, mean, rstd = _GhostNorm.apply(
            input, self.weight, self.bias, self.eps, self._activation, chunks
        )
        if self.track_running_stats:
            momentum = self._count_step()
            # The average over chunks of each chunk's mean and biased variance, the variance
            # handed over as the rstd it would have (the update recovers 1/rstd^2 - eps and
            # makes it unbiased with count / (count - 1)).
            with torch.no_grad():
                avg_rstd = rstd.pow(-2).mean(0).rsqrt_()
                update_running_stats(
                    self.running_mean,
                    self.running_var,
                    mean.mean(0),
                    avg_rstd,
                    self.eps,
                    momentum,
                    count,
                    native=input.is_cpu,
                )
        return out


def _chunked(x: Tensor, chunks: int) -> Tensor:
    """(W*B, C, *) -> (W, C, B * prod(*)): each chunk of B samples becomes one instance-norm
    sample. For channels-last input this is a view (C has stride 1 and a chunk's positions
    follow one another), so the layer is one kernel call on the input's own memory; otherwise
    a copy."""
    c = x.shape[1]
    last = x.movedim(1, -1)
    if last.is_contiguous():
        return last.reshape(chunks, -1, c).transpose(1, 2)
    return x.reshape(chunks, x.shape[0] // chunks, c, -1).transpose(1, 2).reshape(chunks, c, -1)


def _unchunked(y: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """The inverse of :func:`_chunked` for a result laid out like its output."""
    chunks, c = y.shape[0], y.shape[1]
    if channels_last:
        return y.transpose(1, 2).reshape(shape[:1] + shape[2:] + shape[1:2]).movedim(-1, 1)
    return y.reshape(chunks, c, shape[0] // chunks, -1).transpose(1, 2).reshape(shape)


class _GhostNorm(torch.autograd.Function):
    """Per-chunk batch norm of (W*B, C, *) as instance norm of (W, C, B * prod(*)) through the
    backend's kernels, returning the chunks' statistics. The reshapes happen inside, so that
    autograd sees one node per layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, activation, chunks):  # noqa: D102
        channels_last = x.movedim(1, -1).is_contiguous()
        grouped = _chunked(x, chunks)
        backend = kernels.select("auto", grouped, grouped.shape[1], False)
        y, _, mean, rstd = backend.forward(
            kernels.Call(
                grouped, weight, bias, None, None, None, grouped.shape[1], False, eps, activation
            )
        )
        ctx.save_for_backward(grouped, weight, bias, mean, rstd)
        ctx.setup = (activation, backend, x.shape, channels_last, chunks)
        ctx.mark_non_differentiable(mean, rstd)
        return _unchunked(y, x.shape, channels_last), mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):  # noqa: D102
        x, weight, bias, mean, rstd = ctx.saved_tensors
        activation, backend, shape, channels_last, chunks = ctx.setup
        dy = _chunked(dy, chunks)
        if dy.stride() != x.stride():  # the kernels take dy in x's layout
            dy = torch.empty_like(x).copy_(dy)
        needs = tuple(ctx.needs_input_grad[:3])
        grad = kernels.GradCall(
            dy, x, weight, bias, mean, rstd, x.shape[1], False, False, activation, needs
        )
        dx, dw, db = backend.backward(grad)
        if dx is not None:
            dx = _unchunked(dx, shape, channels_last)
        return dx, dw, db, None, None, None


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
