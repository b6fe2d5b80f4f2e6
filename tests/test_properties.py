"""Property-based tests: random calls of every kind agree with the float64 reference.

Hypothesis draws the rank (2-5), the shape, the group count (a divisor of C), the memory layout
(contiguous, channels-last, sliced, transposed, expanded with a zero stride) of the input and,
independently, of the incoming gradient, the dtype, the
mode, the activation, a residual, affine parameters (also float32 ones for half-precision input),
batch norm's running statistics, and the backend (cpu, portable). Each example checks the output
and every gradient against :func:`groupnorm.reference_norm` on the same values in float64.

Budgets (hypothesis profiles, chosen by environment variables):

* default ``ci``: 50 examples per test, derandomized (the same examples on every run), for
  ``make test``;
* ``GROUPNORM_FUZZ_EXAMPLES=N`` (``make fuzz``, N = 10000): N examples per test with fresh
  random seeds; the number of examples actually run is printed at the end.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import FUSED_NAMES, TORCH_ACT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupnorm import normalize, reference_norm

FUZZ_EXAMPLES = int(os.environ.get("GROUPNORM_FUZZ_EXAMPLES", "0") or 0)
settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=max(FUZZ_EXAMPLES, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
PROFILE = "fuzz" if FUZZ_EXAMPLES else "ci"

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Error allowed relative to the largest reference value of each compared tensor (plus that
# much absolute). Half precision: one output rounding (2^-11 / 2^-8), float16/bfloat16
# statistics in torch's native kernel (same again), and a few roundings in the gradient sums.
REL_TOL = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

EXAMPLES_RUN: dict[str, int] = {}


def _count(name: str) -> None:
    EXAMPLES_RUN[name] = EXAMPLES_RUN.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_example_count():
    yield
    total = sum(EXAMPLES_RUN.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(EXAMPLES_RUN.items()))
    print(f"\nhypothesis examples run: {total} ({detail}); profile {PROFILE}")


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    groups = draw(st.integers(1, 4))
    per_group = draw(st.integers(1, 4))
    c = groups * per_group
    n = draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 5)) for _ in range(rank - 2)]
    shape = (n, c, *spatial)
    mode = draw(st.sampled_from(["group", "layer", "instance", "batch"]))
    layouts = ["contiguous", "sliced", "transposed"]
    if rank in (4, 5):
        layouts.append("channels_last")
    if rank >= 3:
        layouts.append("expanded")
    batch_eval = mode == "batch" and draw(st.booleans())
    if mode == "batch" and not batch_eval and math.prod(shape) // c < 2:
        batch_eval = True  # training needs two values per channel
    dtype = draw(st.sampled_from(DTYPES))
    return {
        "shape": shape,
        "groups": groups,
        "mode": mode,
        "layout": draw(st.sampled_from(layouts)),
        "dtype": dtype,
        "activation": draw(st.sampled_from([None, *FUSED_NAMES])),
        "residual": draw(st.booleans()),
        "weight": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "float32_params": dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()),
        "batch_eval": batch_eval,
        "backend": draw(st.sampled_from(["cpu", "portable"])),
        "dy_layout": draw(st.sampled_from([x for x in layouts if x != "transposed"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_input(shape, layout, dtype, gen) -> torch.Tensor:
    """A tensor of ``shape`` with the requested strides, filled with fresh random values."""

    def rand(*size):  # drawn in float32, rounded once to the dtype under test
        return torch.randn(*size, generator=gen).to(dtype)

    if layout == "contiguous":
        return rand(*shape)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return rand(*shape).contiguous(memory_format=fmt)
    if layout == "sliced":  # every other element along the last dim, offset by one
        return rand(*shape[:-1], 2 * shape[-1] + 1)[..., 1::2]
    if layout == "transposed":  # stored as (C, N, ...) and viewed as (N, C, ...)
        return rand(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if layout == "expanded":  # last dim repeated through a zero stride
        return rand(*shape[:-1], 1).expand(shape)
    raise AssertionError(layout)


def _err(got, want) -> float:
    return (got.double() - want).abs().max().item() if want.numel() else 0.0


def _assert_close(got, want, dtype, what, scale=1.0, torch_err=0.0):
    """Error <= REL_TOL of the tensor's scale, or twice torch's own error, whichever is larger."""
    assert got.shape == want.shape, what
    scale = max(want.abs().max().item(), scale) if want.numel() else scale
    err = _err(got, want)
    bound = max(REL_TOL[dtype] * scale, 2 * torch_err)
    assert err <= bound, f"{what}: max error {err:.3g} at scale {scale:.3g} (torch {torch_err:.3g})"


def torch_equivalent(case, x, weight, bias, residual, stats):
    """The same computation from torch's own ops, in the input dtype (the error yardstick)."""
    src = x + residual if residual is not None else x
    if case["mode"] == "batch":
        mean, var = stats if stats is not None else (None, None)
        y = F.batch_norm(src, mean, var, weight, bias, training=stats is None)
    else:
        c = x.shape[1]
        groups = {"group": case["groups"], "layer": 1, "instance": c}[case["mode"]]
        # aten::group_norm: F.group_norm would refuse one sample with one value per group
        y = torch.group_norm(src, groups, weight, bias, 1e-5, False)
    return TORCH_ACT[case["activation"]](y)


