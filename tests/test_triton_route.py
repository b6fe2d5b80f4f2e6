"""The Triton backend's host path: plan cache, settings read once, compiled-launcher handles,
launch counts, the eager autograd entry, ``prefers_triton`` and the triton_op registration.

Kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here if unset).
The direct (compiled-launcher) path cannot run without a GPU: its choice is checked on real
kernel objects, and its calls with a stand-in compiled kernel that records its arguments.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import groupnorm.kernels.triton as backend  # noqa: E402
from groupnorm import reference_norm  # noqa: E402
from groupnorm.kernels import Call, GradCall  # noqa: E402
from groupnorm.kernels.triton import handle, launch, library, settings  # noqa: E402
from groupnorm.kernels.triton import kernels as tk  # noqa: E402
from groupnorm.kernels.triton.plan import TritonConfig  # noqa: E402

if not isinstance(tk._fwd_fused_kernel, InterpretedFunction):
    pytest.skip("these tests run the kernels in Triton's interpreter", allow_module_level=True)


@pytest.fixture(autouse=True)
def _settings_restored(monkeypatch):
    yield
    monkeypatch.undo()
    settings.reload_config()


def _setenv(monkeypatch, values: dict) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings.reload_config()


def _inputs(shape, groups, seed=0, dtype=torch.float32, residual=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.3 + 0.4).to(dtype)
    c = shape[1]
    w = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1).to(dtype)
    b = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    r = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if residual else None
    return x, w, b, r


# ---------------------------------------------------------------------------------------------
# Settings read once
# ---------------------------------------------------------------------------------------------


def test_settings_are_read_once_and_reloaded_on_request(monkeypatch):
    first = settings.settings()
    monkeypatch.setenv("GROUPNORM_TRITON_BLOCK", "32")
    assert settings.settings() is first  # not re-read on the next call
    assert settings.settings().config.block != 32
    assert settings.reload_config().config.block == 32
    assert settings.settings().config.block == 32
    monkeypatch.setenv("GROUPNORM_TRITON_LAUNCH", "fast")
    with pytest.raises(ValueError, match="GROUPNORM_TRITON_LAUNCH"):
        settings.reload_config()
    monkeypatch.setenv("GROUPNORM_TRITON_LAUNCH", "jit")
    monkeypatch.setenv("GROUPNORM_AUTO_TRITON_MIN_NUMEL", "lots")
    with pytest.raises(ValueError, match="GROUPNORM_AUTO_TRITON_MIN_NUMEL"):
        settings.reload_config()


# ---------------------------------------------------------------------------------------------
# Plan cache
# ---------------------------------------------------------------------------------------------


def test_a_repeated_call_is_a_cache_hit_without_planning(monkeypatch):
    _setenv(monkeypatch, {"GROUPNORM_TRITON_BLOCK": "16"})
    x, w, b, _ = _inputs((2, 6, 3, 5), 3)
    y1 = launch.launch_forward(Call(x, w, b, None, None, None, 3, False, 1e-5, "silu"))[0]
    assert len(launch._forward_plans) == 1
    (plan,) = launch._forward_plans.values()

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again on a cache hit")

    monkeypatch.setattr(launch, "plan_for", no_planning)
    monkeypatch.setattr(launch, "check_device", no_planning)
    x2 = x + 1.0  # new data, same key
    y2 = launch.launch_forward(Call(x2, w, b, None, None, None, 3, False, 1e-5, "silu"))[0]
    assert list(launch._forward_plans.values()) == [plan]
    ref = reference_norm(x2, "group", num_groups=3, weight=w, bias=b, activation="silu").output
    torch.testing.assert_close(y2.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y1, y2)
    # A new key (strides, activation, eps is not part of it) plans again.
    monkeypatch.undo()
    _setenv(monkeypatch, {"GROUPNORM_TRITON_BLOCK": "16"})
    launch.launch_forward(Call(x, w, b, None, None, None, 3, False, 1e-5, "silu"))
    launch.launch_forward(Call(x, w, b, None, None, None, 3, False, 0.1, "silu"))
    assert len(launch._forward_plans) == 1
    xcl = x.contiguous(memory_format=torch.channels_last)
    launch.launch_forward(Call(xcl, w, b, None, None, None, 3, False, 1e-5, "silu"))
    launch.launch_forward(Call(x, w, b, None, None, None, 3, False, 1e-5, "gelu"))
    assert len(launch._forward_plans) == 3


def test_reload_config_drops_plans_and_applies_new_settings(monkeypatch):
    _setenv(monkeypatch, {"GROUPNORM_TRITON_BLOCK": "16"})
    x, w, b, _ = _inputs((2, 6, 3, 5), 3)
    launch.launch_forward(Call(x, w, b, None, None, None, 3, False, 1e-5, ""))
    assert next(iter(launch._forward_plans.values())).path == "fused"
    _setenv(monkeypatch, {"GROUPNORM_TRITON_PATH": "split", "GROUPNORM_TRITON_BLOCK": "16"})
    assert not launch._forward_plans
    launch.launch_forward(Call(x, w, b, None, None, None, 3, False, 1e-5, ""))
    assert next(iter(launch._forward_plans.values())).path == "split"


def test_eps_reaches_the_kernel_on_a_cache_hit():
    x, w, b, _ = _inputs((2, 4, 3, 3), 2)
    cfg = TritonConfig(block=16)
    for eps in (1e-5, 0.5):
        y, _, _, rstd = launch.launch_forward(
            Call(x, w, b, None, None, None, 2, False, eps, ""), cfg
        )
        ref = reference_norm(x, "group", num_groups=2, weight=w, bias=b, eps=eps)
        torch.testing.assert_close(rstd.double(), ref.rstd, rtol=1e-5, atol=0)
        torch.testing.assert_close(y.double(), ref.output, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Launch counts: split forward 2, split backward 3
# ---------------------------------------------------------------------------------------------


class _Counting:
    def __init__(self, fn, calls, name):
        self.fn, self.calls, self.name = fn, calls, name

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(self.name)
            return self.fn[grid](*args, **kwargs)

        return run


@pytest.mark.parametrize(
    "path, pool, given, forward_launches, backward_launches",
    [
        ("split", False, False, ["_fwd_partial_kernel", "_fwd_apply_kernel"], 3),
        ("split", True, False, ["_fwd_partial_kernel", "_fwd_apply_kernel"], 3),
        ("fused", False, False, ["_fwd_fused_kernel"], 2),
        ("split", True, True, ["_fwd_apply_kernel"], 3),
    ],
)
def test_launches_per_call(monkeypatch, path, pool, given, forward_launches, backward_launches):
    calls: list[str] = []
    for name in dir(tk):
        if name.endswith("_kernel"):
            monkeypatch.setattr(tk, name, _Counting(getattr(tk, name), calls, name))
    x, w, b, _ = _inputs((3, 4, 5, 3), 4)
    groups = 4 if pool else 2
    gm = torch.randn(4) if given else None
    gv = torch.rand(4) + 0.5 if given else None
    cfg = TritonConfig(path=path, block=8, split=2, poison=True)
    y, _, mean, rstd = launch.launch_forward(
        Call(x, w, b, None, gm, gv, groups, pool, 1e-5, "relu"), cfg
    )
    assert calls == forward_launches
    calls.clear()
    dy = torch.randn_like(x)
    grad = GradCall(dy, x, w, b, mean, rstd, groups, pool, given, "relu", (True, True, True))
    dx, dw, db = launch.launch_backward(grad, cfg)
    assert len(calls) == backward_launches, calls
    assert "_column_sum_kernel" in calls
    assert not any("finalize" in name for name in calls)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()


# ---------------------------------------------------------------------------------------------
# Compiled-launcher handles
# ---------------------------------------------------------------------------------------------


def test_interpreter_and_foreign_kernels_take_the_jit_path():
    assert "interpreter" in handle.direct_launch_declined(tk._fwd_fused_kernel, "direct", True)
    assert "jit" in handle.direct_launch_declined(tk._fwd_fused_kernel, "jit", False)
    assert "not a triton JITFunction" in handle.direct_launch_declined(object(), "direct", False)
    # The plans made under the interpreter launch through kernel[grid] only.
    x, w, b, _ = _inputs((2, 4, 3, 3), 2)
    launch.launch_forward(
        Call(x, w, b, None, None, None, 2, False, 1e-5, ""), TritonConfig(block=16)
    )
    plans = [p for pair in launch._explicit.values() for p in pair[0].values()]
    assert plans and all(p.main.direct is False for p in plans)


def test_compiled_kernels_of_this_triton_take_the_direct_path(monkeypatch):
    """A real JITFunction (the same kernel, not interpreted) with this Triton: accepted; with a
    Triton version outside the known range: declined."""
    real = JITFunction(tk._fwd_apply_kernel.fn)
    assert handle.direct_launch_declined(real, "direct", False) is None
    monkeypatch.setattr(triton, "__version__", "9.1.0")
    assert "not known" in handle.direct_launch_declined(real, "direct", False)


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _FakeCompiled:
    def __init__(self, log, fail=False):
        self.function, self.packed_metadata, self.log, self.fail = "FN", "META", log, fail

    def run(self, *args):
        if self.fail:
            raise TypeError("launcher takes different arguments")
        self.log.append(("direct", args))


class _FakeJit:
    """Stands in for a JITFunction: params (X, n, BLOCK: constexpr, ACT: constexpr)."""

    params = [_Param("X", False), _Param("n", False), _Param("BLOCK", True), _Param("ACT", True)]

    def __init__(self, log, compiled_cls=_FakeCompiled, fail=False):
        self.log, self.compiled_cls, self.fail = log, compiled_cls, fail

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return self.compiled_cls(self.log, self.fail)

        return run


def _fake_launch(log, **kw):
    fake = _FakeJit(log, **kw)
    return handle.Launch(
        fake,
        (5, 2),
        {"ACT": 3, "BLOCK": 16, "num_warps": 4},
        direct=True,
        stream=lambda: "STREAM",
        hooks_installed=lambda: False,
    )


def test_direct_path_calls_the_compiled_launcher_with_every_argument():
    log: list = []
    run = _fake_launch(log)
    t = torch.empty(8)
    run(t, 7)
    assert log == [("jit", (5, 2, 1), (t, 7), {"ACT": 3, "BLOCK": 16, "num_warps": 4})]
    log.clear()
    run(t, 7)
    # grid, stream, function, metadata, no launch metadata or hooks, then the arguments and
    # the constexprs in parameter order (BLOCK before ACT), as JITFunction.run passes them.
    assert log == [("direct", (5, 2, 1, "STREAM", "FN", "META", None, None, None, t, 7, 16, 3))]


def test_direct_path_recompiles_for_a_new_alignment_and_yields_to_hooks():
    log: list = []
    run = _fake_launch(log)
    base = torch.empty(64)
    aligned, offset = base[:8], base[1:9]  # 4-byte offset: another Triton specialization
    run(aligned, 7)
    run(offset, 7)
    run(offset, 7)
    run(aligned, 7)
    assert [entry[0] for entry in log] == ["jit", "jit", "direct", "direct"]
    assert log[2][1][9] is offset and log[3][1][9] is aligned
    log.clear()
    run._hooks = lambda: True  # a profiler's launch hooks: the JIT path runs them
    run(aligned, 7)
    assert [entry[0] for entry in log] == ["jit"]


def test_direct_path_is_given_up_when_internals_differ():
    log: list = []

    class NoLauncher:  # a compiled kernel without the attributes the direct call needs
        def __init__(self, *args):
            pass

    run = _fake_launch(log, compiled_cls=NoLauncher)
    t = torch.empty(8)
    run(t, 7)
    run(t, 7)
    assert [entry[0] for entry in log] == ["jit", "jit"] and run.direct is False
    log.clear()
    run = _fake_launch(log, fail=True)  # a launcher that rejects the arguments
    run(t, 7)
    run(t, 7)  # direct attempt raises TypeError before launching: falls back, once
    run(t, 7)
    assert [entry[0] for entry in log] == ["jit", "jit", "jit"] and run.direct is False


# ---------------------------------------------------------------------------------------------
# eager: the backend's own autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, groups, pool, act, residual, given, env",
    [
        ((2, 6, 5, 7), 3, False, "silu", True, False, {"GROUPNORM_TRITON_PATH": "split"}),
        ((2, 6, 4, 4), 3, False, "gelu", False, False, {}),
        ((3, 4, 3, 5), 4, True, "relu", True, False, {}),
        ((3, 4, 3, 5), 4, True, "silu", False, True, {}),
    ],
)
def test_eager_forward_and_gradients(monkeypatch, shape, groups, pool, act, residual, given, env):
    _setenv(monkeypatch, {"GROUPNORM_TRITON_BLOCK": "16", "GROUPNORM_TRITON_SPLIT": "2", **env})
    x, w, b, r = _inputs(shape, groups, seed=len(shape) + groups, residual=residual)
    c = shape[1]
    gm = torch.randn(c) * 0.3 if given else None
    gv = torch.rand(c) + 0.5 if given else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    y, total, mean, rstd = backend.eager(Call(*leaves, gm, gv, groups, pool, 1e-5, act))
    assert not mean.requires_grad and not rstd.requires_grad
    dy = torch.randn_like(x)
    loss = (y * dy).sum() + (total.sum() * 0.5 if residual else 0.0)
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, inputs)

    mode = "batch" if pool else "group"
    kw = {} if pool else {"num_groups": groups}
    if given:
        kw.update(running_mean=gm, running_var=gv, training=False)
    ref_leaves = [t.double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    ref = reference_norm(
        ref_leaves[0],
        mode,
        weight=ref_leaves[1],
        bias=ref_leaves[2],
        residual=ref_leaves[3],
        activation=act,
        eps=1e-5,
        **kw,
    )
    ref_loss = (ref.output * dy.double()).sum()
    if residual:
        ref_loss = ref_loss + ref.sum.sum() * 0.5
    want = torch.autograd.grad(ref_loss, [t for t in ref_leaves if t is not None])
    torch.testing.assert_close(y.double(), ref.output, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)


def test_eager_without_grad_is_the_launcher_alone():
    x, w, b, _ = _inputs((2, 4, 3, 3), 2)
    w.requires_grad_()
    with torch.no_grad():
        y, _, _, _ = backend.eager(Call(x, w, b, None, None, None, 2, False, 1e-5, ""))
    assert y.grad_fn is None
    y, _, _, _ = backend.eager(Call(x, w.detach(), b, None, None, None, 2, False, 1e-5, ""))
    assert y.grad_fn is None
    y, _, _, _ = backend.eager(Call(x, w, b, None, None, None, 2, False, 1e-5, ""))
    assert type(y.grad_fn).__name__ == "TritonNormBackward"


# ---------------------------------------------------------------------------------------------
# backend="auto": the size threshold
# ---------------------------------------------------------------------------------------------


def test_prefers_triton_threshold_and_override(monkeypatch):
    small, big = torch.empty(2, 32, 4, 4), torch.empty(0)
    default = settings.DEFAULT_AUTO_MIN_NUMEL
    assert not backend.prefers_triton(small, 32, False)
    meta_big = torch.empty(default, device="meta")
    meta_below = torch.empty(default - 1, device="meta")
    assert backend.prefers_triton(meta_big.view(1, 1, -1), 1, False)
    assert not backend.prefers_triton(meta_below.view(1, 1, -1), 1, False)
    _setenv(monkeypatch, {"GROUPNORM_AUTO_TRITON_MIN_NUMEL": "512"})
    assert backend.prefers_triton(small, 32, False)
    assert not backend.prefers_triton(big, 1, False)  # empty tensors never
    assert not backend.prefers_triton(torch.empty(2, 32, 2, 2), 32, False)


# ---------------------------------------------------------------------------------------------
# torch.compile: the triton_op registration
# ---------------------------------------------------------------------------------------------


def test_triton_ops_are_registered_and_the_op_call_declines_under_the_interpreter():
    assert library.register()
    schema = str(torch.ops.groupnorm.triton_forward.default._schema)
    assert "float eps" in schema and "str activation" in schema
    assert str(torch.ops.groupnorm.triton_backward.default._schema).count("Tensor") >= 6
    x, w, b, _ = _inputs((2, 4, 3, 3), 2)
    # The interpreter's kernels cannot run on fake tensors: the caller keeps the opaque op.
    assert backend.call_triton_op(Call(x, w, b, None, None, None, 2, False, 1e-5, "")) is None


@pytest.mark.parametrize("residual", [False, True])
def test_triton_op_bodies_match_the_launchers(monkeypatch, residual):
    """The ops run eagerly (wrap_triton launches the interpreted kernels): same outputs as the
    launchers and gradients through the registered autograd and the backward op."""
    _setenv(monkeypatch, {"GROUPNORM_TRITON_BLOCK": "16", "GROUPNORM_TRITON_PATH": "split"})
    assert library.register()
    x, w, b, r = _inputs((2, 6, 4, 3), 3, seed=4, residual=residual)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    y, total, mean, rstd = torch.ops.groupnorm.triton_forward(
        *leaves, None, None, 3, False, 1e-5, "silu"
    )
    want = launch.launch_forward(Call(x, w, b, r, None, None, 3, False, 1e-5, "silu"))
    torch.testing.assert_close(y, want[0], rtol=0, atol=0)
    torch.testing.assert_close(mean, want[2], rtol=0, atol=0)
    dy = torch.randn_like(x)
    grads = torch.autograd.grad((y * dy).sum(), [t for t in leaves if t is not None])
    saved = want[1] if residual else x
    dx, dw, db = launch.launch_backward(
        GradCall(dy, saved, w, b, want[2], want[3], 3, False, False, "silu", (True, True, True))
    )
    torch.testing.assert_close(grads[0], dx, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], dw, rtol=0, atol=0)
    torch.testing.assert_close(grads[2], db, rtol=0, atol=0)
    if residual:
        torch.testing.assert_close(grads[3], dx, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The benchmarks' CPU-side parts
# ---------------------------------------------------------------------------------------------


def _load(name):
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_help_and_auto_provider(capsys):
    bench = _load("bench_triton_gpu")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--providers" in capsys.readouterr().out
    assert "groupnorm-auto" in bench.PROVIDERS and "torch" in bench.PROVIDERS
    lines = bench.summary(
        [
            dict(provider="groupnorm-auto", mode="full", metric="speedup_vs_torch", value=v)
            for v in ("0.5", "2", "1")
        ]
    )
    assert lines[1] == "groupnorm-auto full: min 0.5x, median 1x over 3 cases"


def test_host_benchmark_measures_every_case_with_launches_stubbed():
    bench = _load("bench_triton_host")
    rows = bench.measure(calls=20, rounds=1)
    assert len(rows) == 9
    for row in rows:
        assert 0 < row["to_first_launch_us"] <= row["whole_call_us"], row
    # The stub is removed afterwards: a real launch runs again.
    x, w, b, _ = _inputs((2, 4, 3, 3), 2)
    y = launch.launch_forward(Call(x, w, b, None, None, None, 2, False, 1e-5, ""))[0]
    ref = reference_norm(x, "group", num_groups=2, weight=w, bias=b).output
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
