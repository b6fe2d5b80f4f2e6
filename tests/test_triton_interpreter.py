"""The Triton backend against the float64 reference: on CPU in Triton's interpreter, or on a GPU.

With ``TRITON_INTERPRET=1`` (the default here, and what ``make test`` sets) every case runs on CPU
tensors in the interpreter. With ``TRITON_INTERPRET=0`` and a CUDA device the same cases run
compiled on the GPU (``make test-gpu``); without either the module is skipped.

Every launcher-allocated buffer (outputs and workspaces) is poisoned with NaN first
(``GROUPNORM_TRITON_POISON=1``), so an element no kernel writes fails the comparison. Tiles and
split counts are forced small so that the multi-tile loops, the split reduction and the finalize
kernels run on tiny shapes. A separate test compiles every kernel variant for sm_90 (H100)
without a GPU, which the interpreter alone would not catch (it does not type-check like the
compiler does).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any import of triton

import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm import reference_norm  # noqa: E402
from groupnorm.kernels import GradCall, portable  # noqa: E402
from groupnorm.kernels.triton import kernels as tk  # noqa: E402
from groupnorm.kernels.triton.kernels import _row_offsets, _tile_offsets  # noqa: E402
from groupnorm.kernels.triton.launch import launch_backward, nc_s_strides, plan_for  # noqa: E402
from groupnorm.kernels.triton.plan import (  # noqa: E402
    TritonConfig,
    config_from_env,
    element_offset,
    make_plan,
)
from groupnorm.kernels.triton.settings import reload_config  # noqa: E402
from groupnorm.ops import forward_op  # noqa: E402

INTERPRETED = isinstance(tk._fwd_fused_kernel, InterpretedFunction)
if INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set and there is no GPU; run pytest "
        "with TRITON_INTERPRET=1 in the environment (make test does)",
        allow_module_level=True,
    )

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def _settings_restored(monkeypatch):
    """The backend reads its environment once: tests that change it re-read it (``_setenv``),
    and every test ends with the environment restored and read again."""
    yield
    monkeypatch.undo()
    reload_config()


def _setenv(monkeypatch, values: dict) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    reload_config()


# ---------------------------------------------------------------------------------------------
# The planner (pure)
# ---------------------------------------------------------------------------------------------


def test_plan_few_sets_are_split_many_sets_fused():
    h100 = TritonConfig(num_sms=132)
    sd = make_plan(1, 320, 64 * 64, 32, False, False, False, h100)
    assert sd.path == "split" and sd.c_tiles * sd.split >= 132  # 32 sets, >= 132 programs
    sd_cl = make_plan(1, 320, 64 * 64, 32, False, False, True, h100)
    assert sd_cl.path == "split" and sd_cl.split > 1 and sd_cl.c_tiles * sd_cl.split >= 132
    many = make_plan(64, 320, 32 * 32, 32, False, False, False, TritonConfig(num_sms=132))
    assert many.path == "fused"
    assert make_plan(32, 64, 56 * 56, 64, True, False, True).path == "split"
    assert make_plan(32, 64, 56 * 56, 64, True, True, True).path == "apply"
    tiny = make_plan(2, 8, 4 * 4, 2, False, False, False)
    assert tiny.path == "fused" and tiny.one_tile


def test_plan_batch_norm_on_rank_2_covers_several_samples_per_program():
    plan = make_plan(4096, 512, 1, 512, True, False, True, TritonConfig(num_sms=132))
    assert plan.batch_block > 1  # the workspace is far smaller than the input
    assert plan.c_tiles * -(-4096 // plan.batch_block) >= 4 * 132


def test_plan_channels_last_with_few_channels_per_group_is_split():
    plan = make_plan(64, 64, 32 * 32, 64, False, False, True, TritonConfig(num_sms=132))
    assert plan.path == "split"
    assert plan.block_c >= 16  # the tile runs along the unit-stride channel axis


@pytest.mark.parametrize("channel_contiguous", [False, True])
@pytest.mark.parametrize("pool", [False, True])
def test_plan_tiles_cover_every_element(channel_contiguous, pool):
    for n, c, s, g in [(1, 320, 4096, 32), (2, 6, 35, 3), (7, 1, 1, 1), (3, 1280, 64, 32)]:
        for cfg in (TritonConfig(), TritonConfig(block=16, split=3), TritonConfig(num_sms=132)):
            groups = c if pool else g
            p = make_plan(n, c, s, groups, pool, False, channel_contiguous, cfg)
            assert p.block_c & (p.block_c - 1) == 0 and p.block_s & (p.block_s - 1) == 0
            assert p.block_c * p.block_s <= (cfg.block or 16384)
            if p.path == "fused":
                assert p.block_c <= max(1, 2 * (c // groups))
                continue
            assert p.c_tiles * p.block_c >= c > (p.c_tiles - 1) * p.block_c
            assert p.split * p.chunk_s >= s > (p.split - 1) * p.chunk_s
            assert p.chunk_s % p.block_s == 0
            assert 1 <= p.batch_block <= n and (pool or p.batch_block == 1)


def test_config_from_env_and_errors():
    cfg = config_from_env({"GROUPNORM_TRITON_SPLIT": "4", "GROUPNORM_TRITON_POISON": "1"})
    assert cfg.split == 4 and cfg.poison and cfg.block is None
    with pytest.raises(ValueError, match="power of two"):
        TritonConfig(block=24)
    with pytest.raises(ValueError, match="path"):
        config_from_env({"GROUPNORM_TRITON_PATH": "fast"})
    with pytest.raises(ValueError, match="integer"):
        config_from_env({"GROUPNORM_TRITON_BLOCK": "big"})


def test_forcing_changes_the_plan():
    x = torch.randn(2, 6, 5, 7)
    assert plan_for(x, 3, False, False, TritonConfig()).path == "fused"
    forced = plan_for(x, 3, False, False, TritonConfig(path="split", block=16, split=2))
    assert forced.path == "split" and forced.split == 2 and forced.block_s == 16
    assert forced.chunk_s == 32 and forced.c_tiles == 6


def test_strides_of_layouts():
    x = torch.empty(2, 3, 4, 5, 6)
    assert nc_s_strides(x) == (360, 120, 1)
    assert nc_s_strides(x.to(memory_format=torch.channels_last_3d)) == (360, 1, 3)
    assert nc_s_strides(torch.empty(2, 3)) == (3, 1, 1)
    assert nc_s_strides(x[:, :, :, ::2]) is None  # spatial dims do not collapse: copied


# ---------------------------------------------------------------------------------------------
# 64-bit offsets
# ---------------------------------------------------------------------------------------------


@triton.jit
def _offset_probe_kernel(
    OUT,  # (BLOCK,) int64 out: offsets computed by the kernels' helpers
    N_IDX,  # (BLOCK,) int32 sample indices
    C_IDX,  # (BLOCK,) int32 channel indices
    S_IDX,  # (BLOCK,) int32 spatial indices
    stride_n,
    stride_c,
    stride_s,
    BLOCK: tl.constexpr,
):
    """Runs the kernels' offset helpers on given indices."""
    i = tl.arange(0, BLOCK)
    n = tl.load(N_IDX + i)
    c = tl.load(C_IDX + i)
    s = tl.load(S_IDX + i)
    rows = _row_offsets(n, c, stride_n, stride_c)
    offs = _tile_offsets(rows, s, stride_s)  # (BLOCK, BLOCK); the diagonal pairs row i with s[i]
    diag = tl.sum(tl.where(i[:, None] == i[None, :], offs, 0), axis=1)
    tl.store(OUT + i, diag)


