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

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FUSED_NAMES,
    KERNEL_ATOL,
    TORCH_ACT,
    abs_err,
    check_against_reference,
    ext_or_skip,
    kernel_data,
    to_layout,
    value_and_grads,
)

import groupnorm
from groupnorm import functional as gf
from groupnorm.kernels import Call, cpu, cpu_ext
from groupnorm.kernels.running import update_running_stats

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


ACTIVATIONS = [None, *FUSED_NAMES]


def _batch_reference(dy, x, w, b):
    """Batch norm's output and (x, weight, bias) gradients from the float64 reference."""
    return value_and_grads(
        lambda a, ww, bb: groupnorm.reference_norm(a, "batch", weight=ww, bias=bb).output,
        dy.double(),
        x.double(),
        w.double(),
        b.double(),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_group_norm_matches_reference(dtype, layout, activation):
    check_against_reference((3, 12, 5, 7), 4, dtype, layout, activation, residual=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape", [(3, 37, 4, 4), (5, 7, 3, 3), (2, 16, 16, 16)], ids=str)
def test_many_short_sets_match_reference(shape, activation, dtype):
    """Instance norm on small maps: the forward takes the statistics of short sets a block of
    sets at a time. Set counts that leave a partial last block (111, 35), a whole number of
    blocks (32, sets of 256 values: the longest that take blocks), in every dtype."""
    check_against_reference(shape, shape[1], dtype, "contiguous", activation, residual=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_residual_gradients(dtype, layout, activation):
    check_against_reference((2, 8, 6, 5), 2, dtype, layout, activation, residual=True, seed=1)


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
    check_against_reference(shape, groups, torch.float32, layout, "silu", residual=False, seed=2)


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
    x, _, dy, w, b = kernel_data(shape, dtype, layout, 8)
    c = shape[1]
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    out, grads = value_and_grads(
        lambda a, ww, bb: gf.batch_norm(a, rm, rv, ww, bb, training=True), dy, x, w, b
    )
    ref_out, ref_grads = _batch_reference(dy, x, w, b)
    t_rm, t_rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    t_out, t_grads = value_and_grads(
        lambda a, ww, bb: F.batch_norm(a, t_rm, t_rv, ww, bb, training=True), dy, x, w, b
    )
    assert out.stride() == x.stride()
    for got, want, theirs in zip(
        (out, *grads), (ref_out, *ref_grads), (t_out, *t_grads), strict=True
    ):
        tol = 2 * abs_err(theirs, want) + KERNEL_ATOL[dtype] * max(1.0, want.abs().max().item())
        assert abs_err(got, want) <= tol
    slack = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(rm, t_rm, atol=slack, rtol=slack)
    torch.testing.assert_close(rv, t_rv, atol=slack, rtol=slack)


def test_large_set_and_offset_mean_stay_accurate():
    # one set of 2 * 10^5 values far from zero: centred variance must hold up in float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 200, 250, generator=g, dtype=torch.float64) * 0.1 + 100.0
    ref = groupnorm.reference_norm(x, "group", num_groups=2)
    for layout in ("contiguous", "channels_last"):
        got = gf.group_norm(to_layout(x.float(), layout), 2)
        want = F.group_norm(x.float(), 2)
        assert abs_err(got, ref.output) <= 2 * abs_err(want, ref.output) + 1e-4


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
                        to_layout(x.float(), "channels_last"), weight=w.float(), bias=b.float()
                    )
                )
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1])
    want = F.group_norm(x.float(), 1, w.float(), b.float())
    assert abs_err(got[0], ref.output) <= 2 * abs_err(want, ref.output) + 1e-4


