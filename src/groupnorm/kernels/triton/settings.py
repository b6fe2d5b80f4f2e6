"""Environment settings of the Triton backend, read once per process (not on every call).

The launchers, the planner and ``backend="auto"`` read the variables below through
:func:`settings`, which parses them on first use and then returns the same object. A program (or
a test) that changes them afterwards calls :func:`reload_config`, which parses them again and
empties every plan cache built from the old values.

=================================  ===========================================================
``GROUPNORM_TRITON_PATH`` ...      planner overrides, see :func:`.plan.config_from_env`
``TRITON_INTERPRET``               ``1``: CPU tensors run in Triton's interpreter (tests)
``GROUPNORM_TRITON_LAUNCH``        ``direct`` (default): after a kernel's first launch, call its
                                   compiled launcher directly; ``jit``: always ``kernel[grid]``
``GROUPNORM_AUTO_TRITON_MIN_NUMEL``  ``backend="auto"`` on CUDA uses Triton from this many
                                   elements up (see :func:`groupnorm.kernels.triton.prefers_triton`)
=================================  ===========================================================

Nothing here imports Triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .plan import TritonConfig, config_from_env

LAUNCH_MODES = ("direct", "jit")

#: ``backend="auto"`` sends CUDA calls of at least this many elements to Triton and smaller
#: ones to torch's native kernels (the evidence is in docs/triton.md, "backend='auto'").
DEFAULT_AUTO_MIN_NUMEL = 1 << 26


@dataclass(frozen=True)
class Settings:
    """The parsed environment.

    Examples:
        >>> s = read_settings({"GROUPNORM_TRITON_LAUNCH": "jit", "TRITON_INTERPRET": "1"})
        >>> s.launch, s.interpret, s.auto_min_numel == DEFAULT_AUTO_MIN_NUMEL
        ('jit', True, True)
    """

    config: TritonConfig
    interpret: bool
    launch: str
    auto_min_numel: int


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the variables (``os.environ`` by default); bad values raise a ``ValueError``."""
    env = os.environ if environ is None else environ
    launch = env.get("GROUPNORM_TRITON_LAUNCH", "").strip() or "direct"
    if launch not in LAUNCH_MODES:
        raise ValueError(f"GROUPNORM_TRITON_LAUNCH must be one of {LAUNCH_MODES}, got {launch!r}")
    raw = env.get("GROUPNORM_AUTO_TRITON_MIN_NUMEL", "").strip()
    try:
        auto_min = int(raw) if raw else DEFAULT_AUTO_MIN_NUMEL
    except ValueError:
        raise ValueError(
            f"GROUPNORM_AUTO_TRITON_MIN_NUMEL must be an integer (elements), got {raw!r}"
        ) from None
    if auto_min < 0:
        raise ValueError(f"GROUPNORM_AUTO_TRITON_MIN_NUMEL must be >= 0, got {auto_min}")
    return Settings(
        config=config_from_env(env),
        interpret=env.get("TRITON_INTERPRET", "0").strip() not in ("", "0"),
        launch=launch,
        auto_min_numel=auto_min,
    )


_current: Settings | None = None
_on_reload: list[Callable[[], None]] = []


def settings() -> Settings:
    """The settings in force: parsed from the environment on first use, then kept."""
    global _current
    if _current is None:
        _current = read_settings()
    return _current


def reload_config(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the environment again (or ``environ``) and drop every plan built from the old
    values. Call it after changing a ``GROUPNORM_TRITON_*`` variable in a running process."""
    global _current
    _current = read_settings(environ)
    for clear in _on_reload:
        clear()
    return _current


def on_reload(clear: Callable[[], None]) -> None:
    """Register a cache-clearing function for :func:`reload_config`."""
    _on_reload.append(clear)
