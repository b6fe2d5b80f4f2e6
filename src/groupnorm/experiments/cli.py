"""``groupnorm reproduce``: the paper's error-vs-batch-size experiment on Fashion-MNIST.

Trains the same small ResNet with each normalization at several images-per-worker values
and writes, into the run directory: ``results.jsonl`` (one line per finished run),
``table.txt`` / ``table.md``, ``error_vs_batch.png`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import time
from pathlib import Path


def _missing_extras() -> list[str]:
    """The experiment's own dependencies (the ``experiment`` extra) that do not import."""
    missing = []
    for name in ("numpy", "matplotlib", "tqdm"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


if _missing_extras():
    raise SystemExit(
        f"groupnorm reproduce (and demo) need {', '.join(_missing_extras())}: "
        "pip install 'groupnorm[experiment]'"
    )

from .data import DEFAULT_DATA_DIR  # noqa: E402  (needs numpy, checked above)

PRESET_HELP = {
    "quick": "BN and GN at 32 and 1 images/worker, 2 seeds; minutes on 2 cores",
    "default": "BN, GN, LN, IN at 32,16,8,4,2 images/worker, 2 seeds; 15-30 min on 2 cores",
    "paper": "all norms incl. synchronized BN and none, 3 seeds, wider net, all 60k images, "
    "plus the GN group-count sweep G=1..32; hours",
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _norm_list(text: str) -> tuple[str, ...]:
    from .model import NORMS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [n for n in names if n not in NORMS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown normalization(s) {bad or text!r}; choose from {', '.join(NORMS)}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``groupnorm reproduce``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "presets:\n"
        + "\n".join(f"  {k:<8} {v}" for k, v in PRESET_HELP.items())
        + "\n\nExamples:\n"
        "  groupnorm reproduce                      # the quick preset into runs/quick\n"
        "  groupnorm reproduce --preset default     # BN/GN/LN/IN at 32..2 images per worker\n"
        "  groupnorm reproduce --preset default --resume   # continue an interrupted grid\n"
        "  groupnorm reproduce --norms bn,bn-sync --batch-sizes 4 --workers 8   # real DDP\n"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESET_HELP),
        default="quick",
        help="which experiment to run (default: quick; see the list below)",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=str(DEFAULT_DATA_DIR),
        help="folder with the four Fashion-MNIST idx files, gzipped or not "
        f"(default: {DEFAULT_DATA_DIR}, from Debian's dataset-fashion-mnist; `make data`)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="run directory for results.jsonl, tables, plot and report (default: runs/<preset>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue in a run directory that already has results: runs already in "
        "results.jsonl are skipped, the rest are trained (without it, such a directory is "
        "refused)",
    )
    parser.add_argument(
        "--norms",
        type=_norm_list,
        default=None,
        metavar="LIST",
        help="comma-separated normalizations instead of the preset's: bn (per-worker "
        "statistics), bn-sync (statistics over all workers), gn, ln, in, none",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=None,
        metavar="LIST",
        help="comma-separated images per worker instead of the preset's, e.g. 32,8,2",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="number of seeds (0..N-1) instead of the preset's",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="K",
        help="0 (default): simulate the preset's 8 workers in one process (fast, the same "
        "arithmetic); K > 0: train each run with K real processes on this machine "
        "(torch.distributed, gloo, DistributedDataParallel); K must divide 8",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="J",
        help="runs trained at the same time in separate processes (default: the number of "
        "CPU cores, at most 2; 1 shows a progress bar per run). With the same --threads, results "
        "do not depend on it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="torch threads per training process (default: cores / jobs, at least 1)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are also off when stderr is not a terminal)",
    )
    group = parser.add_argument_group(
        "protocol overrides (change the protocol; results go to a separate --out)"
    )
    group.add_argument("--epochs", type=int, default=None, help="epochs per run")
    group.add_argument(
        "--train-size",
        type=int,
        default=None,
        metavar="N",
        help="training images used (a random subset per seed)",
    )
    group.add_argument("--width", type=int, default=None, help="channels of the first stage")
    group.add_argument(
        "--lr",
        type=float,
        default=None,
        dest="base_lr",
        help="learning rate per 256 images (scaled linearly with W*B)",
    )
    group.add_argument("--groups", type=int, default=None, help="G for gn")


def _load(data_dir: str):  # module-level so that worker processes can unpickle it
    from .data import load_fashion_mnist

    return load_fashion_mnist(data_dir, check_counts=False)


def run(args: argparse.Namespace) -> int:
    """Run the grid, then write the table, plot and report. Returns the exit status."""
    from .data import FILES, find_idx_file
    from .report import format_table, science_checks, write_report
    from .results import RESULTS_NAME, DirectoryLocked, RunDirLock, read_results
    from .runner import PRESETS, plan_runs, run_grid, with_overrides

    preset = with_overrides(
        PRESETS[args.preset],
        epochs=args.epochs,
        train_size=args.train_size,
        width=args.width,
        base_lr=args.base_lr,
        groups=args.groups,
        norms=args.norms,
        batch_sizes=args.batch_sizes,
        seeds=args.seeds,
    )
    if args.workers < 0 or (args.workers and preset.protocol.workers % args.workers):
        print(
            f"error: --workers {args.workers} must be 0 or divide {preset.protocol.workers}",
            file=sys.stderr,
        )
        return 2
    if preset.seeds < 1:
        print("error: --seeds must be at least 1", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    jobs = 1 if args.workers else (args.jobs or min(2, cores))
    threads = args.threads or max(1, cores // (args.workers or jobs))
    out = Path(args.out or Path("runs") / preset.name)

    try:
        for stem_images, stem_labels, _ in FILES.values():
            find_idx_file(args.data, stem_images)
            find_idx_file(args.data, stem_labels)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    progress = not args.no_progress and sys.stderr.isatty()
    start = time.time()
    load_start = os.getloadavg()[0]
    try:
        with RunDirLock(out):
            results = out / RESULTS_NAME
            if read_results(results) and not args.resume:
                print(
                    f"error: {out} already holds results; pass --resume to continue that "
                    f"grid, or choose another --out",
                    file=sys.stderr,
                )
                return 1
            print(
                f"groupnorm reproduce --preset {preset.name}: {len(plan_runs(preset))} runs "
                f"into {out} ({jobs} at a time, {threads} thread(s) each"
                + (f", {args.workers} gloo processes per run" if args.workers else "")
                + ")",
                flush=True,
            )
            loader = functools.partial(_load, args.data)
            try:
                records = run_grid(
                    preset,
                    out,
                    loader,
                    jobs=jobs,
                    threads=threads,
                    processes=args.workers,
                    progress=progress,
                )
            except (ValueError, FileNotFoundError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            data = _load(args.data)
            session = {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "data": args.data,
                "test_size": data.test_x.shape[0],
                "mode": f"{args.workers} real gloo processes"
                if args.workers
                else "simulated in one process",
                "wall_s": time.time() - start,
                "jobs": jobs,
                "threads": threads,
                "load_start": load_start,
                "load_end": os.getloadavg()[0],
            }
            report = write_report(records, out, preset=preset, session=session)
    except DirectoryLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(records))
    print()
    for claim, ok, detail in science_checks(records):
        print(f"  [{'n/a' if ok is None else 'yes' if ok else 'NO '}] {claim}: {detail}")
    print(
        f"\nreport: {report}   plot: {out / 'error_vs_batch.png'}   ({time.time() - start:.0f} s)"
    )
    return 0
