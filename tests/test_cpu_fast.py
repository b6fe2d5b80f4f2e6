"""The cpu backend's fast paths (fused C++ kernels, torch's kernels) against the float64
reference, in every dtype, layout and activation they take: outputs and the gradients of x,
weight, bias and residual.

The C++ extension is compiled once per machine (cached under ``GROUPNORM_CACHE_DIR``, by
default ``~/.cache/groupnorm``; ``make setup`` builds it); otherwise the first test to need it
pays for that build.

Tolerance: at most twice torch's own error against float64 on the same data (torch's unfused
group_norm then activation, in the same dtype), plus a small absolute slack per dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import functional as gf
from groupnorm.kernels import cpu, cpu_ext
from groupnorm.kernels.running import update_running_stats

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ACTIVATIONS = [None, "silu", "gelu", "relu"]
ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
TORCH_ACT = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, C) in memory


def _data(shape, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7).to(dtype), layout)
    res = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    dy = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, res, dy, w, b


def _run(fn, dy, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    return out.detach(), grads


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


def _check_against_reference(shape, groups, dtype, layout, activation, residual, seed=0):
    x, res, dy, w, b = _data(shape, dtype, layout, seed)
    args = (x, w, b, res) if residual else (x, w, b)

    def ours(x_, w_, b_, r_=None):
        return gf.group_norm(x_, groups, w_, b_, activation=activation, residual=r_)

    def ref(x_, w_, b_, r_=None):
        return groupnorm.reference_norm(
            x_,
            "group",
            num_groups=groups,
            weight=w_,
            bias=b_,
            activation=activation,
            residual=r_,
        ).output

    def torch_fn(x_, w_, b_, r_=None):
        src = x_ + r_ if r_ is not None else x_
        return TORCH_ACT[activation](F.group_norm(src, groups, w_, b_))

    out, grads = _run(ours, dy, *args)
    ref_out, ref_grads = _run(ref, dy.double(), *(t.double() for t in args))
    try:
        t_out, t_grads = _run(torch_fn, dy, *args)
    except RuntimeError:  # torch lacks this dtype on CPU
        t_out, t_grads = None, None
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == x.stride(), "output must keep the input's memory layout"
    names = ["y", "dx", "dweight", "dbias", "dresidual"][: 1 + len(args)]
    for i, (name, got, want) in enumerate(
        zip(names, (out, *grads), (ref_out, *ref_grads), strict=True)
    ):
        torch_err = 0.0
        if t_out is not None:
            torch_err = _err((t_out, *t_grads)[i], want)
        scale = want.abs().max().item()
        tol = 2 * torch_err + ATOL[dtype] * max(1.0, scale)
        assert torch.isfinite(got).all(), name
        assert _err(got, want) <= tol, (
            f"{name}: error {_err(got, want):.3g} > tolerance {tol:.3g} (torch's {torch_err:.3g})"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_group_norm_matches_reference(dtype, layout, activation):
    _check_against_reference((3, 12, 5, 7), 4, dtype, layout, activation, residual=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape", [(3, 37, 4, 4), (5, 7, 3, 3), (2, 16, 16, 16)], ids=str)
def test_many_short_sets_match_reference(shape, activation, dtype):
    """Instance norm on small maps: the forward takes the statistics of short sets a block of
    sets at a time. Set counts that leave a partial last block (111, 35), a whole number of
    blocks (32, sets of 256 values: the longest that take blocks), in every dtype."""
    _check_against_reference(shape, shape[1], dtype, "contiguous", activation, residual=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_residual_gradients(dtype, layout, activation):
    _check_against_reference((2, 8, 6, 5), 2, dtype, layout, activation, residual=True, seed=1)


@pytest.mark.parametrize(
    "shape,groups",
    [
        ((4, 6, 50), 3),
        ((2, 8, 3, 4, 5), 4),
        ((3, 5, 7, 7), 1),
        ((3, 5, 7, 7), 5),
        ((1, 64, 9, 9), 32),
        ((2, 80, 3, 5), 8),
    ],
    ids=["1d", "3d", "layer", "instance", "G32", "C80"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ranks_and_modes(shape, groups, layout):
    _check_against_reference(shape, groups, torch.float32, layout, "silu", residual=False, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape",
    [
        (6, 5, 4, 3),
        (2, 3, 48, 50),  # rows of 2400 values: float16 goes in blocks of 2048 and 352
        (3, 2112, 1, 2),  # 2112 channels: channels-last float16 rows in blocks of 2048 and 64
    ],
)
def test_batch_norm_path_matches_reference(dtype, layout, shape):
    """BN through our forward kernel and torch's native backward (plus the running-stat
    update): outputs, gradients and running statistics against the float64 reference and
    torch."""
    x, _, dy, w, b = _data(shape, dtype, layout, 8)
    c = shape[1]
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    out, grads = _run(
        lambda a, ww, bb: gf.batch_norm(a, rm, rv, ww, bb, training=True), dy, x, w, b
    )
    ref_out, ref_grads = _run(
        lambda a, ww, bb: groupnorm.reference_norm(a, "batch", weight=ww, bias=bb).output,
        dy.double(),
        x.double(),
        w.double(),
        b.double(),
    )
    t_rm, t_rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    t_out, t_grads = _run(
        lambda a, ww, bb: F.batch_norm(a, t_rm, t_rv, ww, bb, training=True), dy, x, w, b
    )
    assert out.stride() == x.stride()
    for got, want, theirs in zip(
        (out, *grads), (ref_out, *ref_grads), (t_out, *t_grads), strict=True
    ):
        tol = 2 * _err(theirs, want) + ATOL[dtype] * max(1.0, want.abs().max().item())
        assert _err(got, want) <= tol
    slack = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(rm, t_rm, atol=slack, rtol=slack)
    torch.testing.assert_close(rv, t_rv, atol=slack, rtol=slack)


def test_large_set_and_offset_mean_stay_accurate():
    # one set of 2 * 10^5 values far from zero: centred variance must hold up in float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 200, 250, generator=g, dtype=torch.float64) * 0.1 + 100.0
    ref = groupnorm.reference_norm(x, "group", num_groups=2)
    for layout in ("contiguous", "channels_last"):
        got = gf.group_norm(_layout(x.float(), layout), 2)
        want = F.group_norm(x.float(), 2)
        assert _err(got, ref.output) <= 2 * _err(want, ref.output) + 1e-4


def test_channels_last_one_group_in_pieces_stays_accurate():
    """Channels-last layer norm sums each sample as one flat set, cut into pieces of 2^16
    values whose moments are combined: with a mean 10^4 standard deviations from zero and
    pieces whose means differ, against float64 and torch, with the same bits on 1 and 2
    threads."""
    g = torch.Generator().manual_seed(8)
    # (2 x 102400 values: two pieces per sample, past the size below which one thread runs)
    ramp = torch.linspace(0.0, 0.05, 1600, dtype=torch.float64).reshape(1, 1, 40, 40)
    x = torch.randn(2, 64, 40, 40, generator=g, dtype=torch.float64) * 0.01 + 100.0 + ramp
    w = torch.rand(64, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(64, generator=g, dtype=torch.float64)
    ref = groupnorm.reference_norm(x, "group", num_groups=1, weight=w, bias=b)
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                got.append(
                    gf.layer_norm(
                        _layout(x.float(), "channels_last"), weight=w.float(), bias=b.float()
                    )
                )
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1])
    want = F.group_norm(x.float(), 1, w.float(), b.float())
    assert _err(got[0], ref.output) <= 2 * _err(want, ref.output) + 1e-4


def _far_first_values(seed, shape=(2, 8, 48, 48), first_sample_only=False):
    """float64 sets whose statistics start at an outlier: x[n, c, 0, 0] = 1e4 (for every n, or
    for n = 0 only) among N(0, 1) values. The first value of a set, row or channel is what the
    kernels shift their float32 sums by; a shift 1e4 from the data used to cost ~1e-2 in y."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[: 1 if first_sample_only else None, :, 0, 0] = 1e4
    return x


