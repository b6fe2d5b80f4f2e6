"""The route of a call (groupnorm/dispatch.py): each context reaches the implementation meant
for it and gives the numbers of the others; the package's imports point downwards only."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import (
    KERNEL_ATOL,
    abs_err,
    ext_or_skip,
    full_path_calls,
    kernel_data,
    to_layout,
    value_and_grads,
)

import groupnorm
from groupnorm import functional as gf
from groupnorm import ops
from groupnorm.kernels import cpu, cpu_ext, portable
from groupnorm.kernels.running import update_running_stats

SRC = pathlib.Path(groupnorm.__file__).parent


def _data(seed=0, shape=(2, 8, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 1
    w, b = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    return x, w, b


def _counter(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, name, counting)
    return calls


def _reference(x, w, b, activation=""):
    return groupnorm.reference_norm(
        x.double(), "group", num_groups=4, weight=w.double(), bias=b.double(),
        activation=activation,
    ).output  # fmt: skip


def test_plain_eager_cpu_call_is_taken_by_the_extension(monkeypatch):
    if cpu_ext.extension() is None:
        pytest.skip(f"extension unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    fast = _counter(monkeypatch, cpu, "whole_call")
    op = _counter(monkeypatch, ops, "forward_op")
    x, w, b = _data()
    m = groupnorm.GroupNormAct(4, 8, activation="silu")
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        y_nograd = m(x)
    xg = x.clone().requires_grad_()
    y = m(xg)
    y.sum().backward()
    assert fast == [True, True] and op == []
    assert torch.equal(y.detach(), y_nograd)
    torch.testing.assert_close(y.double(), _reference(x, w, b, "silu"), atol=1e-5, rtol=1e-5)
    assert xg.grad is not None and m.weight.grad is not None


def test_a_residual_takes_the_backend_eager_entry(monkeypatch):
    eager = _counter(monkeypatch, cpu, "eager")
    op = _counter(monkeypatch, ops, "forward_op")
    x, w, b = _data(1)
    r = torch.randn_like(x)
    y, total = groupnorm.group_norm(x, 4, w, b, residual=r, return_sum=True)
    assert eager == [True] and op == []
    assert torch.equal(total, x + r)
    torch.testing.assert_close(y.double(), _reference(x + r, w, b), atol=1e-5, rtol=1e-5)


def test_compile_takes_the_custom_op(monkeypatch):
    seen = []

    def record(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    x, w, b = _data(2)
    eager = groupnorm.group_norm(x, 4, w, b)
    f = torch.compile(lambda t: groupnorm.group_norm(t, 4, w, b), backend=record, fullgraph=True)
    torch.testing.assert_close(f(x), eager, atol=1e-6, rtol=1e-6)
    assert any("groupnorm.forward" in t for t in seen)


def test_tensor_subclass_takes_the_custom_op(monkeypatch):
    class Tagged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    op = _counter(monkeypatch, ops, "forward_op")
    x, w, b = _data(3)
    y = groupnorm.group_norm(x.as_subclass(Tagged), 4, w, b)
    assert op == [True]
    torch.testing.assert_close(y.as_subclass(torch.Tensor), groupnorm.group_norm(x, 4, w, b))


def test_forward_mode_ad_takes_the_portable_core(monkeypatch):
    port = _counter(monkeypatch, portable, "forward")
    x, w, b = _data(4)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        y = groupnorm.group_norm(fwAD.make_dual(x, tangent), 4, w, b, activation="gelu")
        jvp = fwAD.unpack_dual(y).tangent
    assert port == [True]
    want = torch.func.jvp(
        lambda t: torch.nn.functional.gelu(torch.nn.functional.group_norm(t, 4, w, b)),
        (x,), (tangent,),
    )[1]  # fmt: skip
    torch.testing.assert_close(jvp, want, atol=1e-4, rtol=1e-4)


def test_export_takes_the_decomposed_form():
    m = groupnorm.BatchNorm(8, activation="relu").eval()
    ep = torch.export.export(m, (_data(5)[0],))
    assert not any("groupnorm" in str(n.target) for n in ep.graph.nodes)


class _Watching(torch.overrides.TorchFunctionMode):
    """A function mode that changes nothing: calls under it take the recorded op's route."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("installed", [True, False], ids=["triton", "no-triton"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (2, 32, 4, 4)], ids=["small", "large"])
