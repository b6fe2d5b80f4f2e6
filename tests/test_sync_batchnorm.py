"""SyncBatchNorm across real gloo processes on CPU, conversion to it and back.

Every distributed case runs in 2 and 3 processes. On every rank the output and d(input) must
equal those of one float64 batch norm over the concatenated batch, the running statistics
its running statistics, and the ranks' weight/bias gradients must sum to its.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import groupnorm
from groupnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from groupnorm.sync_batchnorm import BatchNormAct

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

C = 6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, args: tuple, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` processes; fail after ``timeout`` s."""
    ctx = mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"gloo workers did not finish within {timeout:.0f} s")


def _exit_worker() -> None:
    dist.destroy_process_group()
    # Skip C++ static destructors: with gloo about one exit in 15 aborts there.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# The cases: (name, per-rank shares for 2 and 3 ranks, tail shape, dtype, layout, layer kwargs)

CASES = {
    "float64": dict(shares={2: [3, 5], 3: [2, 4, 3]}, tail=(4, 5), dtype=torch.float64),
    "float32": dict(shares={2: [4, 4], 3: [3, 3, 3]}, tail=(5, 3), dtype=torch.float32),
    "uneven": dict(shares={2: [1, 6], 3: [5, 1, 2]}, tail=(3, 3), dtype=torch.float32),
    "empty": dict(shares={2: [0, 5], 3: [3, 0, 4]}, tail=(3, 4), dtype=torch.float32),
    "single-value": dict(shares={2: [1, 1], 3: [1, 0, 1]}, tail=(), dtype=torch.float32),
    "one-value-in-all": dict(shares={2: [1, 0], 3: [0, 1, 0]}, tail=(), dtype=torch.float32),
    "channels-last": dict(
        shares={2: [3, 2], 3: [2, 2, 3]}, tail=(4, 4), dtype=torch.float32, channels_last=True
    ),
    "3d-input": dict(shares={2: [3, 2], 3: [2, 1, 3]}, tail=(7,), dtype=torch.float32),
    "silu": dict(
        shares={2: [3, 4], 3: [2, 3, 2]},
        tail=(3, 3),
        dtype=torch.float32,
        kwargs={"act_layer": nn.SiLU},
        act="silu",
    ),
    "relu-module": dict(
        shares={2: [3, 4], 3: [2, 3, 2]},
        tail=(3, 3),
        dtype=torch.float64,
        kwargs={"act_layer": "hard_swish"},
        act="hardswish",
    ),
    "no-affine": dict(
        shares={2: [2, 5], 3: [2, 3, 2]},
        tail=(3, 3),
        dtype=torch.float32,
        kwargs={"affine": False},
    ),
    "momentum-none": dict(
        shares={2: [4, 2], 3: [2, 2, 2]},
        tail=(2, 2),
        dtype=torch.float64,
        kwargs={"momentum": None},
    ),
    "bfloat16": dict(shares={2: [4, 3], 3: [3, 2, 3]}, tail=(4, 4), dtype=torch.bfloat16),
    "float16": dict(shares={2: [4, 3], 3: [3, 2, 3]}, tail=(4, 4), dtype=torch.float16),
}

ACTS = {
    None: lambda t: t,
    "silu": torch.nn.functional.silu,
    "hardswish": torch.nn.functional.hardswish,
}


def _make_data(name: str, world: int, seed: int):
    """The whole batch (float64), the upstream gradient, weight and bias."""
    case = CASES[name]
    g = torch.Generator().manual_seed(seed)
    n = sum(case["shares"][world])
    shape = (n, C, *case["tail"])
    # each sample has its own offset and scale: the workers' statistics differ, so the merge
    # of per-worker statistics matters
    offset = torch.randn(n, *([1] * (len(shape) - 1)), generator=g, dtype=torch.float64) * 2
    scale = torch.rand(n, *([1] * (len(shape) - 1)), generator=g, dtype=torch.float64) * 3 + 0.2
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset + 1.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    return x, dy, weight, bias


def _layer(name: str, dtype=None) -> SyncBatchNorm:
    case = CASES[name]
    kwargs = dict(case.get("kwargs", {}))
    return SyncBatchNorm(C, dtype=dtype or case["dtype"], **kwargs)


