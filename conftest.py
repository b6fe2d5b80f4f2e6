"""Shared pytest set-up.

Doctests see ``torch`` and ``groupnorm`` without importing them. Where Triton is missing (or
does not import), the doctest run skips the one module that imports it at the top
(``src/groupnorm/kernels/triton/kernels.py``), so ``make test`` passes without Triton.
"""

import pytest
import torch

import groupnorm

try:
    import triton  # noqa: F401  (the kernels read TRITON_INTERPRET later, at launch)

    collect_ignore: list[str] = []
except ImportError:
    collect_ignore = ["src/groupnorm/kernels/triton/kernels.py"]


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["groupnorm"] = groupnorm