def test_offset_helpers_are_64_bit():
    """The kernels' offset helpers, run on indices whose offsets pass 2**31 (and 2**32)."""
    n = torch.tensor([3, 0, 1, 2], dtype=torch.int32, device=DEVICE)
    c = torch.tensor([0, 70_000, 5, 1], dtype=torch.int32, device=DEVICE)
    s = torch.tensor([0, 0, 2_000_000_000, 7], dtype=torch.int32, device=DEVICE)
    strides = (2**30, 40_000, 3, 1)
    out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    for stride_n, stride_c, stride_s in [(2**30, 40_000, 3), (2**31 + 5, 1, 2)]:
        _offset_probe_kernel[(1,)](out, n, c, s, stride_n, stride_c, stride_s, BLOCK=4)
        want = [
            element_offset(int(a), int(b), int(d), stride_n, stride_c, stride_s)
            for a, b, d in zip(n, c, s, strict=True)
        ]
        assert max(want) > 2**31
        assert out.cpu().tolist() == want
    assert strides  # documented case: 3 * 2**30 overflows int32


# ---------------------------------------------------------------------------------------------
# Numerics against the float64 reference, through the custom op and autograd
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    shape: tuple
    dtype: torch.dtype
    mode: str  # group | layer | instance | batch | batch_eval
    groups: int = 1
    layout: str = "contiguous"  # contiguous | channels_last | sliced
    act: str = ""
    residual: bool = False
    affine: str = "same"  # same | f32 | weight | bias | none
    env: dict = field(default_factory=dict)
    path: str | None = None  # the plan path the case must take


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
SPLIT = {
    "GROUPNORM_TRITON_PATH": "split",
    "GROUPNORM_TRITON_BLOCK": "16",
    "GROUPNORM_TRITON_SPLIT": "3",
}
FUSED_LOOP = {"GROUPNORM_TRITON_PATH": "fused", "GROUPNORM_TRITON_BLOCK": "16"}
SMALL = {"GROUPNORM_TRITON_BLOCK": "16"}

