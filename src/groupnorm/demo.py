"""``groupnorm demo``: the quick reproduction of the paper's Figure 1, what ``make demo`` runs.

It is ``groupnorm reproduce --preset quick --resume``: batch norm against group norm at 32 and 1
images per worker, written to ``runs/quick``. A second call finds the finished runs and only
redraws the table, plot and report. Every option of ``groupnorm reproduce`` is accepted.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .experiments import cli

    cli.add_arguments(parser)
    parser.set_defaults(preset="quick", resume=True)
    parser.epilog = (
        "The same as `groupnorm reproduce --preset quick --resume`; `groupnorm reproduce "
        "--help` lists the presets.\n\nExamples:\n"
        "  groupnorm demo                      # BN vs GN at 32 and 1 images/worker, runs/quick\n"
        "  groupnorm demo --data DIR           # Fashion-MNIST from another folder\n"
    )


def run(args: argparse.Namespace) -> int:
    from .experiments import cli

    return cli.run(args)