def _sync_worker(rank: int, world: int, port: int, names: list, seed: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for name in names:
            case = CASES[name]
            x, dy, weight, bias = _make_data(name, world, seed)
            shares = case["shares"][world]
            lo = sum(shares[:rank])
            part = slice(lo, lo + shares[rank])
            # float16/bfloat16 model: the layer's parameters and buffers in that dtype too
            bn = _layer(name)
            if bn.weight is not None:
                with torch.no_grad():
                    bn.weight.copy_(weight)
                    bn.bias.copy_(bias)
            mine = x[part].to(case["dtype"])
            if case.get("channels_last"):
                mine = mine.contiguous(memory_format=torch.channels_last)
            mine.requires_grad_()
            result = {}
            try:
                for _ in range(2):  # two steps: the running statistics move twice
                    mine.grad = None
                    bn.zero_grad(set_to_none=True)
                    y = bn(mine)
                    y.backward(dy[part].to(case["dtype"]))
            except ValueError as err:
                result["error"] = str(err)
            else:
                result.update(
                    y=y.detach(),
                    channels_last=y.is_contiguous(memory_format=torch.channels_last),
                    dx=mine.grad,
                    dw=None if bn.weight is None else bn.weight.grad,
                    db=None if bn.bias is None else bn.bias.grad,
                    running_mean=bn.running_mean.clone(),
                    running_var=bn.running_var.clone(),
                    tracked=int(bn.num_batches_tracked),
                )
                # eval mode communicates nothing: only rank 0 calls it (a collective would hang)
                if rank == 0 and mine.shape[0] > 0:
                    bn.eval()
                    result["eval"] = bn(mine.detach())
            torch.save(result, os.path.join(out_dir, f"{name}-rank{rank}.pt"))
        dist.barrier()
    finally:
        _exit_worker()


def _reference(name: str, world: int, seed: int, steps: int = 2):
    """One float64 batch norm over the concatenated batch (torch's), with the activation."""
    case = CASES[name]
    x, dy, weight, bias = _make_data(name, world, seed)
    x = x.to(case["dtype"]).double()  # the values the workers saw
    kwargs = case.get("kwargs", {})
    affine = kwargs.get("affine", True)
    momentum = kwargs.get("momentum", 0.1)
    ref = nn.BatchNorm1d(C, momentum=momentum, affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(weight.to(case["dtype"]).double())
            ref.bias.copy_(bias.to(case["dtype"]).double())
    act = ACTS[case.get("act")]
    flat = lambda t: t.reshape(t.shape[0], C, -1)  # noqa: E731
    xr = x.clone().requires_grad_()
    for _ in range(steps):
        xr.grad = None
        if ref.weight is not None:
            ref.weight.grad = ref.bias.grad = None
        y = act(ref(flat(xr))).reshape(x.shape)
        y.backward(dy.to(case["dtype"]).double())
    ref.eval()
    return {
        "y": y.detach(),
        "dx": xr.grad,
        "dw": None if ref.weight is None else ref.weight.grad,
        "db": None if ref.bias is None else ref.bias.grad,
        "running_mean": ref.running_mean,
        "running_var": ref.running_var,
        "ref": ref,
        "x": x,
        "act": act,
    }


def _tolerance(dtype):
    if dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-9}
    if dtype == torch.float32:
        return {"atol": 3e-5, "rtol": 1e-4}
    return {"atol": 6e-2, "rtol": 3e-2}  # values rounded to 8 (bfloat16) or 11 bits


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batchnorm_equals_one_batchnorm_over_all_workers(tmp_path, world):
    seed = 100 + world
    names = list(CASES)
    _spawn(_sync_worker, world, (names, seed, str(tmp_path)))
    for name in names:
        case = CASES[name]
        shares = case["shares"][world]
        parts = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(world)]
        if sum(shares) * max(1, torch.Size(case["tail"]).numel()) == 1:
            for p in parts:  # every rank refuses, with a message that says what to do
                assert "more than 1 value per channel over all workers" in p["error"]
            continue
        want = _reference(name, world, seed)
        tol = _tolerance(case["dtype"])

        def cat(key, parts=parts):
            return torch.cat([p[key].double() for p in parts])

        for p in parts:
            assert "error" not in p, (name, p.get("error"))
        torch.testing.assert_close(cat("y"), want["y"], **tol, msg=f"{name}: output")
        scale = want["dx"].abs().max().item()
        dx_tol = {"atol": tol["atol"] * max(1.0, scale), "rtol": tol["rtol"]}
        torch.testing.assert_close(cat("dx"), want["dx"], **dx_tol, msg=f"{name}: d(input)")
        if want["dw"] is not None:
            for key in ("dw", "db"):  # each rank holds its share; DDP adds them up
                got = sum(p[key].double() for p in parts)
                g_tol = {"atol": tol["atol"] * max(1.0, want[key].abs().max().item()), "rtol": 0}
                if case["dtype"] in (torch.float16, torch.bfloat16):
                    g_tol["atol"] *= 2
                torch.testing.assert_close(got, want[key], **g_tol, msg=f"{name}: {key}")
        for p in parts:
            torch.testing.assert_close(
                p["running_mean"].double(), want["running_mean"], **tol, msg=f"{name}: mean"
            )
            torch.testing.assert_close(
                p["running_var"].double(), want["running_var"], **tol, msg=f"{name}: var"
            )
            assert p["tracked"] == 2
            if case.get("channels_last") and p["y"].numel():
                assert p["channels_last"], f"{name}: the output lost the channels-last layout"
        # eval: the running statistics, on rank 0's share alone
        if "eval" in parts[0]:
            x0 = want["x"][: shares[0]]
            with torch.no_grad():
                ref_eval = want["act"](want["ref"](x0.reshape(x0.shape[0], C, -1)))
            torch.testing.assert_close(
                parts[0]["eval"].double(), ref_eval.reshape(x0.shape), **tol, msg=f"{name}: eval"
            )
    # The check can fail: per-worker batch norm on rank 0's share gives another output.
    x, _, weight, bias = _make_data("uneven", world, seed)
    first = CASES["uneven"]["shares"][world][0]
    local = torch.nn.functional.batch_norm(
        x[:first].float(), None, None, weight.float(), bias.float(), training=True
    )
    got = torch.load(tmp_path / "uneven-rank0.pt")["y"]
    assert (got - local).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel on CPU with converted layers


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: batch norm, then ``drop``, then ``act``."""

    def __init__(self, c, act_layer=nn.ReLU):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        x = super().forward(x)
        return self.act(self.drop(x))


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        TimmBatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def _ddp_batch(world: int):
    g = torch.Generator().manual_seed(7)
    n = 4 * world
    # samples on different workers come from different distributions
    x = torch.randn(n, 3, 6, 6, generator=g) * torch.linspace(0.5, 3, n).view(-1, 1, 1, 1)
    return x + torch.linspace(-2, 2, n).view(-1, 1, 1, 1), torch.randint(0, 3, (n,), generator=g)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = convert_sync_batchnorm(_ddp_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x, target = _ddp_batch(world)
        part = slice(rank * 4, rank * 4 + 4)
        loss = nn.functional.cross_entropy(ddp(x[part]), target[part])
        opt.zero_grad()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        if rank == 0:
            torch.save(
                {"grads": grads, "state": model.state_dict(), "kinds": str(model)},
                os.path.join(out_dir, "ddp.pt"),
            )
        del ddp  # drop the reducer before the group goes away
        dist.barrier()
    finally:
        _exit_worker()


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_step_on_cpu_with_converted_layers(tmp_path, world):
    _spawn(_ddp_worker, world, (str(tmp_path),))
    got = torch.load(tmp_path / "ddp.pt")
    assert got["kinds"].count("SyncBatchNorm") == 2 and "activation=silu" in got["kinds"]
    # one process, the whole batch, plain batch norm: the same gradients and the same step
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = _ddp_batch(world)
    nn.functional.cross_entropy(model(x), target).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    assert got["grads"].keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got["grads"][k], want[k], atol=2e-6, rtol=1e-4, msg=k)
    state = model.state_dict()
    assert got["state"].keys() == state.keys()  # BatchNormAct2d's keys stay where they were
    for k in state:
        torch.testing.assert_close(got["state"][k], state[k], atol=2e-6, rtol=1e-4, msg=k)


# ---------------------------------------------------------------------------------------------
# One process: BatchNorm, state_dicts, conversion


def test_without_process_group_it_is_batchnorm():
    torch.manual_seed(0)
    sync, plain = SyncBatchNorm(4), nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(sync(x.float()).double(), plain.double()(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sync.running_var.double(), plain.running_var)
    assert int(sync.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "other",
    [
        lambda: nn.BatchNorm1d(5),
        lambda: nn.BatchNorm2d(5),
        lambda: nn.BatchNorm3d(5),
        lambda: nn.SyncBatchNorm(5),
    ],
)
def test_state_dict_round_trip(other):
    src = other()
    with torch.no_grad():
        for t in src.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    sync = SyncBatchNorm(5, act_layer="relu")
    sync.load_state_dict(src.state_dict())
    for k, t in src.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[k], t)
    back = other()
    back.load_state_dict(sync.state_dict())
    assert sync.state_dict().keys() == src.state_dict().keys()


def test_constructor_matches_torch_positionally():
    torch_bn = nn.SyncBatchNorm(4, 1e-3, 0.2, True, False, None)
    ours = SyncBatchNorm(4, 1e-3, 0.2, True, False, None)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(torch_bn, attr)
    assert ours.process_group is None and ours.running_mean is None


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(ValueError, match="not both"):
        SyncBatchNorm(4, activation="relu", act_layer="silu")
    with pytest.raises(ValueError, match="unknown activation"):
        SyncBatchNorm(4, act_layer="no-such-act")
    with pytest.raises(TypeError, match="drop_layer"):
        SyncBatchNorm(4, drop_layer=3)
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)
    with pytest.raises(ValueError, match="channels in dim 1"):
        SyncBatchNorm(4)(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="wrapped in DataParallel"):
        convert_sync_batchnorm(nn.DataParallel(nn.BatchNorm2d(3)))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        TimmBatchNormAct2d(8, act_layer=nn.Hardswish),
        nn.Sequential(nn.Conv2d(8, 4, 1), groupnorm.BatchNorm(4, activation="gelu")),
        nn.BatchNorm2d(4, track_running_stats=False),
    )


def test_convert_keeps_parameters_buffers_activation_and_function():
    net = _net()
    before = copy.deepcopy(net)
    params = {k: p for k, p in net.named_parameters()}
    buffers = {k: b for k, b in net.named_buffers()}
    net.eval()
    before.eval()
    x = torch.randn(2, 3, 7, 7)
    out = convert_sync_batchnorm(net)
    assert out is net
    kinds = [type(m).__name__ for m in net.modules()]
    assert kinds.count("SyncBatchNorm") == 3 and "BatchNorm2d" not in kinds
    assert isinstance(net[1].act, nn.Hardswish)  # not fused: kept as the same module
    assert net[2][1]._activation == "gelu"
    assert not net[1].training  # mode kept
    for k, p in net.named_parameters():
        assert p is params[k], k  # the same Parameter objects
    for k, b in net.named_buffers():
        assert b is buffers[k], k
    assert net.state_dict().keys() == before.state_dict().keys()
    torch.testing.assert_close(net(x), before(x))
    net.train()
    before.train()
    torch.testing.assert_close(net(x), before(x), atol=1e-5, rtol=1e-5)

    back = revert_sync_batchnorm(net)
    kinds = [type(m).__name__ for m in back.modules()]
    assert "SyncBatchNorm" not in kinds
    assert isinstance(back[1], BatchNormAct) and isinstance(back[1].act, nn.Hardswish)
    assert type(back[2][1]) is groupnorm.BatchNorm and back[2][1]._activation == "gelu"
    for k, p in back.named_parameters():
        assert p is params[k], k
    assert back.state_dict().keys() == before.state_dict().keys()
    back.eval()
    before.eval()
    torch.testing.assert_close(back(x), before(x))


def test_convert_fuses_timm_relu_and_a_root_layer_is_returned_new():
    net = nn.Sequential(TimmBatchNormAct2d(4, act_layer=nn.ReLU))
    convert_sync_batchnorm(net)
    assert net[0]._activation == "relu" and net[0].act is None
    root = convert_sync_batchnorm(nn.SyncBatchNorm(3), process_group=None)
    assert type(root) is SyncBatchNorm
    assert type(SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3))) is SyncBatchNorm
    assert type(revert_sync_batchnorm(nn.SyncBatchNorm(3))) is groupnorm.BatchNorm


def test_convert_warns_about_batchnorm_it_does_not_recognise():
    class Odd(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(Odd(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match="left these batch norm subclasses alone.*Odd"):
        convert_sync_batchnorm(net)
    assert type(net[0]) is Odd and type(net[1]) is SyncBatchNorm
