"""``groupnorm modes``: the four modes of the one formula, side by side on one tensor."""

from __future__ import annotations

import argparse

import torch

from .functional import normalize
from .reference import reference_norm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed for the input tensor")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    n, c, h, w, g = 4, 8, 5, 5, 4
    x = torch.randn(n, c, h, w) * 3 + 1
    print(
        f"input x: shape (N, C, H, W) = {tuple(x.shape)}, mean {x.mean():.3f}, std {x.std():.3f}\n"
    )
    print(f"{'mode':<10}{'set S_i':<44}{'#sets':>6}{'|S_i|':>7}{'max err vs float64 ref':>24}")
    rows = [
        ("batch", {}, "same channel, all samples and positions", c, n * h * w),
        ("layer", {}, "same sample, all channels and positions", n, c * h * w),
        ("instance", {}, "same sample, same channel", n * c, h * w),
        (
            "group",
            {"num_groups": g},
            f"same sample, one group of C/G={c // g} channels",
            n * g,
            c // g * h * w,
        ),
    ]
    outputs = {}
    for mode, kw, desc, sets, size in rows:
        y = normalize(x, mode, **kw)
        ref = reference_norm(x, mode, **kw).output
        outputs[mode] = y
        err = (y.double() - ref).abs().max().item()
        print(f"{mode:<10}{desc:<44}{sets:>6}{size:>7}{err:>24.2e}")

    print("\nspecial cases of group norm:")
    gn1 = normalize(x, "group", num_groups=1)
    gnc = normalize(x, "group", num_groups=c)
    print(f"  GN(G=1) vs LN : max diff {(gn1 - outputs['layer']).abs().max():.1e}")
    print(f"  GN(G=C) vs IN : max diff {(gnc - outputs['instance']).abs().max():.1e}")

    print("\nbatch dependence (change samples 1..N-1, look at sample 0):")
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:]) * 10
    for mode, kw, *_ in rows:
        before = outputs[mode][0]
        after = normalize(x2, mode, **kw)[0]
        diff = (before - after).abs().max().item()
        print(
            f"  {mode:<9} sample 0 changed by {diff:.2e}"
            + ("   <- BN depends on the rest of the batch" if mode == "batch" else "")
        )
    return 0
