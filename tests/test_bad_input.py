"""Bad-input matrix: every wrong call fails early, with the right exception and a useful message.

Each case names the call, the exception type, and a regex that must match the message. The
regex looks for words that name the problem *and* words that name the fix, so a message like
"invalid argument" would fail. No case may reach a kernel: the device-mismatch cases use the
'meta' device, where a kernel call would fail with a different error or silently produce
garbage, and the empty/odd-shape cases at the end check that valid-but-odd inputs give torch's
answer instead of crashing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import (
    BatchNorm,
    GroupNorm,
    GroupNormAct,
    InstanceNorm,
    LayerNorm,
    batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    normalize,
)


def x4(*shape: int, **kw) -> torch.Tensor:
    return torch.randn(*(shape or (2, 4, 3)), **kw)


def _load(module: torch.nn.Module, source: torch.nn.Module):
    return module.load_state_dict(source.state_dict())


def _corrupt_running_mean(bn: BatchNorm) -> BatchNorm:
    bn.running_mean = torch.zeros(3)
    return bn


META = "meta"

# (case id, call, exception type, regex on the message)
CASES = [
    # --- input: type, dtype, rank, channels ---
    (
        "input-not-tensor",
        lambda: group_norm([[1.0, 2.0]], 1),
        TypeError,
        r"torch\.Tensor.*as_tensor",
    ),
    (
        "input-int-dtype",
        lambda: group_norm(torch.ones(2, 4, dtype=torch.int64), 2),
        TypeError,
        r"torch\.int64.*float16, bfloat16, float32 or float64.*\.float\(\)",
    ),
    (
        "input-bool-dtype",
        lambda: layer_norm(torch.ones(2, 4, dtype=torch.bool)),
        TypeError,
        r"torch\.bool.*convert",
    ),
    (
        "input-complex-dtype",
        lambda: instance_norm(torch.ones(2, 4, dtype=torch.complex64)),
        TypeError,
        r"complex64.*\.float\(\)",
    ),
    (
        "input-rank-0",
        lambda: group_norm(torch.tensor(1.0), 1),
        ValueError,
        r"\(N, C, \*\).*at least 2.*unsqueeze\(0\)",
    ),
    (
        "input-rank-1",
        lambda: normalize(torch.randn(4), "layer"),
        ValueError,
        r"at least 2 dimensions.*\(4,\).*unsqueeze",
    ),
    (
        "input-zero-channels",
        lambda: normalize(torch.randn(2, 0, 3), "batch"),
        ValueError,
        r"no channels.*size 0 in dim 1.*C >= 1",
    ),
    (
        "module-input-not-tensor",
        lambda: GroupNorm(2, 4)([[1.0]]),
        TypeError,
        r"torch\.Tensor.*as_tensor",
    ),
    (
        "module-input-rank-1",
        lambda: GroupNorm(2, 4)(torch.randn(4)),
        ValueError,
        r"at least 2 dimensions.*unsqueeze",
    ),
    (
        "module-input-int",
        lambda: BatchNorm(4)(torch.ones(3, 4, dtype=torch.int32)),
        TypeError,
        r"int32.*\.float\(\)",
    ),
    # --- group counts ---
    ("groups-zero", lambda: group_norm(x4(), 0), ValueError, r"positive.*got 0.*choose.*1, 2, 4"),
    ("groups-negative", lambda: group_norm(x4(), -2), ValueError, r"positive.*-2.*1, 2, 4"),
    (
        "groups-more-than-channels",
        lambda: group_norm(x4(), 8),
        ValueError,
        r"\(8\) cannot exceed num_channels \(4\).*choose num_groups from 1, 2, 4",
    ),
    (
        "groups-not-divisor",
        lambda: group_norm(x4(2, 6), 4),
        ValueError,
        r"\(6\) must be divisible by num_groups \(4\).*group_size.*1, 2, 3, 6",
    ),
    (
        "group-size-not-divisor",
        lambda: GroupNorm(None, 6, group_size=4),
        ValueError,
        r"group_size \(4\).*divisor.*\(6\).*1, 2, 3, 6",
    ),
    (
        "group-size-zero",
        lambda: group_norm(x4(), None, group_size=0),
        ValueError,
        r"group_size \(0\).*positive divisor.*choose group_size",
    ),
    (
        "groups-and-group-size",
        lambda: group_norm(x4(), 2, group_size=2),
        ValueError,
        r"exactly one of num_groups or group_size \(got both\)",
    ),
    (
        "groups-neither",
        lambda: GroupNorm(None, 4),
        ValueError,
        r"exactly one of num_groups or group_size \(got neither\).*e\.g\.",
    ),
    ("groups-bool", lambda: group_norm(x4(), True), TypeError, r"num_groups must be an int.*bool"),
    (
        "groups-float",
        lambda: GroupNorm(2.0, 4),
        TypeError,
        r"num_groups must be an int, got float 2\.0.*int\(",
    ),
    (
        "group-size-float",
        lambda: group_norm(x4(), None, group_size=2.0),
        TypeError,
        r"group_size must be an int.*int\(",
    ),
    (
        "groups-for-batch-mode",
        lambda: normalize(x4(), "batch", num_groups=2),
        ValueError,
        r"num_groups/group_size apply to mode='group' only",
    ),
    (
        "num-channels-zero",
        lambda: GroupNorm(1, 0),
        ValueError,
        r"num_channels must be positive.*dim 1.*got 0",
    ),
    ("num-channels-float", lambda: LayerNorm(4.0), TypeError, r"num_channels must be an int"),
    ("num-features-bool", lambda: BatchNorm(True), TypeError, r"num_features must be an int.*bool"),
    # --- eps ---
    (
        "eps-negative",
        lambda: group_norm(x4(), 2, eps=-1e-5),
        ValueError,
        r"eps must be a finite number >= 0.*1e-5.*-1e-05",
    ),
    ("eps-nan", lambda: layer_norm(x4(), eps=float("nan")), ValueError, r"eps.*finite.*nan"),
    ("eps-inf-module", lambda: GroupNorm(2, 4, eps=float("inf")), ValueError, r"eps.*finite.*inf"),
    (
        "eps-str",
        lambda: group_norm(x4(), 2, eps="1e-5"),
        TypeError,
        r"eps must be a float such as 1e-5, got str",
    ),
    ("eps-bool", lambda: BatchNorm(4, eps=True), TypeError, r"eps must be a float.*bool"),
    # --- weight / bias ---
    (
        "weight-wrong-shape",
        lambda: group_norm(x4(), 2, torch.ones(3)),
        ValueError,
        r"weight must have shape \(4,\) to match.*4 channels, got shape \(3,\)",
    ),
    (
        "weight-2d",
        lambda: group_norm(x4(), 2, torch.ones(4, 1)),
        ValueError,
        r"weight must have shape \(4,\).*\(4, 1\)",
    ),
    (
        "bias-wrong-shape",
        lambda: layer_norm(x4(), bias=torch.zeros(5)),
        ValueError,
        r"bias must have shape \(4,\).*\(5,\)",
    ),
    (
        "weight-int-dtype",
        lambda: group_norm(x4(), 2, torch.ones(4, dtype=torch.int32)),
        TypeError,
        r"weight has dtype torch\.int32.*must be torch\.float32.*\.to\(",
    ),
    (
        "weight-float64-input-float32",
        lambda: group_norm(x4(), 2, torch.ones(4).double()),
        TypeError,
        r"float64 but the input is torch\.float32.*\.to\(torch\.float32\)",
    ),
    (
        "bias-float16-input-float32",
        lambda: group_norm(x4(), 2, None, torch.zeros(4).half()),
        TypeError,
        r"bias has dtype torch\.float16.*\.to\(",
    ),
    (
        "weight-not-tensor",
        lambda: group_norm(x4(), 2, [1.0, 1.0, 1.0, 1.0]),
        TypeError,
        r"weight must be a torch\.Tensor or None, got list.*torch\.tensor",
    ),
    (
        "weight-on-meta",
        lambda: group_norm(x4(), 2, torch.ones(4, device=META)),
        ValueError,
        r"weight is on meta but the input is on cpu; move both to one device",
    ),
    (
        "bias-on-meta",
        lambda: instance_norm(x4(), bias=torch.zeros(4, device=META)),
        ValueError,
        r"bias is on meta but the input is on cpu; move both",
    ),
    (
        "input-on-meta-weight-cpu",
        lambda: group_norm(x4(device=META), 2, torch.ones(4)),
        ValueError,
        r"weight is on cpu but the input is on meta; move both",
    ),
    (
        "module-on-meta-input-cpu",
        lambda: GroupNorm(2, 4, device=META)(x4()),
        ValueError,
        r"weight is on meta but the input is on cpu; move both",
    ),
    (
        "module-dtype-mismatch",
        lambda: GroupNorm(2, 4)(x4().double()),
        TypeError,
        r"weight has dtype torch\.float32 but the input is torch\.float64.*\.to\(",
    ),
    # --- residual ---
    (
        "residual-wrong-shape",
        lambda: group_norm(x4(), 2, residual=x4(1, 4, 3)),
        ValueError,
        r"residual must have the input's shape \(2, 4, 3\), got \(1, 4, 3\).*expand",
    ),
    (
        "residual-wrong-dtype",
        lambda: group_norm(x4(), 2, residual=x4().double()),
        TypeError,
        r"residual has dtype torch\.float64 but the input is torch\.float32; convert",
    ),
    (
        "residual-on-meta",
        lambda: layer_norm(x4(), residual=x4(device=META)),
        ValueError,
        r"residual is on meta but the input is on cpu; move both",
    ),
    (
        "residual-not-tensor",
        lambda: layer_norm(x4(), residual=1.0),
        TypeError,
        r"residual must be a torch\.Tensor or None, got float.*as_tensor",
    ),
    (
        "module-residual-wrong-shape",
        lambda: GroupNormAct(2, 4)(x4(), x4(2, 4)),
        ValueError,
        r"residual must have the input's shape",
    ),
    (
        "return-sum-without-residual",
        lambda: group_norm(x4(), 2, return_sum=True),
        ValueError,
        r"return_sum=True needs a residual.*pass residual=.*or drop return_sum",
    ),
    # --- running statistics / batch norm ---
    (
        "running-mean-only",
        lambda: batch_norm(x4(), torch.zeros(4), None, training=True),
        ValueError,
        r"pass both running_mean and running_var, or neither",
    ),
    (
        "running-var-only",
        lambda: batch_norm(x4(), None, torch.ones(4), training=False),
        ValueError,
        r"pass both running_mean and running_var, or neither",
    ),
    (
        "running-stats-wrong-shape",
        lambda: batch_norm(x4(), torch.zeros(3), torch.ones(3), training=True),
        ValueError,
        r"running_mean must have shape \(4,\).*got shape \(3,\)",
    ),
    (
        "running-stats-int-dtype",
        lambda: batch_norm(x4(), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)),
        TypeError,
        r"running_mean must be a floating-point tensor.*int64.*\.float\(\)",
    ),
    (
        "running-stats-on-meta",
        lambda: batch_norm(x4(), torch.zeros(4, device=META), torch.ones(4, device=META)),
        ValueError,
        r"running_mean is on meta but the input is on cpu; move both",
    ),
    (
        "module-running-stats-corrupted",
        lambda: _corrupt_running_mean(BatchNorm(4))(x4()),
        ValueError,
        r"running_mean must have shape \(4,\).*\(3,\)",
    ),
    (
        "bn-eval-without-stats",
        lambda: batch_norm(x4(), None, None, training=False),
        ValueError,
        r"training=False needs running_mean and running_var; pass them, or training=True",
    ),
    (
        "bn-train-one-value-per-channel",
        lambda: batch_norm(x4(1, 4), None, None, training=True),
        ValueError,
        r"more than 1 value per channel.*\(1, 4\).*larger batch, eval mode, or group",
    ),
    (
        "bn-module-one-value-per-channel",
        lambda: BatchNorm(4)(x4(1, 4, 1, 1)),
        ValueError,
        r"more than 1 value per channel.*larger batch",
    ),
    (
        "bn-no-stats-tracking-one-value",
        lambda: BatchNorm(4, track_running_stats=False).eval()(x4(1, 4)),
        ValueError,
        r"more than 1 value per channel",
    ),
    (
        "running-stats-for-group-mode",
        lambda: normalize(
            x4(), "group", num_groups=2, running_mean=torch.zeros(4), running_var=torch.ones(4)
        ),
        ValueError,
        r"running_mean/running_var/training apply to mode='batch' only",
    ),
    (
        "training-false-for-layer-mode",
        lambda: normalize(x4(), "layer", training=False),
        ValueError,
        r"apply to mode='batch' only.*never use batch statistics",
    ),
    (
        "training-not-bool",
        lambda: batch_norm(x4(), None, None, training="yes"),
        TypeError,
        r"training must be True or False, got str.*bool\(",
    ),
    (
        "momentum-above-1",
        lambda: batch_norm(x4(), torch.zeros(4), torch.ones(4), training=True, momentum=1.5),
        ValueError,
        r"momentum must be in \[0, 1\].*0\.1.*1\.5",
    ),
    (
        "momentum-negative-module",
        lambda: BatchNorm(4, momentum=-0.1),
        ValueError,
        r"momentum must be in \[0, 1\].*-0\.1",
    ),
    (
        "momentum-nan-module",
        lambda: BatchNorm(4, momentum=float("nan")),
        ValueError,
        r"momentum must be in \[0, 1\].*nan",
    ),
    (
        "momentum-str",
        lambda: BatchNorm(4, momentum="0.1"),
        TypeError,
        r"momentum must be a float in \[0, 1\] or None, got str",
    ),
    (
        "momentum-none-functional",
        lambda: batch_norm(x4(), torch.zeros(4), torch.ones(4), training=True, momentum=None),
        ValueError,
        r"momentum=None.*groupnorm\.BatchNorm\(momentum=None\).*momentum in \[0, 1\]",
    ),
    # --- names: mode, activation, backend ---
    (
        "mode-unknown",
        lambda: normalize(x4(), "weight"),
        ValueError,
        r"unknown normalization mode 'weight'; choose one of 'batch'.*'group'",
    ),
    ("mode-none", lambda: normalize(x4(), None), ValueError, r"unknown normalization mode None"),
    (
        "activation-unknown",
        lambda: layer_norm(x4(), activation="tanh"),
        ValueError,
        r"unknown activation 'tanh'; choose one of None, 'silu', 'gelu', 'relu'",
    ),
    (
        "activation-unknown-module",
        lambda: GroupNormAct(2, 4, activation="mish"),
        ValueError,
        r"unknown activation 'mish'; choose",
    ),
    (
        "activation-unknown-bn",
        lambda: BatchNorm(4, activation=1),
        ValueError,
        r"unknown activation 1; choose",
    ),
    (
        "backend-unknown",
        lambda: group_norm(x4(), 2, backend="cuda"),
        ValueError,
        r"unknown backend 'cuda'; choose one of auto, cpu, portable, triton",
    ),
    # --- modules: wrong channel count, state_dicts of another size ---
    (
        "module-wrong-channels",
        lambda: GroupNorm(2, 4)(x4(2, 6, 3)),
        ValueError,
        r"expects 4 channels in dim 1.*\(2, 6, 3\).*num_channels=6",
    ),
    (
        "layernorm-wrong-channels",
        lambda: LayerNorm(4)(x4(2, 5)),
        ValueError,
        r"LayerNorm expects 4 channels.*num_channels=5",
    ),
    (
        "instancenorm-wrong-channels",
        lambda: InstanceNorm(4)(x4(2, 3, 3)),
        ValueError,
        r"InstanceNorm expects 4 channels.*num_channels=3",
    ),
    (
        "bn-module-wrong-channels",
        lambda: BatchNorm(4)(x4(2, 6, 3)),
        ValueError,
        r"BatchNorm expects 4 channels.*num_features=6",
    ),
    (
        "state-dict-wrong-size-gn",
        lambda: _load(GroupNorm(2, 4), torch.nn.GroupNorm(2, 8)),
        RuntimeError,
        r"size mismatch for weight[\s\S]*has 8 channels.*num_channels=8",
    ),
    (
        "state-dict-wrong-size-bn",
        lambda: _load(BatchNorm(4), torch.nn.BatchNorm2d(6)),
        RuntimeError,
        r"size mismatch for running_mean[\s\S]*num_features=6 to load",
    ),
    (
        "state-dict-wrong-size-act",
        lambda: _load(GroupNormAct(2, 4), GroupNormAct(3, 6)),
        RuntimeError,
        r"size mismatch[\s\S]*GroupNormAct has num_channels=4; build it with num_channels=6",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises_helpful_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_case_count_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


# --- odd but valid inputs: torch's answer, no crash ---------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "portable"])
@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        ("group", (0, 4, 3)),
        ("batch", (0, 4, 3)),
        ("group", (2, 4, 0)),
        ("instance", (3, 4, 0, 5)),
    ],
)
def test_empty_input_gives_empty_output_and_gradients(backend, mode, shape):
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    kw = {"num_groups": 2} if mode == "group" else {}
    y = normalize(x, mode, weight=w, bias=b, backend=backend, **kw)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    # No element contributes, so the parameter gradients are exactly zero, as in torch.
    assert torch.equal(w.grad, torch.zeros(4)) and torch.equal(b.grad, torch.zeros(4))


def test_empty_batch_matches_torch_modules():
    x = torch.randn(0, 4, 5, 5)
    assert GroupNorm(2, 4)(x).shape == torch.nn.GroupNorm(2, 4)(x).shape
    bn = BatchNorm(4)
    before = bn.running_mean.clone()
    assert bn(x).shape == x.shape
    # An empty batch carries no statistics: the running mean must not move (no NaN written).
    assert torch.equal(bn.running_mean, before)


def test_meta_device_runs_shape_only():
    x = torch.randn(2, 6, 5, 5, device=META)
    w = torch.ones(6, device=META)
    y = group_norm(x, 3, w, w)
    assert y.device.type == META and y.shape == x.shape


def test_numpy_integer_group_count_accepted_like_torch():
    m = GroupNorm(np.int64(2), 4)
    assert m.num_groups == 2 and type(m.num_groups) is int
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(group_norm(x, np.int32(2)), F.group_norm(x, 2))


def test_high_rank_input_works():
    x = torch.randn(2, 4, 2, 3, 2, 3)  # rank 6
    ref = groupnorm.reference_norm(x, "group", num_groups=2).output
    torch.testing.assert_close(group_norm(x, 2).double(), ref, atol=1e-5, rtol=1e-5)


def test_bn_eval_with_one_value_per_channel_is_fine():
    bn = BatchNorm(4).eval()
    x = torch.randn(1, 4)
    torch.testing.assert_close(bn(x), torch.nn.BatchNorm1d(4).eval()(x))


def test_load_state_dict_of_right_size_still_loads():
    src = torch.nn.GroupNorm(2, 4)
    torch.nn.init.normal_(src.weight)
    m = GroupNorm(2, 4)
    m.load_state_dict(src.state_dict())
    assert torch.equal(m.weight, src.weight)
