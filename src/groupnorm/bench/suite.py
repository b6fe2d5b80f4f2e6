"""Run the benchmark plan and write long-format CSV rows.

One row per (op, provider, mode, shape, dtype, layout, metric): ``value`` with ``p20``/``p80``
where the metric has a spread (times and bandwidths), plus the machine, date and commit, so a
results file says where it came from. Metrics:

``time_us``            median microseconds per call (p20, p80 over the repeats)
``gbps``               minimal traffic (:func:`.cases.minimal_bytes`) / time, in GB/s
``speedup_vs_torch``   torch's median time / this provider's, both from the same run
``vs_copy``            this provider's median time / a ``clone()`` of x in the same run

For the two ratios the ``p20``/``p80`` columns hold the same ratio taken between the 20th (80th)
percentile times. On a shared machine the p20 ratio is the one least touched by preemption.
``retained_bytes``     bytes autograd keeps for backward (mode ``forward``)
``peak_bytes``         high-water mark allocated during the call (forward, forward+backward)
``page_faults``        minor page faults per timed call (:class:`.timing.Timing`), where the
                       OS counts them: fresh pages cost the call ~1 us each
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cases as C
from .memory import peak_bytes, retained_bytes
from .timing import measure, no_grad_call

FIELDS = [
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "layout",
    "metric",
    "unit",
    "value",
    "p20",
    "p80",
    "machine",
    "date",
    "commit",
]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """CPU model (from /proc/cpuinfo), usable cores, threads, torch version, and the 1-minute
    load average when the run started (other processes share this machine)."""
    model = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{model}; {cores} cores; {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"load {load:.1f} at start"
    )


def git_commit() -> str:
    """Short commit of the source tree (with ``-dirty`` for uncommitted changes), or unknown."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


@dataclass
class Plan:
    """Which cases to run. ``groups`` is a list of (ops, shapes, dtypes, layouts, modes)."""

    groups: list[
        tuple[
            tuple[str, ...],
            list[C.Shape],
            tuple[torch.dtype, ...],
            tuple[str, ...],
            tuple[str, ...],
        ]
    ] = field(default_factory=list)
    providers: tuple[str, ...] = ("ours", "torch")
    repeats: int = 31
    memory: bool = True
    model_step: bool = True
    model_batch: int = 32
    model_repeats: int = 15

    def cases(self) -> Iterator[tuple[C.Case, tuple[str, ...]]]:
        for ops, shapes, dtypes, layouts, modes in self.groups:
            for shape in shapes:
                for dtype in dtypes:
                    for layout in layouts:
                        for op in ops:
                            yield C.Case(op, shape, dtype, layout), modes


FP = (torch.float32,)
FP_BF = (torch.float32, torch.bfloat16)
CONT = ("contiguous",)
BOTH = ("contiguous", "channels_last")


def default_plan() -> Plan:
    """The committed run: a few minutes on 2 cores."""
    unet2, rn2 = C.SHAPE_SETS["unet-2"], C.SHAPE_SETS["resnet-small"]
    return Plan(
        groups=[
            (("gn_silu", "gn"), unet2[:3] + [(8, 512, 28, 28)], FP_BF, BOTH, C.MODES),
            (
                ("gn_silu", "gn", "ln", "in", "bn"),
                rn2[1:3] + C.SHAPE_SETS["small"],
                FP,
                CONT,
                ("forward", "forward+backward"),
            ),
            (
                ("gn", "gn_silu"),
                C.SHAPE_SETS["1d"][:1] + C.SHAPE_SETS["3d"][:1],
                FP,
                BOTH,
                ("forward", "forward+backward"),
            ),
        ]
    )


def quick_plan() -> Plan:
    """A smoke test: every op and mode on one small shape, few repeats."""
    return Plan(
        groups=[(C.OPS, [(2, 16, 6, 6)], FP, CONT, C.MODES)],
        repeats=3,
        model_batch=4,
        model_repeats=2,
    )


def _mode_callable(fn: C.NormFn, inputs: dict[str, torch.Tensor], mode: str) -> Callable:
    x, w, b, dy = inputs["x"], inputs["weight"], inputs["bias"], inputs["dy"]
    if mode == "forward":
        return no_grad_call(lambda: fn(x, w, b))
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
    if mode == "backward":
        y = fn(xg, wg, bg)
        return lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)
    return lambda: torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), dy)


def _provider_functions(case: C.Case, inputs, providers) -> dict[str, C.NormFn]:
    fns = C.op_functions(case.op, inputs)
    if "compile" in providers:
        fns["compile"] = torch.compile(fns["torch"], dynamic=False)
    return {k: v for k, v in fns.items() if k in providers or k == "torch" or k == "timm"}


