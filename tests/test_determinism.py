"""Determinism on CPU: bit-identical results across repeated runs and across thread counts.

Repeated runs at one thread count must always agree bit for bit. Across thread counts (1 vs 2)
torch's reductions may split a long sum differently, which changes the rounding; where that
happens (measured on this project's 2-core machine, torch 2.13) the case is an
``xfail(strict=True)`` naming the tensor that differs, and docs/reliability.md lists them. The
thread count is restored after every test.
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

# (backend, mode, input, activation) -> what differs between 1 and 2 threads, and why.
KNOWN_THREAD_DEPENDENT = {
    ("cpu", "batch", "many-sets-channels-last", None): "dx, dweight: torch's native "
    "batch norm backward on channels-last input",
    ("cpu", "batch", "few-samples-channels-last", None): "dx, dweight, dbias: torch's native "
    "batch norm backward on channels-last input",
    ("cpu", "batch", "odd-samples-channels-last", None): "dx, dweight, dbias: torch's native "
    "batch norm backward on channels-last input",
    ("portable", "group", "long-sets", None): "dx: torch.mean over a set of 2^18 values is "
    "split across threads",
    ("portable", "group", "long-sets", "silu"): "dx: torch.mean over a set of 2^18 values is "
    "split across threads",
}

if __import__("groupnorm.kernels.cpu_ext", fromlist=["extension"]).extension() is None:
    # Without a C++ compiler the cpu backend falls back to torch's kernels, which are not
    # thread-count invariant here (the fused C++ kernels are).
    KNOWN_THREAD_DEPENDENT[("cpu", "group", "many-sets", None)] = (
        "dx: torch's native_group_norm_backward"
    )
    KNOWN_THREAD_DEPENDENT[("cpu", "group", "long-sets", "silu")] = (
        "dx: the fused-activation backward runs the portable core"
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


def _differences(a, b):
    names = ("y", "dx", "dweight", "dbias")
    return [n for n, s, t in zip(names, a, b, strict=True) if not torch.equal(s, t)]


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


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            marks=pytest.mark.xfail(strict=True, reason=KNOWN_THREAD_DEPENDENT[c])
            if c in KNOWN_THREAD_DEPENDENT
            else (),
        )
        for c in GRID
    ],
    ids=[_id(c) for c in GRID],
)
def test_one_and_two_threads_are_bit_identical(case, restore_threads):
    torch.set_num_threads(1)
    one = _run(*case)
    torch.set_num_threads(2)
    two = _run(*case)
    assert _differences(one, two) == []
