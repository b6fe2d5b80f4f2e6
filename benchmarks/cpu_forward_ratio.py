"""Quick check for the foundation: our CPU group-norm forward against torch's, in one run.

Prints, per shape, the median time of each and the ratio torch/ours (> 1 means we are faster).
Providers are interleaved repeat by repeat so that load from other processes hits both alike.

Usage: python benchmarks/cpu_forward_ratio.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import groupnorm

SHAPES = [  # (N, C, H, W, G): ResNet-style stages and a diffusion-UNet shape
    (8, 64, 56, 56, 32),
    (8, 256, 28, 28, 32),
    (8, 512, 14, 14, 32),
    (2, 320, 32, 32, 32),
    (32, 64, 28, 28, 16),
]


def _time(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per provider")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape (N,C,H,W) G':<26}{'torch ms':>10}{'ours ms':>10}{'torch/ours':>12}")
    for n, c, h, w, g in SHAPES:
        x = torch.randn(n, c, h, w)
        weight, bias = torch.randn(c), torch.randn(c)
        with torch.inference_mode():
            ours = functools.partial(groupnorm.group_norm, num_groups=g, weight=weight, bias=bias)
            theirs = functools.partial(F.group_norm, num_groups=g, weight=weight, bias=bias)
            for _ in range(3):
                ours(x)
                theirs(x)
            t_ours, t_theirs = [], []
            for _ in range(args.repeats):
                t_theirs.append(_time(theirs, x))
                t_ours.append(_time(ours, x))
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        label = f"({n},{c},{h},{w}) {g}"
        print(f"{label:<26}{mt * 1e3:>10.3f}{mo * 1e3:>10.3f}{mt / mo:>12.3f}")


if __name__ == "__main__":
    main()
