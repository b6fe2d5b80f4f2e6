"""Real timm and torchvision models converted, swapped and built with our norm layers (CPU)."""

from __future__ import annotations

import copy
import functools
import warnings
from collections import Counter, OrderedDict

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import groupnorm
from groupnorm import GroupNorm, GroupNormAct


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Affine tensors and running statistics away from their ones/zeros defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and "Norm" in type(m).__name__:
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
    return model


def by_hand(model: nn.Module, num_groups: int) -> nn.Module:
    """Each batch norm of ``model`` -> torch's GroupNorm, then the layer's own drop and act."""
    for name, child in list(model.named_children()):
        if isinstance(child, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            c = child.weight.numel()
            gn = nn.GroupNorm(num_groups, c, eps=child.eps)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            parts = [("gn", gn)]
            for extra in ("drop", "act"):
                if isinstance(getattr(child, extra, None), nn.Module):
                    parts.append((extra, getattr(child, extra)))
            setattr(model, name, nn.Sequential(OrderedDict(parts)))
        else:
            by_hand(child, num_groups)
    return model


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


FUSED_AS = {"silu": "SiLU", "relu": "ReLU", "gelu": "GELU"}


def activations_after_norms(model: nn.Module) -> Counter:
    """Class names of the activations the norm layers apply (fused ones by their module name)."""
    found: Counter = Counter()
    for m in model.modules():
        if isinstance(m, GroupNormAct):
            found[FUSED_AS.get(m._activation) or type(m.act).__name__] += 1
        elif isinstance(m, nn.BatchNorm2d) and not isinstance(m.act, nn.Identity):
            found[type(m.act).__name__] += 1
    return found


@pytest.mark.parametrize(
    "name, kinds", [("efficientnet_b0", {"SiLU"}), ("mobilenetv3_large_100", {"ReLU", "Hardswish"})]
)
def test_timm_bn_act_models_convert_with_their_activations(name, kinds):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name)).eval()
    n_bn = count(model, nn.BatchNorm2d)
    acts = activations_after_norms(model)
    assert set(acts) == kinds and sum(acts.values()) > 10
    ref = by_hand(copy.deepcopy(model), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every channel count divides by 8: nothing to say
        ours = groupnorm.convert_batchnorm(copy.deepcopy(model), num_groups=8)
    assert count(ours, nn.BatchNorm2d) == 0 and count(ours, GroupNorm) == n_bn
    assert activations_after_norms(ours) == acts
    x = torch.randn(2, 3, 96, 96)
    for train in (False, True):
        ref.train(train)
        ours.train(train)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    # a plain GroupNorm (no activation) in place of each BatchNormAct2d differs a lot
    plain = groupnorm.convert_batchnorm(copy.deepcopy(model), num_groups=8, convert_unknown=True)
    for m in plain.modules():
        if isinstance(m, GroupNormAct):
            m._activation, m.act = "", None
    plain.eval()
    ref.eval()
    assert (plain(x) - ref(x)).abs().max() > 1e-2


def sgd_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    """A few steps of SGD with momentum on a fixed batch; the losses."""
    target = torch.arange(x.shape[0]) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize(
    "name, kind", [("resnet50_gn", "GroupNorm"), ("resnetv2_50x1_bit", "GroupNormAct")]
)
def test_timm_gn_models_swap_exactly(name, kind):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, num_classes=10))
    n = sum(
        type(m).__name__ == kind and type(m).__module__.startswith("timm") for m in model.modules()
    )
    assert n > 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = groupnorm.replace_group_norm(copy.deepcopy(model))
    assert count(ours, GroupNorm) == n
    assert not any(type(m).__module__.startswith("timm.layers.norm") for m in ours.modules())
    assert ours.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        model.train(train)
        ours.train(train)
        model.zero_grad()
        ours.zero_grad()
        y_ref, y = model(x), ours(x)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        dy = torch.randn_like(y)
        y_ref.backward(dy)
        y.backward(dy)
        grads = dict(ours.named_parameters())
        for pname, p in model.named_parameters():
            torch.testing.assert_close(grads[pname].grad, p.grad, atol=2e-4, rtol=1e-3, msg=pname)
    model.train()
    ours.train()
    torch.testing.assert_close(sgd_steps(ours, x), sgd_steps(model, x), atol=1e-5, rtol=1e-3)
    params = dict(ours.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(params[pname], p, atol=1e-4, rtol=1e-3, msg=pname)


def test_timm_resnet18_built_with_get_norm_layer():
    torch.manual_seed(0)
    ours = timm.create_model("resnet18", norm_layer=groupnorm.get_norm_layer("gn", num_groups=32))
    ref = timm.create_model("resnet18", norm_layer="groupnorm")  # timm's own GN, 32 groups
    assert count(ours, GroupNorm) == 20 and count(ours, nn.BatchNorm2d) == 0
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    act = groupnorm.get_norm_layer("gn", group_size=16, act_layer="silu")
    m = timm.create_model("resnet18", norm_layer=act)
    assert all(
        g.num_channels // g.num_groups == 16 for g in m.modules() if isinstance(g, GroupNorm)
    )
    # a positional partial does not survive timm's rebinding: an error, not a silent network
    with pytest.raises(TypeError):
        timm.create_model("resnet18", norm_layer=functools.partial(GroupNorm, 32))


@pytest.mark.parametrize(
    "norm_layer",
    [groupnorm.get_norm_layer("gn", num_groups=32), functools.partial(GroupNorm, 32)],
    ids=["get_norm_layer", "partial"],
)
def test_torchvision_resnet18_built_with_our_group_norm(norm_layer):
    torch.manual_seed(0)
    ours = torchvision.models.resnet18(norm_layer=norm_layer)
    ref = torchvision.models.resnet18(norm_layer=functools.partial(nn.GroupNorm, 32))
    assert count(ours, GroupNorm) == 20
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_torchvision_resnet_with_frozen_batch_norm_converts():
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d))
    ref = by_hand(copy.deepcopy(model), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = groupnorm.convert_batchnorm(copy.deepcopy(model), num_groups=8)
    assert count(ours, FrozenBatchNorm2d) == 0 and count(ours, GroupNorm) == 20
    assert all(m.weight.requires_grad for m in ours.modules() if isinstance(m, GroupNorm))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
