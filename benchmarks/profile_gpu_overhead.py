"""Where the time of one small GPU call goes: host (Python and launches) against device.

For one shape, times N back-to-back calls of each layer of the stack with a host clock and no
synchronisation inside the loop (so the number is the host's cost per call whenever the GPU keeps
up), then the GPU time of the kernels with CUDA events, and prints a cProfile of the slowest layer.

    python benchmarks/profile_gpu_overhead.py [--shape 1,320,16,16] [--dtype float16]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F


def host_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    import groupnorm
    from groupnorm.kernels import Call, GradCall
    from groupnorm.kernels.triton import launch

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1,320,16,16")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--groups", type=int, default=32)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    g = args.groups
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape[1], device="cuda", dtype=dtype)
    b = torch.randn(shape[1], device="cuda", dtype=dtype)
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    _, _, mean, rstd = launch.launch_forward(Call(x, w, b, None, None, None, g, False, 1e-5, ""))
    layers = {
        "torch F.group_norm (no grad)": lambda: F.group_norm(x, g, w, b),
        "torch F.group_norm (x requires grad)": lambda: F.group_norm(xg, g, w, b),
        "launch.launch_forward": lambda: launch.launch_forward(
            Call(x, w, b, None, None, None, g, False, 1e-5, "")
        ),
        "launch.launch_backward": lambda: launch.launch_backward(
            GradCall(dy, x, w, b, mean, rstd, g, False, False, "", (True, True, True))
        ),
        "torch.ops.groupnorm.forward": lambda: torch.ops.groupnorm.forward(
            x, w, b, None, None, None, g, False, 1e-5, "", "triton"
        ),
        "groupnorm.group_norm (no grad)": lambda: groupnorm.group_norm(
            x, g, w, b, backend="triton"
        ),
        "groupnorm.group_norm (x requires grad)": lambda: groupnorm.group_norm(
            xg, g, w, b, backend="triton"
        ),
    }
    print(f"shape {shape} {args.dtype} G={g}; host microseconds per call")
    for name, fn in layers.items():
        try:
            with torch.no_grad() if "no grad" in name else torch.enable_grad():
                print(f"{name:>42}: {host_us(fn):8.1f}")
        except Exception as exc:  # report and go on
            print(f"{name:>42}: failed: {type(exc).__name__}: {str(exc)[:200]}")
    # Device time of our forward kernels alone, from CUDA events around many calls.
    fwd = layers["launch.launch_forward"]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd()
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(200):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"{'our forward kernels, CUDA graph replay':>42}: {start.elapsed_time(end) * 5:8.1f} us")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        groupnorm.group_norm(xg, g, w, b, backend="triton")
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