def _check_statistics(mean, rstd, ref):
    """mean within 1e-6 standard deviations and rstd within 2e-6 relative of float64: a few
    float32 ulps whatever the input's dtype (the statistics are float32)."""
    std = 1 / ref.rstd.flatten()
    assert ((mean.double().flatten() - ref.mean.flatten()) / std).abs().max() <= 1e-6
    assert ((rstd.double().flatten() - ref.rstd.flatten()) / ref.rstd.flatten()).abs().max() <= 2e-6


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_statistics_survive_an_outlier_as_the_shift(layout, groups, dtype):
    """Group/layer/instance norm kernels (both layouts, the flat one-group and the per-channel
    chunk statistics) with an outlier where their sums start, against float64: statistics to a
    few float32 ulps, y within a few ulps of the output's scale (float32) or its own rounding."""
    ext = _ext_or_skip()
    x = _far_first_values(12)
    if dtype != torch.float32:
        x = x / 100  # (float16's range)
    x = x.to(dtype)
    ref = groupnorm.reference_norm(x.double(), "group", num_groups=groups)
    xl = _layout(x, layout)
    y, mean, rstd = ext.forward(xl, None, None, groups, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert _err(y, ref.output) <= tol * ref.output.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 48, 48), (16, 8, 7, 7)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_statistics_survive_an_outlier_as_the_shift(layout, shape, dtype):
    """Batch norm's kernels (per channel over samples: long rows, short rows in channel blocks
    of rows or of value spans; channels-last chunks of rows) with an outlier as each channel's
    first value (sample 0 only, so that it does not dominate the variance), against float64."""
    ext = _ext_or_skip()
    x = _far_first_values(13, shape, first_sample_only=True)
    if dtype != torch.float32:
        x = x / 100  # (float16's range)
    x = x.to(dtype)
    ref = groupnorm.reference_norm(x.double(), "batch")
    y, mean, rstd = ext.batch_forward(_layout(x, layout), None, None, None, None, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert _err(y, ref.output) <= tol * ref.output.abs().max().item()


@pytest.mark.parametrize(
    "dtype, shape",
    [(torch.float32, (8, 512, 28, 28)), (torch.bfloat16, (12, 512, 28, 28))],
    ids=["float32", "bfloat16"],
)
def test_batch_norm_sweep_over_large_tensors(dtype, shape):
    """Batch norm over 28x28 maps in tensors of 8 MiB or more reads the samples in the order
    they lie (channel blocks, one a thread): statistics and y against float64, with the outlier
    as each channel's first value."""
    ext = _ext_or_skip()
    x = _far_first_values(15, shape, first_sample_only=True).to(dtype)
    assert x.numel() * x.element_size() >= 8 << 20
    ref = groupnorm.reference_norm(x.double(), "batch")
    y, mean, rstd = ext.batch_forward(x, None, None, None, None, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
    assert _err(y, ref.output) <= tol * ref.output.abs().max().item()


def test_float16_channels_last_layer_norm_past_the_flat_threshold():
    """float16 channels-last layer norm sums each sample flat (as float32 does) from 2^22
    values on: statistics against float64, with the outlier at the start of every sample."""
    ext = _ext_or_skip()
    x = (_far_first_values(14, (2, 64, 256, 128)) / 100 + 3.0).half()  # 2^22 values
    ref = groupnorm.reference_norm(x.double(), "group", num_groups=1)
    xl = _layout(x, "channels_last")
    y, mean, rstd = ext.forward(xl, None, None, 1, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    assert _err(y, ref.output) <= 1e-3 * ref.output.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_one_group_matches_reference(dtype):
    """The flat one-group path (float32, bfloat16) with two samples of two pieces each,
    forward and backward, against float64."""
    _check_against_reference((2, 64, 40, 40), 1, dtype, "channels_last", "silu", False, seed=6)


def test_weight_only_bias_only_and_no_affine():
    x, _, dy, w, b = _data((2, 6, 4, 4), torch.float32, "contiguous", 4)
    for weight, bias in ((w, None), (None, b), (None, None)):
        args = [t for t in (x, weight, bias) if t is not None]

        def ours(*ts, weight=weight, bias=bias):
            it = iter(ts[1:])
            ww = next(it) if weight is not None else None
            bb = next(it) if bias is not None else None
            return gf.group_norm(ts[0], 3, ww, bb, activation="silu")

        def ref(*ts, weight=weight, bias=bias):
            it = iter(ts[1:])
            ww = next(it) if weight is not None else None
            bb = next(it) if bias is not None else None
            return groupnorm.reference_norm(
                ts[0], "group", num_groups=3, weight=ww, bias=bb, activation="silu"
            ).output

        out, grads = _run(ours, dy, *args)
        ref_out, ref_grads = _run(ref, dy.double(), *(t.double() for t in args))
        for got, want in zip((out, *grads), (ref_out, *ref_grads), strict=True):
            assert _err(got, want) <= 1e-5 * max(1.0, want.abs().max().item())


def test_low_precision_input_with_float32_params():
    x, _, dy, w, b = _data((2, 8, 5, 5), torch.bfloat16, "channels_last", 5)
    w32, b32 = w.float(), b.float()
    out, (dx, dw, db) = _run(
        lambda a, ww, bb: gf.group_norm(a, 4, ww, bb, activation="silu"), dy, x, w32, b32
    )
    assert dw.dtype == torch.float32 and db.dtype == torch.float32 and dx.dtype == torch.bfloat16
    ref_out, (rdx, rdw, rdb) = _run(
        lambda a, ww, bb: (
            groupnorm.reference_norm(
                a, "group", num_groups=4, weight=ww, bias=bb, activation="silu"
            ).output
        ),
        dy.double(),
        x.double(),
        w32.double(),
        b32.double(),
    )
    assert _err(out, ref_out) < 0.05 and _err(dx, rdx) < 0.05
    assert _err(dw, rdw) < 1e-3 * rdw.abs().max().item() + 1e-3


def test_fused_path_is_used_and_saves_only_x_mean_rstd():
    _ext_or_skip()
    from groupnorm.bench.memory import retained_bytes

    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    ours = retained_bytes(lambda: gf.group_norm(x, 8, w, b, activation="silu"))
    theirs = retained_bytes(lambda: F.silu(F.group_norm(x, 8, w, b)))
    x_bytes = x.numel() * 4
    assert x_bytes <= ours <= x_bytes + 64 * 4 * 2 + 4 * 8 * 4 * 2
    assert ours <= 0.55 * theirs


def test_launchers_without_autograd():
    ext = _ext_or_skip()
    x, _, dy, w, b = _data((2, 6, 3, 3), torch.float32, "contiguous", 6)
    y, mean, rstd = ext.forward(x, w, b, 3, 1e-5, 3)
    ref = groupnorm.reference_norm(x, "group", num_groups=3, weight=w, bias=b, activation="relu")
    assert _err(y, ref.output) < 1e-5
    assert _err(mean, ref.mean) < 1e-6 and _err(rstd, ref.rstd) < 1e-5
    dx, dw, db = ext.backward(dy, x, w, b, mean, rstd, 3, 3, True, False, True)
    assert dx is not None and dw is None and db is not None


def test_fallback_without_compiler(monkeypatch):
    """No build to load and no compiler: one warning, then the torch-only path, still correct."""
    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.setattr(cpu_ext, "find_build", lambda: (None, None))
    monkeypatch.setattr(cpu_ext, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels are unavailable"):
        assert cpu_ext.extension() is None
    assert "compiler" in cpu_ext.fused_op_unavailable_reason()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once only
        assert cpu_ext.extension() is None
        _check_against_reference((2, 6, 4, 4), 3, torch.float32, "channels_last", "silu", True)


def _break_build(monkeypatch, tmp_path) -> None:
    """No build to load, an empty cache, and sources that do not compile, so that the next
    call of cpu_ext.extension() builds and fails."""
    from groupnorm.kernels.cpu_ext import build

    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.setattr(cpu_ext, "find_build", lambda: (None, None))
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "src"
    broken.mkdir()
    for f in build.source_files():
        (broken / f.name).write_text("// empty\n")
    (broken / build.OPS_SOURCE).write_text("this is not C++\n")
    monkeypatch.setattr(build, "HERE", broken)
    monkeypatch.setattr(build, "KERNEL_SOURCES", ())  # (fail fast: nothing else to compile)


def test_env_switch_uses_torch_kernels(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_ops_state", {})  # (the variable is read at the first call)
    monkeypatch.setenv("GROUPNORM_CPU_EXT", "0")
    assert cpu_ext.extension() is None
    assert cpu.fast(torch.randn(2, 4, 3), None, None, 2, False, 1e-5, "", None, True) is None
    _check_against_reference((2, 6, 4, 4), 3, torch.bfloat16, "contiguous", "gelu", False)


def test_eager_path_matches_custom_op():
    """The dispatcher-free eager path and the registered op give the same values and grads."""
    from groupnorm.ops import norm_forward

    x, res, dy, w, b = _data((2, 6, 4, 4), torch.float64, "contiguous", 7)
    args = (None, None, 3, False, 1e-5, "silu", "auto")
    out1, g1 = _run(
        lambda a, ww, bb, r: gf.group_norm(a, 3, ww, bb, activation="silu", residual=r),
        dy,
        x,
        w,
        b,
        res,
    )
    out2, g2 = _run(lambda a, ww, bb, r: norm_forward(a, ww, bb, r, *args)[0], dy, x, w, b, res)
    assert torch.equal(out1, out2)
    for a, c in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, c)
    # float64 takes torch's kernels, whose derivatives are differentiable again
    xs = x.clone().requires_grad_()
    y = gf.group_norm(xs, 3, activation="silu")
    (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), xs)
    xt = x.clone().requires_grad_()
    yt = F.silu(F.group_norm(xt, 3))
    (gt,) = torch.autograd.grad(yt.square().sum(), xt, create_graph=True)
    ggt = torch.autograd.grad(gt.square().sum(), xt)[0]
    torch.testing.assert_close(ggx, ggt)
    # float32 takes the C++ kernels, whose node computes a create_graph backward in torch ops
    xs = x.float().requires_grad_()
    y = gf.group_norm(xs, 3, activation="silu")
    (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), xs)
    torch.testing.assert_close(ggx.double(), ggt, atol=1e-4, rtol=1e-4)


def test_compile_still_traces_the_op():
    f = torch.compile(
        lambda t: gf.group_norm(t, 2, activation="silu"), fullgraph=True, backend="eager"
    )
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(f(x), gf.group_norm(x, 2, activation="silu"))


# ---- the kernels' exp and activations, on their own -------------------------------------------

_ULP = 2.0**-23  # float32 spacing at 1


def _activation_grid() -> torch.Tensor:
    dense = torch.linspace(-110.0, 110.0, 400_001, dtype=torch.float64)
    near_zero = torch.logspace(-45, 0, 2001, dtype=torch.float64)  # float32 denormals and up
    tail = torch.linspace(-92.0, -84.0, 8001, dtype=torch.float64)  # where e^z leaves float32
    return torch.cat([dense, near_zero, -near_zero, tail]).float()


def _ext_or_skip():
    """The extension module of the fused kernels, or a skip naming why it is unavailable."""
    ext = cpu_ext.extension()
    if ext is None:
        pytest.skip(f"C++ kernels unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    return ext


@pytest.mark.parametrize("name", ["silu", "gelu"])
@pytest.mark.parametrize("grad", [False, True], ids=["value", "derivative"])
def test_activation_accuracy_against_float64(name, grad):
    """The inlined activation (and its derivative) over -110..110, float32 denormals and the
    range where e^z underflows, against float64: within a few ulp where the value is a
    normal float32 (and at most 2x torch's own largest error), flushed to zero only where the
    true value is below 1e-35 (torch flushes earlier)."""
    ext = _ext_or_skip()
    z = _activation_grid()
    ours = ext.activation(z, cpu.ACT_CODES[name], grad).double()
    zd = z.double().requires_grad_(grad)
    tz = z.clone().requires_grad_(grad)
    if name == "silu":
        ref, theirs = zd * torch.sigmoid(zd), F.silu(tz)
    else:
        ref, theirs = F.gelu(zd), F.gelu(tz)
    if grad:
        ref = torch.autograd.grad(ref.sum(), zd)[0]
        theirs = torch.autograd.grad(theirs.sum(), tz)[0]
    ref, theirs = ref.detach(), theirs.detach().double()
    err, torch_err = (ours - ref).abs(), (theirs - ref).abs()
    assert not torch.isnan(ours).any()
    assert err.max() <= 2 * torch_err.max() + 1e-7
    if name == "silu":
        # few ulp of the value, or of 1 where the derivative crosses zero (z = -1.278)
        scale = ref.abs().clamp_min(1.0) if grad else ref.abs()
        normal = ref.abs() > 1e-30
        assert (err[normal] <= 8 * _ULP * scale[normal]).all(), err[normal].max()
        assert (err[~normal] <= 1e-35).all()


def test_activation_special_values():
    ext = _ext_or_skip()
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([100.0, -100.0, inf, -inf, nan, 0.0, -0.0, 1e-40, -1e-40, 88.0, -88.0])
    y = ext.activation(z, 1, False)
    assert y[0] == 100.0 and y[2] == inf and y[9] == 88.0
    assert y[1] == 0.0 and torch.signbit(y[1]) and y[10] == 0.0  # -0: e^-100 is flushed
    assert torch.isnan(y[3]) and torch.isnan(y[4])  # as torch: -inf / (1 + inf), NaN in
    assert y[5] == 0.0 and not torch.signbit(y[5]) and torch.signbit(y[6])
    assert y[7].item() == pytest.approx(5e-41, rel=1e-3)  # denormal in, half of it out
    torch.testing.assert_close(y, F.silu(z), equal_nan=True, rtol=1e-6, atol=1e-30)
    g = ext.activation(z, 1, True)
    assert g[0] == 1.0 and g[1] == 0.0 and torch.isnan(g[4]) and g[5] == 0.5
    yg = ext.activation(z, 2, False)
    assert yg[0] == 100.0 and yg[1] == 0.0 and yg[2] == inf and torch.isnan(yg[4])


@pytest.mark.parametrize(
    "shape,groups",
    [
        ((2, 6, 7), 2),  # S = 7: scalar loops; a set of 21 values: one vector and a tail of 5
        ((2, 16, 7, 7), 4),  # 7x7: blocks of 16 and a masked last block per channel
        ((2, 32, 8, 8), 8),  # 8x8: whole blocks (float32 forward keeps the per-channel loop)
        ((1, 8, 16, 16), 2),  # the longest row of the short-row path (256)
        ((1, 8, 257), 2),  # the shortest row of the per-channel path
    ],
    ids=["S7", "7x7", "8x8", "16x16", "S257"],
)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_short_rows_match_reference(shape, groups, activation, dtype):
    """The short-row kernels (rows of at most 256 values, contiguous, SiLU or GELU: the
    activation over the whole set in one loop, per-channel sums from float32 buffers) and the
    per-channel kernels on either side of the switch: outputs and the gradients of x, weight
    and bias against float64."""
    _check_against_reference(shape, groups, dtype, "contiguous", activation, False, seed=5)


@pytest.mark.parametrize(
    ("shape", "groups", "layout"),
    [
        ((1, 4, 49, 49), 2, "contiguous"),  # rows of 2401 values: blocks of 2048 and 353
        ((2, 128, 7, 7), 2, "contiguous"),  # sets of 3136 values: spans of 41 and 23 channels
        ((2, 96, 13, 13), 3, "contiguous"),  # short rows: spans of 12 channels, 169 values each
        ((1, 2112, 2, 3), 33, "channels_last"),  # rows of 2112 channels: 2048 and 64
        ((2, 40, 3, 5), 8, "channels_last"),  # 40 channels: 32 converted as vectors, 8 one by one
    ],
)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_float16_staged_blocks_match_reference(shape, groups, layout, activation):
    """float16 is converted by the hardware in blocks of up to 2048 values (spans of whole
    channels, or pieces of a longer row) into float32 buffers: block edges, spans and the
    one-by-one tails, forward and backward, against float64."""
    _check_against_reference(shape, groups, torch.float16, layout, activation, False, seed=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_channels_last_groups_of_16_channels_or_more(dtype, activation):
    """Channels-last groups read their mean per channel (layer norm reads one number): three
    groups of 32 whose means differ by several standard deviations (a mean read from the
    wrong group shows in every dtype), against float64."""
    x, _, dy, w, b = _data((2, 96, 3, 5), torch.float64, "channels_last", 4)
    offsets = torch.tensor([3.0, -4.0, 9.0], dtype=torch.float64).repeat_interleave(32)
    x = (x + offsets[None, :, None, None]).contiguous(memory_format=torch.channels_last)
    x, dy, w, b = (t.to(dtype) for t in (x, dy, w, b))

    def ours(x_, w_, b_):
        return gf.group_norm(x_, 3, w_, b_, activation=activation)

    def ref(x_, w_, b_):
        return groupnorm.reference_norm(
            x_, "group", num_groups=3, weight=w_, bias=b_, activation=activation
        ).output

    got = _run(ours, dy, x, w, b)
    want = _run(ref, dy.double(), x.double(), w.double(), b.double())
    names = ("y", "dx", "dw", "db")
    for name, g, r in zip(names, (got[0], *got[1]), (want[0], *want[1]), strict=True):
        tol = 4 * ATOL[dtype] * max(1.0, r.abs().max().item())
        assert _err(g, r) <= tol, f"{name}: error {_err(g, r):.3g} > {tol:.3g}"


@pytest.mark.parametrize(
    "shape",
    [(2, 40, 9, 11), (3, 64, 120, 120), (1, 64, 190, 180)],
    ids=["small", "sample-by-sample", "not-kept"],
)
def test_channels_last_backward_with_and_without_kept_dz(shape):
    """With an activation the channels-last backward keeps dz between its passes: sample by
    sample where a sample has up to 2^21 values (so also in a tensor past that size), and
    computes f'(z) again above: each case, with SiLU, against float64."""
    _check_against_reference(shape, 8, torch.float32, "channels_last", "silu", False, seed=11)


def _assert_near_reference(dtype, names, got, want, theirs, where=""):
    """Each of ours within twice torch's error against the float64 reference, plus ATOL[dtype]
    of the reference's scale."""
    for name, g, w_, t in zip(names, got, want, theirs, strict=True):
        g, w_, t = g.detach(), w_.detach(), t.detach()
        tol = 2 * _err(t, w_) + ATOL[dtype] * max(1.0, w_.abs().max().item())
        assert _err(g, w_) <= tol, f"{where}{name}: {_err(g, w_):.3g} > {tol:.3g}"


def _offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of t whose data starts `offset` elements into its storage (a leaf)."""
    flat = torch.zeros(t.numel() + offset, dtype=t.dtype)
    flat[offset:] = t.reshape(-1)
    return flat[offset:].view(t.shape).detach()


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(
    "shape, groups",
    [
        ((2, 32, 7, 7), 2),  # 16 channels of 49: a channel ends on a vector boundary
        ((3, 6, 14, 14), 3),
        ((1, 6, 9, 9), 1),
        ((2, 4, 10, 10), 4),  # one channel per set
        ((2, 5, 17), 5),
        ((2, 8, 16, 16), 4),  # whole vectors (walked in both directions)
        ((2, 6, 8, 8), 3),  # whole vectors (walked forward; the backward keeps its channel loops)
        ((2, 6, 3, 3), 3),  # rows under a vector: the older short-row paths
    ],
    ids=["7x7", "14x14", "9x9", "10x10-instance", "17", "16x16", "8x8", "3x3"],
)
def test_short_rows_at_any_line_offset(shape, groups, activation, affine):
    """float32 sets of short rows (over 16 values) are walked in vectors aligned to x's
    64-byte lines, so the first and last vectors of a set are partial and most hold two
    channels. x and dy start at offsets within a line (sets then start at every offset),
    against float64: y and all gradients, bit-identical at every offset."""
    x0, _, dy0, w0, b0 = _data(shape, torch.float32, "contiguous", seed=5)
    params = (w0, b0) if affine else (None, None)
    first = None
    for ox, ody in [(0, 0), (1, 1), (5, 9), (15, 3)]:
        x = _offset_view(x0, ox).requires_grad_()
        dy = _offset_view(dy0, ody)
        ws = [p.clone().requires_grad_() if p is not None else None for p in params]
        out = gf.group_norm(x, groups, ws[0], ws[1], activation=activation)
        leaves = [x] + [p for p in ws if p is not None]
        grads = torch.autograd.grad(out, leaves, dy)
        xr = x0.double().requires_grad_()
        wr = [p.double().requires_grad_() if p is not None else None for p in params]
        ref = groupnorm.reference_norm(
            xr, "group", num_groups=groups, weight=wr[0], bias=wr[1], activation=activation
        ).output
        ref_grads = torch.autograd.grad(ref, [xr] + [p for p in wr if p is not None], dy0.double())
        xt = x0.clone().requires_grad_()
        wt = [p.clone().requires_grad_() if p is not None else None for p in params]
        theirs = TORCH_ACT[activation](F.group_norm(xt, groups, wt[0], wt[1]))
        t_grads = torch.autograd.grad(theirs, [xt] + [p for p in wt if p is not None], dy0)
        _assert_near_reference(
            torch.float32,
            ("y", "dx", "dweight", "dbias")[: 1 + len(grads)],
            (out, *grads),
            (ref, *ref_grads),
            (theirs, *t_grads),
            f"offsets {ox}/{ody} ",
        )
        # the same values give the same bits wherever in a line they start
        if first is None:
            first = (out, *grads)
        for got, base in zip((out, *grads), first, strict=True):
            assert torch.equal(got, base), f"offsets {ox}/{ody}: not bit-identical to offset 0"


@pytest.mark.parametrize("shape", [(2, 4, 17, 18), (1, 4, 50, 50)], ids=["306", "2500"])
def test_long_rows_silu_backward_matches_reference(shape):
    """float32 rows of over 256 values with SiLU: the backward's first pass (its own AVX-512
    loop) over a partial last vector (306 values) and over runs of 2048 and 452 (2500)."""
    _check_against_reference(shape, 2, torch.float32, "contiguous", "silu", False, seed=17)


def test_tensor_past_the_prefetch_threshold_matches_reference():
    """A float32 tensor of 4 MiB with sets of 8 KiB: the size at which the forward and the
    backward fetch the next set ahead (hints only, which must not change a value)."""
    _check_against_reference((16, 512, 8, 16), 32, torch.float32, "contiguous", "silu", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 9, 30), (2, 8, 7, 7)],
    ids=["S270", "7x7"],  # 64-lane sums and the overlapping tail; the short-row path
)
def test_silu_with_large_pre_activations(dtype, layout, shape):
    """GN+SiLU where the affine output reaches +-100 (large weights): outputs and gradients
    against float64 within the usual tolerances, in every dtype the fused kernels take."""
    g = torch.Generator().manual_seed(11)
    groups = 4
    x = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    dy = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    w = (40 * (torch.rand(8, generator=g, dtype=torch.float64) + 0.5)).to(dtype)
    b = (20 * torch.randn(8, generator=g, dtype=torch.float64)).to(dtype)
    out, grads = _run(
        lambda x_, w_, b_: gf.group_norm(x_, groups, w_, b_, activation="silu"), dy, x, w, b
    )
    ref_out, ref_grads = _run(
        lambda x_, w_, b_: (
            groupnorm.reference_norm(
                x_, "group", num_groups=groups, weight=w_, bias=b_, activation="silu"
            ).output
        ),
        dy.double(),
        x.double(),
        w.double(),
        b.double(),
    )
    t_out, t_grads = _run(lambda x_, w_, b_: F.silu(F.group_norm(x_, groups, w_, b_)), dy, x, w, b)
    _assert_near_reference(
        dtype,
        ("y", "dx", "dweight", "dbias"),
        (out, *grads),
        (ref_out, *ref_grads),
        (t_out, *t_grads),
    )


# ---- the eager fast road (dispatch.run -> kernels/cpu.fast -> the C++ extension) -------------


@pytest.fixture
def fast_path():
    """The fast-path tests need the C++ extension, which takes the whole call (a C++ autograd
    node when gradients are needed)."""
    _ext_or_skip()
    if cpu_ext.extension() is None:
        pytest.skip(f"extension unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    return "extension"


def _full_path_calls(monkeypatch):
    """A list that grows by one for each functional call that misses the fast road (the
    dispatcher then runs the full checks before it routes the call)."""
    calls = []
    real = gf._check_call

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gf, "_check_call", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fast_path_gives_the_ops_results_bit_for_bit(dtype, fast_path, monkeypatch):
    """No-grad and autograd fast paths against the registered custom op (the full path), with
    weight and bias in x's dtype (as in a model moved to float16): the gradients come back in
    that dtype too."""
    from groupnorm.ops import norm_forward

    missed = _full_path_calls(monkeypatch)
    x, _, dy, w, b = _data((2, 12, 5, 7), dtype, "channels_last", 21)
    for act in ("", "silu"):
        op_args = (None, None, None, 4, False, 1e-5, act, "auto")

        def fast(a, ww, bb, act=act):
            return gf.group_norm(a, 4, ww, bb, activation=act)

        def op(a, ww, bb, op_args=op_args):
            return norm_forward(a, ww, bb, *op_args)[0]

        with torch.no_grad():
            assert torch.equal(fast(x, w, b), op(x, w, b))
        out1, g1 = _run(fast, dy, x, w, b)
        out2, g2 = _run(op, dy, x, w, b)
        assert torch.equal(out1, out2)
        for a, c in zip(g1, g2, strict=True):
            assert a.dtype == dtype
            assert torch.equal(a, c)
    assert missed == []  # every call above took the fast path


@pytest.mark.parametrize("params", ["weight", "bias", "both", "none"])
@pytest.mark.parametrize("needs", [(1, 1, 1), (0, 1, 1), (1, 0, 1), (0, 0, 1), (1, 1, 0)])
def test_fast_path_gradients_for_each_set_of_inputs_that_need_them(
    params, needs, fast_path, monkeypatch
):
    """Every mix of present params and inputs that require grad (an absent weight moves the
    bias to the C++ node's second input edge), with SiLU, against float64."""
    x, _, dy, w, b = _data((2, 6, 4, 4), torch.float32, "contiguous", 12)
    w = w if params in ("weight", "both") else None
    b = b if params in ("bias", "both") else None

    def leaves(dtype):
        return [
            t.to(dtype).clone().requires_grad_(bool(need)) if t is not None else None
            for t, need in zip((x, w, b), needs, strict=True)
        ]

    got_in, ref_in = leaves(torch.float32), leaves(torch.float64)
    wanted = [i for i, t in enumerate(got_in) if t is not None and t.requires_grad]
    if not wanted:
        pytest.skip("nothing requires grad")
    missed = _full_path_calls(monkeypatch)
    y = gf.group_norm(*got_in[:1], 3, *got_in[1:], activation="silu")
    assert missed == []
    want = groupnorm.reference_norm(
        ref_in[0], "group", num_groups=3, weight=ref_in[1], bias=ref_in[2], activation="silu"
    ).output
    got = torch.autograd.grad(y, [got_in[i] for i in wanted], dy)
    ref = torch.autograd.grad(want, [ref_in[i] for i in wanted], dy.double())
    assert _err(y, want) < 1e-5
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        assert _err(g, r) < 1e-4 * max(1.0, r.abs().max().item())


def test_fast_path_double_backward_is_differentiable(fast_path):
    """Second-order gradients through the extension's node are not silently wrong: under
    create_graph=True its backward carries a graph, and the second derivative matches torch's
    float64 one (a gradient without a graph would make the second backward fail)."""
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64)
    got = []
    for dtype in (torch.float32, torch.float64):
        x = x0.to(dtype).requires_grad_()
        if dtype == torch.float32:
            y = gf.group_norm(x, 3, activation="silu")
            assert "groupnorm" in type(y.grad_fn).__name__ or "groupnorm" in y.grad_fn.name()
        else:
            y = F.silu(F.group_norm(x, 3))
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        assert gx.requires_grad
        got.append(torch.autograd.grad(gx.square().sum(), x)[0])
    torch.testing.assert_close(got[0].double(), got[1], atol=1e-4, rtol=1e-4)


def test_extension_fallback_on_failed_build_and_switch(monkeypatch, tmp_path):
    """A broken run-time build warns once and leaves torch's kernels, still correct;
    GROUPNORM_CPU_EXT=0 turns the extension off without a warning."""
    _ext_or_skip()
    if cpu_ext._compiler() is None:
        pytest.skip("no C++ compiler")
    _break_build(monkeypatch, tmp_path)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels are unavailable"):
        assert cpu_ext.extension() is None
    assert "build failed" in cpu_ext.fused_op_unavailable_reason()
    _check_against_reference((2, 6, 4, 4), 3, torch.float32, "channels_last", "silu", False)
    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.setenv("GROUPNORM_CPU_EXT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert cpu_ext.extension() is None
    assert "GROUPNORM_CPU_EXT=0" in cpu_ext.fused_op_unavailable_reason()


def test_fast_path_is_taken_only_where_it_applies(monkeypatch, fast_path):
    calls = []
    real = cpu.fast

    def counting(*args):
        y = real(*args)
        calls.extend([] if y is None else [1])
        return y

    monkeypatch.setattr(cpu, "fast", counting)
    x, w = torch.randn(2, 6, 4, 4), torch.rand(6)
    m = groupnorm.GroupNorm(3, 6)
    with torch.no_grad():
        gf.group_norm(x, 3, w)
        gf.layer_norm(x)
        gf.instance_norm(x, activation="silu")
        groupnorm.normalize(x, "gn", num_groups=3)
        m(x)
        gf.group_norm(x.half(), 3, w.half(), w.half())  # params in x's dtype
        assert len(calls) == 6
        with pytest.raises(TypeError, match="must be torch.float16 or torch.float32"):
            gf.group_norm(x.half(), 3, w.bfloat16())  # a third dtype: the full path explains
        gf.group_norm(x, 3, w, backend="portable")
        gf.group_norm(x.double(), 3)
        gf.group_norm(x, 3, w.double().float()[::1], residual=x)
        gf.group_norm(x[:, :, ::2], 3)  # strided: the full path copies first
        monkeypatch.setenv("GROUPNORM_BACKEND", "portable")
        gf.group_norm(x, 3)
        monkeypatch.setenv("GROUPNORM_BACKEND", "cpu")
        gf.group_norm(x, 3)
        assert len(calls) == 7
    with pytest.raises(ValueError, match="divisible"):
        gf.group_norm(x, 4)  # bad input still gets the full path's message
    with pytest.raises(TypeError, match="eps"):
        gf.group_norm(x, 3, eps="1e-5")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_fast_path_matches_torch(layout, momentum, fast_path):
    """The no-grad batch norm path (running statistics updated in the kernel) against
    torch.nn.BatchNorm2d, in training and eval, and against our own autograd path."""
    _ext_or_skip()
    ours = groupnorm.BatchNorm(6, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(6, momentum=momentum)
    slow = groupnorm.BatchNorm(6, momentum=momentum)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    with torch.no_grad():
        for m in (ours, theirs, slow):
            m.weight.copy_(w)
            m.bias.copy_(b)
    for step in range(3):
        x = _layout(torch.randn(4, 6, 5, 7) * (step + 1) + 3.0, layout)
        with torch.no_grad():
            y, t = ours(x), theirs(x)
        y_slow = slow(x.clone().requires_grad_())
        assert y.stride() == x.stride()
        torch.testing.assert_close(y, t, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(y, y_slow.detach(), rtol=1e-5, atol=2e-5)
        for a, b in (
            (ours.running_mean, theirs.running_mean),
            (ours.running_var, theirs.running_var),
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, slow.running_var, rtol=1e-5, atol=1e-6)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=2e-5)
    rm, rv = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        with torch.no_grad():
            gf.batch_norm(torch.randn(1, 6), rm, rv, training=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_fast_path_with_low_precision_module(dtype, layout, monkeypatch, fast_path):
    """A BatchNorm moved to bfloat16/float16 (params and running statistics in that dtype)
    takes the fast path, in training with and without grad and in eval; it agrees with the
    full path bit for bit (outputs and running statistics; a zero residual sends a call there)
    and with torch's BatchNorm2d in the same dtype (gradients too, in the params' dtype)."""
    _ext_or_skip()
    ours, theirs = groupnorm.BatchNorm(6), torch.nn.BatchNorm2d(6)
    gen = torch.Generator().manual_seed(17)  # (fixed data: the same cases on every run)
    w, b = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()  # the full path's statistics
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    missed = _full_path_calls(monkeypatch)
    for step in range(2):
        x = _layout(torch.randn(4, 6, 5, 7, generator=gen) * (step + 1) + 3.0, layout).to(dtype)
        with torch.no_grad():
            y = ours(x)
            torch.testing.assert_close(y, theirs(x), **tol)
            full = groupnorm.normalize(
                x, "batch", weight=ours.weight, bias=ours.bias, running_mean=rm,
                running_var=rv, training=True, residual=torch.zeros_like(x),
            )  # fmt: skip
        assert torch.equal(y, full)
        assert torch.equal(ours.running_mean, rm) and torch.equal(ours.running_var, rv)
        xg, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, t = ours(xg), theirs(xt)
        dy = _layout(torch.randn(y.shape, generator=gen), layout).to(dtype)
        got = torch.autograd.grad(y, [xg, ours.weight, ours.bias], dy)
        theirs_g = torch.autograd.grad(t, [xt, theirs.weight, theirs.bias], dy)
        leaves = [p.detach().double().requires_grad_() for p in (x, ours.weight, ours.bias)]
        ref = groupnorm.reference_norm(
            leaves[0], "batch", weight=leaves[1], bias=leaves[2]
        ).output  # (torch's low-precision BN rounds its statistics: float64 is the judge)
        want = torch.autograd.grad(ref, leaves, dy.double())
        for g, th, wt in zip(got, theirs_g, want, strict=True):
            assert g.dtype == dtype
            assert _err(g, wt) <= 2 * _err(th, wt) + ATOL[dtype] * max(1.0, wt.abs().max().item())
        for a, r in (
            (ours.running_mean, theirs.running_mean),
            (ours.running_var, theirs.running_var),
        ):
            assert a.dtype == dtype
            torch.testing.assert_close(a, r, **tol)
        with torch.no_grad():  # (the full path's statistics follow the same updates)
            groupnorm.normalize(
                x, "batch", weight=ours.weight, bias=ours.bias, running_mean=rm,
                running_var=rv, training=True, residual=torch.zeros_like(x),
            )  # fmt: skip
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, theirs(x), **tol)
        full = groupnorm.normalize(
            x, "batch", weight=ours.weight, bias=ours.bias, running_mean=rm, running_var=rv,
            training=False, residual=torch.zeros_like(x),
        )  # fmt: skip
    assert torch.equal(y, full)
    assert len(missed) == 5  # the normalize(..., residual=0) calls only (the full path)


@pytest.mark.parametrize(
    "stat_dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_batch_norm_mixed_dtype_running_statistics_match_the_full_path(stat_dtypes, fast_path):
    """Running statistics of two dtypes (one bfloat16, one float32) in training: the fast path
    leaves them to the full path's update, and both give the same bits."""
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(4, 6, 5, 7, generator=gen).bfloat16()
    w, b = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    rm = torch.randn(6, generator=gen).to(stat_dtypes[0])
    rv = (torch.rand(6, generator=gen) + 0.5).to(stat_dtypes[1])
    rm2, rv2, rm0 = rm.clone(), rv.clone(), rm.clone()
    with torch.no_grad():
        y = gf.batch_norm(x, rm, rv, w, b, training=True)
        full = groupnorm.normalize(
            x, "batch", weight=w, bias=b, running_mean=rm2, running_var=rv2, training=True,
            residual=torch.zeros_like(x),
        )  # fmt: skip
    assert torch.equal(y, full) and torch.equal(rm, rm2) and torch.equal(rv, rv2)
    assert not torch.equal(rm, rm0)  # (the statistics were updated)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_running_statistics_update(dtype):
    """bfloat16/float16 running statistics: the extension's update and its torch form give the
    same bits (the formula computed in float64, rounded through float32), never further from the
    exact value than an ATen lerp that rounds the batch mean to the statistics' dtype first."""
    if cpu_ext.extension() is None:
        pytest.skip(f"extension unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    g = torch.Generator().manual_seed(13)
    rm = torch.randn(37, generator=g).to(dtype)
    rv = (torch.rand(37, generator=g) + 0.5).to(dtype)
    mean = torch.randn(37, generator=g)
    rstd = torch.rand(37, generator=g) + 0.2
    eps, momentum, count = 1e-5, 0.1, 70
    var = (rstd.double() ** -2 - eps).clamp_min(0) * (count / (count - 1))
    want_m = (rm.double() + momentum * (mean.double() - rm.double())).float().to(dtype)
    want_v = (rv.double() + momentum * (var - rv.double())).float().to(dtype)
    aten_m, aten_v = rm.clone(), rv.clone()
    rm_before, rv_before = rm.clone(), rv.clone()
    aten_m.lerp_(mean.to(dtype), momentum)
    aten_v.lerp_(var.float().to(dtype), momentum)
    torch_m, torch_v = rm.clone(), rv.clone()
    update_running_stats(torch_m, torch_v, mean, rstd, eps, momentum, count)  # torch form
    update_running_stats(rm, rv, mean, rstd, eps, momentum, count, native=True)  # C++ twin
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v)
    assert torch.equal(torch_m, want_m) and torch.equal(torch_v, want_v)
    exact_m = rm_before.double() + momentum * (mean.double() - rm_before.double())
    exact_v = rv_before.double() + momentum * (var - rv_before.double())
    for got, aten, exact in ((rm, aten_m, exact_m), (rv, aten_v, exact_v)):
        assert ((got.double() - exact).abs() <= (aten.double() - exact).abs() + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_autograd_fast_path_matches_reference(dtype, layout):
    """BatchNorm (float32 parameters) in training with autograd: our forward kernel and torch's
    backward kernel, outputs and gradients of x, weight and bias against float64."""
    _ext_or_skip()
    x, _, dy, _, _ = _data((4, 6, 5, 7), dtype, layout, 23)
    m = groupnorm.BatchNorm(6)
    with torch.no_grad():
        m.weight.copy_(torch.rand(6) + 0.5)
        m.bias.copy_(torch.randn(6))
    w, b = m.weight.detach(), m.bias.detach()

    xs = x.detach().clone().requires_grad_()
    out = m(xs)
    gx, gw, gb = torch.autograd.grad(out, (xs, m.weight, m.bias), dy)
    ref_out, ref_grads = _run(
        lambda x_, w_, b_: groupnorm.reference_norm(x_, "batch", weight=w_, bias=b_).output,
        dy.double(),
        x.double(),
        w.double(),
        b.double(),
    )
    t_out, t_grads = _run(
        lambda x_, w_, b_: F.batch_norm(x_, None, None, w_, b_, training=True), dy, x, w, b
    )
    assert out.stride() == x.stride() and out.dtype == dtype
    for name, got, want, theirs in zip(
        ("y", "dx", "dweight", "dbias"),
        (out.detach(), gx, gw, gb),
        (ref_out, *ref_grads),
        (t_out, *t_grads),
        strict=True,
    ):
        tol = 2 * _err(theirs, want) + ATOL[dtype] * max(1.0, want.abs().max().item())
        assert _err(got, want) <= tol, f"{name}: {_err(got, want):.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------------
# What the kernels cannot see: forward-mode AD, the JIT tracer, and the fast path's own checks
# ---------------------------------------------------------------------------------------------


def _jvp_reference(fn, x, t):
    """The tangent of ``fn`` at x along t, in float64 through torch's own ops."""
    return torch.func.jvp(fn, (x.double(),), (t.double(),))[1]


@pytest.mark.parametrize("case", ["group", "instance", "layer", "module", "batch_eval"])
def test_forward_mode_ad_carries_the_tangent(case):
    """Under forward-mode AD the call takes the portable core's torch ops, so the tangent is
    right; the C++ kernels (and the custom op) would drop it silently."""
    import torch.autograd.forward_ad as fa

    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 6, 4, 5, generator=gen) * 1.3 + 0.2
    t = torch.randn(2, 6, 4, 5, generator=gen)
    w, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    rm, rv = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.5
    ours, ref = {
        "group": (
            lambda a: groupnorm.group_norm(a, 3, w, b, activation="silu"),
            lambda a: F.silu(F.group_norm(a, 3, w.double(), b.double())),
        ),
        "instance": (
            lambda a: groupnorm.instance_norm(a, weight=w, bias=b),
            lambda a: F.group_norm(a, 6, w.double(), b.double()),
        ),
        "layer": (
            lambda a: groupnorm.layer_norm(a, weight=w, bias=b),
            lambda a: F.group_norm(a, 1, w.double(), b.double()),
        ),
        "module": (
            groupnorm.GroupNorm(3, 6, affine=False),
            lambda a: F.group_norm(a, 3),
        ),
        "batch_eval": (
            lambda a: groupnorm.batch_norm(a, rm, rv, w, b, training=False),
            lambda a: F.batch_norm(a, rm.double(), rv.double(), w.double(), b.double()),
        ),
    }[case]
    want = _jvp_reference(ref, x, t)
    with fa.dual_level():
        y = ours(fa.make_dual(x, t))
        tangent = fa.unpack_dual(y).tangent
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(tangent.double(), want, rtol=1e-4, atol=1e-5)


def test_jit_trace_records_the_op_not_a_constant():
    """Tracing must not run the kernels behind the tracer's back (it would record the output
    as a constant): a traced function gives the right answer on a new input."""
    x = torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda a: groupnorm.group_norm(a, 2), (x,), check_trace=False)
    fresh = torch.randn(2, 4, 3, 3) * 3 + 1
    torch.testing.assert_close(traced(fresh), F.group_norm(fresh, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "training, momentum, error",
    [
        (False, 2.0, None),
        (False, float("nan"), None),
        (False, "abc", TypeError),
        (True, 2.0, ValueError),
        (True, -0.5, ValueError),
        (True, "abc", TypeError),
    ],
)
def test_batch_norm_fast_path_checks_momentum_like_the_full_path(
    training, momentum, error, fast_path
):
    """The range is checked where an update uses momentum (training with running statistics),
    as torch ignores it elsewhere; its type always. The fast path and the full checks agree."""
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    if error is None:  # unused: accepted, torch's answer, the statistics left alone
        y = groupnorm.batch_norm(x, rm, rv, training=training, momentum=momentum)
        torch.testing.assert_close(y, F.batch_norm(x, rm, rv, training=training))
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
        return
    with pytest.raises(error, match="momentum"):
        groupnorm.batch_norm(x, rm, rv, training=training, momentum=momentum)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    if training and error is ValueError:  # no running statistics: nothing uses it
        y = groupnorm.batch_norm(x, None, None, training=True, momentum=momentum)
        torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    elif training:
        with pytest.raises(error, match="momentum"):
            groupnorm.batch_norm(x, None, None, training=True, momentum=momentum)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float16_stores_round_like_torch(layout):
    """With weight 0 the output is the float32 bias rounded to float16 by the kernels' own
    conversion: it must match torch's rounding bit for bit, for subnormals, ties to even, the
    largest finite values, overflow to inf, and NaN. (No -0.0: 0 * x + -0.0 is +0.0 when x > 0,
    which is arithmetic, not rounding.)"""
    _ext_or_skip()
    edges = [
        0.0, 1e-8, 3e-8, 2.98e-8, 6.0e-8, 5.96e-8, -1e-6, 6.1e-5, 6.104e-5,
        1.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11, -2.0 - 2**-10, 3.14159, 65504.0, 65519.0,
        65520.0, 70000.0, -1e9, float("inf"), float("-inf"), float("nan"),
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(23)
    bias = torch.cat([torch.tensor(edges), torch.randn(41, generator=gen) * 1e3]).float()
    c = bias.numel()
    x = torch.randn(2, c, 3, 3, generator=gen).half()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = gf.group_norm(x, 1, torch.zeros(c), bias)
    want = bias.half()[None, :, None, None].expand_as(y)
    same = (y.view(torch.int16) == want.contiguous().view(torch.int16)) | (y.isnan() & want.isnan())
    assert same.all(), f"{(~same).sum().item()} values rounded differently from torch"


def test_float16_loads_cover_every_bit_pattern():
    """All 65536 float16 values through the kernels' load: instance norm over pairs (v, 0) has
    mean v/2 and output +-1 exactly when v is finite and nonzero; the statistics say whether
    each v was read as torch reads it."""
    _ext_or_skip()
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.float16)
    x = torch.stack([v, torch.zeros_like(v)], dim=-1).reshape(1, -1, 2)  # (1, 65536, 2)
    y, _, mean, _ = cpu.forward(x, None, None, None, None, None, x.shape[1], False, 0.0, "")
    want = v.float() / 2
    finite = torch.isfinite(v)
    torch.testing.assert_close(mean.flatten()[finite], want[finite], rtol=0, atol=0)
    assert torch.isnan(mean.flatten()[~finite]).all()