CASES = [
    # float32
    Case(
        "f32-gn-split-silu-res",
        (2, 6, 5, 7),
        F32,
        "group",
        3,
        act="silu",
        residual=True,
        env=SPLIT,
        path="split",
    ),
    Case(
        "f32-gn-cl-fusedloop-gelu",
        (2, 6, 5, 7),
        F32,
        "group",
        3,
        "channels_last",
        "gelu",
        affine="f32",
        env=FUSED_LOOP,
        path="fused",
    ),
    Case(
        "f32-gn-onetile-relu-res",
        (2, 8, 4, 4),
        F32,
        "group",
        4,
        act="relu",
        residual=True,
        path="fused",
    ),
    Case(
        "f32-bn-cl5d-silu-res",
        (3, 4, 2, 3, 5),
        F32,
        "batch",
        layout="channels_last",
        act="silu",
        residual=True,
        env=SPLIT,
        path="split",
    ),
    Case("f32-bneval-3d-relu", (3, 5, 11), F32, "batch_eval", act="relu", env=SMALL, path="apply"),
    Case("f32-ln-2d", (5, 12), F32, "layer", env={"GROUPNORM_TRITON_BLOCK": "4"}),
    Case("f32-in-split-gelu", (2, 3, 6, 6), F32, "instance", act="gelu", env=SPLIT, path="split"),
    Case(
        "f32-gn-sliced-weightonly",
        (2, 4, 6, 10),
        F32,
        "group",
        2,
        "sliced",
        affine="weight",
        env=SMALL,
    ),
    Case(
        "f32-gn-noaffine-split2",
        (2, 6, 9, 3),
        F32,
        "group",
        2,
        affine="none",
        env={
            "GROUPNORM_TRITON_PATH": "split",
            "GROUPNORM_TRITON_BLOCK": "8",
            "GROUPNORM_TRITON_SPLIT": "2",
        },
        path="split",
    ),
    # float16
    Case(
        "f16-gn-split-silu-res-f32affine",
        (2, 6, 5, 7),
        F16,
        "group",
        3,
        act="silu",
        residual=True,
        affine="f32",
        env=SPLIT,
        path="split",
    ),
    Case(
        "f16-gn-cl-fusedloop-gelu-res",
        (2, 6, 5, 7),
        F16,
        "group",
        2,
        "channels_last",
        "gelu",
        residual=True,
        env=FUSED_LOOP,
        path="fused",
    ),
    Case(
        "f16-bn-cl-relu-f32affine",
        (4, 6, 3, 5),
        F16,
        "batch",
        layout="channels_last",
        act="relu",
        affine="f32",
        env=SPLIT,
        path="split",
    ),
    Case("f16-ln-5d-res", (2, 3, 2, 3, 4), F16, "layer", residual=True, path="fused"),
    Case(
        "f16-bneval-cl-silu",
        (3, 6, 4, 4),
        F16,
        "batch_eval",
        "channels_last",
        "silu",
        env=SMALL,
        path="apply",
    ),
    Case("f16-gn-3d-split-relu", (3, 8, 13), F16, "group", 4, act="relu", env=SPLIT, path="split"),
    # bfloat16
    Case(
        "bf16-gn-split-gelu-res-f32affine",
        (2, 6, 5, 7),
        BF16,
        "group",
        3,
        act="gelu",
        residual=True,
        affine="f32",
        env=SPLIT,
        path="split",
    ),
    Case(
        "bf16-gn-cl-fusedloop-silu-res",
        (2, 6, 5, 7),
        BF16,
        "group",
        3,
        "channels_last",
        "silu",
        residual=True,
        env=FUSED_LOOP,
        path="fused",
    ),
    Case(
        "bf16-in-cl5d-relu", (2, 4, 2, 3, 3), BF16, "instance", "channels_last", "relu", env=SMALL
    ),
    Case(
        "bf16-bn-res-biasonly",
        (4, 3, 5, 5),
        BF16,
        "batch",
        residual=True,
        affine="bias",
        env=SPLIT,
        path="split",
    ),
    Case(
        "bf16-bneval-cl-gelu-res",
        (3, 6, 4, 4),
        BF16,
        "batch_eval",
        "channels_last",
        "gelu",
        residual=True,
        path="apply",
    ),
    Case("bf16-ln-2d-silu", (6, 10), BF16, "layer", act="silu", affine="f32"),
    # float64
    Case(
        "f64-gn-split-gelu-res",
        (2, 6, 5, 7),
        F64,
        "group",
        3,
        act="gelu",
        residual=True,
        env=SPLIT,
        path="split",
    ),
    Case(
        "f64-gn-cl-fusedloop-silu",
        (2, 6, 5, 7),
        F64,
        "group",
        3,
        "channels_last",
        "silu",
        env=FUSED_LOOP,
        path="fused",
    ),
    Case(
        "f64-bn-cl-relu-res",
        (3, 4, 3, 5),
        F64,
        "batch",
        "channels_last",
        "relu",
        residual=True,
        env=SPLIT,
        path="split",
    ),
    Case("f64-bneval-3d-silu", (3, 5, 7), F64, "batch_eval", act="silu", path="apply"),
    # batch norm with several samples per program (3 = 2 + 1), and on rank-2 input
    Case(
        "f32-bn-batchblock-gelu-res",
        (3, 4, 5, 6),
        F32,
        "batch",
        act="gelu",
        residual=True,
        env={**SPLIT, "GROUPNORM_TRITON_BATCH_BLOCK": "2"},
        path="split",
    ),
    Case(
        "f16-bn-2d-batchblock",
        (7, 6),
        F16,
        "batch",
        affine="f32",
        env={"GROUPNORM_TRITON_BLOCK": "4", "GROUPNORM_TRITON_BATCH_BLOCK": "3"},
        path="split",
    ),
    Case(
        "bf16-bneval-2d-batchblock-relu",
        (5, 6),
        BF16,
        "batch_eval",
        act="relu",
        env={"GROUPNORM_TRITON_BATCH_BLOCK": "2"},
        path="apply",
    ),
]

