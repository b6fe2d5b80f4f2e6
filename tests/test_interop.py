"""Real models: a diffusers UNet with our GroupNorm swapped in, a BN ResNet converted to GN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import groupnorm


def test_diffusers_unet_same_output_and_gradients():
    diffusers = pytest.importorskip(
        "diffusers", reason="needs diffusers (pip install diffusers; part of the dev extra)"
    )
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    with torch.no_grad():  # the output conv starts at zero in some configs; make all non-trivial
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = groupnorm.replace_group_norm(copy.deepcopy(unet))
    n_torch = sum(type(m) is nn.GroupNorm for m in unet.modules())
    n_ours = sum(type(m) is groupnorm.GroupNorm for m in ours.modules())
    assert n_torch > 10 and n_ours == n_torch
    assert not any(type(m) is nn.GroupNorm for m in ours.modules())

    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 500])
    y_ref = unet(x, t).sample
    y = ours(x, t).sample
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    grads = dict(ours.named_parameters())
    for name, p in unet.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)


class Bottleneck(nn.Module):
    """torchvision-style bottleneck (1x1, 3x3, 1x1; BN after each; downsample branch)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True)
        )
        self.layer1 = nn.Sequential(Bottleneck(24, 8), Bottleneck(32, 8))
        self.layer2 = nn.Sequential(Bottleneck(32, 16, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))


def test_converted_resnet_trains():
    torch.manual_seed(0)
    model = TinyResNet()
    with pytest.warns(UserWarning, match=r"stem\.1 \(C=24\): 32 -> num_groups=24"):
        groupnorm.convert_batchnorm(
            model,
            activation_fusion=True,
            weight_standardization=True,
            zero_init_last=True,
        )
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model.stem[1], groupnorm.GroupNormAct)
    assert isinstance(model.layer1[0].conv1, groupnorm.WSConv2d)
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0  # zero_init_last
    # A fixed small batch (a batch of 4: where BN struggles and GN does not care).
    x = torch.randn(4, 3, 12, 12)
    target = torch.tensor([1, 3, 5, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
