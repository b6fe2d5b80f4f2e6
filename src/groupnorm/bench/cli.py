"""``groupnorm bench``: run the benchmark suite and write a long-format CSV (and plots).

Examples::

    groupnorm bench --quick --out /tmp/quick.csv        # smoke test, seconds
    groupnorm bench                                      # the committed default run, minutes
    groupnorm bench --ops gn_silu --shapes unet --dtypes float32,bfloat16 --layouts both
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import cases as C
from .suite import BOTH, CONT, Plan, default_plan, quick_plan, run_plan

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``bench`` command."""
    parser.add_argument("--quick", action="store_true", help="smoke test: one small shape")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV to write (default benchmarks/results/cpu-<threads>-<date>.csv; the committed "
        "results are named <suite>-<machine>-<threads>-<date>.csv, see their README)",
    )
    parser.add_argument("--ops", default=None, help=f"comma list from {','.join(C.OPS)}")
    parser.add_argument(
        "--shapes", default=None, help=f"comma list of shape sets: {','.join(C.SHAPE_SETS)}"
    )
    parser.add_argument("--dtypes", default="float32", help="comma list, e.g. float32,bfloat16")
    parser.add_argument("--layouts", default="contiguous", help="contiguous, channels_last or both")
    parser.add_argument("--modes", default=",".join(C.MODES), help="comma list of modes")
    parser.add_argument(
        "--providers",
        default="ours,torch",
        help="comma list: ours,torch,compile (torch is always measured)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    parser.add_argument("--no-memory", action="store_true", help="skip peak/retained memory")
    parser.add_argument("--no-model", action="store_true", help="skip the ResNet training step")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the run (default: torch's choice)",
    )
    parser.add_argument("--plot", action="store_true", help="also draw one PNG per op")


def _plan_from(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = quick_plan()
    elif args.ops is None and args.shapes is None:
        plan = default_plan()
    else:
        ops = tuple(args.ops.split(",")) if args.ops else C.OPS
        for op in ops:
            if op not in C.OPS:
                raise ValueError(f"unknown op {op!r}; choose from {', '.join(C.OPS)}")
        shapes: list[C.Shape] = []
        for name in (args.shapes or "small").split(","):
            if name not in C.SHAPE_SETS:
                raise ValueError(
                    f"unknown shape set {name!r}; choose from {', '.join(C.SHAPE_SETS)}"
                )
            shapes += C.SHAPE_SETS[name]
        dtypes = []
        for name in args.dtypes.split(","):
            if name not in _DTYPES:
                raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}")
            dtypes.append(_DTYPES[name])
        layouts = {"both": BOTH, "contiguous": CONT, "channels_last": ("channels_last",)}.get(
            args.layouts
        )
        if layouts is None:
            raise ValueError("--layouts must be contiguous, channels_last or both")
        modes = tuple(args.modes.split(","))
        for m in modes:
            if m not in C.MODES:
                raise ValueError(f"unknown mode {m!r}; choose from {', '.join(C.MODES)}")
        plan = Plan(groups=[(ops, shapes, tuple(dtypes), layouts, modes)])
    plan.providers = tuple(args.providers.split(","))
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        plan.repeats = args.repeats
    plan.memory = not args.no_memory
    plan.model_step = not args.no_model
    return plan


def run(args: argparse.Namespace) -> int:
    """Run the suite; prints one line per case and where the CSV went."""
    import datetime as _dt

    plan = _plan_from(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    out = args.out
    if out is None:
        day = _dt.date.today().isoformat()
        n = torch.get_num_threads()
        threads = f"{n}thread" + ("s" if n > 1 else "")
        out = (
            Path("benchmarks/results") / f"cpu-{'quick-' if args.quick else ''}{threads}-{day}.csv"
        )
    run_plan(plan, out)
    print(f"wrote {out}")
    if args.plot:
        from .plot import plot_results

        for p in plot_results(out, out.parent, prefix=out.stem + "-"):
            print(f"wrote {p}")
    return 0
