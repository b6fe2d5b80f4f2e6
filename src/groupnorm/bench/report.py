"""Markdown tables from a results CSV: ours' speedup over torch (per case, and summarized per
op, dtype and layout), memory kept for backward, and the training step.
``python -m groupnorm.bench.report results.csv``."""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .cases import MODES
from .suite import read_rows

# A cell where ours or torch averaged at least this many minor page faults a call is marked:
# fresh pages then weigh in the ratio, and whether a call gets them depends on the allocator's
# state (benchmarks/README.md, "Method")
PAGING_FAULTS = 16.0


def paging_cells(rows: list[dict]) -> set[tuple]:
    """(op, shape, dtype, layout, mode) of the cells where ours or torch faulted in fresh pages
    on most calls (PAGING_FAULTS or more a call)."""
    return {
        (r["op"], r["shape"], r["dtype"], r["layout"], r["mode"])
        for r in rows
        if r["metric"] == "page_faults"
        and r["provider"] in ("ours", "torch")
        and float(r["value"]) >= PAGING_FAULTS
    }


def speedup_table(rows: list[dict]) -> str:
    """One line per (op, shape, dtype, layout): torch time / ours time for each mode; "(paging)"
    marks a cell where ours or torch faulted in fresh pages on most calls."""
    table: dict[tuple, dict[str, str]] = defaultdict(dict)
    for r in rows:
        if r["provider"] == "ours" and r["metric"] == "speedup_vs_torch":
            table[(r["op"], r["shape"], r["dtype"], r["layout"])][r["mode"]] = (
                r["value"],
                r["p20"],
            )
    times = {
        (r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]): r["value"]
        for r in rows
        if r["provider"] == "ours" and r["metric"] == "time_us"
    }
    paging = paging_cells(rows)
    lines = [
        "| op | shape | dtype | layout | " + " | ".join(MODES) + " |",
        "|---|---|---|---|" + "---|" * len(MODES),
    ]
    for key, by_mode in table.items():
        cells = []
        for m in MODES:
            if m in by_mode:
                us = float(times.get((*key, m), "nan"))
                med, p20 = by_mode[m]
                mark = " (paging)" if (*key, m) in paging else ""
                cells.append(f"{float(med):.2f}x / {float(p20):.2f}x ({us:.0f} us){mark}")
            else:
                cells.append("")
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SMALL_VALUES = 16384  # tensors of up to this many values form their own row of the summary


def summary_table(rows: list[dict], below: float = 0.95) -> str:
    """One line per (op, dtype, layout, mode, size class): how many shapes, the smallest,
    median and largest speedup over torch (ratio of medians), and every shape under ``below``
    with its ratio, slowest first, "(paging)" marking those whose calls faulted in fresh
    pages. Size classes: tensors of up to 16k values (the "small" shape set), and the rest."""
    paging = paging_cells(rows)
    groups: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
    for r in rows:
        if r["provider"] != "ours" or r["metric"] != "speedup_vs_torch":
            continue
        numel = math.prod(int(d) for d in r["shape"].split("x"))
        size = f"up to {SMALL_VALUES // 1024}k values" if numel <= SMALL_VALUES else "larger"
        mark = (
            " (paging)"
            if (r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]) in paging
            else ""
        )
        groups[(r["op"], r["dtype"], r["layout"], r["mode"], size)].append(
            (float(r["value"]), r["shape"] + mark)
        )
    lines = [
        f"| op | dtype | layout | mode | shapes | n | min | median | max | below {below} |",
        "|" + "---|" * 10,
    ]
    for key, cells in groups.items():
        ratios = [v for v, _ in cells]
        slow = "; ".join(f"{shape} {v:.2f}" for v, shape in sorted(cells) if v < below) or "-"
        lines.append(
            "| " + " | ".join(key) + f" | {len(cells)} | {min(ratios):.2f} | "
            f"{statistics.median(ratios):.2f} | {max(ratios):.2f} | {slow} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    """Bytes kept for backward, ours against torch, per case."""
    kept: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["metric"] == "retained_bytes":
            kept[(r["op"], r["shape"], r["dtype"], r["layout"])][r["provider"]] = float(r["value"])
    lines = ["| op | shape | dtype | layout | ours MB | torch MB | ours/torch |", "|" + "---|" * 7]
    for key, v in kept.items():
        if "ours" in v and "torch" in v and v["torch"] > 0:
            lines.append(
                "| " + " | ".join(key) + f" | {v['ours'] / 1e6:.2f} | {v['torch'] / 1e6:.2f} | "
                f"{v['ours'] / v['torch']:.2f} |"
            )
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    """The ResNet training step per norm: median ms and the ratio to torch's BatchNorm."""
    lines = [
        "| norm | step ms (p20-p80) | / torch BN (median) | / torch BN (p20) |",
        "|---|---|---|---|",
    ]
    t = {r["provider"]: r for r in rows if r["op"] == "resnet_step" and r["metric"] == "time_us"}
    ratio = {
        r["provider"]: (r["value"], r["p20"])
        for r in rows
        if r["op"] == "resnet_step" and r["metric"] == "ratio_vs_torch_bn"
    }
    for name, r in t.items():
        lines.append(
            f"| {name} | {float(r['value']) / 1e3:.1f} ({float(r['p20']) / 1e3:.1f}-"
            f"{float(r['p80']) / 1e3:.1f}) | {float(ratio[name][0]):.2f} | "
            f"{float(ratio[name][1]):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m groupnorm.bench.report RESULTS.csv", file=sys.stderr)
        return 2
    rows = read_rows(Path(argv[0]))
    if rows:
        print(f"machine: {rows[0]['machine']}; date {rows[0]['date']}; commit {rows[0]['commit']}")
    print(
        "\nSpeedup of ours over torch, same run: ratio of medians / ratio of 20th percentiles "
        "(ours' median time)\n"
    )
    print(speedup_table(rows))
    print("\nSummary per op, dtype, layout and mode (ratio of medians)\n")
    print(summary_table(rows))
    print("\nMemory kept for backward\n")
    print(memory_table(rows))
    if any(r["op"] == "resnet_step" for r in rows):
        print("\nTraining step of the small ResNet (batch 32, 28x28)\n")
        print(step_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
