"""Memory measured on CPU: bytes kept for backward, and the peak allocated during a call.

* retained: every tensor autograd saves for backward passes through a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook; we add up the distinct storages
  (the input counts when it is saved; parameters count too, they are small).
* peak: ``torch.profiler`` with ``profile_memory=True`` attributes every allocation and free to
  the op that made it; walking the ops in time order (allocations at their start, frees at their
  end) gives the high-water mark of memory allocated during the call, above what existed before.
  Allocations made outside torch's allocator (the C++ kernels' small scratch vectors) are not
  seen.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import torch


def retained_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs its forward.

    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> retained_bytes(lambda: (x * x).sum()) == x.numel() * 4
    True
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return int(sum(seen.values()))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side logs every start and stop to file descriptor 2; hide that."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture or no real stderr
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def peak_bytes(fn: Callable[[], object]) -> int:
    """High-water mark of bytes allocated (net of frees) while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fn()
                del out
    points: list[tuple[float, int]] = []
    for ev in prof.events():
        delta = ev.self_cpu_memory_usage
        if not delta:
            continue
        when = ev.time_range.start if delta > 0 else ev.time_range.end
        points.append((when, delta))
    points.sort()
    level = peak = 0
    for _, delta in points:
        level += delta
        peak = max(peak, level)
    return int(peak)
