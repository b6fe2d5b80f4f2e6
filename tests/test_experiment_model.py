"""The experiment's network and its batch norms: per-chunk (virtual workers) and synchronized."""

from __future__ import annotations

import pytest
import torch

import groupnorm
from groupnorm import SyncBatchNorm
from groupnorm.experiments.model import (
    NORMS,
    GhostBatchNorm,
    SmallResNet,
    make_norm,
    set_virtual_workers,
)


def _chunked_reference(x, weight, bias, chunks, eps=1e-5):
    """Float64 reference: each chunk normalized with its own batch statistics."""
    outs = [
        groupnorm.reference_norm(c, "batch", weight=weight, bias=bias, eps=eps).output
        for c in x.chunk(chunks)
    ]
    return torch.cat(outs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_ghost_bn_is_per_chunk_bn(dtype, chunks, channels_last):
    torch.manual_seed(chunks)
    n, c = 8, 6
    bn = GhostBatchNorm(c, dtype=dtype)
    bn.virtual_workers = chunks
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c))
        bn.bias.copy_(torch.randn(c))
    x = torch.randn(n, c, 5, 3, dtype=dtype) * 2 + 1
    dy = torch.randn(n, c, 5, 3, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = bn(x)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    w64 = bn.weight.detach().double().requires_grad_()
    b64 = bn.bias.detach().double().requires_grad_()
    ref = _chunked_reference(x64, w64, b64, chunks)
    ref.backward(dy.double())
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 0}
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(bn.weight.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(bn.bias.grad.double(), b64.grad, **tol)

    # running statistics: the average over chunks of each chunk's mean / unbiased variance
    xs = x.detach().double().chunk(chunks)
    mean = torch.stack([t.mean((0, 2, 3)) for t in xs]).mean(0)
    var = torch.stack([t.transpose(0, 1).reshape(c, -1).var(1) for t in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean, **tol)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var, **tol)

    bn.eval()  # eval uses the running statistics, whatever the chunking
    expect = torch.nn.functional.batch_norm(
        x.detach(), bn.running_mean, bn.running_var, bn.weight, bn.bias, False
    )
    torch.testing.assert_close(bn(x.detach()), expect)


def test_ghost_bn_errors():
    bn = GhostBatchNorm(3)
    bn.virtual_workers = 4
    with pytest.raises(ValueError, match="multiple of the number of workers"):
        bn(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(4, 3, 1, 1))


def test_sync_bn_without_process_group_is_bn():
    torch.manual_seed(0)
    sync, plain = SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


@pytest.mark.parametrize("norm", NORMS)
def test_small_resnet_every_norm(norm):
    torch.manual_seed(0)
    net = SmallResNet(norm, width=8, groups=4)
    set_virtual_workers(net, 2)
    x = torch.randn(4, 1, 28, 28)
    out = net(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    kinds = {type(m).__name__ for m in net.modules()}
    expected = {
        "bn": "GhostBatchNorm",
        "bn-sync": "SyncBatchNorm",
        "gn": "GroupNorm",
        "ln": "LayerNorm",
        "in": "InstanceNorm",
        "none": "Identity",
    }[norm]
    assert expected in kinds
    if norm == "none":
        assert not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.GroupNorm)
            for m in net.modules()
        )


def test_make_norm_groups_and_errors():
    assert make_norm("gn", 16, groups=32).num_groups == 16  # capped at the channels
    assert make_norm("gn", 64, group_size=16).num_groups == 4
    assert make_norm("in", 8).num_groups == 8 and make_norm("ln", 8).num_groups == 1
    with pytest.raises(ValueError, match="choose from"):
        make_norm("wn", 8)
    with pytest.raises(ValueError, match="choose from"):
        SmallResNet("batchnorm")
