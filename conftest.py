"""Shared pytest set-up: doctests see ``torch`` and ``groupnorm`` without importing them."""

import pytest
import torch

import groupnorm


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["groupnorm"] = groupnorm