def test_auto_takes_one_backend_on_every_route(monkeypatch, request, installed, shape):
    """backend="auto" on a CUDA tensor (CPU tensors that say they are on CUDA): the plain eager
    route, the op recorded under tracing and that op's own implementation take the same
    backend: Triton from GROUPNORM_AUTO_TRITON_MIN_NUMEL elements up where Triton is
    installed, torch's kernels otherwise."""
    from groupnorm import kernels
    from groupnorm.kernels import aten
    from groupnorm.kernels import triton as triton_backend
    from groupnorm.kernels.triton import settings

    settings.reload_config({"GROUPNORM_AUTO_TRITON_MIN_NUMEL": "512"})
    request.addfinalizer(settings.reload_config)
    monkeypatch.setattr(triton_backend, "INSTALLED", installed)
    chosen = {}

    def taking(route, name):
        def entry(call):
            chosen.setdefault(route, []).append(name)
            return portable.forward(call)

        return entry

    for module, name in ((aten, "aten"), (triton_backend, "triton")):
        monkeypatch.setattr(module, "eager", taking("eager", name))
        monkeypatch.setattr(module, "forward", taking("op", name))
    real_record = ops.record

    def record(call, backend):
        chosen.setdefault("traced", []).append(backend)
        return real_record(call, backend)

    monkeypatch.setattr(ops, "record", record)
    x = torch.randn(shape)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        m.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
        want = kernels.decide("auto", x, 2, False)
        groupnorm.group_norm(x, 2)
        with _Watching():
            groupnorm.group_norm(x, 2)
        ops.forward_op(x, None, None, None, None, None, 2, False, 1e-5, "", "auto")
    assert want == ("triton" if installed and x.numel() >= 512 else "aten")
    assert chosen == {"eager": [want], "traced": [want], "op": [want, want]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_running_update_twins_give_the_same_bits(dtype):
    """The C++ update and its torch form (used by export, the custom op and the other
    backends) round the same way."""
    if cpu_ext.extension() is None:
        pytest.skip(f"extension unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    g = torch.Generator().manual_seed(7)
    for momentum in (0.1, 0.5, 1.0 / 3.0):
        rm = torch.randn(53, generator=g).to(dtype)
        rv = (torch.rand(53, generator=g) + 0.1).to(dtype)
        mean, rstd = torch.randn(53, generator=g), torch.rand(53, generator=g) * 4 + 0.05
        a_m, a_v, b_m, b_v = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        update_running_stats(a_m, a_v, mean, rstd, 1e-5, momentum, 37, native=True)
        update_running_stats(b_m, b_v, mean, rstd, 1e-5, momentum, 37)
        assert torch.equal(a_m, b_m) and torch.equal(a_v, b_v)
        assert not torch.equal(a_m, rm)


def test_batch_norm_routes_agree_on_running_statistics():
    """The extension's call, the backend eager entry (a zero residual) and the export form
    update the running statistics alike."""
    x, w, b = _data(6, (4, 8, 3, 3))
    outs = []
    for residual in (None, torch.zeros_like(x)):
        rm, rv = torch.zeros(8), torch.ones(8)
        y = groupnorm.batch_norm(x, rm, rv, w, b, training=True, residual=residual)
        outs.append((y, rm, rv))
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0][2], outs[1][2], atol=0, rtol=0)
    want = torch.nn.BatchNorm2d(8)
    want(x)
    torch.testing.assert_close(outs[0][1], want.running_mean)
    torch.testing.assert_close(outs[0][2], want.running_var)


def test_module_spec_follows_attribute_changes():
    x = _data(8)[0]
    m = groupnorm.GroupNorm(4, 8)
    m(x)
    m.num_groups = 2
    m.eps = 1e-3
    torch.testing.assert_close(m(x), torch.nn.functional.group_norm(x, 2, eps=1e-3),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="divisible"):
        m.num_groups = 3
        m(x)


