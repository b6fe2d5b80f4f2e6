"""Fused CPU kernels in C++: compiled at install for each instruction-set level, chosen at run time.

The kernels (``gn_common.h``, ``gn_tuning.h``, and one translation unit per op and layout:
``gn_nchw.cpp``, ``gn_nhwc.cpp``, ``bn.cpp``, with the C entry points in ``gn_entry.cpp``) are
plain C++ with OpenMP, compiled once per level into ``libgnkernels-<level>.so``: on x86-64 the
psABI levels ``x86-64-v2`` (SSE4.2), ``x86-64-v3`` (AVX2, FMA) and ``x86-64-v4`` (AVX-512),
elsewhere one ``generic`` build. ``gn_ops.cpp`` is the Python extension module ``_ops``
(pybind11 calls, a C++ autograd node), compiled once for the baseline; it opens one kernel
library with ``dlopen``. :mod:`.build` compiles all of it; ``pip install`` runs it (``setup.py``).

The first CPU call (:func:`extension`) picks the highest level this CPU runs
(:func:`cpu_levels`), capped by ``GROUPNORM_CPU_ISA``, and loads it: a few milliseconds, no
compiler, nothing written. Where the installed package has no build for the running torch:

* a build made for another torch is not loaded (a torch extension is tied to the torch it was
  compiled against): one warning names both versions and how to rebuild, then torch's kernels;
* a package with no build at all (a source checkout on ``PYTHONPATH``) is built once into
  ``$GROUPNORM_CACHE_DIR`` (default ``~/.cache/groupnorm``), announced on stderr. Processes that
  start together build once: the builder holds an ``flock`` on a lock file, which the kernel
  releases when the process dies, so a build killed at any moment never blocks the next (which
  says so and builds again); others wait, at most ``GROUPNORM_BUILD_WAIT`` seconds (900), and
  say whom they wait for. Finished files appear atomically.

With no compiler, a cache that cannot be written or a failed build, :func:`extension` returns
``None`` after one warning and the cpu backend uses torch's kernels; ``GROUPNORM_CPU_EXT=0``
does the same without the warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

from . import build as _build

_HERE = Path(__file__).parent
_lock = threading.Lock()

#: environment variable capping the instruction-set level (for example ``x86-64-v3``)
ISA_ENV = "GROUPNORM_CPU_ISA"
#: how long a process waits for another one's build before it gives up (seconds)
WAIT_ENV = "GROUPNORM_BUILD_WAIT"
_DEFAULT_WAIT = 900.0
#: a cold build of all levels on the 2-core machine the project is developed on
_USUAL_BUILD = "about 1-2 minutes on 2 cores"

#: the CPU features (Linux /proc/cpuinfo names) each x86-64 level needs, on top of the last
_LEVEL_FEATURES = {
    "x86-64-v2": {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
#: torch's capability names, for where /proc/cpuinfo cannot be read
_TORCH_CAPABILITY_LEVEL = {"AVX512": "x86-64-v4", "AVX2": "x86-64-v3"}


def cache_dir() -> Path:
    """Where run-time builds are kept (``$GROUPNORM_CACHE_DIR`` or ``~/.cache/groupnorm``)."""
    env = os.environ.get("GROUPNORM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "groupnorm"


def _compiler() -> str | None:
    return _build.compiler()


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (first processor), or None if unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_levels() -> list[str]:
    """The instruction-set levels this CPU can run, lowest first (empty: none of ours)."""
    if not _build.is_x86_64():
        return ["generic"]
    flags = _cpu_flags()
    if flags is None:  # (no /proc: ask torch, which reads CPUID)
        import torch

        best = _TORCH_CAPABILITY_LEVEL.get(torch.backends.cpu.get_cpu_capability(), "x86-64-v2")
        order = list(_LEVEL_FEATURES)
        return order[: order.index(best) + 1]
    levels, need = [], set()
    for level, features in _LEVEL_FEATURES.items():
        need |= features
        if not need <= flags:
            break
        levels.append(level)
    return levels


def isa_cap() -> str | None:
    """The level named by ``$GROUPNORM_CPU_ISA`` (None when unset or ``native``)."""
    value = os.environ.get(ISA_ENV, "").strip()
    if value in ("", "native"):
        return None
    if value not in _build.LEVEL_FLAGS:
        known = ", ".join(_build.levels_for())
        raise ValueError(
            f"{ISA_ENV}={value!r} is not an instruction-set level of this machine's "
            f"architecture; use one of {known} (or unset it for the best this CPU runs)"
        )
    return value


def target_level(available: list[str] | None = None) -> str | None:
    """The level to load: the highest this CPU runs, no higher than ``$GROUPNORM_CPU_ISA``,
    among ``available`` (default: every level of this architecture); None if there is none."""
    runs = cpu_levels()
    cap = isa_cap()
    if cap is not None and cap in runs:
        runs = runs[: runs.index(cap) + 1]
    choices = [lvl for lvl in runs if available is None or lvl in available]
    return choices[-1] if choices else None


def _cache_key() -> str:
    import torch

    parts = [
        _build.sources_digest().encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(),
        platform.machine().encode(),
    ]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def cache_build_dir() -> Path:
    """The cache folder of the run-time build for these sources, this torch and this Python."""
    import torch

    version = torch.__version__.replace("+", "_")
    return (
        cache_dir()
        / "cpu_ext"
        / f"torch{version}-py{sys.version_info[0]}{sys.version_info[1]}-{_cache_key()}"
    )


def _usable(folder: Path) -> tuple[dict | None, str | None]:
    """(build info, None) when ``folder`` holds a finished build for this torch and Python,
    else (info or None, why not)."""
    import torch

    info = _build.read_info(folder)
    if info is None:
        return None, "no build"
    if info.get("torch") != torch.__version__:
        return info, f"built for torch {info.get('torch')}, running torch {torch.__version__}"
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if info.get("python") != python or not (folder / _build.ops_filename()).exists():
        return info, f"built for Python {info.get('python')}, running Python {python}"
    try:
        digest = _build.sources_digest()
    except OSError:  # (a package shipped without its sources: nothing to compare)
        digest = info.get("sources")
    if info.get("sources") != digest:
        return info, "built from other sources than the ones beside them"
    return info, None


def package_build_dir() -> Path:
    """Where ``pip install`` (``setup.py``) puts the build: this package's own folder."""
    return _HERE