# Compiled on a GPU only: the shapes people run, with the planner's default tiles (no forcing), so
# the real split counts, one-tile sets and long fused loops are what gets checked.
GPU_CASES = [
    Case("gpu-sd-n1-f16-silu", (1, 320, 64, 64), F16, "group", 32, act="silu", path="split"),
    Case(
        "gpu-sd-n1-bf16-cl-silu",
        (1, 640, 64, 64),
        BF16,
        "group",
        32,
        "channels_last",
        "silu",
        path="split",
    ),
    Case("gpu-sd-n2-f16-cl-8x8", (2, 1280, 8, 8), F16, "group", 32, "channels_last"),
    Case("gpu-sd-n1-f16-small-fused", (1, 320, 16, 16), F16, "group", 32, path="fused"),
    Case("gpu-sd-n64-f16-onetile", (64, 320, 16, 16), F16, "group", 32, path="fused"),
    Case("gpu-sd-n16-f16-fusedloop", (16, 256, 64, 64), F16, "group", 32, path="fused"),
    Case("gpu-resnet-f32", (8, 256, 56, 56), F32, "group", 32, affine="f32"),
    Case("gpu-resnet-bf16-cl", (4, 512, 28, 28), BF16, "group", 32, "channels_last"),
    Case(
        "gpu-video-bf16-cl3d-gelu-res",
        (2, 256, 8, 28, 28),
        BF16,
        "group",
        32,
        "channels_last",
        "gelu",
        residual=True,
        affine="f32",
    ),
    Case("gpu-bn-f32", (16, 64, 28, 28), F32, "batch", path="split"),
    Case("gpu-bn-bf16-cl-relu", (8, 128, 14, 14), BF16, "batch", 0, "channels_last", "relu"),
    Case("gpu-bn-2d-f32", (4096, 512), F32, "batch", path="split"),
    Case("gpu-bneval-f16-cl", (8, 128, 14, 14), F16, "batch_eval", 0, "channels_last"),
    Case("gpu-ln-f16", (4, 512, 16, 16), F16, "layer"),
    Case("gpu-in-f32", (2, 64, 32, 32), F32, "instance"),
    Case("gpu-gn-1d-f32", (8, 256, 1000), F32, "group", 32),
    Case("gpu-gn-one-big-set-f16", (1, 32, 256, 256), F16, "group", 1, path="split"),
    Case("gpu-gn-sliced-f32", (2, 64, 16, 16), F32, "group", 8, "sliced"),
]
if DEVICE.type == "cuda":
    CASES = CASES + GPU_CASES


