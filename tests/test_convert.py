"""BN -> GN conversion, torch GN -> ours, Weight Standardization, zero-init of the last norm."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import GroupNorm, GroupNormAct, WSConv1d, WSConv2d, WSConv3d
from groupnorm.convert import choose_num_groups, find_last_norms


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics (never the ones/zeros defaults)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5).to(b.dtype))
    return model


class FrozenBatchNorm2d(nn.Module):
    """torchvision-style frozen BN: all four tensors are buffers, nothing is trainable."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class Detectron2FrozenBN(FrozenBatchNorm2d):
    """detectron2 names the same thing differently and keeps num_features."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)
        self.num_features = num_features


def reference_gn(x, num_groups, weight, bias, eps, activation=None):
    return groupnorm.reference_norm(
        x, "group", num_groups=num_groups, weight=weight, bias=bias, eps=eps, activation=activation
    ).output


BN_CASES = [
    (lambda c: nn.BatchNorm1d(c, eps=1e-3), (3, 64, 7)),
    (lambda c: nn.BatchNorm2d(c), (3, 64, 5, 5)),
    (lambda c: nn.BatchNorm3d(c, eps=2e-5), (2, 64, 3, 4, 2)),
    (lambda c: nn.SyncBatchNorm(c), (3, 64, 5, 5)),
    (lambda c: groupnorm.BatchNorm(c), (3, 64, 5, 5)),
    (lambda c: FrozenBatchNorm2d(c, eps=1e-4), (3, 64, 5, 5)),
    (lambda c: Detectron2FrozenBN(c), (3, 64, 5, 5)),
]


@pytest.mark.parametrize("make_bn, shape", BN_CASES)
def test_every_batchnorm_kind_becomes_groupnorm_with_its_affine(make_bn, shape):
    bn = randomize(make_bn(64))
    net = nn.Sequential(nn.Identity(), bn)
    old_w, old_b = bn.weight, bn.bias
    out = groupnorm.convert_batchnorm(net, num_groups=8)
    assert out is net
    gn = net[1]
    assert type(gn) is GroupNorm and gn.num_groups == 8 and gn.num_channels == 64
    assert gn.eps == bn.eps
    if isinstance(old_w, nn.Parameter):  # the same Parameter objects: optimizers keep working
        assert gn.weight is old_w and gn.bias is old_b
    else:  # frozen BN: the buffers' values become trainable Parameters
        assert isinstance(gn.weight, nn.Parameter) and gn.weight.requires_grad
        assert torch.equal(gn.weight.detach(), old_w) and torch.equal(gn.bias.detach(), old_b)
    assert not any("running" in k for k in net.state_dict())
    x = torch.randn(shape) * 2 + 0.5
    ref = reference_gn(x, 8, old_w, old_b, bn.eps)
    torch.testing.assert_close(net(x).double(), ref, atol=2e-5, rtol=1e-5)


def test_dtype_device_and_mode_are_kept():
    net = nn.Sequential(
        nn.BatchNorm2d(32), nn.BatchNorm2d(32).eval(), nn.BatchNorm2d(32, affine=False)
    )
    net = randomize(net.double())
    net[0].train()
    groupnorm.convert_batchnorm(net, num_groups=4)
    assert [m.training for m in net] == [True, False, True]
    assert net[0].weight.dtype == torch.float64 and net[0].weight.device.type == "cpu"
    assert net[2].weight is None and net[2].bias is None and net[2].num_groups == 4
    x = torch.randn(2, 32, 3, 3, dtype=torch.float64)
    assert net(x).dtype == torch.float64


def test_nearest_group_count_and_one_warning_naming_the_layers():
    net = nn.Sequential(nn.BatchNorm2d(64), nn.BatchNorm2d(48), nn.Sequential(nn.BatchNorm2d(30)))
    with pytest.warns(UserWarning) as record:
        groupnorm.convert_batchnorm(net)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "1 (C=48)" in msg and "num_groups=24" in msg and "2.0 (C=30)" in msg
    assert "0 (C=64)" not in msg
    assert [net[0].num_groups, net[1].num_groups, net[2][0].num_groups] == [32, 24, 30]


def test_strict_raises_instead_of_adjusting():
    with pytest.raises(ValueError, match="valid group counts: 1, 2, 3, 4, 6, 8, 12, 16, 24, 48"):
        groupnorm.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(48)), strict=True)


def test_group_size_and_choose_num_groups():
    net = nn.Sequential(nn.BatchNorm2d(64), nn.BatchNorm2d(96))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groupnorm.convert_batchnorm(net, group_size=16)
    assert [m.num_groups for m in net] == [4, 6]
    assert choose_num_groups(64, 32) == 32
    assert choose_num_groups(48, 32) == 24  # 24 is 8 away, 48 is 16 away
    assert choose_num_groups(40, 32) == 40  # 40 is 8 away, 20 is 12 away
    assert choose_num_groups(36, 15) == 12  # 12 and 18 tie: fewer, larger groups
    assert choose_num_groups(16, 32) == 16  # fewer channels than groups: instance norm
    assert choose_num_groups(96, group_size=20) == 4  # sizes 16 and 24 tie: take 24
    with pytest.warns(UserWarning, match=r"group_size=20 -> num_groups=4"):
        groupnorm.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(96)), group_size=20)


def test_root_batchnorm_and_no_batchnorm():
    gn = groupnorm.convert_batchnorm(nn.BatchNorm2d(16), num_groups=4)
    assert type(gn) is GroupNorm and gn.num_groups == 4
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = copy.deepcopy(net)
    groupnorm.convert_batchnorm(net)
    assert repr(net) == repr(before)


@pytest.mark.parametrize(
    "act, name", [(nn.ReLU(inplace=True), "relu"), (nn.SiLU(), "silu"), (nn.GELU(), "gelu")]
)
def test_activation_fusion_matches_unfused(act, name):
    net = randomize(
        nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), act, nn.Conv2d(16, 4, 1))
    )
    plain = groupnorm.convert_batchnorm(copy.deepcopy(net), num_groups=4)
    fused = groupnorm.convert_batchnorm(net, num_groups=4, activation_fusion=True)
    assert isinstance(fused[1], GroupNormAct) and fused[1].activation == name
    assert isinstance(fused[2], nn.Identity)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)


def test_fusion_only_where_it_is_safe():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU()  # not in a Sequential: call order unknown, so not fused

        def forward(self, x):
            return self.act(self.bn(x))

    net = nn.Sequential(
        nn.BatchNorm2d(8),
        nn.GELU(approximate="tanh"),  # not the exact GELU we fuse
        Block(),
        groupnorm.BatchNorm(8, activation="silu"),
        nn.SiLU(),  # follows a BN that already has an activation: kept
        nn.BatchNorm2d(8),
        nn.LeakyReLU(),
    )
    groupnorm.convert_batchnorm(net, num_groups=2, activation_fusion=True)
    assert type(net[0]) is GroupNorm and isinstance(net[1], nn.GELU)
    assert type(net[2].bn) is GroupNorm and isinstance(net[2].act, nn.ReLU)
    assert isinstance(net[3], GroupNormAct) and net[3].activation == "silu"
    assert isinstance(net[4], nn.SiLU)
    assert type(net[5]) is GroupNorm and isinstance(net[6], nn.LeakyReLU)


def test_optimizer_built_before_conversion_still_trains_the_new_layers():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    groupnorm.convert_batchnorm(net, num_groups=2)
    before = net[1].weight.detach().clone()
    net(torch.randn(2, 3, 6, 6)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, net[1].weight.detach())


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        groupnorm.convert_batchnorm("resnet50")
    with pytest.raises(ValueError, match="positive"):
        groupnorm.convert_batchnorm(nn.BatchNorm2d(8), num_groups=0)
    with pytest.raises(ValueError, match="positive"):
        groupnorm.convert_batchnorm(nn.BatchNorm2d(8), group_size=-2)
    with pytest.raises(ValueError, match="not both"):
        groupnorm.convert_batchnorm(nn.BatchNorm2d(8), num_groups=32, group_size=8)
    with pytest.raises(ValueError, match="not both"):
        groupnorm.convert_batchnorm(nn.BatchNorm2d(8), num_groups=4, group_size=2)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        groupnorm.convert_batchnorm(nn.BatchNorm2d(8), num_groups=4.0)
    with pytest.raises(ValueError, match="eps"):
        groupnorm.convert_batchnorm(nn.BatchNorm2d(8), eps=-1.0)
    with pytest.raises(ValueError, match="one forward pass"):
        groupnorm.convert_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))
    with pytest.raises(TypeError, match="DataParallel"):
        groupnorm.convert_batchnorm(nn.DataParallel(nn.BatchNorm2d(8)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        groupnorm.replace_group_norm(None)


# ---------------------------------------------------------------- replace_group_norm


def test_replace_group_norm_gives_identical_outputs_and_shares_parameters():
    net = randomize(
        nn.Sequential(
            nn.Conv2d(3, 12, 3),
            nn.GroupNorm(3, 12, eps=1e-4),
            nn.SiLU(),
            nn.Sequential(nn.GroupNorm(4, 12, affine=False), nn.GELU()),
        )
    )
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    want = net(x)
    w = net[1].weight
    for fuse in (False, True):
        new = groupnorm.replace_group_norm(copy.deepcopy(net), activation_fusion=fuse)
        assert all(type(m) is not nn.GroupNorm for m in new.modules())
        torch.testing.assert_close(new(x), want, atol=1e-6, rtol=1e-6)
    assert groupnorm.replace_group_norm(net)[1].weight is w
    fused = groupnorm.replace_group_norm(net, activation_fusion=True)  # ours, now fused
    assert isinstance(fused[1], GroupNormAct) and fused[1].eps == 1e-4
    assert isinstance(fused[2], nn.Identity) and isinstance(fused[3][1], nn.Identity)
    torch.testing.assert_close(fused(x), want, atol=1e-6, rtol=1e-6)


def test_replace_group_norm_fuse_activation_is_a_deprecated_spelling():
    net = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    with pytest.warns(DeprecationWarning, match=r"fuse_activation=\) is deprecated"):
        new = groupnorm.replace_group_norm(net, fuse_activation=True)
    assert isinstance(new[0], GroupNormAct) and isinstance(new[1], nn.Identity)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="not both"):
        groupnorm.replace_group_norm(net, activation_fusion=True, fuse_activation=True)


def test_replace_group_norm_root_and_foreign_subclass():
    gn = groupnorm.replace_group_norm(nn.GroupNorm(2, 4))
    assert type(gn) is GroupNorm

    class CustomGN(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(CustomGN(2, 4), groupnorm.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"0 \(CustomGN from "):
        groupnorm.replace_group_norm(net)
    assert type(net[0]) is CustomGN and type(net[1]) is groupnorm.LayerNorm


# ---------------------------------------------------------------- Weight Standardization


def reference_ws_conv(x, weight, bias, eps, conv, **kw):
    """Float64 WS: each filter minus its mean, over sqrt(biased variance + eps)."""
    w = weight.double()
    flat = w.reshape(w.shape[0], -1)
    mean = flat.sum(dim=1, keepdim=True) / flat.shape[1]
    var = ((flat - mean) ** 2).sum(dim=1, keepdim=True) / flat.shape[1]
    w_hat = ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)
    return conv(x.double(), w_hat, None if bias is None else bias.double(), **kw)


WS_CASES = [
    (WSConv1d, torch.nn.functional.conv1d, (2, 4, 11), dict(stride=2)),
    (WSConv2d, torch.nn.functional.conv2d, (2, 4, 7, 6), dict(padding=1, groups=2)),
    (WSConv3d, torch.nn.functional.conv3d, (1, 4, 5, 4, 4), dict(dilation=1)),
]


@pytest.mark.parametrize("cls, conv, shape, kw", WS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ws_conv_matches_float64_reference_with_gradients(cls, conv, shape, kw, dtype):
    torch.manual_seed(0)
    m = cls(4, 6, 3, **kw, eps=1e-5).to(dtype)
    with torch.no_grad():
        m.weight.mul_(3).add_(0.2)  # a filter mean and scale far from the standardized ones
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).requires_grad_()
    y = m(x)
    x64 = x.detach().double().requires_grad_()
    w64 = m.weight.detach().double().requires_grad_()
    b64 = m.bias.detach().double().requires_grad_()
    ref = reference_ws_conv(x64, w64, b64, 1e-5, conv, **kw)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(m.weight.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(m.bias.grad.double(), b64.grad, **tol)


def test_ws_bfloat16_weights_use_float32_statistics():
    w = torch.randn(8, 4, 3, 3) * 5 + 2
    got = groupnorm.standardize_weight(w.bfloat16())
    ref = groupnorm.standardize_weight(w.bfloat16().double())
    torch.testing.assert_close(got.double(), ref, atol=2e-2, rtol=1e-2)
    assert got.dtype == torch.bfloat16


def test_ws_state_dict_and_errors():
    m = WSConv2d(3, 4, 3)
    assert isinstance(m, nn.Conv2d)
    assert m.state_dict().keys() == nn.Conv2d(3, 4, 3).state_dict().keys()
    with pytest.raises(ValueError, match="eps"):
        WSConv2d(3, 4, 3, eps=-1)
    with pytest.raises(ValueError, match="out_channels"):
        groupnorm.standardize_weight(torch.randn(4))
    with pytest.raises(TypeError, match="needs a Conv2d"):
        WSConv2d.from_conv(nn.Conv1d(3, 4, 3))


def test_converter_weight_standardization_keeps_weights():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False, padding_mode="reflect"),
        nn.BatchNorm2d(8),
        nn.Identity(),
        nn.ConvTranspose2d(8, 8, 2),  # not a plain convolution: left alone
    )
    w = net[0].weight
    groupnorm.convert_batchnorm(net, num_groups=2, weight_standardization=True, ws_eps=1e-5)
    ws = net[0]
    assert type(ws) is WSConv2d and ws.weight is w and ws.bias is None
    assert ws.padding_mode == "reflect" and ws.padding == (1, 1) and ws.ws_eps == 1e-5
    assert type(net[3]) is nn.ConvTranspose2d
    x = torch.randn(2, 3, 6, 6)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"),
        groupnorm.standardize_weight(w, 1e-5),
    )
    torch.testing.assert_close(ws(x), ref)


# ---------------------------------------------------------------- zero_init_last


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Stage(nn.Module):  # "Block" in no name: a container
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))


def test_zero_init_last_zeroes_the_last_norm_of_each_block_only():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Stage())
    randomize(net)
    assert [n for n, _ in find_last_norms(net)] == ["2.blocks.0.bn2", "2.blocks.1.bn2"]
    groupnorm.convert_batchnorm(net, num_groups=4, zero_init_last=True)
    blocks = net[2].blocks
    for block in blocks:
        assert torch.count_nonzero(block.bn2.weight) == 0
        assert torch.count_nonzero(block.bn1.weight) == 8 * 2
    assert torch.count_nonzero(blocks[0].downsample[1].weight) == 16
    assert torch.count_nonzero(net[1].weight) == 8
    # A post-activation block with a zero last gamma (and zero beta) is the identity + ReLU.
    block = blocks[1]
    with torch.no_grad():
        block.bn2.bias.zero_()
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_containers_eps_override_and_stats_free_bn():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.list = nn.ModuleList([nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)])
            self.dict = nn.ModuleDict({"norm": nn.BatchNorm1d(8, track_running_stats=False)})

    net = groupnorm.convert_batchnorm(Net(), num_groups=2, eps=1e-3)
    assert type(net.list[0]) is GroupNorm and type(net.dict["norm"]) is GroupNorm
    assert net.list[0].eps == 1e-3 and net.dict["norm"].eps == 1e-3
    assert type(net.list[1]) is nn.Conv2d  # weight_standardization is off by default
