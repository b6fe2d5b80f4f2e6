"""Modules: drop-in compatibility with torch.nn (attributes, repr, state_dict), compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FUSED_NAMES, make_input

import groupnorm


def test_group_norm_is_a_drop_in():
    theirs = torch.nn.GroupNorm(4, 12)
    torch.nn.init.normal_(theirs.weight)
    torch.nn.init.normal_(theirs.bias)
    ours = groupnorm.GroupNorm(4, 12)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.GroupNorm)
    assert (ours.num_groups, ours.num_channels, ours.eps, ours.affine) == (4, 12, 1e-5, True)
    assert ours.extra_repr() == theirs.extra_repr()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = make_input((3, 12, 5, 5), torch.float32)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    # and back into torch's layer
    ours.weight.data.mul_(2)
    theirs.load_state_dict(ours.state_dict())
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize("affine,bias", [(False, True), (True, False)])
def test_group_norm_without_affine_or_bias(affine, bias):
    ours = groupnorm.GroupNorm(2, 6, affine=affine, bias=bias)
    theirs = torch.nn.GroupNorm(2, 6, affine=affine, bias=bias)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert ours.extra_repr() == theirs.extra_repr()
    x = make_input((2, 6, 3), torch.float32)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_group_size_alternative():
    assert groupnorm.GroupNorm(None, 64, group_size=16).num_groups == 4
    with pytest.raises(ValueError, match="exactly one of num_groups or group_size"):
        groupnorm.GroupNorm(4, 64, group_size=16)


def test_factory_kwargs():
    m = groupnorm.GroupNorm(2, 4, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("activation", [*FUSED_NAMES, None])
def test_group_norm_act_equals_norm_then_activation(activation):
    m = groupnorm.GroupNormAct(3, 12, activation=activation)
    torch.nn.init.normal_(m.weight)
    torch.nn.init.normal_(m.bias)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert m.activation == activation
    x = make_input((2, 12, 4, 4), torch.float32)
    expected = F.group_norm(x, 3, m.weight, m.bias)
    if activation:
        expected = getattr(F, activation)(expected)
    assert torch.allclose(m(x), expected, atol=1e-5)


def test_group_norm_act_saves_no_normalized_output():
    # Only x (or x + residual), mean and rstd (and the parameters) are kept for backward.
    m = groupnorm.GroupNormAct(4, 16, activation="silu")
    x = make_input((2, 16, 8, 8), torch.float32).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1, f"expected only x saved at full size, got {len(big)} tensors"


def test_presets():
    x = make_input((2, 6, 4, 4), torch.float64)
    assert torch.allclose(groupnorm.LayerNorm(6, affine=False)(x), F.layer_norm(x, x.shape[1:]))
    assert torch.allclose(groupnorm.InstanceNorm(6, affine=False)(x), F.instance_norm(x))
    assert isinstance(groupnorm.LayerNorm(6), torch.nn.GroupNorm)


def test_batch_norm_module_matches_torch_attributes():
    ours, theirs = groupnorm.BatchNorm(7), torch.nn.BatchNorm2d(7)
    assert ours.extra_repr() == theirs.extra_repr()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)


def test_batch_norm_module_with_activation():
    m = groupnorm.BatchNorm(4, activation="relu")
    x = make_input((5, 4, 3), torch.float32)
    expected = F.relu(F.batch_norm(x, None, None, m.weight, m.bias, True))
    assert torch.allclose(m(x), expected, atol=1e-5)
    assert "activation=relu" in repr(m)


def test_module_residual_argument():
    m = groupnorm.GroupNorm(2, 4)
    x, r = make_input((2, 4, 3), torch.float32), make_input((2, 4, 3), torch.float32, seed=3)
    assert torch.allclose(m(x, r), F.group_norm(x + r, 2, m.weight, m.bias), atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: groupnorm.GroupNorm(2, 4),
        lambda: groupnorm.GroupNormAct(2, 4),
        lambda: groupnorm.BatchNorm(4),
        lambda: groupnorm.BatchNorm(4).eval(),
        lambda: groupnorm.SyncBatchNorm(4, act_layer="hard_swish"),
    ],
)
def test_modules_reject_a_bad_backend_variable(monkeypatch, make):
    # The dispatcher reads GROUPNORM_BACKEND first, before the module's own checks: plain
    # calls, calls with a residual and calls with the wrong channel count all say so.
    m, message = make(), "^unknown backend 'nonsense'; choose one of auto, cpu"
    monkeypatch.setenv("GROUPNORM_BACKEND", "nonsense")
    x, r = make_input((2, 4, 3), torch.float32), make_input((2, 4, 3), torch.float32, seed=3)
    for args in ((x,), (x, r), (make_input((2, 6, 3), torch.float32),)):
        with pytest.raises(ValueError, match=message):
            m(*args)


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        groupnorm.GroupNormAct(4, 8),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        groupnorm.BatchNorm(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        groupnorm.GroupNorm(2, 8),
        groupnorm.LayerNorm(8),
        groupnorm.InstanceNorm(8),
    )


def test_compile_fullgraph_traces_without_breaks():
    torch.manual_seed(0)
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 6, 6), torch.float32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = model(x1)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x2)
    out.square().sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-4)


def test_compile_dynamic_shapes_without_breaks():
    # dynamic=True makes sizes (and float arguments such as eps) symbolic: validation must not
    # call functions that need concrete values.
    torch.manual_seed(0)
    model = _model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (2, 3):
        x = make_input((n, 3, 6, 5), torch.float32, seed=n)
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_batch_norm_momentum_none_is_torchs_cumulative_average():
    """momentum=None: each training call is counted and the running statistics are the
    cumulative average of the batches', as in torch.nn.BatchNorm2d."""
    torch.manual_seed(0)
    ours = groupnorm.BatchNorm(4, momentum=None)
    theirs = torch.nn.BatchNorm2d(4, momentum=None)
    for _ in range(3):
        x = torch.randn(8, 4, 5, 5)
        ours(x)
        theirs(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