def _make_inputs(case: Case, gen: torch.Generator):
    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE) * scale + shift

    c = case.shape[1]
    x = rand(*case.shape, scale=1.5, shift=0.3).to(case.dtype)
    if case.layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif case.layout == "sliced":
        x = x.repeat_interleave(2, dim=-1)[..., ::2]  # strided spatial dims: no (N, C, S) view
    pdtype = torch.float32 if case.affine == "f32" else case.dtype
    w = (
        rand(c, scale=0.7, shift=1.0).to(pdtype)
        if case.affine in ("same", "f32", "weight")
        else None
    )
    b = rand(c, scale=0.5).to(pdtype) if case.affine in ("same", "f32", "bias") else None
    r = rand(*case.shape).to(case.dtype) if case.residual else None
    gm = gv = None
    if case.mode == "batch_eval":
        gm = rand(c, scale=0.3).float()
        gv = (rand(c).abs() + 0.5).float()
    dy = rand(*case.shape).to(case.dtype)
    dt = rand(*case.shape).to(case.dtype) if case.residual else None
    return x, w, b, r, gm, gv, dy, dt


def _groups(case: Case) -> tuple[int, bool]:
    c = case.shape[1]
    return {
        "group": (case.groups, False),
        "layer": (1, False),
        "instance": (c, False),
        "batch": (c, True),
        "batch_eval": (c, True),
    }[case.mode]


def _run_op(case, backend, x, w, b, r, gm, gv, dy, dt, eps):
    """Forward through the custom op and gradients through its autograd."""
    groups, pool = _groups(case)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last)
        leaves[0].requires_grad_()
    y, total, mean, rstd = forward_op(
        leaves[0], leaves[1], leaves[2], leaves[3], gm, gv, groups, pool, eps, case.act, backend
    )
    outs, grads_out = [y], [dy]
    if r is not None:
        outs.append(total)
        grads_out.append(dt)
    inputs = [t for t in leaves if t is not None]

    def grads():
        return torch.autograd.grad(outs, inputs, grads_out, retain_graph=True)

    return y, total, mean, rstd, grads(), grads


