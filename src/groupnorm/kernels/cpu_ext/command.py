"""``groupnorm build``: make sure the fused CPU kernels can load here, building them if needed.

``pip install`` compiles the kernels into the package; this command is for the cases it does
not cover: a source checkout used from ``PYTHONPATH``, or a torch upgraded after the install.
Then it builds into the cache (``$GROUPNORM_CACHE_DIR``). It also tells which build and which
instruction-set level a CPU call would use, and lists the levels this CPU runs (``--levels``).
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--isa",
        default=None,
        help="cap the instruction-set level, as $GROUPNORM_CPU_ISA does (e.g. x86-64-v3)",
    )
    parser.add_argument(
        "--levels",
        action="store_true",
        help="print the instruction-set levels this CPU runs, lowest first, one per line, and exit",
    )
    parser.add_argument(
        "--inplace",
        action="store_true",
        help="compile into the package's own folder (a source checkout, or an install whose "
        "torch changed) instead of the cache; does nothing when that build is up to date",
    )
    parser.add_argument(
        "--clean",
        action="store_true",
        help="then delete the cache's other builds (older versions, other torch versions)",
    )


def run(args: argparse.Namespace) -> int:
    if args.isa:
        os.environ["GROUPNORM_CPU_ISA"] = args.isa
    from groupnorm.kernels import cpu_ext

    if args.levels:
        print("\n".join(cpu_ext.cpu_levels()))
        return 0
    if args.inplace:
        from groupnorm.kernels.cpu_ext import build

        try:
            build.build(
                cpu_ext.package_build_dir(),
                log=lambda line: print(f"groupnorm build: {line}"),
                objects=cpu_ext.cache_dir() / "objects",  # (unchanged units are not recompiled)
            )
        except (build.BuildError, OSError) as err:
            print(f"groupnorm build: the in-place build failed: {err}", file=sys.stderr)
            return 1
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (the reason is printed below)
            ext = cpu_ext.extension()
    except ValueError as err:
        print(f"groupnorm build: {err}", file=sys.stderr)
        return 2
    if ext is None:
        reason = cpu_ext.fused_op_unavailable_reason()
        folder, why = cpu_ext.find_build()
        if folder is None and why is not None:  # built for another torch: build for this one
            cxx = cpu_ext._compiler()
            if cxx is None:
                print(
                    "groupnorm build: no C++ compiler found (set CXX or install g++)",
                    file=sys.stderr,
                )
                return 1
            cpu_ext.build_into_cache(cxx)
            cpu_ext._ops_state.clear()
            ext = cpu_ext.extension()
        if ext is None:
            reason = cpu_ext.fused_op_unavailable_reason() or reason
            print(
                f"groupnorm build: the fused CPU kernels are unavailable: {reason}", file=sys.stderr
            )
            print("groupnorm build: CPU norms will use torch's kernels", file=sys.stderr)
            return 1
    folder = cpu_ext.loaded_folder()
    runs = ", ".join(cpu_ext.cpu_levels())
    print(f"groupnorm build: {folder} ({cpu_ext.loaded_level()}; this CPU runs {runs})")
    if args.clean:
        keep = folder if folder != cpu_ext.package_build_dir() else None
        count, freed = cpu_ext.remove_other_builds(keep)
        print(f"groupnorm build: removed {count} other build(s), {freed / 2**20:.1f} MiB")
    return 0
