"""Determinism on CPU: bit-identical results across repeated runs and across thread counts.

Repeated runs at one thread count must always agree bit for bit, on every backend. Across
thread counts (1 vs 2) only the fused CPU kernels promise the same bits: torch's own kernels
(the portable backend, batch norm's backward) may split a long sum by thread, and whether they
do depends on the CPU's vector width, so nothing here asserts it. ``make test`` runs this file
once per instruction-set level the CPU runs. The thread count is restored after every test.
"""

from __future__ import annotations

import pytest
import torch

from groupnorm import normalize

BACKENDS = ["cpu", "portable"]

# name -> (shape, num_groups, channels_last)
INPUTS = {
    "many-sets": ((8, 32, 32, 32), 8, False),
    "many-sets-channels-last": ((8, 32, 32, 32), 8, True),
    # two samples: the channels-last kernels cut each into chunks of rows, whose number once
    # followed the thread count (2x128x14x14: 2 chunks a sample on 1 thread, 4 on 2)
    "few-samples-channels-last": ((2, 128, 14, 14), 32, True),
    # three samples: with an activation the channels-last backward runs sample by sample on
    # one thread but over the whole tensor on two (3 samples do not share out evenly)
    "odd-samples-channels-last": ((3, 64, 10, 10), 16, True),
    "long-sets": ((1, 4, 1 << 18), 1, False),
    # instance norm on small maps: 2130 sets of 16 values, taken in blocks of sets (the last
    # block partial) shared by the threads
    "short-sets": ((71, 30, 4, 4), 30, False),
}

#: what the fused kernels compute in each mode, and so what this project promises to be
#: independent of the thread count: group norm's output and every gradient; batch norm's output
#: (its backward is torch's native_batch_norm_backward, whose sums torch splits by thread)
OWN_KERNEL_OUTPUTS = {"group": ("y", "dx", "dweight", "dbias"), "batch": ("y",)}

_HAVE_KERNELS = (
    __import__("groupnorm.kernels.cpu_ext", fromlist=["extension"]).extension() is not None
)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _data(name: str):
    shape, groups, channels_last = INPUTS[name]
    g = torch.Generator().manual_seed(20)
    x = 3.0 + torch.randn(*shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    dy = torch.randn(*shape, generator=g)
    return x, groups, w, b, dy


def _run(backend, mode, name, activation):
    """Output and all gradients of one forward/backward, as a list of tensors."""
    x, groups, w, b, dy = _data(name)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    kw = {"num_groups": groups} if mode == "group" else {}
    y = normalize(
        leaves[0],
        mode,
        weight=leaves[1],
        bias=leaves[2],
        activation=activation,
        backend=backend,
        **kw,
    )
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _differences(a, b, names=("y", "dx", "dweight", "dbias")):
    every = ("y", "dx", "dweight", "dbias")
    return [n for n, s, t in zip(every, a, b, strict=True) if n in names and not torch.equal(s, t)]


GRID = [
    (backend, mode, name, act)
    for backend in BACKENDS
    for mode in ("group", "batch")
    for name in INPUTS
    for act in (None, "silu")
]


def _id(case):
    backend, mode, name, act = case
    return f"{backend}-{mode}-{name}-{act or 'none'}"


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_repeated_runs_are_bit_identical(case, restore_threads):
    torch.set_num_threads(2)
    assert _differences(_run(*case), _run(*case)) == []


OWN_GRID = [case for case in GRID if case[0] == "cpu"]


@pytest.mark.skipif(not _HAVE_KERNELS, reason="the fused CPU kernels are unavailable")
@pytest.mark.parametrize("case", OWN_GRID, ids=[_id(c) for c in OWN_GRID])
def test_one_and_two_threads_are_bit_identical(case, restore_threads):
    """The fused kernels' results do not depend on the thread count (what they compute)."""
    torch.set_num_threads(1)
    one = _run(*case)
    torch.set_num_threads(2)
    two = _run(*case)
    assert _differences(one, two, OWN_KERNEL_OUTPUTS[case[1]]) == []
