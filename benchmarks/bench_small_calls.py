"""Host cost of small calls: every module and function on a tiny tensor against torch.nn.

On a tensor of 2x32x4x4 values a call is almost all host work (argument checks, routing,
allocation), so this measures the route a call takes rather than the kernels. Each case runs
ours and torch's equivalent alternately, many rounds, and reports the median time of each and
torch's time over ours (above 1: ours is faster) as the median over the adjacent pairs.

    python benchmarks/bench_small_calls.py [--threads 1] [--shape 2,32,4,4] [--csv FILE]

Cases: GroupNorm, GroupNormAct (against GroupNorm then SiLU), group_norm, LayerNorm and
InstanceNorm presets, BatchNorm in training and in eval; each with grad enabled and under
no_grad, forward and forward+backward (where there is a backward).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import time

import torch
import torch.nn.functional as F

import groupnorm
from groupnorm.bench.suite import cpu_model


def _cases(shape):
    c = shape[1]
    g = 8 if c % 8 == 0 else 1
    gn, tgn = groupnorm.GroupNorm(g, c), torch.nn.GroupNorm(g, c)
    gna = groupnorm.GroupNormAct(g, c, activation="silu")
    ln, tln = groupnorm.LayerNorm(c), torch.nn.GroupNorm(1, c)
    inn, tin = groupnorm.InstanceNorm(c), torch.nn.GroupNorm(c, c)
    bn, tbn = groupnorm.BatchNorm(c), torch.nn.BatchNorm2d(c) if len(shape) == 4 else None
    tbn = tbn or torch.nn.BatchNorm1d(c)
    bne, tbne = groupnorm.BatchNorm(c).eval(), type(tbn)(c).eval()
    w, b = torch.ones(c), torch.zeros(c)
    return [
        ("GroupNorm", gn, tgn),
        ("GroupNormAct", gna, lambda x: F.silu(tgn(x))),
        (
            "group_norm",
            lambda x: groupnorm.group_norm(x, g, w, b),
            lambda x: F.group_norm(x, g, w, b),
        ),
        ("LayerNorm", ln, tln),
        ("InstanceNorm", inn, tin),
        ("BatchNorm-train", bn, tbn),
        ("BatchNorm-eval", bne, tbne),
    ]


def _time(fn, rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", default="2,32,4,4")
    parser.add_argument("--repeats", type=int, default=15, help="alternations per case")
    parser.add_argument("--rounds", type=int, default=200, help="calls per timing")
    parser.add_argument("--csv", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    xg = x.clone().requires_grad_()
    rows = []
    for name, ours, theirs in _cases(shape):
        for grad in ("grad", "no_grad"):
            for mode in ("forward", "forward+backward"):
                if mode == "forward+backward" and grad == "no_grad":
                    continue

                def make(fn, grad=grad, mode=mode, name=name):
                    if mode == "forward":
                        if grad == "no_grad":

                            def call():
                                with torch.no_grad():
                                    fn(x)
                        else:

                            def call():
                                fn(xg if name != "BatchNorm-eval" else x)

                        return call

                    def call():
                        fn(xg).sum().backward()

                    return call

                a, t = make(ours), make(theirs)
                for _ in range(20):  # warm-up (first-call builds, allocator)
                    a()
                    t()
                ours_s, torch_s = [], []
                for _ in range(args.repeats):
                    ours_s.append(_time(a, args.rounds))
                    torch_s.append(_time(t, args.rounds))
                mo, mt = statistics.median(ours_s), statistics.median(torch_s)
                # the ratio of each adjacent pair of timings, then their median: load that
                # comes and goes between pairs cancels within a pair
                ratio = statistics.median(t / o for o, t in zip(ours_s, torch_s, strict=True))
                rows.append((name, grad, mode, mo * 1e6, mt * 1e6, ratio))
                print(
                    f"{name:16s} {grad:8s} {mode:17s} ours {mo * 1e6:7.1f} us  "
                    f"torch {mt * 1e6:7.1f} us  torch/ours {ratio:5.2f}x",
                    flush=True,
                )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(
                [
                    "case",
                    "grad",
                    "mode",
                    "shape",
                    "threads",
                    "ours_us",
                    "torch_us",
                    "torch_over_ours",
                    "machine",
                    "date",
                    "torch",
                ]
            )
            for name, grad, mode, mo, mt, r in rows:
                out.writerow(
                    [
                        name,
                        grad,
                        mode,
                        "x".join(map(str, shape)),
                        args.threads,
                        f"{mo:.2f}",
                        f"{mt:.2f}",
                        f"{r:.3f}",
                        cpu_model(),
                        datetime.date.today().isoformat(),
                        torch.__version__,
                    ]
                )


if __name__ == "__main__":
    main()