def find_build() -> tuple[Path | None, str | None]:
    """(folder, None) for a finished build this process can load (the package's, else the
    cache's), or (None, why the package's cannot be used)."""
    info, why = _usable(package_build_dir())
    if why is None:
        return package_build_dir(), None
    try:
        cached = cache_build_dir()
    except OSError:
        cached = None
    if cached is not None and _usable(cached)[1] is None:
        return cached, None
    return None, (why if info is not None else None)


def _say(message: str) -> None:
    print(f"groupnorm: {message}", file=sys.stderr, flush=True)


def build_into_cache(cxx: str, levels: list[str] | None = None) -> Path:
    """Build into :func:`cache_build_dir` unless a finished build is there; returns the folder.

    One process builds; others wait for its lock (the kernel drops a dead holder's lock, so a
    killed build never blocks) and then load what it made. Raises ``OSError`` when the cache
    cannot be written and ``TimeoutError`` when the wait passes ``$GROUPNORM_BUILD_WAIT``."""
    import fcntl

    folder = cache_build_dir()
    if _usable(folder)[1] is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / (folder.name + ".lock")
    with open(lock_path, "a+") as lock:
        _acquire(lock, lock_path)
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            if _usable(folder)[1] is None:  # another process finished it while we waited
                return folder
            stale = sorted(folder.glob(".build-*")) if folder.is_dir() else []
            if stale:
                _say(
                    f"an earlier build in {folder} did not finish (its process ended); "
                    "building again"
                )
                for leftover in stale:
                    shutil.rmtree(leftover, ignore_errors=True)
            _say(
                f"building the fused CPU kernels into {folder} (no build in the installed "
                f"package for this torch); once per version, {_USUAL_BUILD}"
            )
            info = _build.build(folder, levels, cxx=cxx)
            _say(f"built the fused CPU kernels in {info['seconds']:.0f} s")
            return folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _acquire(lock, lock_path: Path) -> None:
    """Take the build lock, waiting at most ``$GROUPNORM_BUILD_WAIT`` seconds."""
    import fcntl

    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    wait = float(os.environ.get(WAIT_ENV, _DEFAULT_WAIT))
    holder = ""
    for _ in range(20):  # (the holder writes its pid just after it takes the lock)
        lock.seek(0)
        holder = lock.read().strip()
        if holder:
            break
        time.sleep(0.05)
    holder = holder or "unknown"
    _say(f"waiting for process {holder}, which is building the fused CPU kernels ({lock_path})")
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {holder} still held the build lock {lock_path} after {wait:.0f} s "
                    f"(${WAIT_ENV}); its build may be stuck"
                ) from None
            time.sleep(0.2)


_ops_state: dict[str, object] = {}


def _disabled() -> str | None:
    """Why the kernels are switched off by the environment (asked for: no warning), else None."""
    if os.environ.get("GROUPNORM_CPU_EXT", "1") == "0":
        return "disabled by GROUPNORM_CPU_EXT=0"
    if os.environ.get("GROUPNORM_CPU_OPS", "1") == "0":
        warnings.warn(
            "GROUPNORM_CPU_OPS is deprecated; set GROUPNORM_CPU_EXT=0 to turn the fused CPU "
            "kernels off",
            DeprecationWarning,
            stacklevel=4,
        )
        return "disabled by GROUPNORM_CPU_OPS=0"
    return None


