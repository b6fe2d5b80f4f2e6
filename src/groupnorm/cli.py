"""The ``groupnorm`` command line: ``groupnorm <command> [options]``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``; the
module is imported only when its command runs, so ``groupnorm --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": (
        "groupnorm.demo",
        "the quick reproduction: BN vs GN at 32 and 1 images per worker (make demo)",
    ),
    "modes": ("groupnorm.modes", "show the four modes side by side on one tensor"),
    "reproduce": (
        "groupnorm.experiments.cli",
        "reproduce the paper's error-vs-batch-size experiment on Fashion-MNIST",
    ),
    "bench": ("groupnorm.bench.cli", "benchmark the kernels against torch and peers"),
    "build": ("groupnorm.kernels.cpu_ext.command", "compile the fused CPU kernels ahead of use"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupnorm",
        description="Batch, Layer, Instance and Group Normalization from one core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name in sys.argv[1:2]:  # only import the module of the command being run
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        parser = build_parser()
    finally:
        sys.argv = saved
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