def _reference(case, x, w, b, r, gm, gv, dy, dt, eps):
    leaves = [t.double().detach().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    mode = "batch" if case.mode == "batch_eval" else case.mode
    kwargs = dict(weight=leaves[1], bias=leaves[2], eps=eps, activation=case.act or None)
    kwargs["residual"] = leaves[3]
    if mode == "group":
        kwargs["num_groups"] = case.groups
    if case.mode == "batch_eval":
        kwargs.update(running_mean=gm, running_var=gv, training=False)
    ref = reference_norm(leaves[0], mode, **kwargs)
    loss = (ref.output * dy.double()).sum()
    if r is not None:
        loss = loss + (ref.sum * dt.double()).sum()
    inputs = [t for t in leaves if t is not None]
    return ref, torch.autograd.grad(loss, inputs)


def _check(name, got, want64, torch_val, dtype):
    """|got - want| <= 2 * |torch's - want| + atol (scaled by the magnitude), and all finite."""
    assert got.shape == want64.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten element?)"
    err = (got.double() - want64).abs().max().item()
    torch_err = (torch_val.double() - want64).abs().max().item()
    scale = max(1.0, want64.abs().max().item())
    tol = 2 * torch_err + ATOL[dtype] * scale
    assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g} (torch's {torch_err:.3g})"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_backward_against_reference(case, monkeypatch):
    _setenv(monkeypatch, {"GROUPNORM_TRITON_POISON": "1", **case.env})
    gen = torch.Generator().manual_seed(sum(map(ord, case.id)))
    eps = 1e-5
    inputs = _make_inputs(case, gen)
    x = inputs[0]
    groups, pool = _groups(case)
    if case.path is not None:
        plan = plan_for(x, groups, pool, case.mode == "batch_eval")
        assert plan.path == case.path

    y, total, mean, rstd, grads, again = _run_op(case, "triton", *inputs, eps)
    ty, ttotal, tmean, trstd, tgrads, _ = _run_op(case, "portable", *inputs, eps)
    ref, rgrads = _reference(case, *inputs, eps)

    assert y.dtype == x.dtype and y.shape == x.shape
    if case.layout == "channels_last":
        assert nc_s_strides(y)[1] == 1  # output keeps the channels-last layout
    _check("y", y, ref.output, ty, case.dtype)
    if case.residual:
        _check("x + residual", total, ref.sum, ttotal, case.dtype)
    _check("mean", mean, ref.mean, tmean, case.dtype)
    _check("rstd", rstd, ref.rstd, trstd, case.dtype)
    names = [
        n
        for n, t in zip(("dx", "dweight", "dbias", "dresidual"), inputs[:4], strict=True)
        if t is not None
    ]
    for name, got, want, tv in zip(names, grads, rgrads, tgrads, strict=True):
        _check(name, got, want, tv, case.dtype)
    # Determinism: a second backward is bit-for-bit the same.
    for name, first, second in zip(names, grads, again(), strict=True):
        assert torch.equal(first, second), f"{name} differs between two backward runs"


def test_backward_launcher_only_what_is_needed(monkeypatch):
    """needs=(False, True, False) computes dweight alone (on the fused path's fallback plan)."""
    _setenv(monkeypatch, {"GROUPNORM_TRITON_POISON": "1"})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=gen).to(DEVICE)
    w, b = torch.randn(4, generator=gen).to(DEVICE), torch.randn(4, generator=gen).to(DEVICE)
    dy = torch.randn_like(x)
    y, _, mean, rstd = forward_op(x, w, b, None, None, None, 2, False, 1e-5, "", "triton")
    grad = GradCall(dy, x, w, b, mean, rstd, 2, False, False, "", (False, True, False))
    dx, dw, db = launch_backward(grad)
    assert dx is None and db is None
    _, want_dw, _ = portable.backward(grad._replace(needs=(True, True, True)))
    torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_sum_backward_with_an_expanded_gradient(monkeypatch):
    """``y.sum().backward()`` may hand the backward a stride-0 dy; it is read in place."""
    _setenv(monkeypatch, {"GROUPNORM_TRITON_POISON": "1"})
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, 5, generator=gen).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, generator=gen).to(DEVICE), torch.randn(6, generator=gen).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = groupnorm.group_norm(
        leaves[0], 3, leaves[1], leaves[2], activation="gelu", backend="triton"
    )
    y.sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = reference_norm(
        ref_leaves[0],
        "group",
        num_groups=3,
        weight=ref_leaves[1],
        bias=ref_leaves[2],
        activation="gelu",
    )
    ref.output.sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
    dy = torch.ones((), device=DEVICE).expand(x.shape)
    assert nc_s_strides(dy) == (0, 0, 0)


@pytest.mark.parametrize(
    "path, mode",
    [("fused", "group"), ("split", "group"), ("split", "instance"), ("split", "batch")],
)
def test_large_mean_small_spread_is_stable(path, mode, monkeypatch):
    """mean 1e4, std 1e-3 in float32: E[x^2]-E[x]^2 would lose every digit of the variance, and
    normalizing with the float32-rounded mean (x - mean) would lose most digits of the output
    (torch: 6e-2 relative error); the shifted apply ((x - shift) - mean_d) * rstd keeps them."""
    _setenv(monkeypatch, {"GROUPNORM_TRITON_PATH": path, "GROUPNORM_TRITON_BLOCK": "64"})
    gen = torch.Generator().manual_seed(11)
    x = (1e4 + 1e-3 * torch.randn(2, 8, 16, 16, generator=gen, dtype=torch.float64)).float()
    x = x.to(DEVICE)
    groups = {"group": 4, "instance": 8, "batch": 8}[mode]
    pool = mode == "batch"
    y, _, mean, rstd = forward_op(x, None, None, None, None, None, groups, pool, 0.0, "", "triton")
    kwargs = {"num_groups": 4} if mode == "group" else {}
    ref = reference_norm(x, mode, eps=0.0, **kwargs)
    assert plan_for(x, groups, pool, False).path == path
    torch.testing.assert_close(rstd.double(), ref.rstd, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), ref.mean, rtol=1e-7, atol=0)
    rel = (y.double() - ref.output).abs().max().item() / ref.output.abs().max().item()
    assert rel <= 1e-3, f"relative output error {rel:.3g} against float64"