def _load() -> tuple[object | None, str | None]:
    """(module, None), or (None, why not)."""
    isa_cap()  # (a bad value is the user's to fix: raise, do not fall back)
    folder, why = find_build()
    if folder is None:
        if why is not None:  # a build for another torch: no silent rebuild
            return None, (
                f"the installed kernels were {why}; rebuild them with `groupnorm build` (into "
                f"the cache), `groupnorm build --inplace` (into the package) or by reinstalling "
                f"groupnorm (`pip install --no-build-isolation --force-reinstall <source>`)"
            )
        cxx = _compiler()
        if cxx is None:
            return (
                None,
                "no build in the package and no C++ compiler found (set CXX or install g++)",
            )
        try:
            folder = build_into_cache(cxx)
        except (OSError, TimeoutError) as err:
            return None, f"no build in the package, and none could be made in the cache: {err}"
        except Exception as err:  # a compiler failure: the path without it
            return None, f"build failed: {err}"
    info = _build.read_info(folder) or {}
    level = target_level(info.get("levels"))
    if level is None:
        return None, (
            f"this CPU runs none of the built levels {info.get('levels')} "
            f"(it runs {cpu_levels() or 'none'})"
        )
    try:
        module = _import_extension("groupnorm.kernels.cpu_ext._ops", folder / _build.ops_filename())
    except Exception as err:  # ImportError, a missing symbol of another torch, ...
        return None, f"the extension did not load: {err}"
    error = module.load_kernels(str(folder / _build.kernel_library(level)))
    if error:
        return None, f"the {level} kernels did not load: {error}"
    _ops_state["folder"] = folder
    return module, None


def extension():
    """The extension module (``gn_ops.cpp``) with the best kernel library for this CPU loaded,
    or ``None`` when it cannot be had; the cpu backend then uses torch's kernels.

    The first call finds the build (see the module docstring), chooses the level and loads it;
    the answer is kept for the process (``GROUPNORM_CPU_EXT``, ``GROUPNORM_CPU_ISA`` are read
    then). A failure warns once, naming the reason (also in
    :func:`fused_op_unavailable_reason`). A bad ``GROUPNORM_CPU_ISA`` raises ``ValueError``."""
    if "value" in _ops_state:  # (the common case)
        return _ops_state["value"]
    with _lock:
        if "value" in _ops_state:
            return _ops_state["value"]
        disabled = _disabled()
        value, reason = (None, disabled) if disabled else _load()
        if value is None:
            _ops_state["reason"] = reason
        if value is None and not disabled:
            warnings.warn(
                f"groupnorm: the fused CPU kernels are unavailable ({reason}); using torch's "
                "kernels",
                RuntimeWarning,
                stacklevel=3,
            )
        _ops_state["value"] = value
        return value


def loaded_level() -> str | None:
    """The instruction-set level of the kernels in use (None before the first call or when the
    extension is unavailable)."""
    ext = _ops_state.get("value")
    return ext.kernel_level() if ext is not None else None


def loaded_folder() -> Path | None:
    """The folder of the build in use (the package's or the cache's)."""
    return _ops_state.get("folder") if _ops_state.get("value") is not None else None


def use_level(level: str) -> str:
    """Switch the loaded extension to another level's kernels (for tests and benchmarks that
    compare levels in one process); returns the level in use before. Raises ``ValueError``
    when this CPU cannot run ``level`` or the build lacks it."""
    ext = extension()
    if ext is None:
        raise RuntimeError(
            f"the fused CPU kernels are unavailable: {fused_op_unavailable_reason()}"
        )
    if level not in cpu_levels():
        raise ValueError(f"this CPU cannot run {level} code (it runs {cpu_levels()})")
    folder = loaded_folder()
    path = folder / _build.kernel_library(level)
    if not path.exists():
        raise ValueError(f"the build in {folder} has no {level} kernels")
    before = ext.kernel_level()
    error = ext.load_kernels(str(path))
    if error:
        raise RuntimeError(f"the {level} kernels did not load: {error}")
    return before


def _import_extension(name: str, path: Path):
    """The extension module ``name`` at ``path`` (once per process)."""
    import importlib.machinery
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    import torch  # noqa: F401  (its libraries must be loaded first)

    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def fused_op_unavailable_reason() -> str | None:
    """Why :func:`extension` returned ``None`` (after it was called), else ``None``."""
    return _ops_state.get("reason")  # type: ignore[return-value]


def remove_other_builds(keep: Path | None) -> tuple[int, int]:
    """Delete every run-time build folder in the cache except ``keep`` (older versions, other
    torch versions): each is rebuilt if ever needed again. Returns (folders removed, bytes
    freed)."""
    root = cache_dir() / "cpu_ext"
    removed = freed = 0
    if not root.is_dir():
        return 0, 0
    for folder in root.iterdir():
        if not folder.is_dir() or not folder.name.startswith(("torch", "groupnorm_cpu_ops-")):
            continue  # (only what the builds made)
        if keep is not None and folder.resolve() == Path(keep).resolve():
            continue
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        (root / (folder.name + ".lock")).unlink(missing_ok=True)
        removed += 1
    return removed, freed
