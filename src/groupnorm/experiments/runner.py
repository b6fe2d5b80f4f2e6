"""The grid of runs of a preset: which runs, in which order, in which processes.

A preset names a :class:`~groupnorm.experiments.train.Protocol`, the normalizations, the
images-per-worker values, the seeds and optionally a group-count sweep. :func:`run_grid` trains
every run not yet in the results file and appends each record as soon as it finishes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .results import RESULTS_NAME, append_result, read_results
from .train import Protocol, RunSpec, train_run, train_run_ddp

__all__ = ["Preset", "PRESETS", "plan_runs", "run_grid"]


@dataclass(frozen=True)
class Preset:
    """A named experiment: protocol, grid and (optionally) a group-count sweep."""

    name: str
    description: str
    protocol: Protocol
    norms: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    seeds: int
    sweep_groups: tuple[int, ...] = ()
    sweep_batch: int = 32
    budget: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_SMALL = Protocol(train_size=30000, epochs=2, base_lr=0.4, width=16, groups=8)
# The quick preset's budget is about 200 s on 2 cores; its 8 runs at 30,000 images cost about
# 500 s of run time there (measured per step), so it trains on 20,000 images, every run alike.
_QUICK = dataclasses.replace(_SMALL, train_size=20000)

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        # The tiny batch is 1, not the paper's smallest (2): on Fashion-MNIST with this network
        # BN shows no penalty at 2 images per worker (docs/reproduction.md, default preset) and
        # collapses at 1, so 32 vs 1 is the pair that shows the gap in minutes.
        description="BN vs GN at 32 and 1 images per worker (what `make demo` runs)",
        protocol=_QUICK,
        norms=("bn", "gn"),
        batch_sizes=(32, 1),
        seeds=2,
        budget="minutes on 2 cores",
    ),
    "default": Preset(
        name="default",
        description="BN, GN, LN, IN at 32, 16, 8, 4, 2 images per worker",
        protocol=_SMALL,
        norms=("bn", "gn", "ln", "in"),
        batch_sizes=(32, 16, 8, 4, 2),
        seeds=2,
        budget="15-30 minutes on 2 cores",
    ),
    "paper": Preset(
        name="paper",
        description=(
            "BN, synchronized BN, GN, LN, IN, no norm at 32..2 images per worker, 3 seeds, "
            "wider network, all 60,000 images; plus GN with G = 1..32 at 32 images per worker"
        ),
        protocol=Protocol(train_size=60000, epochs=3, base_lr=0.4, width=32, groups=32),
        norms=("bn", "bn-sync", "gn", "ln", "in", "none"),
        batch_sizes=(32, 16, 8, 4, 2),
        seeds=3,
        sweep_groups=(1, 2, 4, 8, 16, 32),
        sweep_batch=32,
        budget="hours on 2 cores",
    ),
}


def plan_runs(preset: Preset) -> list[RunSpec]:
    """Every run of the preset, largest batch first, seeds interleaved so partial grids are
    already balanced."""
    runs = [
        RunSpec(norm, b, seed)
        for seed in range(preset.seeds)
        for b in preset.batch_sizes
        for norm in preset.norms
    ]
    for seed in range(preset.seeds):
        for g in preset.sweep_groups:
            runs.append(RunSpec("gn", preset.sweep_batch, seed, groups=g))
    return runs


def _bar(total: int, desc: str, disable: bool, position: int = 0, leave: bool = True) -> Any:
    if disable:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=leave, dynamic_ncols=True)


# Worker-process state for --jobs > 1 (loaded once per process by the initializer).
_DATA: Any = None


def _init_worker(loader: Callable[[], Any], threads: int) -> None:
    global _DATA
    torch.set_num_threads(threads)
    _DATA = loader()


def _run_in_worker(protocol: Protocol, run: RunSpec) -> dict[str, Any]:
    return train_run(protocol, run, _DATA)


def run_grid(
    preset: Preset,
    out_dir: str | os.PathLike,
    loader: Callable[[], Any],
    *,
    runs: Iterable[RunSpec] | None = None,
    jobs: int = 1,
    threads: int = 1,
    processes: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train the runs of ``preset`` missing from ``out_dir/results.jsonl``; return all records.

    Args:
        preset: what to run; its protocol is stored in every record.
        out_dir: the run directory (the caller holds its lock).
        loader: returns the dataset; called in each process that trains.
        runs: a subset of :func:`plan_runs` (default: all of it).
        jobs: runs trained at once, in separate processes (1: in this process).
        threads: torch threads per training process.
        processes: 0 for virtual workers; K > 0 for K real gloo processes per run.
        progress: show tqdm bars.
        log: where one line per finished run goes.
    """
    protocol = preset.protocol
    digest = protocol.digest()
    path = Path(out_dir) / RESULTS_NAME
    done = read_results(path)
    for r in done:
        if r.get("protocol_digest") != digest:
            raise ValueError(
                f"{path} holds runs of a different protocol ({r.get('protocol_digest')} vs "
                f"{digest}: the preset or an override changed); use another --out to keep both"
            )
    done_keys = {r["key"] for r in done}
    todo = [r for r in (runs if runs is not None else plan_runs(preset)) if r.key not in done_keys]
    records = list(done)
    if not todo:
        return records
    extra = {
        "protocol": protocol.to_dict(),
        "protocol_digest": digest,
        "preset": preset.name,
        "threads": threads,
    }

    def finish(record: dict[str, Any], grid_bar: Any) -> None:
        record = {**record, **extra, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        append_result(path, record)
        records.append(record)
        if grid_bar is not None:
            grid_bar.update(1)
        message = (
            f"{record['key']:<16} error {record['test_error']:6.2f}%  "
            f"({record['steps']} steps, {record['wall_s']:.0f} s)"
        )
        if grid_bar is not None:
            grid_bar.write(message)
        else:
            log(message)

    grid_bar = _bar(len(todo), f"{preset.name} grid", not progress)
    try:
        if processes > 0:
            data = loader()
            for run in todo:
                finish(train_run_ddp(protocol, run, data, processes, threads=threads), grid_bar)
        elif jobs <= 1:
            torch.set_num_threads(threads)
            data = loader()
            for run in todo:
                from .train import _total_steps

                bar = _bar(_total_steps(protocol, run, None), run.key, not progress, 1, False)
                try:
                    record = train_run(protocol, run, data, progress=bar)
                finally:
                    if bar is not None:
                        bar.close()
                finish(record, grid_bar)
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=jobs,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(loader, threads),
            ) as pool:
                # Longest first (the most steps: the smallest batches), so that the pool does
                # not end on one long run while the other workers are idle. Results do not
                # depend on the order.
                from .train import _total_steps

                longest_first = sorted(
                    todo, key=lambda r: _total_steps(protocol, r, None), reverse=True
                )
                futures = [pool.submit(_run_in_worker, protocol, run) for run in longest_first]
                for future in as_completed(futures):
                    finish(future.result(), grid_bar)
    finally:
        if grid_bar is not None:
            grid_bar.close()
    sys.stdout.flush()
    return records


def with_overrides(preset: Preset, **changes: Any) -> Preset:
    """A copy of ``preset`` with protocol fields (``epochs=...``) or grid fields replaced."""
    proto_fields = {f.name for f in dataclasses.fields(Protocol)}
    proto = {k: v for k, v in changes.items() if k in proto_fields and v is not None}
    grid = {k: v for k, v in changes.items() if k not in proto_fields and v is not None}
    return dataclasses.replace(
        preset, protocol=dataclasses.replace(preset.protocol, **proto), **grid
    )