def _far_first_values(seed, shape=(2, 8, 48, 48), first_sample_only=False):
    """float64 sets whose statistics start at an outlier: x[n, c, 0, 0] = 1e4 (for every n, or
    for n = 0 only) among N(0, 1) values. The first value of a set, row or channel is what the
    kernels shift their float32 sums by: here a shift 1e4 away from the rest of the data."""
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
    ext = ext_or_skip()
    x = _far_first_values(12)
    if dtype != torch.float32:
        x = x / 100  # (float16's range)
    x = x.to(dtype)
    ref = groupnorm.reference_norm(x.double(), "group", num_groups=groups)
    xl = to_layout(x, layout)
    y, mean, rstd = ext.forward(xl, None, None, groups, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert abs_err(y, ref.output) <= tol * ref.output.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 48, 48), (16, 8, 7, 7)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_statistics_survive_an_outlier_as_the_shift(layout, shape, dtype):
    """Batch norm's kernels (per channel over samples: long rows, short rows in channel blocks
    of rows or of value spans; channels-last chunks of rows) with an outlier as each channel's
    first value (sample 0 only, so that it does not dominate the variance), against float64."""
    ext = ext_or_skip()
    x = _far_first_values(13, shape, first_sample_only=True)
    if dtype != torch.float32:
        x = x / 100  # (float16's range)
    x = x.to(dtype)
    ref = groupnorm.reference_norm(x.double(), "batch")
    y, mean, rstd = ext.batch_forward(to_layout(x, layout), None, None, None, None, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert abs_err(y, ref.output) <= tol * ref.output.abs().max().item()


@pytest.mark.parametrize(
    "dtype, shape",
    [(torch.float32, (8, 512, 28, 28)), (torch.bfloat16, (12, 512, 28, 28))],
    ids=["float32", "bfloat16"],
)
def test_batch_norm_sweep_over_large_tensors(dtype, shape):
    """Batch norm over 28x28 maps in tensors of 8 MiB or more reads the samples in the order
    they lie (channel blocks, one a thread): statistics and y against float64, with the outlier
    as each channel's first value."""
    ext = ext_or_skip()
    x = _far_first_values(15, shape, first_sample_only=True).to(dtype)
    assert x.numel() * x.element_size() >= 8 << 20
    ref = groupnorm.reference_norm(x.double(), "batch")
    y, mean, rstd = ext.batch_forward(x, None, None, None, None, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
    assert abs_err(y, ref.output) <= tol * ref.output.abs().max().item()


def test_float16_channels_last_layer_norm_past_the_flat_threshold():
    """float16 channels-last layer norm sums each sample flat (as float32 does) from 2^22
    values on: statistics against float64, with the outlier at the start of every sample."""
    ext = ext_or_skip()
    x = (_far_first_values(14, (2, 64, 256, 128)) / 100 + 3.0).half()  # 2^22 values
    ref = groupnorm.reference_norm(x.double(), "group", num_groups=1)
    xl = to_layout(x, "channels_last")
    y, mean, rstd = ext.forward(xl, None, None, 1, 1e-5, 0)
    _check_statistics(mean, rstd, ref)
    assert abs_err(y, ref.output) <= 1e-3 * ref.output.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_one_group_matches_reference(dtype):
    """The flat one-group path (float32, bfloat16) with two samples of two pieces each,
    forward and backward, against float64."""
    check_against_reference((2, 64, 40, 40), 1, dtype, "channels_last", "silu", False, seed=6)


def test_weight_only_bias_only_and_no_affine():
    x, _, dy, w, b = kernel_data((2, 6, 4, 4), torch.float32, "contiguous", 4)
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

        out, grads = value_and_grads(ours, dy, *args)
        ref_out, ref_grads = value_and_grads(ref, dy.double(), *(t.double() for t in args))
        for got, want in zip((out, *grads), (ref_out, *ref_grads), strict=True):
            assert abs_err(got, want) <= 1e-5 * max(1.0, want.abs().max().item())


def test_low_precision_input_with_float32_params():
    x, _, dy, w, b = kernel_data((2, 8, 5, 5), torch.bfloat16, "channels_last", 5)
    w32, b32 = w.float(), b.float()
    out, (dx, dw, db) = value_and_grads(
        lambda a, ww, bb: gf.group_norm(a, 4, ww, bb, activation="silu"), dy, x, w32, b32
    )
    assert dw.dtype == torch.float32 and db.dtype == torch.float32 and dx.dtype == torch.bfloat16
    ref_out, (rdx, rdw, rdb) = value_and_grads(
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
    assert abs_err(out, ref_out) < 0.05 and abs_err(dx, rdx) < 0.05
    assert abs_err(dw, rdw) < 1e-3 * rdw.abs().max().item() + 1e-3


def test_fused_path_is_used_and_saves_only_x_mean_rstd():
    ext_or_skip()
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
    ext = ext_or_skip()
    x, _, dy, w, b = kernel_data((2, 6, 3, 3), torch.float32, "contiguous", 6)
    y, mean, rstd = ext.forward(x, w, b, 3, 1e-5, 3)
    ref = groupnorm.reference_norm(x, "group", num_groups=3, weight=w, bias=b, activation="relu")
    assert abs_err(y, ref.output) < 1e-5
    assert abs_err(mean, ref.mean) < 1e-6 and abs_err(rstd, ref.rstd) < 1e-5
    dx, dw, db = ext.backward(dy, x, w, b, mean, rstd, 3, 3, True, False, True)
    assert dx is not None and dw is None and db is not None


# ---- the kernels' exp and activations, on their own -------------------------------------------

_ULP = 2.0**-23  # float32 spacing at 1


def _activation_grid() -> torch.Tensor:
    dense = torch.linspace(-110.0, 110.0, 400_001, dtype=torch.float64)
    near_zero = torch.logspace(-45, 0, 2001, dtype=torch.float64)  # float32 denormals and up
    tail = torch.linspace(-92.0, -84.0, 8001, dtype=torch.float64)  # where e^z leaves float32
    return torch.cat([dense, near_zero, -near_zero, tail]).float()


@pytest.mark.parametrize("name", ["silu", "gelu"])
@pytest.mark.parametrize("grad", [False, True], ids=["value", "derivative"])
def test_activation_accuracy_against_float64(name, grad):
    """The inlined activation (and its derivative) over -110..110, float32 denormals and the
    range where e^z underflows, against float64: within a few ulp where the value is a
    normal float32 (and at most 2x torch's own largest error), flushed to zero only where the
    true value is below 1e-35 (torch flushes earlier)."""
    ext = ext_or_skip()
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
    ext = ext_or_skip()
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
    check_against_reference(shape, groups, dtype, "contiguous", activation, False, seed=5)


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
    check_against_reference(shape, groups, torch.float16, layout, activation, False, seed=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_channels_last_groups_of_16_channels_or_more(dtype, activation):
    """Channels-last groups read their mean per channel (layer norm reads one number): three
    groups of 32 whose means differ by several standard deviations (a mean read from the
    wrong group shows in every dtype), against float64."""
    x, _, dy, w, b = kernel_data((2, 96, 3, 5), torch.float64, "channels_last", 4)
    offsets = torch.tensor([3.0, -4.0, 9.0], dtype=torch.float64).repeat_interleave(32)
    x = (x + offsets[None, :, None, None]).contiguous(memory_format=torch.channels_last)
    x, dy, w, b = (t.to(dtype) for t in (x, dy, w, b))

    def ours(x_, w_, b_):
        return gf.group_norm(x_, 3, w_, b_, activation=activation)

    def ref(x_, w_, b_):
        return groupnorm.reference_norm(
            x_, "group", num_groups=3, weight=w_, bias=b_, activation=activation
        ).output

    got = value_and_grads(ours, dy, x, w, b)
    want = value_and_grads(ref, dy.double(), x.double(), w.double(), b.double())
    names = ("y", "dx", "dw", "db")
    for name, g, r in zip(names, (got[0], *got[1]), (want[0], *want[1]), strict=True):
        tol = 4 * KERNEL_ATOL[dtype] * max(1.0, r.abs().max().item())
        assert abs_err(g, r) <= tol, f"{name}: error {abs_err(g, r):.3g} > {tol:.3g}"


@pytest.mark.parametrize(
    "shape",
    [(2, 40, 9, 11), (3, 64, 120, 120), (1, 64, 190, 180)],
    ids=["small", "sample-by-sample", "not-kept"],
)
def test_channels_last_backward_with_and_without_kept_dz(shape):
    """With an activation the channels-last backward keeps dz between its passes: sample by
    sample where a sample has up to 2^21 values (so also in a tensor past that size), and
    computes f'(z) again above: each case, with SiLU, against float64."""
    check_against_reference(shape, 8, torch.float32, "channels_last", "silu", False, seed=11)


def _assert_near_reference(dtype, names, got, want, theirs, where=""):
    """Each of ours within twice torch's error against the float64 reference, plus
    KERNEL_ATOL[dtype] of the reference's scale."""
    for name, g, w_, t in zip(names, got, want, theirs, strict=True):
        g, w_, t = g.detach(), w_.detach(), t.detach()
        tol = 2 * abs_err(t, w_) + KERNEL_ATOL[dtype] * max(1.0, w_.abs().max().item())
        assert abs_err(g, w_) <= tol, f"{where}{name}: {abs_err(g, w_):.3g} > {tol:.3g}"


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
    x0, _, dy0, w0, b0 = kernel_data(shape, torch.float32, "contiguous", seed=5)
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
    check_against_reference(shape, 2, torch.float32, "contiguous", "silu", False, seed=17)


def test_tensor_past_the_prefetch_threshold_matches_reference():
    """A float32 tensor of 4 MiB with sets of 8 KiB: the size at which the forward and the
    backward fetch the next set ahead (hints only, which must not change a value)."""
    check_against_reference((16, 512, 8, 16), 32, torch.float32, "contiguous", "silu", False)


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
    x = to_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    dy = to_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    w = (40 * (torch.rand(8, generator=g, dtype=torch.float64) + 0.5)).to(dtype)
    b = (20 * torch.randn(8, generator=g, dtype=torch.float64)).to(dtype)
    out, grads = value_and_grads(
        lambda x_, w_, b_: gf.group_norm(x_, groups, w_, b_, activation="silu"), dy, x, w, b
    )
    ref_out, ref_grads = value_and_grads(
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
    t_out, t_grads = value_and_grads(
        lambda x_, w_, b_: F.silu(F.group_norm(x_, groups, w_, b_)), dy, x, w, b
    )
    _assert_near_reference(
        dtype,
        ("y", "dx", "dweight", "dbias"),
        (out, *grads),
        (ref_out, *ref_grads),
        (t_out, *t_grads),
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_fast_path_matches_torch(layout, momentum, fast_path):
    """The no-grad batch norm path (running statistics updated in the kernel) against
    torch.nn.BatchNorm2d, in training and eval, and against our own autograd path."""
    ext_or_skip()
    ours = groupnorm.BatchNorm(6, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(6, momentum=momentum)
    slow = groupnorm.BatchNorm(6, momentum=momentum)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    with torch.no_grad():
        for m in (ours, theirs, slow):
            m.weight.copy_(w)
            m.bias.copy_(b)
    for step in range(3):
        x = to_layout(torch.randn(4, 6, 5, 7) * (step + 1) + 3.0, layout)
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
    ext_or_skip()
    x, _, dy, _, _ = kernel_data((4, 6, 5, 7), dtype, layout, 23)
    m = groupnorm.BatchNorm(6)
    with torch.no_grad():
        m.weight.copy_(torch.rand(6) + 0.5)
        m.bias.copy_(torch.randn(6))
    w, b = m.weight.detach(), m.bias.detach()

    xs = x.detach().clone().requires_grad_()
    out = m(xs)
    gx, gw, gb = torch.autograd.grad(out, (xs, m.weight, m.bias), dy)
    ref_out, ref_grads = _batch_reference(dy, x, w, b)
    t_out, t_grads = value_and_grads(
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
        tol = 2 * abs_err(theirs, want) + KERNEL_ATOL[dtype] * max(1.0, want.abs().max().item())
        assert abs_err(got, want) <= tol, f"{name}: {abs_err(got, want):.3g} > {tol:.3g}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float16_stores_round_like_torch(layout):
    """With weight 0 the output is the float32 bias rounded to float16 by the kernels' own
    conversion: it must match torch's rounding bit for bit, for subnormals, ties to even, the
    largest finite values, overflow to inf, and NaN. (No -0.0: 0 * x + -0.0 is +0.0 when x > 0,
    which is arithmetic, not rounding.)"""
    ext_or_skip()
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
    ext_or_skip()
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.float16)
    x = torch.stack([v, torch.zeros_like(v)], dim=-1).reshape(1, -1, 2)  # (1, 65536, 2)
    y, _, mean, _ = cpu.forward(Call(x, None, None, None, None, None, x.shape[1], False, 0.0, ""))
    want = v.float() / 2
    finite = torch.isfinite(v)
    torch.testing.assert_close(mean.flatten()[finite], want[finite], rtol=0, atol=0)
    assert torch.isnan(mean.flatten()[~finite]).all()
