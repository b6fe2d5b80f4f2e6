"""torch.compile(fullgraph=True) through models built with our layers: no graph break, same
outputs and gradients as eager."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import functional as gf


class BasicBlock(nn.Module):
    """Post-activation ResNet block (add after the second norm, as torchvision), fused GN+ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = groupnorm.GroupNormAct(4, cout, activation="relu")
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = groupnorm.GroupNorm(4, cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                groupnorm.WSConv2d(cin, cout, 1, stride, bias=False), groupnorm.GroupNorm(4, cout)
            )

    def forward(self, x):
        out = self.gn2(self.conv2(self.gn1(self.conv1(x))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), groupnorm.GroupNormAct(4, 16, activation="relu")
        )
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


class ResnetBlock(nn.Module):
    """diffusers-style UNet block: GN+SiLU, conv, GN+SiLU, conv, residual (1x1 when C changes)."""

    def __init__(self, cin: int, cout: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = groupnorm.GroupNormAct(groups, cin, eps=1e-6, activation="silu")
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = groupnorm.GroupNormAct(groups, cout, eps=1e-6, activation="silu")
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        return self.shortcut(x) + h


class PreNormResidual(nn.Module):
    """The norm's own residual input: y = silu(gn(x + f(x))), carried through compile."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Conv2d(c, c, 3, padding=1)
        self.norm = groupnorm.GroupNormAct(4, c, activation="silu")

    def forward(self, x):
        return self.norm(self.f(x), residual=x)


def randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def check_compiled(model, x, backend="aot_eager", atol=1e-5):
    torch._dynamo.reset()
    eager = model
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, y2 = eager(x1), compiled(x2)
    torch.testing.assert_close(y2, y1, atol=atol, rtol=1e-5)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad, atol=atol, rtol=1e-5)
    grads = dict(compiled_model.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=atol, rtol=1e-5, msg=name)


def test_small_resnet_fullgraph_aot_eager():
    check_compiled(randomize(SmallResNet()), torch.randn(2, 3, 16, 16))


def test_unet_resnet_block_fullgraph_aot_eager():
    check_compiled(randomize(ResnetBlock(16, 32)), torch.randn(2, 16, 8, 8) * 2 + 1)


def test_norm_residual_input_fullgraph_aot_eager():
    check_compiled(randomize(PreNormResidual(8)), torch.randn(2, 8, 6, 6))


def test_dynamic_batch_compiles_once():
    torch._dynamo.reset()
    model = randomize(ResnetBlock(8, 8, groups=4))
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for n in (2, 3, 5):
        x = torch.randn(n, 8, 6, 6)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(frames) == 1


@pytest.mark.slow
def test_inductor_once():
    """The default backend once: it builds C++ on CPU (about 25 s cold here), so the model is
    one conv and a fused GN+SiLU with a residual input, forward and backward."""
    check_compiled(randomize(PreNormResidual(8)), torch.randn(2, 8, 4, 4), backend="inductor")


# ---- torch.compile and the JIT tracer on a bare functional call -------------------------------


def test_compile_still_traces_the_op():
    f = torch.compile(
        lambda t: gf.group_norm(t, 2, activation="silu"), fullgraph=True, backend="eager"
    )
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(f(x), gf.group_norm(x, 2, activation="silu"))


def test_jit_trace_records_the_op_not_a_constant():
    """Tracing must not run the kernels behind the tracer's back (it would record the output
    as a constant): a traced function gives the right answer on a new input."""
    x = torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda a: groupnorm.group_norm(a, 2), (x,), check_trace=False)
    fresh = torch.randn(2, 4, 3, 3) * 3 + 1
    torch.testing.assert_close(traced(fresh), F.group_norm(fresh, 2), rtol=1e-5, atol=1e-5)
