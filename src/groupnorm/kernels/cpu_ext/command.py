"""``groupnorm build``: compile the fused CPU kernels into the cache ahead of use.

The first call of a CPU norm otherwise waits for the build (about a minute on 2 cores) inside
whatever it is doing; ``make setup`` runs this command so that tests and demos do not.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--isa",
        default=None,
        help="instruction set to compile for, a -march value (default: $GROUPNORM_CPU_ISA, "
        "else native); e.g. x86-64-v3 for a build that runs on any AVX2 machine",
    )
    parser.add_argument(
        "--clean",
        action="store_true",
        help="then delete the other builds in the cache (older versions, other instruction "
        "sets); each is rebuilt if it is needed again",
    )


def run(args: argparse.Namespace) -> int:
    if args.isa:
        os.environ["GROUPNORM_CPU_ISA"] = args.isa
    import warnings

    from groupnorm.kernels import cpu_ext

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the reason is printed below)
        ext = cpu_ext.extension()
    if ext is None:
        reason = cpu_ext.fused_op_unavailable_reason()
        print(f"groupnorm build: the fused CPU kernels are unavailable: {reason}", file=sys.stderr)
        print("groupnorm build: CPU norms will use torch's kernels", file=sys.stderr)
        return 1
    print(f"groupnorm build: {ext.__file__} ({cpu_ext.target_isa()})")
    if args.clean:
        from pathlib import Path

        count, freed = cpu_ext.remove_other_builds(Path(ext.__file__).parent)
        print(f"groupnorm build: removed {count} other build(s), {freed / 2**20:.1f} MiB")
    return 0
