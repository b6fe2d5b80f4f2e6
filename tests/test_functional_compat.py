"""The functionals against torch.nn.functional: a call written torch's way means the same here,
or is refused with a message that says what to write.

``group_norm``, ``batch_norm`` and ``instance_norm`` take torch's positional arguments with
torch's meaning and defaults (our extra options are keyword-only); ``layer_norm`` is the paper's
layer norm, not torch's, and refuses every positional argument after the input.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import make_input

import groupnorm

SAME_SIGNATURE = ["group_norm", "batch_norm", "instance_norm"]


def _positional(fn):
    return [
        (p.name, p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


@pytest.mark.parametrize("name", SAME_SIGNATURE)
def test_positional_parameters_are_torchs(name):
    """Same names, order and defaults; everything else keyword-only."""
    ours, theirs = getattr(groupnorm, name), getattr(F, name)
    assert _positional(ours) == _positional(theirs)
    for p in inspect.signature(ours).parameters.values():
        assert p.kind != p.VAR_KEYWORD
        if p.name not in dict(_positional(theirs)):
            assert p.kind == p.KEYWORD_ONLY, f"{name}: {p.name} must be keyword-only"


def test_layer_norm_takes_nothing_positional_but_the_input():
    params = list(inspect.signature(groupnorm.layer_norm).parameters.values())
    assert params[0].name == "input"
    assert params[1].kind == params[1].VAR_POSITIONAL  # refused with a message
    assert all(p.kind == p.KEYWORD_ONLY for p in params[2:])
    assert "**not** ``torch.nn.functional.layer_norm``" in groupnorm.layer_norm.__doc__


def _data(seed, dtype=torch.float32, shape=(3, 4, 5, 6), layout="contiguous"):
    x = make_input(shape, dtype, layout, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    c = shape[1]
    w = torch.rand(c, generator=g).to(dtype) + 0.5
    b = torch.randn(c, generator=g).to(dtype)
    rm = torch.randn(c, generator=g)
    rv = torch.rand(c, generator=g) + 0.5
    return x, w, b, rm, rv


def _close(a, b, dtype=torch.float32):
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("nargs", range(2, 6))
def test_group_norm_positional_calls_give_torchs_answer(nargs, dtype):
    x, w, b, _, _ = _data(nargs, dtype)
    args = (x, 2, w, b, 1e-3)[:nargs]
    _close(groupnorm.group_norm(*args), F.group_norm(*args), dtype)


# batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
BATCH_CALLS = [
    (training, momentum, nargs)
    for training, momentum, nargs in itertools.product([False, True], [0.1, 0.7], range(3, 9))
]


@pytest.mark.parametrize("training,momentum,nargs", BATCH_CALLS)
def test_batch_norm_positional_calls_give_torchs_answer(training, momentum, nargs):
    x, w, b, rm, rv = _data(nargs + int(training))
    ours_stats, their_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    tail = (w, b, training, momentum, 1e-3)[: nargs - 3]
    got = groupnorm.batch_norm(x, *ours_stats, *tail)
    want = F.batch_norm(x, *their_stats, *tail)
    _close(got, want)
    for a, c in zip(ours_stats, their_stats, strict=True):  # updated alike (or not at all)
        _close(a, c)


# instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
INSTANCE_CALLS = [
    (stats, use_input_stats, nargs)
    for stats, use_input_stats, nargs in itertools.product(
        [False, True], [True, False], range(1, 9)
    )
    if (stats or use_input_stats) and (nargs >= 6 or use_input_stats)
]


@pytest.mark.parametrize("stats,use_input_stats,nargs", INSTANCE_CALLS)
def test_instance_norm_positional_calls_give_torchs_answer(stats, use_input_stats, nargs):
    """Including the call that once took the running statistics as weight and bias."""
    x, w, b, rm, rv = _data(10 + nargs)
    ours_stats = (rm.clone(), rv.clone()) if stats else (None, None)
    their_stats = (rm.clone(), rv.clone()) if stats else (None, None)
    tail = (w, b, use_input_stats, 0.3, 1e-3)
    got = groupnorm.instance_norm(x, *ours_stats, *tail[: max(nargs - 3, 0)])
    want = F.instance_norm(x, *their_stats, *tail[: max(nargs - 3, 0)])
    _close(got, want)
    if stats:
        for a, c in zip(ours_stats, their_stats, strict=True):
            _close(a, c)
            assert use_input_stats or torch.equal(a, c)


def test_instance_norm_running_stats_in_other_layouts_and_with_an_activation():
    x, w, b, rm, rv = _data(30, layout="channels_last")
    ours = (rm.clone(), rv.clone())
    theirs = (rm.clone(), rv.clone())
    got = groupnorm.instance_norm(x, *ours, w, b, True, 0.2, activation="silu")
    want = F.silu(F.instance_norm(x, *theirs, w, b, True, 0.2))
    _close(got, want)
    for a, c in zip(ours, theirs, strict=True):
        _close(a, c)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_instance_norm_with_running_stats_has_torchs_gradients():
    x, w, b, rm, rv = _data(31, torch.float64)
    for use_input_stats in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        twins = [t.clone().requires_grad_() for t in (x, w, b)]
        y = groupnorm.instance_norm(
            leaves[0], rm.double(), rv.double(), *leaves[1:], use_input_stats
        )
        z = F.instance_norm(twins[0], rm.double(), rv.double(), *twins[1:], use_input_stats)
        dy = torch.randn_like(y)
        for a, c in zip(
            torch.autograd.grad(y, leaves, dy), torch.autograd.grad(z, twins, dy), strict=True
        ):
            _close(a, c, torch.float64)


def test_layer_norm_matches_torchs_without_affine_and_refuses_torchs_positional_form():
    x, w, b, _, _ = _data(40)
    _close(groupnorm.layer_norm(x), F.layer_norm(x, x.shape[1:]))
    _close(groupnorm.layer_norm(x, weight=w, bias=b, eps=1e-3), F.group_norm(x, 1, w, b, 1e-3))
    for args in [(x.shape[1:],), (x.shape[1:], w, b), (w, b), (w,)]:
        with pytest.raises(TypeError, match=r"paper's layer norm.*keyword-only.*weight=w, bias=b"):
            groupnorm.layer_norm(x, *args)


def test_momentum_unused_is_not_range_checked_as_torch_does():
    """momentum is checked where an update uses it: training with running statistics."""
    x, w, b, rm, rv = _data(50)
    for momentum in (-1.2, 3.0):
        _close(
            groupnorm.batch_norm(x, rm, rv, w, b, training=False, momentum=momentum),
            F.batch_norm(x, rm, rv, w, b, training=False, momentum=momentum),
        )
        _close(
            groupnorm.batch_norm(x, None, None, w, b, training=True, momentum=momentum),
            F.batch_norm(x, None, None, w, b, training=True, momentum=momentum),
        )
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            groupnorm.batch_norm(x, rm.clone(), rv.clone(), training=True, momentum=momentum)
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            groupnorm.instance_norm(x, rm.clone(), rv.clone(), momentum=momentum)
    with pytest.raises(TypeError, match="momentum must be a float"):
        groupnorm.batch_norm(x, rm, rv, training=False, momentum="0.1")


BAD_INSTANCE_CALLS = [
    (
        "old positional weight and bias (parameters)",
        lambda x, w, b, rm, rv: groupnorm.instance_norm(
            x, torch.nn.Parameter(w), torch.nn.Parameter(b)
        ),
        ValueError,
        r"running_mean requires grad.*running_mean, running_var, weight, bias.*weight=w, bias=b",
    ),
    (
        "use_input_stats=False without statistics",
        lambda x, w, b, rm, rv: groupnorm.instance_norm(x, use_input_stats=False),
        ValueError,
        r"use_input_stats=False normalizes with running_mean and running_var; pass them",
    ),
    (
        "one statistic",
        lambda x, w, b, rm, rv: groupnorm.instance_norm(x, rm),
        ValueError,
        r"pass both running_mean and running_var, or neither",
    ),
    (
        "use_input_stats not a bool",
        lambda x, w, b, rm, rv: groupnorm.instance_norm(x, rm, rv, None, None, "yes"),
        TypeError,
        r"use_input_stats must be True or False.*bool\(",
    ),
    (
        "momentum None with statistics",
        lambda x, w, b, rm, rv: groupnorm.instance_norm(x, rm, rv, momentum=None),
        ValueError,
        r"momentum in \[0, 1\].*pass one",
    ),
    (
        "statistics of the wrong size",
        lambda x, w, b, rm, rv: groupnorm.instance_norm(x, rm[:3], rv[:3]),
        ValueError,
        r"running_mean must have shape \(4,\)",
    ),
    (
        "one value per instance",
        lambda x, w, b, rm, rv: groupnorm.instance_norm(x[:, :, :1, :1], rm, rv),
        ValueError,
        r"more than 1 value per channel",
    ),
]


@pytest.mark.parametrize(
    "make,exc,pattern", [c[1:] for c in BAD_INSTANCE_CALLS], ids=[c[0] for c in BAD_INSTANCE_CALLS]
)
def test_instance_norm_refusals_say_what_to_write(make, exc, pattern):
    x, w, b, rm, rv = _data(60)
    before = (rm.clone(), rv.clone())
    with pytest.raises(exc, match=pattern):
        make(x, w, b, rm, rv)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # nothing updated