def test_single_element_sets_warn_once_in_training():
    m = groupnorm.InstanceNorm(6)
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="single value"):
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once per module
        m.eval()(x)
        groupnorm.GroupNorm(3, 6)(x)  # two values per set: fine


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize(
    "shape", [(0, 3, 4, 4), (1, 3, 4, 4), (5, 3, 2, 2)], ids=["empty", "one-sample", "small"]
)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_module_matches_torch_on_odd_inputs(shape, momentum, track, affine):
    ours = groupnorm.BatchNorm(3, momentum=momentum, track_running_stats=track, affine=affine)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum, track_running_stats=track, affine=affine)
    x = torch.randn(shape) + 2
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5, equal_nan=True)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for k in ours_state:
        torch.testing.assert_close(ours_state[k], theirs_state[k], equal_nan=True)
    ours.eval(), theirs.eval()
    if shape[0]:
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def _imports(path: pathlib.Path) -> set[str]:
    """The groupnorm modules ``path`` imports at module level (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + "." + "__init__"
    base = package.split(".")[:-1]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("groupnorm"):
                names = [f"{mod}.{a.name}" for a in node.names]
                out.update(n if _module_exists(n) else mod for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("groupnorm"))
    return out


def _module_exists(name: str) -> bool:
    rel = pathlib.Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        graph[name] = {m.removesuffix(".__init__") for m in _imports(path)} - {name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            pytest.fail("import cycle: " + " -> ".join([*trail, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt != "groupnorm" and not trail[-1:] == [nxt]:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_layers_import_downwards_only():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("groupnorm.kernels"):
            upward = {d for d in deps if not d.startswith("groupnorm.kernels")}
            assert not upward, f"{name} imports the layers above it: {sorted(upward)}"
    assert not {d for d in graph["groupnorm.modules"] if d.startswith("groupnorm.kernels.")}, (
        "modules.py reaches into kernels/"
    )


# ---- the eager fast road (dispatch.run -> kernels/cpu.whole_call -> the C++ extension) -------


def test_eager_path_matches_custom_op():
    """The dispatcher-free eager path and the registered op give the same values and grads."""
    from groupnorm.ops import forward_op

    x, res, dy, w, b = kernel_data((2, 6, 4, 4), torch.float64, "contiguous", 7)
    args = (None, None, 3, False, 1e-5, "silu", "auto")
    out1, g1 = value_and_grads(
        lambda a, ww, bb, r: gf.group_norm(a, 3, ww, bb, activation="silu", residual=r),
        dy,
        x,
        w,
        b,
        res,
    )
    out2, g2 = value_and_grads(
        lambda a, ww, bb, r: forward_op(a, ww, bb, r, *args)[0], dy, x, w, b, res
    )
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fast_path_gives_the_ops_results_bit_for_bit(dtype, fast_path, monkeypatch):
    """No-grad and autograd fast paths against the registered custom op (the full path), with
    weight and bias in x's dtype (as in a model moved to float16): the gradients come back in
    that dtype too."""
    from groupnorm.ops import forward_op

    missed = full_path_calls(monkeypatch)
    x, _, dy, w, b = kernel_data((2, 12, 5, 7), dtype, "channels_last", 21)
    for act in ("", "silu"):
        op_args = (None, None, None, 4, False, 1e-5, act, "auto")

        def fast(a, ww, bb, act=act):
            return gf.group_norm(a, 4, ww, bb, activation=act)

        def op(a, ww, bb, op_args=op_args):
            return forward_op(a, ww, bb, *op_args)[0]

        with torch.no_grad():
            assert torch.equal(fast(x, w, b), op(x, w, b))
        out1, g1 = value_and_grads(fast, dy, x, w, b)
        out2, g2 = value_and_grads(op, dy, x, w, b)
        assert torch.equal(out1, out2)
        for a, c in zip(g1, g2, strict=True):
            assert a.dtype == dtype
            assert torch.equal(a, c)
    assert missed == []  # every call above took the fast path


def test_fast_path_is_taken_only_where_it_applies(monkeypatch, fast_path):
    calls = []
    real = cpu.whole_call

    def counting(*args):
        y = real(*args)
        calls.extend([] if y is None else [1])
        return y

    monkeypatch.setattr(cpu, "whole_call", counting)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_fast_path_with_low_precision_module(dtype, layout, monkeypatch, fast_path):
    """A BatchNorm moved to bfloat16/float16 (params and running statistics in that dtype)
    takes the fast path, in training with and without grad and in eval; it agrees with the
    full path bit for bit (outputs and running statistics; a zero residual sends a call there)
    and with torch's BatchNorm2d in the same dtype (gradients too, in the params' dtype)."""
    ext_or_skip()
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
    missed = full_path_calls(monkeypatch)
    for step in range(2):
        x = to_layout(torch.randn(4, 6, 5, 7, generator=gen) * (step + 1) + 3.0, layout).to(dtype)
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
        dy = to_layout(torch.randn(y.shape, generator=gen), layout).to(dtype)
        got = torch.autograd.grad(y, [xg, ours.weight, ours.bias], dy)
        theirs_g = torch.autograd.grad(t, [xt, theirs.weight, theirs.bias], dy)
        leaves = [p.detach().double().requires_grad_() for p in (x, ours.weight, ours.bias)]
        ref = groupnorm.reference_norm(
            leaves[0], "batch", weight=leaves[1], bias=leaves[2]
        ).output  # (torch's low-precision BN rounds its statistics: float64 is the judge)
        want = torch.autograd.grad(ref, leaves, dy.double())
        for g, th, wt in zip(got, theirs_g, want, strict=True):
            assert g.dtype == dtype
            assert abs_err(g, wt) <= 2 * abs_err(th, wt) + KERNEL_ATOL[dtype] * max(
                1.0, wt.abs().max().item()
            )
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
