"""The route of a call (groupnorm/dispatch.py): each context reaches the implementation meant
for it and gives the numbers of the others; the package's imports point downwards only."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import groupnorm
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
