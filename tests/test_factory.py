"""Norm layers by name: create_norm_layer / get_norm_layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import BatchNorm, GroupNorm, GroupNormAct, InstanceNorm, LayerNorm
from groupnorm.factory import NORM_LAYERS

EXPECTED = {
    "gn": (GroupNorm, None),
    "gn_silu": (GroupNormAct, "silu"),
    "gn_gelu": (GroupNormAct, "gelu"),
    "gn_relu": (GroupNormAct, "relu"),
    "bn": (BatchNorm, ""),
    "bn_silu": (BatchNorm, "silu"),
    "bn_gelu": (BatchNorm, "gelu"),
    "bn_relu": (BatchNorm, "relu"),
    "ln": (LayerNorm, None),
    "in": (InstanceNorm, None),
}
REFERENCE = {
    "gn": lambda x: torch.nn.functional.group_norm(x, 32),
    "ln": lambda x: torch.nn.functional.group_norm(x, 1),
    "in": lambda x: torch.nn.functional.group_norm(x, 64),
    "bn": lambda x: torch.nn.functional.batch_norm(x, None, None, training=True),
}
ACTS = {
    None: lambda t: t,
    "": lambda t: t,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
}


def test_every_name_is_listed_and_tested():
    assert set(NORM_LAYERS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_create_norm_layer_builds_the_named_layer(name):
    cls, act = EXPECTED[name]
    m = groupnorm.create_norm_layer(name, 64)
    assert type(m) is cls
    if cls is GroupNormAct:
        assert m.activation == act and m.num_groups == 32
    if cls is BatchNorm:
        assert m._activation == act
    x = torch.randn(4, 64, 3, 3) * 2 + 1
    want = ACTS[act](REFERENCE[name.split("_")[0]](x))
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def test_kwargs_aliases_and_case():
    m = groupnorm.create_norm_layer("GN", 48, group_size=16, eps=1e-3, affine=False)
    assert (m.num_groups, m.eps, m.weight) == (3, 1e-3, None)
    m = groupnorm.create_norm_layer("gn-relu", 8, num_groups=2, dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.activation == "relu"
    m = groupnorm.create_norm_layer("batch", 8, momentum=None, track_running_stats=False)
    assert m.momentum is None and m.running_mean is None
    assert type(groupnorm.create_norm_layer("group", 32)) is GroupNorm
    assert type(groupnorm.create_norm_layer("layer", 3)) is LayerNorm
    assert type(groupnorm.create_norm_layer("instance", 3)) is InstanceNorm


def test_get_norm_layer_for_norm_layer_arguments():
    class Net(nn.Module):  # the torchvision pattern: norm_layer(num_channels)
        def __init__(self, norm_layer):
            super().__init__()
            self.a, self.b = norm_layer(16), norm_layer(64)

    net = Net(groupnorm.get_norm_layer("gn_silu", num_groups=8))
    assert (net.a.num_groups, net.b.num_groups) == (8, 8)
    assert net.a.activation == "silu"
    make = groupnorm.get_norm_layer("gn")
    assert make(64).num_groups == 32 and make(64, group_size=4).num_groups == 16


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown norm layer 'gnn'.*'gn', 'gn_silu'"):
        groupnorm.create_norm_layer("gnn", 8)
    with pytest.raises(ValueError, match="unknown norm layer"):
        groupnorm.get_norm_layer("batchnorm2d")
    with pytest.raises(TypeError, match="must be a str"):
        groupnorm.create_norm_layer(nn.BatchNorm2d, 8)
    with pytest.raises(TypeError, match="does not take momentum"):
        groupnorm.create_norm_layer("gn", 64, momentum=0.1)
    with pytest.raises(TypeError, match="fixes the activation"):
        groupnorm.get_norm_layer("gn_silu", activation="relu")
    with pytest.raises(TypeError, match="does not take num_groups"):
        groupnorm.create_norm_layer("ln", 8, num_groups=1)
    with pytest.raises(ValueError, match="divisible"):
        groupnorm.create_norm_layer("gn", 48)
    with pytest.raises(ValueError, match="not both|exactly one"):
        groupnorm.create_norm_layer("gn", 64, num_groups=4, group_size=4)
    with pytest.raises(ValueError, match="positive"):
        groupnorm.create_norm_layer("gn", 64, num_groups=0)
    with pytest.raises(ValueError, match="positive"):
        groupnorm.create_norm_layer("bn", 0)
