"""Gradients over the whole grid, against the float64 reference.

Every functional (group, layer, instance, batch norm in training and at inference) x weight
and bias present or None x dtype x layout x route, first-order gradients and gradients of
gradients (``create_graph=True``), each compared with the same computation in float64 through
``groupnorm.reference_norm`` (torch operations, its own autograd) on fresh random data.

Routes: ``cpu`` (the C++ extension's autograd nodes for float32/bfloat16/float16 in dense
layouts, torch's kernels otherwise), ``portable`` (torch operations), and ``op`` (the
``groupnorm::forward`` custom op and its registered autograd, which a tensor subclass, a mode,
a tracer or a compiler sees; entered here through a torch-function mode that changes nothing).
The Triton kernels have their own grid in ``test_gradients_triton.py``.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL, FUSED_NAMES, abs_err, full_path_calls, kernel_data, make_input

import groupnorm
from groupnorm import functional as gf

FUNCTIONALS = ["group", "layer", "instance", "batch", "batch_eval"]
AFFINES = ["weight_bias", "weight", "bias", "none"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
ROUTES = ["cpu", "portable", "op"]
SHAPE = (2, 4, 3, 3)


class _Watching(torch.overrides.TorchFunctionMode):
    """A torch-function mode that changes nothing: calls under it take the custom op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _stats(c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g, dtype=torch.float64), (
        torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    )


def call(name, x, w, b, route, stats=None, **kw):
    """Our functional ``name`` on x with the given params and route."""
    backend = "cpu" if route == "op" else route
    if name == "group":
        f = lambda: groupnorm.group_norm(x, 2, w, b, backend=backend, **kw)  # noqa: E731
    elif name == "layer":
        f = lambda: groupnorm.layer_norm(x, weight=w, bias=b, backend=backend, **kw)  # noqa: E731
    elif name == "instance":
        f = lambda: groupnorm.instance_norm(  # noqa: E731
            x, weight=w, bias=b, backend=backend, **kw
        )
    elif name == "batch":
        f = lambda: groupnorm.batch_norm(x, None, None, w, b, True, backend=backend, **kw)  # noqa: E731
    else:
        rm, rv = stats
        f = lambda: groupnorm.batch_norm(x, rm, rv, w, b, False, backend=backend, **kw)  # noqa: E731
    if route == "op":
        with _Watching():
            return f()
    return f()


def reference(name, x, w, b, stats=None, **kw):
    """The same call in float64 (torch operations, differentiable to any order)."""
    modes = {
        "group": dict(mode="group", num_groups=2),
        "layer": dict(mode="layer"),
        "instance": dict(mode="instance"),
        "batch": dict(mode="batch"),
    }
    if name == "batch_eval":
        rm, rv = stats
        mode = dict(mode="batch", training=False, running_mean=rm.double(), running_var=rv.double())
    else:
        mode = modes[name]
    return groupnorm.reference_norm(x, weight=w, bias=b, **mode, **kw).output


def _leaves(x, w, b, r, dy):
    return [t for t in (x, w, b, r, dy) if t is not None]


