"""Norm layers of timm, torchvision, detectron2 and mmcv, as small look-alike classes.

The real packages are tested by ``make test-interop`` (tests/interop); these copies of their
structure keep the recognition rules of the converters in the normal suite.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import GroupNorm, GroupNormAct


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5).to(b.dtype))
    return model


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass with ``drop`` then ``act`` after the norm."""

    def __init__(self, c, act_layer=nn.ReLU, drop=None, inplace=True):
        super().__init__(c)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if act_layer is not None else nn.Identity()

    def forward(self, x):
        assert x.ndim == 4
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            self.training or self.running_mean is None,
            0.1,
            self.eps,
        )
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """detectron2's: plain BN on one worker (the all-reduce path needs a process group)."""

    def __init__(self, *args, stats_mode="", **kwargs):
        super().__init__(*args, **kwargs)
        self._stats_mode = stats_mode

    def forward(self, input):
        return super().forward(input)


class FrozenBatchNormAct2d(nn.Module):
    """timm's frozen BN with an activation: buffers only, ``act`` child."""

    def __init__(self, c, act_layer=nn.SiLU):
        super().__init__()
        self.eps = 1e-5
        for name, init in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
            self.register_buffer(name, torch.full((c,), float(init)))
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return self.act(self.drop(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)))


class MmcvSyncBatchNorm(nn.Module):
    """mmcv's SyncBatchNorm: not a _BatchNorm; Parameters weight/bias and the running buffers."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.num_features, self.eps, self.momentum = c, eps, 0.1
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1,
            self.eps,
        )  # fmt: skip


class TimmGroupNorm(nn.GroupNorm):
    """timm's GroupNorm: channels first, its own forward computing the same math."""

    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.fast_norm = False

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class TimmGroupNormAct(nn.GroupNorm):
    def __init__(self, num_channels, num_groups=32, act_layer=nn.ReLU, drop=None, **act_kwargs):
        super().__init__(num_groups, num_channels)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act_layer(**act_kwargs) if act_layer is not None else nn.Identity()

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


def gn_then(x, layer, num_groups, *after):
    y = F.group_norm(x, num_groups, layer.weight, layer.bias, layer.eps)
    for f in after:
        y = f(y)
    return y


# ----------------------------------------------------------------- convert_batchnorm


