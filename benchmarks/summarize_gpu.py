"""Markdown tables from the GPU benchmark's CSVs (``bench_triton_gpu.py``).

    python benchmarks/summarize_gpu.py benchmarks/results/triton-*.csv

For each shape, dtype and layout: our time and torch eager's in the same run (eager clock and
CUDA-graph clock), their ratio, and the bandwidth of our forward against the copy's; then the
peers (Liger-Kernel, torch.compile) against ours where they were measured.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict


def load(paths: list[str]) -> dict:
    """(provider, mode, shape, dtype, layout) -> {metric: value}, plus the gpu and dates."""
    table: dict = defaultdict(dict)
    meta = set()
    for path in paths:
        with open(path) as fh:
            for r in csv.DictReader(fh):
                key = (r["provider"], r["mode"], r["shape"], r["dtype"], r["layout"])
                table[key][r["metric"]] = float(r["value"])
                meta.add((r["gpu"], r["date"][:10], r["commit"]))
    return table, meta


def _ms(table, provider, mode, shape, dtype, layout):
    return table.get((provider, mode, shape, dtype, layout), {}).get("ms_median")


def main(paths: list[str]) -> None:
    table, meta = load(paths)
    for gpu, date, commit in sorted(meta):
        print(f"- {gpu}, {date}, commit {commit}")
    cases = sorted(
        {(k[2], k[3], k[4]) for k in table if k[0] == "groupnorm"},
        key=lambda k: (k[0].count("x"), [int(v) for v in k[0].split("x")], k[1], k[2]),
    )
    print()
    print(
        "| shape | dtype | layout | fwd ms ours / torch (eager) | x | fwd us ours / torch "
        "(graph) | x | ours % of copy (graph) | fwd+bwd ms ours / torch (eager) | x |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = defaultdict(list)
    for shape, dtype, layout in cases:
        cells = [shape, dtype, layout]
        for mode, scale in (("forward", 1), ("forward_graph", 1000)):
            ours = _ms(table, "groupnorm", mode, shape, dtype, layout)
            base = _ms(table, "torch", mode, shape, dtype, layout)
            if ours is None or base is None:
                cells += ["-", "-"]
                if mode == "forward_graph":
                    cells.append("-")
                continue
            cells += [f"{ours * scale:.3g} / {base * scale:.3g}", f"{base / ours:.2f}"]
            ratios[mode].append(base / ours)
            if mode == "forward_graph":
                copy = _ms(table, "copy", "copy_graph", shape, dtype, "contiguous")
                cells.append(f"{100 * copy / ours:.0f}%" if copy else "-")
        ours = _ms(table, "groupnorm", "full", shape, dtype, layout)
        base = _ms(table, "torch", "full", shape, dtype, layout)
        if ours is None or base is None:
            cells += ["-", "-"]
        else:
            cells += [f"{ours:.3g} / {base:.3g}", f"{base / ours:.2f}"]
            ratios["full"].append(base / ours)
        print("| " + " | ".join(cells) + " |")
    print()
    for mode, values in ratios.items():
        print(
            f"- {mode}: torch/ours median {statistics.median(values):.2f}x, "
            f"min {min(values):.2f}x, max {max(values):.2f}x over {len(values)} cases"
        )
    for peer in ("liger", "torch.compile"):
        rows = []
        for shape, dtype, layout in cases:
            for mode in ("forward", "forward_graph", "full"):
                theirs = _ms(table, peer, mode, shape, dtype, layout)
                ours = _ms(table, "groupnorm", mode, shape, dtype, layout)
                if theirs is not None and ours is not None:
                    rows.append((shape, dtype, layout, mode, theirs / ours))
        if not rows:
            continue
        print(f"\n{peer} time / ours (> 1: ours is faster)\n")
        print("| shape | dtype | layout | forward | forward (graph) | fwd+bwd |")
        print("|---|---|---|---|---|---|")
        by_case = defaultdict(dict)
        for shape, dtype, layout, mode, r in rows:
            by_case[(shape, dtype, layout)][mode] = r
        for (shape, dtype, layout), modes in by_case.items():
            vals = [
                f"{modes[m]:.2f}" if m in modes else "-"
                for m in ("forward", "forward_graph", "full")
            ]
            print(f"| {shape} | {dtype} | {layout} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
