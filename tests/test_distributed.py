"""Two-process DDP (gloo, CPU): group norm needs no cross-worker statistics, batch norm does.

Each worker gets half of a batch. DDP averages the workers' gradients of their mean losses,
which is the gradient of the mean loss over the whole batch if, and only if, each sample's output
does not depend on the other samples. With GN that holds; with BN each worker normalizes by its
own half's statistics, so the averaged gradient differs from single-process training.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import groupnorm

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2


def make_model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    layer = groupnorm.GroupNorm(4, 8) if norm == "gn" else groupnorm.BatchNorm(8)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        layer,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return model


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g) * 2 + 0.5, torch.randn(8, 2, generator=g)


def loss_grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, port: int, out_path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        x, y = make_batch()
        shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        results = {}
        for norm in ("gn", "bn"):
            model = make_model(norm)
            ddp = nn.parallel.DistributedDataParallel(model)
            grads = loss_grads(ddp, x[shard], y[shard])
            results[norm] = {k.removeprefix("module."): v for k, v in grads.items()}
            del ddp  # drop the reducer before the group goes away
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Results are written. Skip C++ static destructors: with gloo about one exit in 15 aborts
    # there ("terminate called without an active exception"), which spawn reports as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradient_equals_full_batch_with_gn_not_with_bn(tmp_path, monkeypatch):
    out = str(tmp_path / "grads.pt")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two workers on a small machine
    torch.multiprocessing.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    got = torch.load(out)
    x, y = make_batch()
    for norm in ("gn", "bn"):
        want = loss_grads(make_model(norm), x, y)
        assert got[norm].keys() == want.keys()
        diff = max((got[norm][k] - want[k]).abs().max().item() for k in want)
        scale = max(want[k].abs().max().item() for k in want)
        print(f"{norm}: max |DDP grad - full-batch grad| = {diff:.2e} (max |grad| {scale:.2e})")
        if norm == "gn":
            assert diff < 1e-5 * max(scale, 1.0), diff
        else:  # per-worker statistics: a different gradient, by far more than rounding
            assert diff > 1e-2 * scale, (diff, scale)
