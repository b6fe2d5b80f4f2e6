"""What the suite measures: the ops, the providers of each op, and the shape sets.

An *op* is one normalization as a user calls it (``gn``, ``ln``, ``in``, ``bn`` and ``gn_silu``,
group norm followed by SiLU). Each op has providers: ``ours`` (:mod:`groupnorm.functional`),
``torch`` (the matching torch function, the baseline of every ratio), ``compile``
(``torch.compile`` of the torch function, opt-in: compiling costs tens of seconds per shape on
this machine) and peers when installed (``timm``: its ``GroupNormAct`` for ``gn_silu``).

The paper's LN (statistics over (C, \\*), affine per channel) is ``F.group_norm(x, 1, w, b)`` in
torch, so that is its torch provider; torch's IN is ``F.instance_norm`` with affine parameters.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import functional as gf

Shape = tuple[int, ...]
NormFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: default number of groups (the paper's G = 32), fewer when C is small
DEFAULT_GROUPS = 32


def groups_for(c: int) -> int:
    """G = 32 when it divides C, else the largest divisor of C not above 32."""
    return max(g for g in range(1, min(DEFAULT_GROUPS, c) + 1) if c % g == 0)


@dataclass(frozen=True)
class Case:
    """One input configuration of one op."""

    op: str
    shape: Shape
    dtype: torch.dtype
    layout: str  # "contiguous" | "channels_last"

    @property
    def label(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """x, dy, weight, bias (and BN running stats) on fresh random data."""
    g = torch.Generator().manual_seed(seed)
    c = case.shape[1]
    x = (torch.randn(case.shape, generator=g) * 2 + 0.5).to(case.dtype)
    dy = torch.randn(case.shape, generator=g).to(case.dtype)
    if case.layout == "channels_last":
        x, dy = to_channels_last(x), to_channels_last(dy)
    w = (torch.rand(c, generator=g) + 0.5).to(case.dtype)
    b = torch.randn(c, generator=g).to(case.dtype)
    return {
        "x": x,
        "dy": dy,
        "weight": w,
        "bias": b,
        "running_mean": torch.zeros(c, dtype=case.dtype),
        "running_var": torch.ones(c, dtype=case.dtype),
    }


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """Channels-last for rank 3 (N, L, C in memory), 4 and 5."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(f"no channels-last layout for rank {t.dim()}")


def op_functions(op: str, inputs: dict[str, torch.Tensor]) -> dict[str, NormFn]:
    """The callables ``f(x, weight, bias) -> y`` of each available provider of ``op``."""
    c = inputs["x"].shape[1]
    rm, rv = inputs["running_mean"], inputs["running_var"]
    G = groups_for(c)
    if op == "gn":
        fns = {
            "ours": lambda x, w, b: gf.group_norm(x, G, w, b),
            "torch": lambda x, w, b: F.group_norm(x, G, w, b),
        }
    elif op == "gn_silu":
        fns = {
            "ours": lambda x, w, b: gf.group_norm(x, G, w, b, activation="silu"),
            "torch": lambda x, w, b: F.silu(F.group_norm(x, G, w, b)),
        }
        if importlib.util.find_spec("timm") is not None:
            from timm.layers import GroupNormAct  # type: ignore[import-not-found]

            m = GroupNormAct(c, num_groups=G, act_layer="silu").to(inputs["x"].dtype)

            def timm_fn(x, w, b, m=m):
                m.weight, m.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)
                return m(x)

            fns["timm"] = timm_fn
    elif op == "ln":
        fns = {
            "ours": lambda x, w, b: gf.layer_norm(x, weight=w, bias=b),
            "torch": lambda x, w, b: F.group_norm(x, 1, w, b),
        }
    elif op == "in":
        fns = {
            "ours": lambda x, w, b: gf.instance_norm(x, weight=w, bias=b),
            "torch": lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
        }
    elif op == "bn":
        # each provider updates its own running statistics (torch saves them for backward,
        # so a shared buffer updated by another provider would invalidate its graph)
        rm2, rv2 = rm.clone(), rv.clone()
        fns = {
            "ours": lambda x, w, b: gf.batch_norm(x, rm, rv, w, b, training=True),
            "torch": lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, training=True),
        }
    else:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return fns


OPS = ("gn", "gn_silu", "ln", "in", "bn")
MODES = ("forward", "backward", "forward+backward")


def minimal_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """Least traffic any implementation must move: forward reads x and writes y; backward reads
    x and dy and writes dx; both together are the sum. Parameters are negligible."""
    units = {"forward": 2, "backward": 3, "forward+backward": 5}[mode]
    return units * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


# ---- shape sets -------------------------------------------------------------------------------


def resnet_shapes(batches: tuple[int, ...] = (32, 16, 8, 4, 2)) -> list[Shape]:
    """ResNet-50 stage outputs at 224x224 (C = 256..2048, 56x56..7x7)."""
    stages = ((256, 56), (512, 28), (1024, 14), (2048, 7))
    return [(n, c, s, s) for n in batches for c, s in stages]


def unet_shapes(batches: tuple[int, ...] = (1, 2)) -> list[Shape]:
    """Stable Diffusion UNet norms at 512x512 (latent 64x64): C = 320..1280, 64x64..8x8."""
    levels = ((320, 64), (640, 32), (1280, 16), (1280, 8))
    return [(n, c, s, s) for n in batches for c, s in levels]


SHAPE_SETS: dict[str, list[Shape]] = {
    "resnet": resnet_shapes(),
    "resnet-small": resnet_shapes((2,)),
    "unet": unet_shapes(),
    "unet-2": unet_shapes((2,)),
    "1d": [(8, 256, 4096), (32, 512, 128)],
    "3d": [(2, 64, 16, 32, 32), (4, 128, 8, 16, 16)],
    "small": [(2, 8, 4, 4), (4, 32, 8, 8), (1, 64, 16, 16)],
    "fmnist": [(32, 16, 28, 28), (32, 32, 14, 14), (32, 64, 7, 7)],
}