def _data(name, affine, dtype, layout, seed, residual=False):
    x = make_input(SHAPE, dtype, layout, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    c = SHAPE[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    w = w if affine in ("weight_bias", "weight") else None
    b = b if affine in ("weight_bias", "bias") else None
    r = make_input(SHAPE, dtype, layout, seed=seed + 2, scale=1.0, shift=0.0) if residual else None
    dy = make_input(SHAPE, dtype, "contiguous", seed=seed + 3, scale=1.0, shift=0.0)
    stats = None
    if name == "batch_eval":  # float32 running statistics (what a module keeps)
        stats = tuple(s.float() for s in _stats(c, seed + 4))
    return x, w, b, r, dy, stats


def _bound(got, want, dtype, scale):
    mag = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    return ATOL[dtype] * mag * scale


def _check(got_list, want_list, names, dtype, scale, what):
    for name, got, want in zip(names, got_list, want_list, strict=True):
        if want is None:
            assert got is None or got.abs().max().item() == 0, f"{what} {name}: spurious"
            continue
        assert got is not None, f"{what} {name}: missing"
        assert got.dtype == dtype or name == "dy", f"{what} {name}: dtype {got.dtype}"
        assert got.shape == want.shape
        assert torch.isfinite(got).all(), f"{what} {name}: not finite"
        err = (got.double() - want).abs().max().item()
        bound = _bound(got, want, dtype, scale)
        assert err <= bound, f"{what} d{name} ({dtype}): error {err:.3e} > {bound:.3e}"


def _first_and_second(fn, x, w, b, r, dy, second):
    """y, the gradients of <y, dy> w.r.t. the leaves, and with ``second`` the same gradients
    again under create_graph=True and the gradients of a penalty on those: sum_i <g_i, v_i>, v
    fixed random (so every term is exercised)."""
    leaves = _leaves(x, w, b, r, dy if second else None)
    for t in leaves:
        t.requires_grad_(True)
    y = fn(x, w, b, r)
    inputs = _leaves(x, w, b, r, None)
    grads = torch.autograd.grad(y, inputs, dy, retain_graph=second)
    if not second:
        return y, grads, None
    # the ordinary backward (the backend's kernels) above; now again with create_graph
    graph_grads = torch.autograd.grad(y, inputs, dy, create_graph=True)
    for plain, graph in zip(grads, graph_grads, strict=True):
        assert graph.requires_grad or not plain.any()
    gen = torch.Generator().manual_seed(99)
    penalty = sum(
        (g.double() * torch.randn(g.shape, generator=gen, dtype=torch.float64)).sum()
        for g in graph_grads
    )
    grads = (*grads, *graph_grads)
    hess = torch.autograd.grad(penalty, leaves, allow_unused=True)
    return y, grads, hess


def _compare(name, affine, dtype, layout, route, second, activation=None, residual=False):
    key = f"{name}/{affine}/{dtype}/{layout}/{route}/{activation}/{residual}"
    seed = zlib.crc32(key.encode()) % 10_000  # (one fixed seed per case)
    x, w, b, r, dy, stats = _data(name, affine, dtype, layout, seed, residual)
    kw = {"activation": activation, "residual": r} if (activation or residual) else {}

    def ours(x_, w_, b_, r_):
        extra = dict(kw)
        if residual:
            extra["residual"] = r_
        return call(name, x_, w_, b_, route, stats, **extra)

    def ref(x_, w_, b_, r_):
        extra = dict(kw)
        if residual:
            extra["residual"] = r_
        return reference(name, x_, w_, b_, stats, **extra)

    def f64(t):
        return None if t is None else t.detach().double()

    y, grads, hess = _first_and_second(ours, x, w, b, r, dy, second)
    y64, grads64, hess64 = _first_and_second(ref, f64(x), f64(w), f64(b), f64(r), f64(dy), second)
    names = [n for n, t in zip("x w b r".split(), (x, w, b, r), strict=True) if t is not None]
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride() or layout == "strided"
    _check([y.detach()], [y64.detach()], ["y"], dtype, 1.0, "output")
    if second:  # (the ordinary gradients, then those computed with create_graph=True)
        names = names + [f"{n} (create_graph)" for n in names]
    _check(grads, grads64, names, dtype, 4.0, "gradient")
    if second:
        # second order: each term went through one more rounding to dtype (the first gradient)
        names = names[: len(names) // 2] + ["dy"]
        _check(hess, hess64, names, dtype, 16.0, "second-order gradient")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("name", FUNCTIONALS)
def test_backward(name, affine, dtype, layout, route):
    """Every weight/bias combination, dtype, layout and route: gradients equal float64's."""
    _compare(name, affine, dtype, layout, route, second=False)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("name", FUNCTIONALS)
def test_double_backward(name, affine, dtype, layout, route):
    """create_graph=True: the gradients carry a graph, and its gradients equal float64's."""
    _compare(name, affine, dtype, layout, route, second=True)


# (activation, residual) but the plain (None, False), which test_double_backward covers
FUSED = [(a, r) for a in (*FUSED_NAMES, None) for r in (False, True) if a or r]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "activation,residual", FUSED, ids=[f"{a}-{'res' if r else 'nores'}" for a, r in FUSED]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", FUNCTIONALS)
def test_double_backward_with_activation_and_residual(name, dtype, activation, residual, route):
    """The fused activation and the residual sum inside the second-order graph."""
    _compare(name, "weight_bias", dtype, "channels_last", route, True, activation, residual)


# gradgradcheck: float64, numerical against analytical second derivatives (including those
# w.r.t. the incoming gradient), on a small input: every weight/bias combination plain, and
# the activations and the residual with both params.
GG_CASES = [(name, affine, None, False) for name in FUNCTIONALS for affine in AFFINES] + [
    (name, "weight_bias", act, res)
    for name, (act, res) in itertools.product(FUNCTIONALS, [("silu", True), ("gelu", False)])
]
GG_SHAPE = (2, 4, 2, 2)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,affine,activation,residual", GG_CASES)
def test_gradgradcheck(name, affine, activation, residual, route):
    x, w, b, r, _, stats = _data(name, affine, torch.float64, "channels_last", 5, residual)
    x = x[:, :, :2, :2].contiguous(memory_format=torch.channels_last)
    r = None if r is None else r[:, :, :2, :2].contiguous(memory_format=torch.channels_last)
    assert x.shape == GG_SHAPE
    if stats is not None:
        stats = tuple(s.double() for s in stats)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    kinds = [k for k, t in zip("xwbr", (x, w, b, r), strict=True) if t is not None]

    def fn(*ts):
        got = dict(zip(kinds, ts, strict=True))
        kw = {"activation": activation} if activation else {}
        if "r" in got:
            kw["residual"] = got["r"]
        return call(name, got["x"], got.get("w"), got.get("b"), route, stats, **kw)

    assert torch.autograd.gradgradcheck(fn, leaves, atol=1e-6, rtol=1e-5, fast_mode=True)


# ---- modules: a gradient penalty, as in WGAN-GP, against torch.nn in float64 ---------------

MODULES = {
    "GroupNorm": (lambda: groupnorm.GroupNorm(2, 4), lambda: torch.nn.GroupNorm(2, 4)),
    "GroupNorm-no-affine": (
        lambda: groupnorm.GroupNorm(2, 4, affine=False),
        lambda: torch.nn.GroupNorm(2, 4, affine=False),
    ),
    "GroupNormAct": (
        lambda: groupnorm.GroupNormAct(2, 4, activation="silu"),
        lambda: torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU()),
    ),
    "LayerNorm": (lambda: groupnorm.LayerNorm(4), lambda: torch.nn.GroupNorm(1, 4)),
    "InstanceNorm": (lambda: groupnorm.InstanceNorm(4), lambda: torch.nn.GroupNorm(4, 4)),
    "BatchNorm": (lambda: groupnorm.BatchNorm(4), lambda: torch.nn.BatchNorm2d(4)),
    "BatchNorm-eval": (
        lambda: groupnorm.BatchNorm(4).eval(),
        lambda: torch.nn.BatchNorm2d(4).eval(),
    ),
    "BatchNorm-relu": (
        lambda: groupnorm.BatchNorm(4, activation="relu"),
        lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU()),
    ),
}


def _penalty_grads(module, x):
    """The gradient penalty ((|dy/dx| - 1)^2) and its gradients w.r.t. x and the params."""
    x = x.detach().requires_grad_()
    y = module(x)
    (g,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
    loss = (g.flatten(1).norm(dim=1) - 1).square().mean()
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, [x, *params], allow_unused=True)


@pytest.mark.parametrize("backend", ["auto", "portable"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("module", list(MODULES))
def test_gradient_penalty_through_modules(module, dtype, layout, backend, monkeypatch):
    """Each module's gradient penalty equals torch.nn's computed in float64."""
    monkeypatch.setenv("GROUPNORM_BACKEND", backend)
    make_ours, make_theirs = MODULES[module]
    ours, theirs = make_ours(), make_theirs()
    gen = torch.Generator().manual_seed(3)
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters(), strict=True):
        value = torch.rand(p_ours.shape, generator=gen, dtype=torch.float64) + 0.5
        p_ours.data.copy_(value)
        p_theirs.data.copy_(value)
    for buf_ours, buf_theirs in zip(ours.buffers(), theirs.buffers(), strict=True):
        if buf_ours.is_floating_point():  # (running statistics)
            value = torch.rand(buf_ours.shape, generator=gen, dtype=torch.float64) + 0.5
            buf_ours.copy_(value)
            buf_theirs.copy_(value)
    x = make_input(SHAPE, torch.float64, layout, seed=8)
    want = _penalty_grads(theirs.double(), x)
    got = _penalty_grads(ours.to(dtype), x.to(dtype))
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a is not None or b is None or not b.any(), f"{module} gradient {i}: missing"
        if a is not None:
            b = torch.zeros_like(a, dtype=torch.float64) if b is None else b  # (not in graph)
            err = (a.double() - b).abs().max().item()
            bound = ATOL[dtype] * 16 * max(b.abs().max().item(), 1.0)
            assert err <= bound, f"{module} gradient {i}: {err:.3e} > {bound:.3e}"


def test_torch_func_hessian_and_grad_of_grad():
    """torch.func transforms nest: the Hessian and grad(grad) equal torch's."""
    x = make_input((1, 4, 2, 2), torch.float64, seed=4)
    w = torch.rand(4, dtype=torch.float64) + 0.5

    def ours(t):
        return groupnorm.group_norm(t, 2, w, None, activation="silu").square().sum()

    def theirs(t):
        return F.silu(F.group_norm(t, 2, w, None)).square().sum()

    torch.testing.assert_close(torch.func.hessian(ours)(x), torch.func.hessian(theirs)(x))
    gg = torch.func.grad(lambda t: torch.func.grad(ours)(t).sin().sum())(x)
    torch.testing.assert_close(
        gg, torch.func.grad(lambda t: torch.func.grad(theirs)(t).sin().sum())(x)
    )


def test_ordinary_backward_keeps_the_fused_node():
    """Without create_graph the extension's node runs its kernels: the gradient carries no
    graph; with create_graph it does."""
    from groupnorm.kernels import cpu_ext

    if cpu_ext.extension() is None:
        pytest.skip(f"extension unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    x = make_input(SHAPE, torch.float32, seed=2).requires_grad_()
    y = groupnorm.group_norm(x, 2)
    assert y.grad_fn.name() == "groupnorm::GroupNormBackward"
    (g,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
    assert not g.requires_grad
    (g2,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert g2.requires_grad
    torch.testing.assert_close(g, g2.detach(), atol=1e-5, rtol=1e-5)


# ---- the C++ node's gradients and forward-mode AD ----------------------------------------------


@pytest.mark.parametrize("params", ["weight", "bias", "both", "none"])
@pytest.mark.parametrize("needs", [(1, 1, 1), (0, 1, 1), (1, 0, 1), (0, 0, 1), (1, 1, 0)])
def test_fast_path_gradients_for_each_set_of_inputs_that_need_them(
    params, needs, fast_path, monkeypatch
):
    """Every mix of present params and inputs that require grad (an absent weight moves the
    bias to the C++ node's second input edge), with SiLU, against float64."""
    x, _, dy, w, b = kernel_data((2, 6, 4, 4), torch.float32, "contiguous", 12)
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
    missed = full_path_calls(monkeypatch)
    y = gf.group_norm(*got_in[:1], 3, *got_in[1:], activation="silu")
    assert missed == []
    want = groupnorm.reference_norm(
        ref_in[0], "group", num_groups=3, weight=ref_in[1], bias=ref_in[2], activation="silu"
    ).output
    got = torch.autograd.grad(y, [got_in[i] for i in wanted], dy)
    ref = torch.autograd.grad(want, [ref_in[i] for i in wanted], dy.double())
    assert abs_err(y, want) < 1e-5
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        assert abs_err(g, r) < 1e-4 * max(1.0, r.abs().max().item())


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
