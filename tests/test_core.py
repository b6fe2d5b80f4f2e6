"""The one core against the float64 reference: every mode, rank, layout, dtype and CPU backend."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    FUSED_NAMES,
    assert_close,
    dx_magnitude,
    make_input,
    params,
    reference_with_grads,
    torch_counterpart,
)

import groupnorm

MODES = ["batch", "layer", "instance", "group"]
BACKENDS = ["cpu", "portable"]
SHAPES = {2: (6, 12), 3: (3, 12, 7), 4: (2, 12, 5, 3), 5: (2, 12, 3, 2, 3)}


def _layouts(rank):
    return ["contiguous", "strided"] + (["channels_last"] if rank in (4, 5) else [])


CASES = [
    (mode, rank, layout, dtype, backend)
    for mode, rank, dtype, backend in itertools.product(MODES, SHAPES, DTYPES, BACKENDS)
    for layout in _layouts(rank)
    # Instance norm of (N, C) has one element per set: x - mean is pure rounding error, scaled by
    # 1/sqrt(eps), for every implementation. test_single_element_sets covers that case.
    if not (mode == "instance" and rank == 2)
]


def _kw(mode):
    return {"num_groups": 4} if mode == "group" else {}


@pytest.mark.parametrize(
    "mode,rank,layout,dtype,backend",
    CASES,
    ids=[f"{m}-{r}d-{lay}-{str(d)[6:]}-{b}" for m, r, lay, d, b in CASES],
)
def test_matches_reference(mode, rank, layout, dtype, backend):
    shape = SHAPES[rank]
    x = make_input(shape, dtype, layout, seed=rank)
    # Low-precision input takes float32 affine parameters (mixed precision) half the time.
    pdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) and rank % 2 else dtype
    w, b = params(shape[1], pdtype)
    dy = make_input(shape, dtype, "contiguous", seed=99)

    xg = x.detach().requires_grad_(True)
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = groupnorm.normalize(xg, mode, weight=wg, bias=bg, backend=backend, **_kw(mode))
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt), "output must keep channels-last"
    y.backward(dy)
    assert wg.grad.dtype == pdtype and bg.grad.dtype == pdtype

    ref, grads = reference_with_grads(x, mode, w, b, dy=dy, **_kw(mode))
    tref = torch_counterpart(x, mode, w, b, num_groups=_kw(mode).get("num_groups"))
    assert_close(y, ref, dtype, tref)
    # Gradient sums run over up to N*S elements: scale the slack with the set size.
    mag = dx_magnitude(x, mode, dy, w, **_kw(mode))
    assert_close(xg.grad, grads["x"], dtype, what="dx", scale=4, mag=mag)
    assert_close(wg.grad, grads["weight"], dtype, what="dweight", scale=8)
    assert_close(bg.grad, grads["bias"], dtype, what="dbias", scale=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_dtype_and_shape(dtype, backend):
    x = make_input((3, 8, 4, 4), dtype)
    y, total, mean, rstd = torch.ops.groupnorm.forward(
        x, None, None, None, None, None, 2, False, 1e-5, "", backend
    )
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == expected
    assert mean.shape == (3, 2) and total.numel() == 0
    ref = groupnorm.reference_norm(x, "group", num_groups=2)
    assert torch.allclose(
        mean.double(), ref.mean, atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    )
    assert torch.allclose(
        rstd.double(), ref.rstd, rtol=1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,groups",
    [
        ((2, 30, 7, 9), 5),  # odd sizes
        ((2, 30, 7, 9), 30),  # C/G = 1
        ((3, 7, 11), 1),  # G = 1, prime sizes
        ((1, 16, 4, 4), 8),  # N = 1
        ((4, 6), 3),  # rank 2: a group is C/G single values
        ((2, 4, 1, 1), 4),  # single-element groups
    ],
)
def test_odd_shapes_match_torch_and_reference(shape, groups, backend):
    x = make_input(shape, torch.float32)
    w, b = params(shape[1], torch.float32)
    y = groupnorm.group_norm(x, groups, w, b, backend=backend)
    ref = groupnorm.reference_norm(x, "group", num_groups=groups, weight=w, bias=b).output
    assert_close(y, ref, torch.float32, F.group_norm(x, groups, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_behaves_like_torch(mode, backend):
    x = torch.randn(0, 6, 4, 4, requires_grad=True)
    w, b = params(6, torch.float32)
    y = groupnorm.normalize(x, mode, weight=w, bias=b, backend=backend, **_kw_small(mode))
    expected = torch_counterpart(
        x.detach(), mode, w, b, num_groups=_kw_small(mode).get("num_groups")
    )
    assert y.shape == expected.shape == (0, 6, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape


def _kw_small(mode):
    return {"num_groups": 3} if mode == "group" else {}


def test_empty_batch_leaves_running_stats_alone():
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    groupnorm.batch_norm(torch.randn(0, 6, 3), rm, rv, training=True)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6), (4, 5, 3, 3), (2, 5, 2, 3, 2)])
def test_batch_norm_train_and_eval_match_torch(shape, backend):
    x = make_input(shape, torch.float32)
    w, b = params(shape[1], torch.float32)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    trm, trv = rm.clone(), rv.clone()
    for momentum in (0.1, 0.5):
        y = groupnorm.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5, backend=backend)
        ty = F.batch_norm(x, trm, trv, w, b, True, momentum, 1e-5)
        assert torch.allclose(y, ty, atol=1e-5)
        assert torch.allclose(rm, trm, atol=1e-6) and torch.allclose(rv, trv, atol=1e-5)
    y = groupnorm.batch_norm(x, rm, rv, w, b, False, backend=backend)
    assert torch.allclose(y, F.batch_norm(x, trm, trv, w, b, False), atol=1e-5)
    ref = groupnorm.reference_norm(
        x, "batch", weight=w, bias=b, running_mean=rm, running_var=rv, training=False
    ).output
    assert_close(y, ref, torch.float32)


@pytest.mark.parametrize(
    "module_cls", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d]
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_module_tracks_like_torch(module_cls, momentum):
    rank = {torch.nn.BatchNorm1d: 3, torch.nn.BatchNorm2d: 4, torch.nn.BatchNorm3d: 5}[module_cls]
    shape = SHAPES[rank][:1] + (5,) + SHAPES[rank][2:]
    theirs = module_cls(5, momentum=momentum)
    ours = groupnorm.BatchNorm(5, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = make_input(shape, torch.float32, seed=step)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    for key, value in theirs.state_dict().items():
        assert torch.allclose(ours.state_dict()[key].double(), value.double(), atol=1e-5), key
    ours.eval()
    theirs.eval()
    x = make_input(shape, torch.float32, seed=7)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    theirs.load_state_dict(ours.state_dict())  # and back


def test_batch_norm_without_running_stats_uses_batch_stats_in_eval():
    ours = groupnorm.BatchNorm(4, track_running_stats=False).eval()
    theirs = torch.nn.BatchNorm2d(4, track_running_stats=False).eval()
    x = make_input((3, 4, 2, 2), torch.float32)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    assert set(ours.state_dict()) == set(theirs.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_cases_of_group_norm(backend):
    x = make_input((3, 6, 5, 4), torch.float64)
    gn1 = groupnorm.group_norm(x, 1, backend=backend)
    gnc = groupnorm.group_norm(x, 6, backend=backend)
    assert torch.allclose(gn1, F.layer_norm(x, x.shape[1:]), atol=1e-12)
    assert torch.allclose(gn1, groupnorm.layer_norm(x, backend=backend), atol=1e-12)
    assert torch.allclose(gnc, F.instance_norm(x), atol=1e-12)
    assert torch.allclose(gnc, groupnorm.instance_norm(x, backend=backend), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_batch_independence(mode, backend):
    x = make_input((4, 6, 5, 5), torch.float32)
    y = groupnorm.normalize(x, mode, backend=backend, **_kw_small(mode))
    x2 = x.clone()
    x2[1:] = make_input((3, 6, 5, 5), torch.float32, seed=5, scale=7.0, shift=-3.0)
    y2 = groupnorm.normalize(x2, mode, backend=backend, **_kw_small(mode))
    if mode == "batch":
        assert (y[0] - y2[0]).abs().max() > 0.1, "BN must depend on the other samples"
    else:
        assert torch.equal(y[0], y2[0]), f"{mode} must not depend on the other samples"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", FUSED_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_and_residual_match_reference(activation, dtype, backend):
    shape = (2, 8, 4, 3)
    x, r = make_input(shape, dtype, seed=1), make_input(shape, dtype, seed=2)
    w, b = params(8, dtype)
    dy, ds = make_input(shape, dtype, seed=3), make_input(shape, dtype, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    y, s = groupnorm.group_norm(
        leaves[0],
        2,
        leaves[2],
        leaves[3],
        activation=activation,
        residual=leaves[1],
        return_sum=True,
        backend=backend,
    )
    assert torch.equal(s, x + r)
    torch.autograd.backward([y, s], [dy, ds])
    ref, grads = reference_with_grads(
        x, "group", w, b, residual=r, dy=dy, num_groups=2, activation=activation
    )
    torch_y = getattr(F, activation)(F.group_norm(x + r, 2, w, b))
    assert_close(y, ref, dtype, torch_y)
    # The sum is returned as well, so its gradient flows into x and the residual too.
    assert_close(leaves[0].grad, grads["x"] + ds.double(), dtype, what="dx", scale=4)
    assert_close(leaves[1].grad, grads["residual"] + ds.double(), dtype, what="dres", scale=4)
    assert_close(leaves[2].grad, grads["weight"], dtype, what="dweight", scale=8)
    assert_close(leaves[3].grad, grads["bias"], dtype, what="dbias", scale=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", [None, *FUSED_NAMES])
def test_gradcheck(mode, activation, backend):
    shape = (3, 6, 4, 3)
    x = make_input(shape, torch.float64).requires_grad_(True)
    r = make_input(shape, torch.float64, seed=3).requires_grad_(True)
    w, b = (p.requires_grad_(True) for p in params(6, torch.float64))

    def fn(x, w, b, r):
        return groupnorm.normalize(
            x,
            mode,
            weight=w,
            bias=b,
            residual=r,
            activation=activation,
            backend=backend,
            **_kw_small(mode),
        )

    assert torch.autograd.gradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_batch_norm_eval(backend):
    x = make_input((3, 5, 4), torch.float64).requires_grad_(True)
    w, b = (p.requires_grad_(True) for p in params(5, torch.float64))
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return groupnorm.batch_norm(x, rm, rv, w, b, False, activation="silu", backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradients_only_where_asked():
    x = make_input((2, 4, 3), torch.float32).requires_grad_(True)
    w, b = params(4, torch.float32)
    groupnorm.group_norm(x, 2, w, b).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None
    w.requires_grad_(True)
    x2 = make_input((2, 4, 3), torch.float32)
    groupnorm.group_norm(x2, 2, w, b).sum().backward()
    assert w.grad is not None and b.grad is None


def test_backend_from_environment(monkeypatch):
    x = make_input((2, 4, 3), torch.float32)
    monkeypatch.setenv("GROUPNORM_BACKEND", "portable")
    y = groupnorm.group_norm(x, 2)
    monkeypatch.setenv("GROUPNORM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        groupnorm.group_norm(x, 2)
    monkeypatch.delenv("GROUPNORM_BACKEND")
    assert torch.allclose(y, groupnorm.group_norm(x, 2), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_element_sets(backend):
    # Each set holds one value: the normalized value is 0, so the output is beta (up to the
    # rounding of x - mean, amplified by 1/sqrt(eps)), as with torch.
    x = make_input((5, 6), torch.float32)
    w, b = params(6, torch.float32)
    y = groupnorm.instance_norm(x, weight=w, bias=b, backend=backend)
    assert torch.allclose(y, b.expand_as(y), atol=1e-3)
    assert torch.allclose(y, F.group_norm(x, 6, w, b), atol=1e-3)
