"""Real data parallelism (gloo processes): synchronized BN and virtual workers vs DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from groupnorm import SyncBatchNorm
from groupnorm.experiments.data import Dataset
from groupnorm.experiments.train import Protocol, RunSpec, _free_port, train_run, train_run_ddp

WORLD = 2


def _sync_bn_worker(rank, world, init_method, cases, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        for i, (x, dy, weight, bias) in enumerate(cases):
            bn = SyncBatchNorm(x.shape[1], dtype=x.dtype)
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
            mine = x.chunk(world)[rank].clone().requires_grad_()
            y = bn(mine)
            y.backward(dy.chunk(world)[rank])
            torch.save(
                {
                    "y": y.detach(),
                    "dx": mine.grad,
                    "dw": bn.weight.grad,
                    "db": bn.bias.grad,
                    "running_mean": bn.running_mean,
                    "running_var": bn.running_var,
                },
                os.path.join(out_dir, f"case{i}-rank{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip C++ teardown, which gloo sometimes aborts in (see train._ddp_worker)


def test_sync_bn_matches_bn_on_concatenated_batch(tmp_path):
    """Outputs, input gradients, parameter gradients and running statistics, in two dtypes."""
    torch.manual_seed(0)
    c = 5
    cases = []
    for dtype in (torch.float64, torch.float32):
        # uneven magnitudes per worker: the merge of per-worker statistics must be exact
        x = torch.cat([torch.randn(3, c, 4, 4) * 3 + 2, torch.randn(3, c, 4, 4) * 0.5 - 1])
        cases.append(
            (
                x.to(dtype),
                torch.randn(6, c, 4, 4, dtype=dtype),
                torch.randn(c, dtype=dtype),
                torch.randn(c, dtype=dtype),
            )
        )
    mp.spawn(
        _sync_bn_worker,
        args=(WORLD, f"tcp://127.0.0.1:{_free_port()}", cases, str(tmp_path)),
        nprocs=WORLD,
    )
    for i, (x, dy, weight, bias) in enumerate(cases):
        parts = [torch.load(tmp_path / f"case{i}-rank{r}.pt") for r in range(WORLD)]
        ref = torch.nn.BatchNorm2d(c, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(weight)
            ref.bias.copy_(bias)
        x64 = x.double().requires_grad_()
        y_ref = ref(x64)
        y_ref.backward(dy.double())
        if x.dtype == torch.float64:
            tol = {"atol": 1e-10, "rtol": 1e-10}
        else:
            tol = {"atol": 2e-5, "rtol": 1e-4}
        torch.testing.assert_close(torch.cat([p["y"] for p in parts]).double(), y_ref, **tol)
        torch.testing.assert_close(torch.cat([p["dx"] for p in parts]).double(), x64.grad, **tol)
        # each worker holds its share of dgamma/dbeta; DDP sums (then averages) them
        torch.testing.assert_close(sum(p["dw"] for p in parts).double(), ref.weight.grad, **tol)
        torch.testing.assert_close(sum(p["db"] for p in parts).double(), ref.bias.grad, **tol)
        for p in parts:  # every worker ends with the running statistics of the whole batch
            torch.testing.assert_close(p["running_mean"].double(), ref.running_mean, **tol)
            torch.testing.assert_close(p["running_var"].double(), ref.running_var, **tol)


def _tiny_data(n_train=256, n_test=64):
    g = torch.Generator().manual_seed(0)
    ty = torch.randint(0, 10, (n_train,), generator=g)
    tx = torch.randn(n_train, 1, 28, 28, generator=g) + ty.view(-1, 1, 1, 1) * 0.1
    sy = torch.randint(0, 10, (n_test,), generator=g)
    sx = torch.randn(n_test, 1, 28, 28, generator=g) + sy.view(-1, 1, 1, 1) * 0.1
    return Dataset(tx, ty, sx, sy, 0.0, 1.0, "synthetic")


@pytest.mark.parametrize("norm", ["bn", "bn-sync"])
def test_virtual_workers_equal_real_ddp(tmp_path, norm):
    """Two gloo processes with DDP end where one process with two virtual workers ends."""
    protocol = Protocol(workers=2, train_size=256, epochs=1, width=4, groups=2, warmup=0.0)
    run = RunSpec(norm, images_per_worker=4, seed=3)
    steps = 4
    virtual = train_run(protocol, run, _tiny_data(), max_steps=steps, return_model=True)
    state = tmp_path / "ddp.pt"
    real = train_run_ddp(protocol, run, _tiny_data(), 2, max_steps=steps, state_file=state)
    assert real["mode"] == "ddp-gloo-2" and real["steps"] == virtual["steps"] == steps
    ddp_state = torch.load(state)
    virtual_state = virtual["model"].state_dict()
    assert ddp_state.keys() == virtual_state.keys()
    for name, value in virtual_state.items():
        torch.testing.assert_close(ddp_state[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # a model that differs is caught: plain BN over the whole batch is not per-worker BN
    if norm == "bn":
        other = train_run(
            protocol, RunSpec("bn-sync", 4, 3), _tiny_data(), max_steps=steps, return_model=True
        )["model"].state_dict()
        assert not torch.allclose(
            other["stem_norm.running_var"], ddp_state["stem_norm.running_var"]
        )
    assert real["test_error"] == pytest.approx(virtual["test_error"], abs=100 / 64 + 1e-9)


def test_ddp_refuses_workers_that_do_not_divide():
    with pytest.raises(ValueError, match="must divide"):
        train_run_ddp(Protocol(workers=8), RunSpec("bn", 2, 0), _tiny_data(), 3)
