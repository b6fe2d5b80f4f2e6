"""GPU benchmark of the Triton group norm against torch eager, torch.compile and Liger-Kernel.

One command (``make bench-gpu`` or ``python benchmarks/bench_triton_gpu.py``) measures forward,
backward and forward+backward for each shape and provider, plus a device-to-device copy of the
same tensor as the bandwidth ceiling, in the same run. It writes a long-format CSV (op, provider,
mode, shape, dtype, layout, metric, value, gpu, date, commit) and a plot to
``benchmarks/results/``.

Bandwidth is computed from the minimal traffic: forward reads x and writes y (2 tensors),
backward reads x and dy and writes dx (3 tensors), forward+backward 5; copy reads and writes 2.
Timings are the median (and 20th/80th percentiles) of ``triton.testing.do_bench``. The input
requires grad in every mode, so the forward is timed as in training (autograd records it).

Before timing, each provider's output is compared with torch eager's; a provider that disagrees
is reported and its timings are still written, with the error, so a fast wrong kernel is visible.

Needs a CUDA GPU; ``--dry-run`` lists the shapes and providers on any machine.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("forward", "backward", "full")
TRAFFIC = {"forward": 2, "backward": 3, "full": 5, "copy": 2}
PROVIDERS = ("groupnorm", "torch", "torch.compile", "liger")


@dataclass(frozen=True)
class Shape:
    family: str
    dims: tuple[int, ...]
    groups: int
    dtypes: tuple[str, ...]

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in self.dims)

    def nbytes(self, dtype: str) -> int:
        return math.prod(self.dims) * {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]


def shapes() -> list[Shape]:
    """The benchmarked shapes: SD UNet, ResNet-50 stages, video, one tensor >= 256 MB."""
    out: list[Shape] = []
    for n in (1, 2, 8):
        for c in (320, 640, 1280):
            for hw in (64, 32, 16, 8):
                out.append(Shape("sd-unet", (n, c, hw, hw), 32, ("float16", "bfloat16")))
    for n in (32, 8, 2):
        for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7)):
            out.append(Shape("resnet50", (n, c, hw, hw), 32, ("float32", "bfloat16")))
    out.append(Shape("video", (2, 256, 8, 56, 56), 32, ("float16", "bfloat16")))
    # >= 256 MB: sets of 262144 elements (two passes over x), and sets that fit one tile (one).
    out.append(Shape("large", (16, 512, 128, 128), 32, ("float16",)))  # 268 MB in fp16
    out.append(Shape("large", (1024, 512, 16, 16), 32, ("float16",)))  # 268 MB, 4096 per set
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family",
        action="append",
        choices=("sd-unet", "resnet50", "video", "large"),
        help="only these shape families (repeatable; default all)",
    )
    parser.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help=f"comma-separated subset of {','.join(PROVIDERS)} (copy always runs)",
    )
    parser.add_argument("--quick", action="store_true", help="N<=2 SD shapes and the large one")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: results/)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--dry-run", action="store_true", help="list shapes and providers; needs no GPU"
    )
    return parser.parse_args(argv)


def selected_shapes(args: argparse.Namespace) -> list[Shape]:
    chosen = [s for s in shapes() if not args.family or s.family in args.family]
    if args.quick:
        chosen = [
            s
            for s in chosen
            if (s.family == "sd-unet" and s.dims[0] <= 2 and s.dims[2] in (64, 16))
            or s.family == "large"
        ]
    return chosen


# ---------------------------------------------------------------------------------------------
# Providers: each returns a function x -> y (with weight and bias closed over) or None
# ---------------------------------------------------------------------------------------------


def _provider_fns(name, groups, c, dtype, device):
    import torch
    import torch.nn.functional as F

    w = torch.randn(c, device=device, dtype=dtype).requires_grad_()
    b = torch.randn(c, device=device, dtype=dtype).requires_grad_()
    params = [w, b]
    if name == "torch":
        return (lambda x: F.group_norm(x, groups, w, b, 1e-5)), params
    if name == "torch.compile":
        torch._dynamo.reset()  # a fresh cache per shape: never fall back to eager on a limit
        compiled = torch.compile(lambda x: F.group_norm(x, groups, w, b, 1e-5), dynamic=False)
        return compiled, params
    if name == "groupnorm":
        import groupnorm

        return (lambda x: groupnorm.group_norm(x, groups, w, b, 1e-5, backend="triton")), params
    if name == "liger":
        try:
            from liger_kernel.transformers.group_norm import LigerGroupNorm
        except ImportError:
            return None, params
        module = LigerGroupNorm(c, groups, eps=1e-5, bias=True).to(device=device, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        return module, list(module.parameters())
    raise ValueError(name)


def _bench(fn):
    from triton.testing import do_bench

    ms = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return ms if isinstance(ms, (list, tuple)) else (ms, ms, ms)


def run(args: argparse.Namespace) -> Path:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (use --dry-run to list it)")
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    commit = _git_commit()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"triton_gpu_{date[:10]}_{commit}.csv"
    rows: list[dict] = []

    def emit(provider, mode, shape, dtype, layout, metric, value):
        rows.append(
            dict(
                op="group_norm",
                provider=provider,
                mode=mode,
                shape=shape.label,
                dtype=dtype,
                layout=layout,
                metric=metric,
                value=f"{value:.6g}",
                gpu=gpu,
                date=date,
                commit=commit,
            )
        )

    for shape in selected_shapes(args):
        for dtype_name in shape.dtypes:
            dtype = getattr(torch, dtype_name)
            nbytes = shape.nbytes(dtype_name)
            base = torch.randn(shape.dims, device=device, dtype=dtype)
            dy = torch.randn_like(base)
            dst = torch.empty_like(base)
            ms = _bench(lambda dst=dst, base=base: dst.copy_(base))
            emit("copy", "copy", shape, dtype_name, "contiguous", "ms_median", ms[0])
            emit("copy", "copy", shape, dtype_name, "contiguous", "GB/s", 2 * nbytes / ms[0] / 1e6)
            layouts = ["contiguous", "channels_last"]
            for provider in providers:
                try:
                    fn, params = _provider_fns(provider, shape.groups, shape.dims[1], dtype, device)
                except Exception as exc:  # a peer library that does not construct: skip it
                    print(f"skip {provider}: {exc}")
                    continue
                if fn is None:
                    print(f"skip {provider}: not installed")
                    continue
                for layout in layouts:
                    if provider == "liger" and layout == "channels_last":
                        continue  # Liger reshapes to (N, G, -1): channels-last would copy
                    x, grad = base, dy
                    if layout == "channels_last":
                        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
                        x = x.contiguous(memory_format=fmt)
                        grad = dy.contiguous(memory_format=fmt)
                    x = x.detach().requires_grad_()
                    try:
                        y = fn(x)
                        ref = torch.nn.functional.group_norm(
                            x.detach().float(), shape.groups, params[0].float(), params[1].float()
                        )
                        err = (y.float() - ref).abs().max().item()
                        emit(provider, "forward", shape, dtype_name, layout, "max_abs_err", err)
                        inputs = [x, *params]
                        timings = {
                            "forward": lambda fn=fn, x=x: fn(x),
                            "backward": lambda y=y, inputs=inputs, g=grad: torch.autograd.grad(
                                y, inputs, g, retain_graph=True
                            ),
                            "full": lambda fn=fn, x=x, inputs=inputs, g=grad: torch.autograd.grad(
                                fn(x), inputs, g
                            ),
                        }
                        for mode in MODES:
                            med, p20, p80 = _bench(timings[mode])
                            for metric, value in (
                                ("ms_median", med),
                                ("ms_p20", p20),
                                ("ms_p80", p80),
                                ("GB/s", TRAFFIC[mode] * nbytes / med / 1e6),
                            ):
                                emit(provider, mode, shape, dtype_name, layout, metric, value)
                        print(
                            f"{shape.label:>18} {dtype_name:>8} {layout:>13} {provider:>13} "
                            f"fwd {TRAFFIC['forward'] * nbytes / _ms(rows, 'forward') / 1e6:7.0f}"
                            f" GB/s  err {err:.2e}"
                        )
                    except Exception as exc:  # record and carry on with the other providers
                        print(f"{provider} failed on {shape.label} {dtype_name} {layout}: {exc}")
                        emit(provider, "forward", shape, dtype_name, layout, "failed", 1)
                    del x, grad
            del base, dy, dst
            torch.cuda.empty_cache()

    rows.extend(speedups(rows))
    if not rows:
        raise SystemExit("nothing was measured")
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    if not args.no_plot:
        plot(out)
    return out


def speedups(rows: list[dict]) -> list[dict]:
    """Rows with metric ``speedup_vs_torch``: torch eager's median time over the provider's, for
    the same mode, shape, dtype and layout, both measured in this run."""
    medians = {
        (r["provider"], r["mode"], r["shape"], r["dtype"], r["layout"]): float(r["value"])
        for r in rows
        if r["metric"] == "ms_median"
    }
    out = []
    for (provider, mode, shape, dtype, layout), ms in medians.items():
        base = medians.get(("torch", mode, shape, dtype, layout))
        if provider in ("torch", "copy") or base is None:
            continue
        row = next(
            r
            for r in rows
            if (r["provider"], r["mode"], r["shape"], r["dtype"], r["layout"])
            == (provider, mode, shape, dtype, layout)
        )
        out.append({**row, "metric": "speedup_vs_torch", "value": f"{base / ms:.4g}"})
    return out


def _ms(rows: list[dict], mode: str) -> float:
    for row in reversed(rows):
        if row["mode"] == mode and row["metric"] == "ms_median":
            return float(row["value"])
    return float("nan")


def plot(csv_path: Path) -> Path:
    """GB/s per shape for each provider and mode, with the copy ceiling, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as fh:
        rows = [r for r in csv.DictReader(fh) if r["metric"] == "GB/s"]
    keys = sorted({(r["shape"], r["dtype"]) for r in rows}, key=lambda k: (k[1], k[0]))
    index = {k: i for i, k in enumerate(keys)}
    fig, axes = plt.subplots(3, 1, figsize=(max(10, len(keys) * 0.3), 12), sharex=True)
    for ax, mode in zip(axes, MODES, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["mode"] in (mode, "copy"):
                name = "copy" if r["mode"] == "copy" else f"{r['provider']} ({r['layout']})"
                series.setdefault(name, []).append(
                    (index[(r["shape"], r["dtype"])], float(r["value"]))
                )
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "k--" if name == "copy" else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=3)
        ax.set_ylabel(f"{mode} GB/s")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3)
    axes[-1].set_xticks(range(len(keys)))
    axes[-1].set_xticklabels([f"{s} {d}" for s, d in keys], rotation=90, fontsize=6)
    fig.suptitle(f"group norm bandwidth ({csv_path.name})")
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    return png


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for shape in selected_shapes(args):
            for dtype in shape.dtypes:
                mb = shape.nbytes(dtype) / 1e6
                print(
                    f"{shape.family:>9} {shape.label:>18} G={shape.groups} {dtype:>8} {mb:9.1f} MB"
                )
        print(f"providers: {args.providers} + copy; modes: {', '.join(MODES)}")
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