@pytest.mark.parametrize(
    "act, fused",
    [
        (nn.SiLU, "silu"),
        (nn.ReLU, "relu"),
        (functools.partial(nn.GELU), "gelu"),
        (nn.Hardswish, ""),
        (functools.partial(nn.GELU, approximate="tanh"), ""),
        (nn.PReLU, ""),
    ],
)
def test_bn_act_keeps_its_activation_fused_or_as_module(act, fused):
    def make(**kw):
        try:
            return act(inplace=True, **kw)
        except TypeError:
            return act(**kw)

    bn = BatchNormAct2d(16, act_layer=lambda inplace: make())
    randomize(bn)
    act_module = bn.act
    net = nn.Sequential(nn.Conv2d(3, 16, 3), bn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groupnorm.convert_batchnorm(net, num_groups=4)
    gn = net[1]
    assert isinstance(gn, GroupNormAct) and gn.weight is bn.weight
    if fused:
        assert gn.activation == fused and gn.act is None
    else:
        assert gn.act is act_module and gn._activation == ""
    x = torch.randn(2, 3, 7, 7)
    h = net[0](x)
    want = gn_then(h, gn, 4, copy.deepcopy(act_module))
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
    if isinstance(act_module, nn.PReLU):  # its Parameter moved over with its key
        assert "1.act.weight" in net.state_dict()


def test_bn_act_dropout_is_kept_in_order_and_stops_fusion():
    bn = randomize(BatchNormAct2d(8, act_layer=nn.SiLU, drop=nn.Dropout(0.5)))
    gn = groupnorm.convert_batchnorm(nn.Sequential(bn), num_groups=2)[0]
    assert isinstance(gn, GroupNormAct) and gn.drop is bn.drop and isinstance(gn.act, nn.SiLU)
    x = torch.randn(2, 8, 4, 4)
    torch.manual_seed(1)
    y = gn.train()(x)
    torch.manual_seed(1)
    want = F.silu(F.dropout(F.group_norm(x, 2, gn.weight, gn.bias), 0.5, training=True))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_bn_act_without_activation_becomes_plain_groupnorm():
    bn = BatchNormAct2d(8, act_layer=None)
    net = groupnorm.convert_batchnorm(nn.Sequential(bn, nn.ReLU()), 2, activation_fusion=True)
    assert isinstance(net[0], GroupNormAct) and net[0].activation == "relu"
    assert isinstance(net[1], nn.Identity)
    bn = BatchNormAct2d(8, act_layer=nn.ReLU)  # has its own: the next ReLU is not fused
    net = groupnorm.convert_batchnorm(nn.Sequential(bn, nn.ReLU()), 2, activation_fusion=True)
    assert net[0].activation == "relu" and isinstance(net[1], nn.ReLU)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SyncBatchNormAct(8),
        lambda: NaiveSyncBatchNorm(8),
        lambda: MmcvSyncBatchNorm(8, eps=1e-3),
        lambda: FrozenBatchNormAct2d(8),
    ],
)
def test_sync_frozen_and_mmcv_batchnorms_are_converted(make):
    m = randomize(make())
    act = getattr(m, "act", None)
    net = nn.Sequential(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groupnorm.convert_batchnorm(net, num_groups=4)
    gn = net[0]
    assert isinstance(gn, GroupNorm) and gn.eps == m.eps
    assert torch.equal(gn.weight.detach(), m.weight.detach())
    x = torch.randn(2, 8, 5, 5) * 2 + 1
    after = [copy.deepcopy(act)] if act is not None else []
    torch.testing.assert_close(net(x), gn_then(x, gn, 4, *after), atol=1e-5, rtol=1e-5)


def test_unknown_batchnorm_subclass_left_alone_with_one_warning_or_converted_on_request():
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class BNWithGate(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.gate = nn.Conv2d(c, c, 1)

    net = nn.Sequential(ScaledBN(8), BNWithGate(8), nn.BatchNorm2d(8), BatchNormAct2d(8))
    with pytest.warns(UserWarning) as record:
        groupnorm.convert_batchnorm(net, num_groups=2)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "0 (ScaledBN from" in msg and "1 (BNWithGate from" in msg
    assert "convert_unknown=True" in msg and "2 (" not in msg and "3 (" not in msg
    assert type(net[0]) is ScaledBN and type(net[1]) is BNWithGate
    assert type(net[2]) is GroupNorm and isinstance(net[3], GroupNormAct)
    with pytest.warns(UserWarning, match="converted these unrecognised.*0 \\(ScaledBN"):
        groupnorm.convert_batchnorm(net, num_groups=2, convert_unknown=True)
    assert type(net[0]) is GroupNorm and type(net[1]) is GroupNorm


def test_check_leaves_modes_and_buffers_unchanged():
    bn = randomize(BatchNormAct2d(8)).train()
    before = {k: t.clone() for k, t in bn.state_dict().items()}
    gn = groupnorm.convert_batchnorm(nn.Sequential(bn), num_groups=2)[0]
    assert isinstance(gn, GroupNormAct) and gn.training
    assert bn.training and bn.act.training  # the original layer, checked in eval mode, is restored
    for k, t in bn.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_batchnorm1d_never_gets_single_channel_groups():
    net = nn.Sequential(nn.Linear(16, 10), nn.BatchNorm1d(10), nn.Linear(10, 6), nn.BatchNorm1d(6))
    with pytest.warns(UserWarning, match=r"1 \(C=10\): 32 -> num_groups=5 \(BatchNorm1d"):
        groupnorm.convert_batchnorm(net)
    assert [net[1].num_groups, net[3].num_groups] == [5, 3]
    y = net(torch.randn(4, 16))
    assert y.std(dim=0).min() > 0  # depends on the input, not the constant bias
    with pytest.warns(UserWarning, match=r"kept these BatchNorm1d.*0 \(C=1\)"):
        kept = groupnorm.convert_batchnorm(nn.Sequential(nn.BatchNorm1d(1), nn.BatchNorm2d(1)), 1)
    assert type(kept[0]) is nn.BatchNorm1d and type(kept[1]) is GroupNorm
    with pytest.raises(ValueError, match="valid group counts: 1, 2, 4"):
        groupnorm.convert_batchnorm(nn.BatchNorm1d(8), num_groups=8, strict=True)
    with warnings.catch_warnings():  # a request with groups of 2+ channels is used as it is
        warnings.simplefilter("error")
        assert groupnorm.convert_batchnorm(nn.BatchNorm1d(8), num_groups=4).num_groups == 4
    assert groupnorm.convert.choose_num_groups(7, 32, min_group_size=2) == 1


# ----------------------------------------------------------------- replace_group_norm


def test_timm_style_group_norms_are_swapped_with_their_activations():
    net = nn.Sequential(
        TimmGroupNorm(16, num_groups=4),
        TimmGroupNormAct(16, num_groups=4, act_layer=nn.ReLU, inplace=True),
        TimmGroupNormAct(16, num_groups=2, act_layer=nn.Hardswish),
        TimmGroupNormAct(16, num_groups=1, act_layer=None),
    )
    randomize(net)
    ref = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groupnorm.replace_group_norm(net)
    assert type(net[0]) is GroupNorm and type(net[3]) is GroupNorm
    assert isinstance(net[1], GroupNormAct) and net[1].activation == "relu"
    assert isinstance(net[2], GroupNormAct) and isinstance(net[2].act, nn.Hardswish)
    assert [m.num_groups for m in net] == [4, 4, 2, 1]
    assert net.state_dict().keys() == ref.state_dict().keys()
    x = (torch.randn(2, 16, 5, 5) * 3 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = net(x), ref(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_foreign_group_norm_that_computes_something_else_is_left_alone():
    class GNPlusOne(TimmGroupNorm):
        def forward(self, x):
            return super().forward(x) + 1

    net = nn.Sequential(GNPlusOne(8, 2))
    with pytest.warns(UserWarning, match=r"left these subclasses.*0 \(GNPlusOne from"):
        groupnorm.replace_group_norm(net)
    assert type(net[0]) is GNPlusOne
    with pytest.warns(UserWarning, match="swapped these unrecognised"):
        groupnorm.replace_group_norm(net, convert_unknown=True)
    assert type(net[0]) is GroupNorm


# ----------------------------------------------------------------- GroupNormAct, factory


@pytest.mark.parametrize(
    "kwargs, fused, module",
    [
        (dict(activation="gelu"), "gelu", None),
        (dict(act_layer="silu", act_kwargs={"inplace": True}), "silu", None),
        (dict(act_layer=nn.ReLU), "relu", None),
        (dict(act_layer=F.silu), "silu", None),
        (dict(act_layer="gelu_tanh"), "", nn.GELU),
        (dict(act_layer="hard_swish", act_kwargs={"inplace": True}), "", nn.Hardswish),
        (dict(act_layer="sigmoid", act_kwargs={"inplace": True}), "", nn.Sigmoid),
        (dict(act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}), "", nn.LeakyReLU),
        (dict(act_layer=lambda: nn.Mish()), "", nn.Mish),
        (dict(act_layer=nn.ELU(alpha=0.5)), "", nn.ELU),
        (dict(act_layer="identity"), "", None),
    ],
)
def test_group_norm_act_activation_forms(kwargs, fused, module):
    m = randomize(GroupNormAct(4, 16, **kwargs))
    assert m._activation == fused
    assert (m.act is None) if module is None else isinstance(m.act, module)
    x = (torch.randn(2, 16, 3, 3) * 2).requires_grad_()
    y = m(x)
    h = F.group_norm(x, 4, m.weight, m.bias)
    want = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}.get(fused) or (m.act or (lambda t: t))
    torch.testing.assert_close(y, want(h), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_group_norm_act_errors():
    with pytest.raises(ValueError, match="not both"):
        GroupNormAct(2, 8, activation="relu", act_layer="silu")
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        GroupNormAct(2, 8, act_layer="swishy")
    with pytest.raises(TypeError, match="not an nn.Module"):
        GroupNormAct(2, 8, act_layer=lambda: torch.sigmoid)
    with pytest.raises(TypeError, match="already built"):
        GroupNormAct(2, 8, act_layer=nn.SiLU(), act_kwargs={"inplace": True})
    with pytest.raises(TypeError, match="act_layer must be"):
        GroupNormAct(2, 8, act_layer=3)
    assert GroupNormAct(2, 8).activation == "silu"  # the default is unchanged


def test_get_norm_layer_is_a_keyword_only_partial_frameworks_can_rebind():
    make = groupnorm.get_norm_layer("gn", num_groups=8)
    assert isinstance(make, functools.partial) and make.args == ()
    # timm: take the partial apart and bind its keywords (and its own) again
    rebound = functools.partial(make.func, **make.keywords, device="cpu")
    assert type(rebound(64)) is GroupNorm and rebound(64).num_groups == 8
    # detectron2 / torchvision: norm(out_channels)
    assert make(32).num_groups == 8
    act = groupnorm.get_norm_layer("gn", num_groups=4, act_layer="hard_swish")
    layer = act(16, apply_act=True, inplace=True)
    assert isinstance(layer.act, nn.Hardswish) and layer.act.inplace
    assert type(act(16, apply_act=False)) is GroupNorm
    assert type(groupnorm.get_norm_layer("gn_silu")(64, apply_act=False)) is GroupNorm
    with pytest.raises(TypeError, match="norm-act layer.*no activation"):
        groupnorm.get_norm_layer("gn")(64, inplace=True)
    with pytest.raises(TypeError, match="fixes the activation"):
        groupnorm.get_norm_layer("gn_silu", act_layer="relu")
