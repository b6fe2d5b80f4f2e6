"""Bad inputs: each gets a clear error that says what to fix."""

from __future__ import annotations

import pytest
import torch

import groupnorm

X = torch.randn(2, 6, 4)
W = torch.ones(6)

CASES = [
    (
        "C not divisible",
        lambda: groupnorm.group_norm(X, 4),
        ValueError,
        r"must be divisible by num_groups \(4\).*1, 2, 3, 6",
    ),
    ("G zero", lambda: groupnorm.group_norm(X, 0), ValueError, r"positive.*1, 2, 3, 6"),
    ("G > C", lambda: groupnorm.group_norm(X, 12), ValueError, r"cannot exceed num_channels"),
    ("both", lambda: groupnorm.group_norm(X, 2, group_size=3), ValueError, "exactly one"),
    ("neither", lambda: groupnorm.group_norm(X, None), ValueError, "exactly one"),
    (
        "rank 1",
        lambda: groupnorm.group_norm(torch.randn(6), 2),
        ValueError,
        r"at least 2 dimensions.*unsqueeze",
    ),
    (
        "int input",
        lambda: groupnorm.group_norm(torch.ones(2, 6, dtype=torch.int64), 2),
        TypeError,
        r"int64.*float",
    ),
    (
        "bool input",
        lambda: groupnorm.normalize(torch.ones(2, 6, dtype=torch.bool), "layer"),
        TypeError,
        "bool",
    ),
    (
        "complex input",
        lambda: groupnorm.normalize(torch.ones(2, 6, dtype=torch.complex64), "layer"),
        TypeError,
        "complex64",
    ),
    (
        "weight shape",
        lambda: groupnorm.group_norm(X, 2, torch.ones(5)),
        ValueError,
        r"weight must have shape \(6,\)",
    ),
    (
        "bias shape",
        lambda: groupnorm.group_norm(X, 2, W, torch.ones(6, 1)),
        ValueError,
        r"bias must have shape \(6,\)",
    ),
    (
        "weight dtype",
        lambda: groupnorm.group_norm(X, 2, W.double()),
        TypeError,
        r"weight has dtype torch.float64.*input is torch.float32",
    ),
    (
        "weight device",
        lambda: groupnorm.group_norm(X, 2, torch.ones(6, device="meta")),
        ValueError,
        "move both to one device",
    ),
    ("negative eps", lambda: groupnorm.group_norm(X, 2, eps=-1e-5), ValueError, r"eps.*>= 0"),
    ("unknown mode", lambda: groupnorm.normalize(X, "batchgroup"), ValueError, "unknown.*mode"),
    (
        "unknown activation",
        lambda: groupnorm.group_norm(X, 2, activation="tanh"),
        ValueError,
        "unknown activation 'tanh'",
    ),
    (
        "residual shape",
        lambda: groupnorm.group_norm(X, 2, residual=torch.randn(2, 6, 5)),
        ValueError,
        "residual must have the input's shape",
    ),
    (
        "BN one value per channel",
        lambda: groupnorm.batch_norm(torch.randn(1, 6), None, None, training=True),
        ValueError,
        "more than 1 value per channel",
    ),
    (
        "BN eval without stats",
        lambda: groupnorm.batch_norm(X, None, None, training=False),
        ValueError,
        "needs running_mean and running_var",
    ),
    (
        "groups with layer mode",
        lambda: groupnorm.normalize(X, "layer", num_groups=2),
        ValueError,
        "mode='group' only",
    ),
    (
        "module channels",
        lambda: groupnorm.GroupNorm(2, 6)(torch.randn(2, 8, 3)),
        ValueError,
        "expects 6 channels",
    ),
]


@pytest.mark.parametrize("name,call,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_explained(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


class _Sub(torch.Tensor):
    """A tensor subclass: the shortcut leaves such tensors to the full checks."""


def test_tensor_shortcut_never_passes_what_the_full_checks_reject():
    """``tensors_ok`` lets calls skip the full checks; it must never say True where they would
    raise (it may say False where they pass: those calls just take the full checks). Checked on
    a seeded sample of combinations of good and bad inputs, params, residuals and groups."""
    import random

    from groupnorm import _validation as v

    x32 = torch.randn(2, 8, 3, 3)
    xs = {
        "f32": x32,
        "f16": torch.randn(2, 8, 3, 3).half(),
        "f64": torch.randn(2, 8, 3, 3, dtype=torch.float64),
        "channels_last": x32.contiguous(memory_format=torch.channels_last),
        "int": torch.ones(2, 8, 3, 3, dtype=torch.int32),
        "rank1": torch.randn(8),
        "no channels": torch.randn(2, 0, 3),
        "meta": torch.empty(2, 8, 3, 3, device="meta"),
        "subclass": torch.randn(2, 8, 3, 3).as_subclass(_Sub),
        "list": [[1.0] * 8] * 2,
    }
    params = {
        "none": None,
        "f32": torch.rand(8),
        "f16": torch.rand(8).half(),
        "f64": torch.rand(8, dtype=torch.float64),
        "bf16": torch.rand(8).bfloat16(),
        "param": torch.nn.Parameter(torch.rand(8)),
        "short": torch.rand(4),
        "2d": torch.rand(8, 1),
        "int": torch.ones(8, dtype=torch.int64),
        "meta": torch.empty(8, device="meta"),
        "float": 1.0,
    }
    residuals = {
        "none": None,
        "f32": torch.randn(2, 8, 3, 3),
        "f16": torch.randn(2, 8, 3, 3).half(),
        "other shape": torch.randn(2, 8, 3, 1),
        "meta": torch.empty(2, 8, 3, 3, device="meta"),
    }

    def full(x, w, b, r, g, c):
        v.check_input(x)
        if c is not None and x.shape[1] != c:
            raise ValueError("channels")
        if g is not None:
            v.resolve_num_groups(x.shape[1], g, None)
        v.check_param(w, "weight", x.shape[1], x)
        v.check_param(b, "bias", x.shape[1], x)
        v.check_residual(r, x)

    rng = random.Random(5)
    said_yes = 0
    for _ in range(20000):
        xk, wk, bk, rk = (rng.choice(list(d)) for d in (xs, params, params, residuals))
        g, c = rng.choice([None, 1, 2, 3, 4, 8, 16]), rng.choice([None, 8, 6])
        args = (xs[xk], params[wk], params[bk], residuals[rk], g, c)
        if v.tensors_ok(*args):
            said_yes += 1
            try:
                full(*args)
            except (TypeError, ValueError) as err:
                pytest.fail(f"shortcut passed x={xk} w={wk} b={bk} r={rk} g={g} c={c}: {err}")
    assert said_yes > 50  # (the sample holds many valid calls)
    # the common valid calls take the shortcut
    for x, w, r in [(x32, params["f32"], None), (xs["f16"], params["f32"], residuals["f16"]),
                    (xs["channels_last"], params["param"], residuals["f32"])]:  # fmt: skip
        assert v.tensors_ok(x, w, w, r, 4, 8) and v.tensors_ok(x, None, None, None, None)