gpu_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs the kernels compiled on a GPU")


@gpu_only
def test_more_than_2_31_elements_on_gpu():
    """A float16 tensor of 2**31 + 512 elements (about 4.3 GB): the statistics of every set and
    the output and dx at the far end of the tensor, where 32-bit offsets would wrap."""
    n, g, length = 2, 2, 2**28 + 64
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(n, 4, length, device="cuda", dtype=F16, generator=gen)
    assert x.numel() > 2**31
    w = torch.randn(4, device="cuda", generator=gen) * 0.5 + 1.0
    b = torch.randn(4, device="cuda", generator=gen)
    y, _, mean, rstd = forward_op(x, w, b, None, None, None, g, False, 1e-5, "", "triton")
    sets = x.view(n, g, -1)
    want_mean = torch.stack([sets[i, j].double().mean() for i in range(n) for j in range(g)])
    want_var = torch.stack(
        [sets[i, j].double().var(correction=0) for i in range(n) for j in range(g)]
    )
    want_rstd = (want_var + 1e-5).rsqrt()
    torch.testing.assert_close(mean.double().flatten(), want_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(rstd.double().flatten(), want_rstd, rtol=1e-5, atol=0)
    tail = slice(length - 4096, length)  # the last positions of the last sample: offsets > 2**31
    xt = x[1, :, tail].double()
    k = (torch.arange(4, device="cuda") // 2) + g  # set index of each channel in sample 1
    xhat = (xt - want_mean[k, None]) * want_rstd[k, None]
    want_y = xhat * w.double()[:, None] + b.double()[:, None]
    assert (y[1, :, tail].double() - want_y).abs().max().item() < 1e-2
    del y
    dy = torch.randn_like(x)
    dx, dw, db = launch_backward(
        GradCall(dy, x, w, b, mean, rstd, g, False, False, "", (True, True, True))
    )
    # dx of a set = rstd * (g - mean(g) - xhat * mean(g * xhat)), with g = dy * w.
    gsum = torch.zeros(n * g, device="cuda", dtype=torch.float64)
    gxsum = torch.zeros_like(gsum)
    for i in range(n):
        for c in range(4):
            j = i * g + c // 2
            d = dy[i, c].double() * w[c].double()
            xh = (x[i, c].double() - want_mean[j]) * want_rstd[j]
            gsum[j] += d.sum()
            gxsum[j] += (d * xh).sum()
    count = 2 * length
    want_dx = want_rstd[k, None] * (
        dy[1, :, tail].double() * w.double()[:, None]
        - gsum[k, None] / count
        - xhat * gxsum[k, None] / count
    )
    assert (dx[1, :, tail].double() - want_dx).abs().max().item() < 2e-2
    want_db = dy.double().sum(dim=(0, 2))
    torch.testing.assert_close(db.double(), want_db, rtol=1e-4, atol=1.0)


@gpu_only
def test_torch_compile_fullgraph_on_gpu():
    """A GroupNormAct module on the triton backend compiles with no graph break and matches eager,
    forward and gradients."""
    torch.manual_seed(0)
    module = groupnorm.GroupNormAct(32, 320, activation="silu").cuda().half()
    x = torch.randn(2, 320, 16, 16, device="cuda", dtype=F16, requires_grad=True)
    eager = module(x)
    (gx,) = torch.autograd.grad(eager.float().square().sum(), x)
    compiled = torch.compile(module, fullgraph=True)
    x2 = x.detach().clone().requires_grad_()
    out = compiled(x2)
    (gx2,) = torch.autograd.grad(out.float().square().sum(), x2)
    # Same kernels, but the compiled graph may hand the op differently laid-out operands, so
    # compare within float16 rounding rather than bit for bit.
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx2, gx, rtol=2e-3, atol=2e-3)


@gpu_only
def test_torch_compile_records_the_triton_op_on_gpu():
    """With the triton backend, a compiled graph holds ``groupnorm::triton_forward`` (the
    ``triton_op`` whose kernels Inductor launches itself), not the opaque ``groupnorm::forward``;
    with Inductor, forward and gradients match eager."""
    torch.manual_seed(0)
    w = torch.randn(320, device="cuda", dtype=F16)
    b = torch.randn(320, device="cuda", dtype=F16)
    x = torch.randn(2, 320, 16, 16, device="cuda", dtype=F16, requires_grad=True)

    def fn(t):
        return groupnorm.group_norm(t, 32, w, b, activation="silu", backend="triton")

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(x)
    assert graphs and "triton_forward" in graphs[0] and "groupnorm.forward" not in graphs[0]
    torch._dynamo.reset()
    eager = fn(x)
    (gx,) = torch.autograd.grad(eager.float().square().sum(), x)
    x2 = x.detach().clone().requires_grad_()
    out = torch.compile(fn, fullgraph=True)(x2)
    (gx2,) = torch.autograd.grad(out.float().square().sum(), x2)
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx2, gx, rtol=2e-3, atol=2e-3)


