"""Training-step time of a small CNN with synchronized batch norm against per-worker batch norm.

Two (``--ranks``) gloo processes on this machine, each with ``--threads`` torch threads, train
the same CNN inside DistributedDataParallel, once with each normalization:

* ``bn``: :class:`groupnorm.BatchNorm`, statistics per worker (no communication in the norm);
* ``torch-bn``: ``torch.nn.BatchNorm2d``, the same with torch's kernels;
* ``sync``: :class:`groupnorm.SyncBatchNorm` (the same model after ``convert_sync_batchnorm``):
  statistics over all workers, one ``all_gather`` per layer in the forward and one
  ``all_reduce`` per layer in the backward.

The variants take turns (``--rounds`` rounds of ``--steps`` steps each, after a warm-up), so a
change in the machine's load hits all of them alike; each variant's step time is the median
over its rounds, and the ratio is its median over ``bn``'s (above 1: slower than per-worker
batch norm). Rank 0 prints the table and writes the CSV.

    python benchmarks/bench_sync_batchnorm.py [--ranks 2] [--batch 16] [--csv FILE]

torch.nn.SyncBatchNorm needs CUDA tensors, so it has no CPU row; on a machine with GPUs the
same comparison over NCCL is not part of this script.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import groupnorm
from groupnorm.bench.suite import cpu_model, git_commit

VARIANTS = ("bn", "torch-bn", "sync")


def make_model(variant: str, width: int) -> nn.Module:
    """A small CNN for 32x32 RGB images: three conv-norm-ReLU stages and a linear head."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if variant == "torch-bn" else groupnorm.BatchNorm
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        norm(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        norm(2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
        norm(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )
    if variant == "sync":
        model = groupnorm.convert_sync_batchnorm(model)
    return model


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        setups = {}
        for variant in VARIANTS:
            model = make_model(variant, args.width)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
            setups[variant] = (ddp, opt)

        def steps(variant: str, n: int) -> float:
            ddp, opt = setups[variant]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(n):
                loss = nn.functional.cross_entropy(ddp(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            dist.barrier()
            return (time.perf_counter() - start) / n

        for variant in VARIANTS:
            steps(variant, args.warmup)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                times[variant].append(steps(variant, args.steps))
        if rank == 0:
            _report(times, args, world)
        for ddp, _ in setups.values():
            del ddp
        setups.clear()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip C++ teardown, which gloo sometimes aborts in


def _report(times: dict[str, list[float]], args: argparse.Namespace, world: int) -> None:
    machine = (
        f"{cpu_model()}; {os.cpu_count()} cores; {world} gloo processes x {args.threads} "
        f"thread(s); torch {torch.__version__}; load at start {args.load:.1f}"
    )
    base = statistics.median(times["bn"])
    rows = []
    print(f"# {machine}")
    print(
        f"# CNN width {args.width}, {args.batch} images of {args.size}x{args.size} per rank; "
        f"median of {args.rounds} rounds of {args.steps} steps"
    )
    print(f"{'variant':<10} {'step ms':>9} {'vs bn':>7}")
    for variant in VARIANTS:
        med = statistics.median(times[variant])
        ratio = med / base
        print(f"{variant:<10} {med * 1e3:9.2f} {ratio:7.3f}")
        rows.append(
            {
                "variant": variant,
                "ranks": world,
                "threads": args.threads,
                "batch_per_rank": args.batch,
                "size": args.size,
                "width": args.width,
                "step_ms_median": round(med * 1e3, 3),
                "step_ms_min": round(min(times[variant]) * 1e3, 3),
                "ratio_vs_bn": round(ratio, 4),
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "machine": machine,
                "date": datetime.date.today().isoformat(),
                "commit": args.commit,
            }
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="gloo processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch", type=int, default=16, help="images per rank and step")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing")
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per variant")
    parser.add_argument("--csv", default=None, help="write the table to this CSV file")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error("--ranks must be at least 1")
    args.load = os.getloadavg()[0]
    args.commit = git_commit()
    mp.spawn(_worker, args=(args.ranks, _free_port(), args), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