def torch_errors(case, leaves, names, stats, dy, ref, ref_grads):
    """torch's error against the reference for the output and each gradient (0 if torch fails).

    torch's CPU group norm backward crashes on a bias without a weight ("tensor does not have
    a device", torch 2.13; our cpu backend routes that case to the portable core): then only
    the output has a yardstick.
    """
    theirs = {k: t.detach().requires_grad_() for k, t in leaves.items() if t is not None}
    try:
        y = torch_equivalent(
            case,
            theirs["x"],
            theirs.get("weight"),
            theirs.get("bias"),
            theirs.get("residual"),
            stats,
        )
    except (ValueError, RuntimeError):  # torch refuses the call (e.g. float64 input with
        # float32 running stats: "mixed dtype"): no yardstick, REL_TOL only
        return 0.0, [0.0] * len(names)
    try:
        grads = torch.autograd.grad(y, [theirs[k] for k in names], dy)
    except RuntimeError:  # torch's backward crashes: REL_TOL only for the gradients
        return _err(y, ref), [0.0] * len(names)
    return _err(y, ref), [_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]


@settings.get_profile(PROFILE)
@given(case=cases())
def test_forward_and_gradients_match_reference(case):
    _count("forward_and_gradients")
    gen = torch.Generator().manual_seed(case["seed"])
    shape, dtype, c = case["shape"], case["dtype"], case["shape"][1]
    x = make_input(shape, case["layout"], dtype, gen)
    param_dtype = torch.float32 if case["float32_params"] else dtype
    w = torch.randn(c, generator=gen).to(param_dtype) if case["weight"] else None
    b = torch.randn(c, generator=gen).to(param_dtype) if case["bias"] else None
    res = torch.randn(shape, generator=gen).to(dtype) if case["residual"] else None
    kw = {}
    if case["mode"] == "group":
        kw["num_groups"] = case["groups"]
    stats = None
    if case["batch_eval"]:
        stats = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5)
        kw.update(running_mean=stats[0], running_var=stats[1], training=False)
    # The incoming gradient has its own layout (a channels-last dy with a contiguous x, the
    # zero-stride dy of y.sum(), ...): torch's native backward kernels assume dy is laid out
    # like x, which once gave wrong gradients here.
    dy = make_input(shape, case["dy_layout"], dtype, gen)

    leaves = {"x": x, "weight": w, "bias": b, "residual": res}
    # detach() keeps each tensor's strides, so x reaches the op in the layout under test.
    ours = {k: t.detach().requires_grad_() for k, t in leaves.items() if t is not None}
    y = normalize(
        ours["x"],
        case["mode"],
        weight=ours.get("weight"),
        bias=ours.get("bias"),
        residual=ours.get("residual"),
        activation=case["activation"],
        backend=case["backend"],
        **kw,
    )
    assert y.shape == shape and y.dtype == dtype
    if case["layout"] == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)
    names = list(ours)
    grads = torch.autograd.grad(y, [ours[k] for k in names], dy)

    # The op normalizes x + residual as rounded to the input dtype (the sum it also returns,
    # as torch's composite would): the reference starts from that same sum. Starting from the
    # exact sum instead can flip a relu where the rounded and exact z straddle 0.
    src = x + res if res is not None else x
    ref_leaves = {
        k: t.detach().double().requires_grad_()
        for k, t in {"x": src, "weight": w, "bias": b}.items()
        if t is not None
    }
    result = reference_norm(
        ref_leaves["x"],
        case["mode"],
        weight=ref_leaves.get("weight"),
        bias=ref_leaves.get("bias"),
        activation=case["activation"],
        **kw,
    )
    ref = result.output
    wanted = [ref_leaves["x" if k == "residual" else k] for k in names]
    ref_grads = [g.clone() for g in torch.autograd.grad(ref, wanted, dy.double())]

    y_torch_err, grad_torch_errs = torch_errors(case, leaves, names, stats, dy, ref, ref_grads)
    _assert_close(y, ref, dtype, "output", torch_err=y_torch_err)
    # dx carries every rounding of x_hat times rstd: a set whose variance is below eps (a
    # single element, or values equal after rounding) has rstd up to 1/sqrt(eps) = 316, and so
    # does the absolute error of a float32 dx. Scale dx's tolerance by rstd.
    rstd = result.rstd.max().item() if result.rstd.numel() else 1.0
    for name, got, want, terr in zip(names, grads, ref_grads, grad_torch_errs, strict=True):
        assert got.dtype == leaves[name].dtype, name
        scale = max(rstd, 1.0) if name in ("x", "residual") else 1.0
        _assert_close(got, want, dtype, f"d{name}", scale, terr)