def test_functional_api_dispatches_to_triton(monkeypatch):
    monkeypatch.setenv("GROUPNORM_BACKEND", "triton")
    x = torch.randn(2, 6, 4, 4, device=DEVICE)
    y = groupnorm.group_norm(x, 3, activation="silu")
    ref = reference_norm(x, "group", num_groups=3, activation="silu").output
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_empty_input_falls_back():
    x = torch.randn(0, 4, 3, 3, device=DEVICE)
    y = groupnorm.group_norm(x, 2, backend="triton")
    assert y.shape == x.shape


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    _setenv(monkeypatch, {"TRITON_INTERPRET": "0"})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        groupnorm.group_norm(torch.randn(2, 4, 3), 2, backend="triton")


def test_cpu_use_works_without_triton(tmp_path):
    """CPU-only installs: with Triton unimportable, the package, the CPU path and the planner work,
    the kernel module is never imported, and asking for the triton backend is a clear error."""
    (tmp_path / "triton.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n"
    )
    code = (
        "import sys, torch, groupnorm\n"
        "from groupnorm.kernels.triton import make_plan\n"
        "groupnorm.group_norm(torch.randn(2, 4, 3, requires_grad=True), 2).sum().backward()\n"
        "make_plan(2, 4, 3, 2, False, False, False)\n"
        "assert 'groupnorm.kernels.triton.kernels' not in sys.modules\n"
        "try:\n"
        "    groupnorm.group_norm(torch.randn(2, 4, 3), 2, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    assert 'TRITON_INTERPRET' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("GROUPNORM_BACKEND", "TRITON_INTERPRET")
    }
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_kernels_compile_for_h100_without_a_gpu():
    """Every kernel variant the launchers use compiles to an sm_90 cubin (no GPU needed), the
    apply kernels get 128-bit memory accesses in both layouts, and the default plans of realistic
    shapes compile without register spills (ptxas -v)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "..", "tools", "triton_compile_check.py"),
            "--quick",
            "--vector-check",
            "--spill-check",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "kernel variants for sm_90" in proc.stdout
    assert "channels_last: 128-bit" in proc.stdout and "contiguous: 128-bit" in proc.stdout
    assert "register check: no spills" in proc.stdout


# ---------------------------------------------------------------------------------------------
# The GPU benchmark script (cannot run here; its CPU-side parts can)
# ---------------------------------------------------------------------------------------------

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_triton_gpu.py")


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_triton_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_script_dry_run_lists_the_shapes(capsys):
    bench = _bench_module()
    assert bench.main(["--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "1x320x64x64" in listing and "2x256x8x56x56" in listing and "32x256x56x56" in listing
    assert max(s.nbytes(d) for s in bench.shapes() for d in s.dtypes) >= 256e6
    assert bench.main(["--dry-run", "--quick", "--family", "sd-unet"]) == 0


def test_bench_plot_from_a_csv(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _bench_module()
    path = tmp_path / "r.csv"
    head = "op,provider,mode,shape,dtype,layout,metric,value,gpu,date,commit\n"
    body = "".join(
        f"group_norm,{p},{m},1x320x64x64,float16,contiguous,GB/s,{v},X,d,c\n"
        for p, m, v in [("copy", "copy", 3000), ("torch", "forward", 140), ("groupnorm", "full", 9)]
    )
    path.write_text(head + body)
    assert bench.plot(path).exists()
