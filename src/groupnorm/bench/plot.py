"""One figure per op from a results CSV: ours' speedup over torch per shape, one panel per mode.

Run as ``python -m groupnorm.bench.plot results.csv outdir/`` or through ``groupnorm bench
--plot``; needs matplotlib.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from .suite import read_rows


def plot_results(csv_path: Path, out_dir: Path, prefix: str = "") -> list[Path]:
    """Write ``<prefix><op>.png`` for each op in the CSV; returns the paths written."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib: pip install 'groupnorm[bench]' (or drop --plot)"
        ) from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path) if r["metric"] == "speedup_vs_torch"]
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op, op_rows in sorted(by_op.items()):
        modes = sorted(
            {r["mode"] for r in op_rows}, key=["forward", "backward", "forward+backward"].index
        )
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            series: dict[str, dict[str, float]] = defaultdict(dict)
            labels: list[str] = []
            for r in op_rows:
                if r["mode"] != mode or r["provider"] == "torch":
                    continue
                label = f"{r['shape']}\n{r['dtype']} {r['layout'][:7]}"
                if label not in labels:
                    labels.append(label)
                series[r["provider"]][label] = float(r["value"])
            width = 0.8 / max(1, len(series))
            for i, (provider, vals) in enumerate(sorted(series.items())):
                xs = [j + i * width for j, lab in enumerate(labels) if lab in vals]
                ax.bar(xs, [vals[lab] for lab in labels if lab in vals], width, label=provider)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_ylabel("speedup over torch (same run)")
            ax.set_title(f"{op}: {mode}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{prefix}{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m groupnorm.bench.plot RESULTS.csv OUT_DIR", file=sys.stderr)
        return 2
    for p in plot_results(Path(argv[0]), Path(argv[1])):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
