"""The bad inputs named by the foundation issue: each gets a clear error that says what to fix."""

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
