"""Time two builds of benchmarks/cpu_kernel_harness.cpp against each other, interleaved.

Each case runs build A, then B, then A, ... (ROUNDS times each), and the table gives each
build's best median and B's time over A's: on a shared machine, load from other processes
hits both alike, and the best of a few medians drops most of it. Usage:

    python benchmarks/compare_harness.py /tmp/harness_old /tmp/harness_new [--rounds 3]

Build the two binaries as the harness's header says (a version of the kernels kept in one
file is built with -DKERNELS=...). Prints one line per case and the median of the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

# (label, dtype, act, N, C, S, G, layout, pass): forward of every op (GN, LN, IN, BN), GN+SiLU
# forward and backward, both layouts, float32 and bfloat16, UNet and ResNet stage shapes; and
# instance norm on small maps (many short sets), in every dtype, also with SiLU
SHAPES = [(2, 1280, 256, 32), (2, 2048, 49, 32), (8, 512, 784, 32), (2, 320, 4096, 32)]
SMALL_SETS = [(2, 32, 16), (8, 128, 16), (2, 64, 49), (4, 32, 256), (2, 32, 4)]


def cases():
    for dtype, dname in ((0, "float32"), (1, "bfloat16")):
        for layout, lname in ((0, "contiguous"), (1, "channels_last")):
            for n, c, s, g in SHAPES:
                shape = f"{n}x{c}x{s}"
                yield (f"gn {dname} {lname} {shape}", dtype, 0, n, c, s, g, layout, 0)
                yield (f"gn_silu fwd {dname} {lname} {shape}", dtype, 1, n, c, s, g, layout, 0)
                yield (f"gn_silu bwd {dname} {lname} {shape}", dtype, 1, n, c, s, g, layout, 1)
            n, c, s = 8, 512, 784
            yield (f"ln {dname} {lname} {n}x{c}x{s}", dtype, 0, n, c, s, 1, layout, 0)
            yield (f"in {dname} {lname} {n}x{c}x{s}", dtype, 0, n, c, s, c, layout, 0)
            for n, c, s in ((8, 512, 784), (32, 2048, 49)):
                yield (f"bn {dname} {lname} {n}x{c}x{s}", dtype, 0, n, c, s, 1, layout, 2)
    for dtype, dname in ((0, "float32"), (1, "bfloat16"), (2, "float16")):
        for layout, lname in ((0, "contiguous"), (1, "channels_last")):
            for n, c, s in SMALL_SETS:
                for act, aname in ((0, "in"), (1, "in_silu")):
                    yield (
                        f"{aname} {dname} {lname} {n}x{c}x{s}",
                        dtype,
                        act,
                        n,
                        c,
                        s,
                        c,
                        layout,
                        0,
                    )


def time_once(binary: str, args, reps: int) -> tuple[float, str]:
    out = subprocess.run(
        [binary, *map(str, args), str(reps)], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), out[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--match", default="", help="only the cases whose label contains this text")
    args = p.parse_args()
    ratios = []
    print(f"{'case':48s} {'A us':>9s} {'B us':>9s}  B/A  same bits")
    for label, *rest in cases():
        if args.match not in label:
            continue
        ta, tb = [], []
        for _ in range(args.rounds):
            t, bits_a = time_once(args.a, rest, args.reps)
            ta.append(t)
            t, bits_b = time_once(args.b, rest, args.reps)
            tb.append(t)
        a, b = min(ta), min(tb)
        ratios.append(b / a)
        print(f"{label:48s} {a:9.1f} {b:9.1f} {b / a:5.2f} {bits_a == bits_b}", flush=True)
    print(
        f"median B/A {statistics.median(ratios):.3f}, min {min(ratios):.2f}, max {max(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