@settings.get_profile(PROFILE)
@given(
    rank=st.integers(2, 5),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    backend=st.sampled_from(["cpu", "portable"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_norm_module_is_a_drop_in_for_torch(rank, groups, per_group, dtype, backend, seed):
    """groupnorm.GroupNorm and torch.nn.GroupNorm with the same state give the same output."""
    _count("drop_in")
    import groupnorm

    gen = torch.Generator().manual_seed(seed)
    c = groups * per_group
    shape = (2, c, *[int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(rank - 2)])
    theirs = torch.nn.GroupNorm(groups, c).to(dtype)
    with torch.no_grad():
        theirs.weight.normal_(generator=gen)
        theirs.bias.normal_(generator=gen)
    ours = groupnorm.GroupNorm(groups, c).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, generator=gen).to(dtype)
    old = os.environ.get("GROUPNORM_BACKEND")
    os.environ["GROUPNORM_BACKEND"] = backend
    try:
        got = ours(x)
    finally:
        if old is None:
            del os.environ["GROUPNORM_BACKEND"]
        else:
            os.environ["GROUPNORM_BACKEND"] = old
    want = theirs(x)
    ref = reference_norm(x, "group", num_groups=groups, weight=theirs.weight, bias=theirs.bias)
    # Both within the dtype's tolerance of float64; ours no worse than twice torch's error.
    err = (got.double() - ref.output).abs().max().item()
    torch_err = (want.double() - ref.output).abs().max().item()
    scale = max(ref.output.abs().max().item(), 1.0)
    assert err <= 2 * torch_err + 0.1 * REL_TOL[dtype] * scale


@pytest.mark.parametrize("mode", ["group", "batch"])
@pytest.mark.parametrize("backend", ["cpu", "portable"])
def test_channels_last_input_with_contiguous_gradient(backend, mode):
    """A contiguous dy with a channels-last x: dx against float64 on both backends
    (native_group_norm_backward reads dy with x's strides, so the cpu backend must hand it dy in
    x's layout; native batch norm handles the mix, and is covered too)."""
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(2, 4, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 4, 6, 6, generator=gen)
    kw = {"num_groups": 2} if mode == "group" else {}
    leaf = x.detach().requires_grad_()
    (dx,) = torch.autograd.grad(normalize(leaf, mode, backend=backend, **kw), leaf, dy)
    ref_leaf = x.double().requires_grad_()
    ref = reference_norm(ref_leaf, mode, **kw).output
    (want,) = torch.autograd.grad(ref, ref_leaf, dy.double())
    assert (dx.double() - want).abs().max().item() < 1e-4
