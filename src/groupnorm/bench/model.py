"""A small ResNet-style network for the training-step benchmark.

Three stages of basic blocks (conv3x3-norm-relu-conv3x3-norm, plus the shortcut, then relu) on
28x28 single-channel inputs, as in the Fashion-MNIST reproduction: widths 16, 32, 64, strides
1, 2, 2, global average pooling and a linear classifier. The norm layer is a parameter, so the
same network is built with torch's BatchNorm, torch's GroupNorm or ours.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..modules import GroupNorm, GroupNormAct

NormFactory = Callable[[int, bool], nn.Module]
"""(channels, followed_by_relu) -> a module that normalizes (and applies relu when True)."""


def _torch_bn(c: int, relu: bool) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True)) if relu else nn.BatchNorm2d(c)


def _torch_gn(c: int, relu: bool) -> nn.Module:
    g = min(8, c)
    return nn.Sequential(nn.GroupNorm(g, c), nn.ReLU(inplace=True)) if relu else nn.GroupNorm(g, c)


def _ours_gn(c: int, relu: bool) -> nn.Module:
    g = min(8, c)
    return GroupNormAct(g, c, activation="relu") if relu else GroupNorm(g, c)


NORMS: dict[str, NormFactory] = {"torch_bn": _torch_bn, "torch_gn": _torch_gn, "ours_gn": _ours_gn}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm(cout, True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm(cout, False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout, False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """3 stages x ``blocks`` basic blocks, widths 16/32/64, for 1x28x28 inputs.

    >>> m = SmallResNet("ours_gn")
    >>> m(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, norm: str = "torch_bn", blocks: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        factory = NORMS[norm]
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), factory(16, True))
        layers: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, factory))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def train_step_fn(norm: str, batch: int = 32, blocks: int = 1, seed: int = 0) -> Callable[[], None]:
    """A closure doing one SGD step (forward, cross-entropy, backward, update) on fixed data."""
    torch.manual_seed(seed)
    model = SmallResNet(norm, blocks)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step
