"""The benchmark suite: ``groupnorm bench`` / ``make bench``.

Layers: :mod:`.timing` (interleaved repeats, percentiles), :mod:`.memory` (peak and retained
bytes), :mod:`.cases` (ops, providers, shape sets), :mod:`.model` (a small ResNet training step),
:mod:`.suite` (runs everything into long-format CSV rows), :mod:`.plot` (one figure per op) and
:mod:`.cli` (the command). Nothing runs at import.
"""
