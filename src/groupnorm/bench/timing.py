"""Wall-clock timing that is fair on a shared machine.

Every provider of a case is timed in the same loop, one sample each per round and in a rotating
order, so a burst of load from another process hits all of them alike, and ratios between them
are taken from one run. A sample times ``inner`` back-to-back calls (enough for about a
millisecond) and is divided by ``inner``.

Minor page faults are counted around every sample too (``Timing.faults``, per call). A call
that writes fresh pages pays the kernel to map and zero each 4 KiB page (~1 us here), and
whether a tensor's pages are fresh depends on the allocator's state (glibc returns a freed
block to the system or keeps it, by thresholds it moves as the process runs), not on the
kernel being timed: the same call swung 2-3x between runs on this machine. A ratio whose
providers fault differently measures the allocator as much as the kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

try:
    import resource
except ImportError:  # (not on Windows)
    resource = None


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th/80th percentiles over the samples; ``faults``:
    minor page faults per call over all timed calls (None where the OS does not count them)."""

    median: float
    p20: float
    p80: float
    samples: int
    faults: float | None = None


def _minor_faults() -> int | None:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _inner_count(fn: Callable[[], object], target_s: float) -> int:
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, int(target_s / once)))


def measure(
    fns: dict[str, Callable[[], object]],
    repeats: int = 15,
    warmup: int = 2,
    target_s: float = 1e-3,
) -> dict[str, Timing]:
    """Time each callable, interleaved round by round; returns a :class:`Timing` per key.

    >>> t = measure({"a": lambda: sum(range(100))}, repeats=5)
    >>> t["a"].p20 <= t["a"].median <= t["a"].p80
    True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    inner = {name: _inner_count(fns[name], target_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    faults = dict.fromkeys(names, 0)
    counted = resource is not None
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], inner[name]
            f0 = _minor_faults() if counted else 0
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
            if counted:
                faults[name] += _minor_faults() - f0
    return {
        name: Timing(
            percentile(s, 50),
            percentile(s, 20),
            percentile(s, 80),
            len(s),
            faults[name] / (repeats * inner[name]) if counted else None,
        )
        for name, s in samples.items()
    }


def no_grad_call(fn: Callable[[], object]) -> Callable[[], object]:
    """Wrap ``fn`` so that it runs under ``torch.no_grad()`` (forward-only timing)."""

    def call() -> object:
        with torch.no_grad():
            return fn()

    return call