def run_case(case: C.Case, modes: Iterable[str], plan: Plan, stamp: dict) -> list[dict]:
    """Measure one case in every mode; returns CSV rows."""
    inputs = C.make_inputs(case)
    fns = _provider_functions(case, inputs, plan.providers)
    rows: list[dict] = []

    def row(provider, mode, metric, unit, value, p20="", p80=""):
        rows.append(
            {
                "op": case.op,
                "provider": provider,
                "mode": mode,
                "shape": case.label,
                "dtype": case.dtype_name,
                "layout": case.layout,
                "metric": metric,
                "unit": unit,
                "value": _fmt(value),
                "p20": _fmt(p20),
                "p80": _fmt(p80),
                **stamp,
            }
        )

    x = inputs["x"]
    for mode in modes:
        calls = {name: _mode_callable(fn, inputs, mode) for name, fn in fns.items()}
        calls["copy"] = x.clone
        times = measure(calls, repeats=plan.repeats, target_s=3e-4)
        nbytes = C.minimal_bytes(case.shape, case.dtype, mode)
        base, copy = times["torch"].median, times["copy"].median
        for name in fns:
            t = times[name]
            row(name, mode, "time_us", "us", t.median * 1e6, t.p20 * 1e6, t.p80 * 1e6)
            row(
                name,
                mode,
                "gbps",
                "GB/s",
                nbytes / t.median / 1e9,
                nbytes / t.p80 / 1e9,
                nbytes / t.p20 / 1e9,
            )
            tb, tc = times["torch"], times["copy"]
            row(
                name, mode, "speedup_vs_torch", "x", base / t.median, tb.p20 / t.p20, tb.p80 / t.p80
            )
            row(name, mode, "vs_copy", "x", t.median / copy, t.p20 / tc.p20, t.p80 / tc.p80)
        t = times["copy"]
        row("copy", mode, "time_us", "us", t.median * 1e6, t.p20 * 1e6, t.p80 * 1e6)
        for name, t in times.items():
            if t.faults is not None:
                row(name, mode, "page_faults", "1/call", t.faults)
        if plan.memory and mode != "backward":
            for name, fn in fns.items():
                if name == "compile":
                    continue
                row(name, mode, "peak_bytes", "B", peak_bytes(_mode_callable(fn, inputs, mode)))
    if plan.memory and "forward" in modes:
        for name, fn in fns.items():
            if name == "compile":
                continue
            xg, wg, bg = (
                t.detach().clone().requires_grad_() for t in (x, inputs["weight"], inputs["bias"])
            )
            row(
                name,
                "forward",
                "retained_bytes",
                "B",
                retained_bytes(lambda fn=fn, xg=xg, wg=wg, bg=bg: fn(xg, wg, bg)),
            )
    return rows


def run_model_step(plan: Plan, stamp: dict) -> list[dict]:
    """Training step of :class:`.model.SmallResNet` with each norm, interleaved in one run."""
    from .model import NORMS, train_step_fn

    steps = {name: train_step_fn(name, batch=plan.model_batch) for name in NORMS}
    times = measure(steps, repeats=plan.model_repeats, warmup=2, target_s=0.0)
    base = times["torch_bn"].median
    rows = []
    for name, t in times.items():
        common = {
            "op": "resnet_step",
            "provider": name,
            "mode": "train_step",
            "shape": f"{plan.model_batch}x1x28x28",
            "dtype": "float32",
            "layout": "contiguous",
            **stamp,
        }
        rows.append(
            {
                **common,
                "metric": "time_us",
                "unit": "us",
                "value": _fmt(t.median * 1e6),
                "p20": _fmt(t.p20 * 1e6),
                "p80": _fmt(t.p80 * 1e6),
            }
        )
        rows.append(
            {
                **common,
                "metric": "ratio_vs_torch_bn",
                "unit": "x",
                "value": _fmt(t.median / base),
                "p20": _fmt(t.p20 / times["torch_bn"].p20),
                "p80": _fmt(t.p80 / times["torch_bn"].p80),
            }
        )
    return rows


def _fmt(v) -> str:
    if v == "" or v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


def run_plan(plan: Plan, out: Path, log: Callable[[str], None] = print) -> list[dict]:
    """Run every case of ``plan``, writing rows to the CSV ``out`` as they come."""
    stamp = {
        "machine": machine_description(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict] = []
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for case, modes in plan.cases():
            rows = run_case(case, modes, plan, stamp)
            writer.writerows(rows)
            f.flush()
            all_rows.extend(rows)
            log(summarize(case, rows))
        if plan.model_step:
            rows = run_model_step(plan, stamp)
            writer.writerows(rows)
            all_rows.extend(rows)
            r = {x["provider"]: x["value"] for x in rows if x["metric"] == "ratio_vs_torch_bn"}
            log(f"resnet_step  train step time / torch BN: {r}")
    return all_rows


def summarize(case: C.Case, rows: list[dict]) -> str:
    """One log line: ours' speedup over torch per mode."""
    parts = [
        f"{r['mode']}={float(r['value']):.2f}x"
        for r in rows
        if r["provider"] == "ours" and r["metric"] == "speedup_vs_torch"
    ]
    return f"{case.op:8s} {case.label:18s} {case.dtype_name:8s} {case.layout:13s} " + " ".join(
        parts
    )


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
