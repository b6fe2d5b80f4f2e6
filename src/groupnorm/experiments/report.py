"""Tables, the plot and the Markdown report of a run directory.

Spread: every cell is the mean over seeds ``±`` half the range (max - min) / 2; the plot's
error bars span min to max, so two cells whose bars do not touch have seed ranges that do
not overlap.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = [
    "aggregate",
    "format_table",
    "markdown_table",
    "plot",
    "science_checks",
    "write_report",
    "LABELS",
]

LABELS = {
    "bn": "BN",
    "bn-sync": "BN, sync",
    "gn": "GN",
    "ln": "LN",
    "in": "IN",
    "none": "no norm",
}


def _row_name(record: dict[str, Any]) -> str:
    return record["norm"] if record.get("groups") is None else f"gn-G{record['groups']}"


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
    """``{row: {images_per_worker: [error per seed]}}``; rows are norms (``gn-G4`` for the
    sweep)."""
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[_row_name(r)][int(r["images_per_worker"])].append(float(r["test_error"]))
    return {k: dict(v) for k, v in cells.items()}


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    lo, hi = min(values), max(values)
    return statistics.fmean(values), (hi - lo) / 2, lo, hi


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    mean, half, _, _ = _stats(values)
    return f"{mean:.1f} ± {half:.1f}" if len(values) > 1 else f"{mean:.1f}"


def _ordered_rows(cells: dict[str, Any]) -> list[str]:
    order = list(LABELS)
    main = [r for r in order if r in cells]
    sweep = sorted((r for r in cells if r.startswith("gn-G")), key=lambda r: int(r[4:]))
    return main + sweep


def _label(row: str) -> str:
    return LABELS.get(row, row.replace("gn-G", "GN, G="))


def format_table(records: list[dict[str, Any]]) -> str:
    """Plain-text table like the paper's: rows normalization, columns images per worker."""
    cells = aggregate(records)
    batches = sorted({b for row in cells.values() for b in row}, reverse=True)
    head = f"{'top-1 error (%)':<16}" + "".join(f"{b:>14}" for b in batches)
    lines = [head, "-" * len(head)]
    for row in _ordered_rows(cells):
        lines.append(
            f"{_label(row):<16}" + "".join(f"{_cell(cells[row].get(b)):>14}" for b in batches)
        )
    lines.append("columns: images per worker; cells: mean ± half the range over seeds")
    return "\n".join(lines)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The same table in Markdown."""
    cells = aggregate(records)
    batches = sorted({b for row in cells.values() for b in row}, reverse=True)
    lines = [
        "| error (%) \\ images per worker | " + " | ".join(str(b) for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for row in _ordered_rows(cells):
        lines.append(
            f"| {_label(row)} | " + " | ".join(_cell(cells[row].get(b)) for b in batches) + " |"
        )
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Error vs images per worker (log2 x axis), one line per normalization, min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = aggregate(records)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for row in _ordered_rows(cells):
        if row.startswith("gn-G"):
            continue
        batches = sorted(cells[row])
        stats = [_stats(cells[row][b]) for b in batches]
        means = [s[0] for s in stats]
        err = [[s[0] - s[2] for s in stats], [s[3] - s[0] for s in stats]]
        ax.errorbar(batches, means, yerr=err, marker="o", capsize=3, label=_label(row))
    ax.set_xscale("log", base=2)
    all_b = sorted({b for row in cells.values() for b in row})
    ax.set_xticks(all_b)
    ax.set_xticklabels([str(b) for b in all_b])
    ax.invert_xaxis()
    ax.set_xlabel("images per worker")
    ax.set_ylabel("test error (%)")
    ax.set_title(title or "Fashion-MNIST, small ResNet: error vs batch size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def science_checks(records: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The paper's claims as checks: ``(claim, passed or None if not measurable, detail)``."""
    cells = aggregate(records)
    out: list[tuple[str, bool | None, str]] = []
    bn, gn = cells.get("bn", {}), cells.get("gn", {})
    big = max(bn) if bn else None
    small = min(bn) if bn else None
    if bn and big != small:
        m_big, _, lo_big, hi_big = _stats(bn[big])
        m_small, _, lo_small, hi_small = _stats(bn[small])
        gap = m_small - m_big
        out.append(
            (
                f"BN at {small} images/worker at least 2 points worse than at {big}",
                gap >= 2,
                f"{m_small:.2f} vs {m_big:.2f} (+{gap:.2f})",
            )
        )
        out.append(
            (
                f"BN seed ranges at {small} and {big} do not overlap",
                lo_small > hi_big if len(bn[small]) > 1 and len(bn[big]) > 1 else None,
                f"[{lo_small:.2f}, {hi_small:.2f}] vs [{lo_big:.2f}, {hi_big:.2f}]",
            )
        )
    if len(gn) > 1:
        means = {b: _stats(v)[0] for b, v in gn.items()}
        spread = max(means.values()) - min(means.values())
        # Every batch size sees the same images, so larger batches take fewer steps; the
        # step counts say whether the largest batch had the steps to converge.
        steps: dict[int, int] = {}
        for r in records:
            if _row_name(r) == "gn" and "steps" in r:
                steps.setdefault(int(r["images_per_worker"]), int(r["steps"]))
        counts = ", ".join(f"{b}: {steps[b]}" for b in sorted(steps, reverse=True))
        out.append(
            (
                "GN's mean error varies by at most 1 point across batch sizes",
                spread <= 1,
                f"max - min over batch sizes = {spread:.2f}"
                + (f" (training steps by images/worker: {counts})" if counts else ""),
            )
        )
    if bn and gn and small in gn:
        m_gn, m_bn = _stats(gn[small])[0], _stats(bn[small])[0]
        out.append(
            (
                f"GN better than BN at {small} images/worker",
                m_gn < m_bn,
                f"GN {m_gn:.2f} vs BN {m_bn:.2f}",
            )
        )
    if all(k in cells for k in ("bn", "gn", "ln", "in")) and big is not None:
        if all(big in cells[k] for k in ("bn", "gn", "ln", "in")):
            m = {k: _stats(cells[k][big])[0] for k in ("bn", "gn", "ln", "in")}
            out.append(
                (
                    f"paper's order at {big} images/worker: BN < GN < LN < IN",
                    m["bn"] < m["gn"] < m["ln"] < m["in"],
                    ", ".join(f"{LABELS[k]} {v:.2f}" for k, v in m.items()),
                )
            )
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS, Python and torch versions, for the report."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_report(
    records: list[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    preset: Any,
    session: dict[str, Any],
) -> Path:
    """Write ``table.txt``, ``table.md``, ``error_vs_batch.png`` and ``report.md``."""
    out = Path(out_dir)
    (out / "table.txt").write_text(format_table(records) + "\n")
    (out / "table.md").write_text(markdown_table(records) + "\n")
    # The title says what the records hold (options such as --batch-sizes change the grid).
    norms = ", ".join(sorted({r["norm"].upper() for r in records}))
    sizes = ", ".join(
        str(b) for b in sorted({r["images_per_worker"] for r in records}, reverse=True)
    )
    title = f"preset {preset.name}: {norms} at {sizes} images per worker"
    plot(records, out / "error_vs_batch.png", title=title)
    p = preset.protocol
    machine = machine_info()
    seeds = sorted({r["seed"] for r in records})
    train_s = sum(float(r["wall_s"]) for r in records)
    lines = [
        f"# groupnorm reproduce: preset `{preset.name}`",
        "",
        f"{preset.description}. Date: {session['date']}.",
        "",
        "## Protocol (fixed before the runs; the same for every normalization)",
        "",
        f"- Data: Fashion-MNIST from `{session['data']}`; a random subset of {p.train_size} "
        f"training images (fixed per seed, the same for every normalization and batch size); "
        f"test error on all {session['test_size']} test images, top-1.",
        f"- Network: small ResNet, stem 3x3 conv (stride {p.stem_stride}), three stages of "
        f"{p.blocks} basic block(s) with {p.width}, {2 * p.width}, {4 * p.width} channels; "
        f"the normalization after every convolution; last norm of each block starts with "
        f"gamma = 0. GN: G = {p.groups} (at most the channels of a layer).",
        f"- Workers: W = {p.workers} data-parallel workers ({session['mode']}); x axis B = images "
        f"per worker, so a step sees W*B images; BN statistics per worker, running statistics "
        f"averaged over workers, used for testing.",
        f"- Optimiser: SGD, momentum {p.momentum}, weight decay {p.weight_decay}; learning rate "
        f"{p.base_lr} x (W*B)/{p.lr_batch} (linear scaling), linear warm-up over the first "
        f"{p.warmup:.0%} of the steps, then cosine decay to 0; {p.epochs} epoch(s) for every "
        f"batch size (small batches take more steps).",
        f"- Seeds: {', '.join(map(str, seeds))} (initialisation, subset and order); cells are "
        f"mean ± half the range; error bars span min to max.",
        "",
        "## Results",
        "",
        markdown_table(records),
        "",
        "![error vs images per worker](error_vs_batch.png)",
        "",
        "## The paper's claims, checked",
        "",
    ]
    for claim, ok, detail in science_checks(records):
        mark = "n/a" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"- {claim}: {mark} ({detail})")
    lines += [
        "",
        "## Where and how long",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; {machine['os']}; Python "
        f"{machine['python']}, torch {machine['torch']}.",
        f"- {len(records)} runs; training+testing time summed over runs {train_s:.0f} s; "
        f"wall time of the last invocation {session['wall_s']:.0f} s with {session['jobs']} "
        f"run(s) at a time, {session['threads']} torch thread(s) each.",
        f"- Load average (1 min) at start {session['load_start']:.1f}, at end "
        f"{session['load_end']:.1f} (other processes on the machine slow the runs down; the "
        f"results do not depend on it).",
        "",
        f"Raw records: `results.jsonl` (one line per run). Re-run: `groupnorm reproduce --preset "
        f"{preset.name}`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
