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

Two clocks, both in every run: the eager modes (``forward``, ``backward``, ``full``) time each
call the way a Python loop pays it, host work included; on small tensors that is the cost of
Python and kernel launches, not of the GPU. ``forward_graph`` captures the same forward calls in
a CUDA graph and times its replays (``do_bench_cudagraph``): the GPU's time alone, what a model
captured in a graph or compiled pays; ``copy_graph`` is its ceiling. (Capturing the backward
through autograd failed on torch 2.11: AccumulateGrad nodes kept from the eager modes sit on
another stream, so the backward has no graph clock yet.)

Before timing, each provider's output is compared with torch eager's; a provider that disagrees
is reported and its timings are still written, with the error, so a fast wrong kernel is visible.

Providers: ``groupnorm`` is ``backend="triton"`` (the Triton route always), ``groupnorm-auto``
is ``backend="auto"`` (on CUDA: Triton from ``GROUPNORM_AUTO_TRITON_MIN_NUMEL`` elements up,
torch's kernels below; the one users get by default), ``torch`` is ``F.group_norm`` eager. Every
provider's time is divided into torch's of the same run (``speedup_vs_torch`` rows), and the
end of the run prints, per provider and eager mode, the smallest and the median ratio over all
shapes, the numbers the targets in docs/triton.md are stated in.

Needs a CUDA GPU; ``--dry-run`` lists the shapes and providers on any machine. Typical calls::

    python benchmarks/bench_triton_gpu.py --quick --providers groupnorm,groupnorm-auto,torch
    python benchmarks/bench_triton_gpu.py            # everything, ~30 minutes on an H100
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("forward", "backward", "full", "forward_graph")
TRAFFIC = {"forward": 2, "backward": 3, "full": 5, "forward_graph": 2}
PROVIDERS = ("groupnorm", "groupnorm-auto", "torch", "torch.compile", "liger")


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
    for n in (1, 2):
        for c in (320, 640, 1280):
            for hw in (64, 32, 16, 8):
                out.append(Shape("sd-unet", (n, c, hw, hw), 32, ("float16", "bfloat16")))
    # >= 256 MB: sets of 262144 elements (two passes over x), and sets that fit one tile (one).
    out.append(Shape("large", (16, 512, 128, 128), 32, ("float16",)))  # 268 MB in fp16
    out.append(Shape("large", (1024, 512, 16, 16), 32, ("float16",)))  # 268 MB, 4096 per set
    for n in (32, 8, 2):
        for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7)):
            out.append(Shape("resnet50", (n, c, hw, hw), 32, ("float32", "bfloat16")))
    out.append(Shape("video", (2, 256, 8, 56, 56), 32, ("float16", "bfloat16")))
    # Liger-Kernel's own group-norm benchmark layout: (M, C, H) with H = 512, 4 channels a group.
    for m in (4, 32):
        for c in (512, 2048, 4096):
            out.append(Shape("liger", (m, c, 512), c // 4, ("float32", "bfloat16")))
    for c in (320, 640, 1280):
        for hw in (64, 32, 16, 8):
            out.append(Shape("sd-unet", (8, c, hw, hw), 32, ("float16", "bfloat16")))
    return out


def _git_commit() -> str:
    """The short commit, with "+dirty" when the checkout has changes the commit does not hold."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=here,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=here,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family",
        action="append",
        choices=("sd-unet", "resnet50", "video", "liger", "large"),
        help="only these shape families (repeatable; default all)",
    )
    parser.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help=f"comma-separated subset of {','.join(PROVIDERS)} (copy always runs)",
    )
    parser.add_argument("--quick", action="store_true", help="N<=2 SD shapes and the large one")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: results/)")
    parser.add_argument(
        "--rep", type=int, default=100, help="milliseconds of timed repeats per measurement"
    )
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

    # Random data is drawn on the CPU: a failed graph capture cannot then break the CUDA RNG.
    w = torch.randn(c, dtype=dtype).to(device).requires_grad_()
    b = torch.randn(c, dtype=dtype).to(device).requires_grad_()
    params = [w, b]
    if name == "torch":
        return (lambda x: F.group_norm(x, groups, w, b, 1e-5)), params
    if name == "torch.compile":
        torch._dynamo.reset()  # a fresh cache per shape: never fall back to eager on a limit
        compiled = torch.compile(lambda x: F.group_norm(x, groups, w, b, 1e-5), dynamic=False)
        return compiled, params
    if name in ("groupnorm", "groupnorm-auto"):
        import groupnorm

        backend = "triton" if name == "groupnorm" else "auto"
        return (lambda x: groupnorm.group_norm(x, groups, w, b, 1e-5, backend=backend)), params
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


def _channels_last(t):
    """Channel stride 1 at any rank: torch's memory formats for 4-D/5-D, a permuted copy else."""
    if t.dim() in (4, 5):
        import torch

        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    order = (0, *range(2, t.dim()), 1)
    back = (0, t.dim() - 1, *range(1, t.dim() - 1))
    return t.permute(order).contiguous().permute(back)


def _bench(fn, rep=100, graph=False):
    """(median, p20, p80) in ms. Eager: each call as a user's loop pays it, host work (Python,
    launches) included, with the L2 cache flushed before each call. Graph: the calls captured in
    a CUDA graph and replayed, so the time is the GPU's alone (what a captured or compiled model
    pays); the L2 cache is not flushed there."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        ms = do_bench_cudagraph(fn, rep=max(5, rep // 5), quantiles=[0.5, 0.2, 0.8])
    else:
        ms = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=rep)
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
    card = "".join(ch if ch.isalnum() else "-" for ch in gpu.lower()).strip("-")
    out = args.out or RESULTS / f"triton_gpu_{card}_{date[:10]}_{commit}.csv"
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

    fields = ["op", "provider", "mode", "shape", "dtype", "layout", "metric", "value"]
    fields += ["gpu", "date", "commit"]
    fh = open(out, "w", newline="")  # rows are appended as they come: a killed run keeps them
    writer = csv.DictWriter(fh, fieldnames=fields)
    writer.writeheader()
    written = 0
    started = time.perf_counter()
    for shape in selected_shapes(args):
        for dtype_name in shape.dtypes:
            dtype = getattr(torch, dtype_name)
            nbytes = shape.nbytes(dtype_name)
            base = torch.randn(shape.dims, dtype=dtype).to(device)
            dy = torch.randn(shape.dims, dtype=dtype).to(device)
            dst = torch.empty_like(base)
            for mode, graph in (("copy", False), ("copy_graph", True)):
                ms = _bench(lambda dst=dst, base=base: dst.copy_(base), args.rep, graph=graph)
                emit("copy", mode, shape, dtype_name, "contiguous", "ms_median", ms[0])
                gbs = 2 * nbytes / ms[0] / 1e6
                emit("copy", mode, shape, dtype_name, "contiguous", "GB/s", gbs)
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
                        x, grad = _channels_last(x), _channels_last(dy)
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
                            "forward_graph": lambda fn=fn, x=x: fn(x),
                            "backward": lambda y=y, inputs=inputs, g=grad: torch.autograd.grad(
                                y, inputs, g, retain_graph=True
                            ),
                            "full": lambda fn=fn, x=x, inputs=inputs, g=grad: torch.autograd.grad(
                                fn(x), inputs, g
                            ),
                        }
                        for mode in MODES:
                            if mode.endswith("_graph") and provider == "torch.compile":
                                continue  # its own graphs and guards; not captured here
                            try:
                                med, p20, p80 = _bench(
                                    timings[mode], args.rep, graph=mode.endswith("_graph")
                                )
                            except Exception as exc:  # e.g. a provider that cannot be captured
                                print(f"{provider} {mode} failed on {shape.label}: {exc}")
                                emit(provider, mode, shape, dtype_name, layout, "failed", 1)
                                continue
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
                            f" GB/s, in a graph "
                            f"{TRAFFIC['forward'] * nbytes / _ms(rows, 'forward_graph') / 1e6:7.0f}"
                            f" GB/s  err {err:.2e}"
                        )
                    except Exception as exc:  # record and carry on with the other providers
                        print(f"{provider} failed on {shape.label} {dtype_name} {layout}: {exc}")
                        emit(provider, "forward", shape, dtype_name, layout, "failed", 1)
                    del x, grad
            del base, dy, dst
            torch.cuda.empty_cache()
            writer.writerows(rows[written:])
            fh.flush()
            written = len(rows)
            print(f"  [{time.perf_counter() - started:6.1f} s] {shape.label} {dtype_name} done")

    extra = speedups(rows)
    writer.writerows(extra)
    fh.close()
    rows.extend(extra)
    if not rows:
        raise SystemExit("nothing was measured")
    print(f"wrote {len(rows)} rows to {out}")
    for line in summary(rows):
        print(line)
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


def summary(rows: list[dict]) -> list[str]:
    """Per provider and eager mode: smallest and median ``speedup_vs_torch`` over the cases.

    >>> rows = [dict(provider="groupnorm-auto", mode="forward", metric="speedup_vs_torch",
    ...              value=v, shape="s", dtype="d", layout="l") for v in ("0.96", "1.5", "2")]
    >>> summary(rows)[1]
    'groupnorm-auto forward: min 0.96x, median 1.5x over 3 cases'
    """
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["metric"] == "speedup_vs_torch" and r["mode"] in ("forward", "full", "backward"):
            ratios.setdefault((r["provider"], r["mode"]), []).append(float(r["value"]))
    lines = ["torch eager time over the provider's (> 1: faster than torch), same run:"]
    for (provider, mode), values in sorted(ratios.items()):
        values.sort()
        median, count = values[len(values) // 2], len(values)
        lines.append(
            f"{provider} {mode}: min {values[0]:.3g}x, median {median:.3g}x over {count} cases"
        )
    return lines


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
    fig, axes = plt.subplots(
        len(MODES), 1, figsize=(max(10, len(keys) * 0.3), 4 * len(MODES)), sharex=True
    )
    for ax, mode in zip(axes, MODES, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        copy_mode = "copy_graph" if mode.endswith("_graph") else "copy"
        for r in rows:
            if r["mode"] in (mode, copy_mode):
                name = "copy" if r["mode"] == copy_mode else f"{r['provider']} ({r['layout']})"
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
