"""Fused CPU kernels in C++, compiled on first use (or by ``groupnorm build``) and cached.

The kernels (``gn_common.h``, ``gn_tuning.h``, and one translation unit per op and layout:
``gn_nchw.cpp``, ``gn_nhwc.cpp``, ``bn.cpp``, with the C entry points in ``gn_entry.cpp``)
are plain C++ with OpenMP. ``gn_ops.cpp`` wraps them as the Python extension module
``groupnorm_cpu_ops`` (pybind11 calls, a C++ autograd node), built with
:mod:`torch.utils.cpp_extension` and ninja, which compiles the units in parallel.

The build goes into ``$GROUPNORM_CACHE_DIR`` (default ``~/.cache/groupnorm``), in a folder
named by a hash of the sources, the flags, the compiler, torch, Python and the target
instruction set (``-march=native`` unless ``GROUPNORM_CPU_ISA`` names another, e.g.
``x86-64-v3``; native's key also holds the CPU's model and flags), so a cache shared between
machines never loads code a CPU cannot run. A cold build announces itself on stderr. With no
compiler, a failed build, or ``GROUPNORM_CPU_EXT=0``, :func:`extension` returns ``None``
after one warning and the cpu backend uses torch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).parent
#: the kernel sources, one translation unit each (gn_kernels.h declares what they export)
KERNEL_SOURCES = [_HERE / name for name in ("gn_entry.cpp", "gn_nchw.cpp", "gn_nhwc.cpp", "bn.cpp")]
#: headers the kernel sources include (part of the build key)
KERNEL_HEADERS = [_HERE / name for name in ("gn_kernels.h", "gn_common.h", "gn_tuning.h")]
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built libraries are kept (``$GROUPNORM_CACHE_DIR`` or ``~/.cache/groupnorm``)."""
    env = os.environ.get("GROUPNORM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "groupnorm"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """Model name and feature flags, so a binary built with -march=native is not reused on a
    CPU that lacks its instructions."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not model and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if not flags and line.startswith("flags"):
                    flags = line.split(":", 1)[1].strip()
                if model and flags:
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}"


def _load_once(state: dict, disabled: str | None, load, warning: str):
    """``state["value"]``, made on the first call: ``load(compiler)``, or ``None`` with the
    reason in ``state["reason"]`` when ``disabled`` names one, no compiler is found, or the
    build or load fails (then ``warning``, formatted with the reason, is given once)."""
    if "value" in state:
        return state["value"]
    with _lock:
        if "value" in state:
            return state["value"]
        value = None
        if disabled:
            state["reason"] = disabled
        else:
            cxx = _compiler()
            if cxx is None:
                state["reason"] = "no C++ compiler found (set CXX or install g++)"
            else:
                try:
                    value = load(cxx)
                except Exception as err:  # any failure means: the path without it
                    state["reason"] = f"build or load failed: {err}"
            if value is None:
                warnings.warn(warning.format(reason=state["reason"]), RuntimeWarning, stacklevel=4)
        state["value"] = value
        return value


_OPS_SOURCE = Path(__file__).with_name("gn_ops.cpp")
_ops_state: dict[str, object] = {}


#: environment variable naming the instruction set the extension is compiled for (a GCC/Clang
#: -march value: x86-64-v3 for a build that runs on any AVX2 machine); "native" by default
ISA_ENV = "GROUPNORM_CPU_ISA"
#: a cold build of the extension on the 2-core machine the project is developed on, with ninja
#: compiling the five translation units in parallel (benchmarks/README.md, "Build")
_USUAL_BUILD = "about 1-2 minutes on 2 cores"
_ISA_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def target_isa() -> str:
    """The instruction set the extension is built for: ``$GROUPNORM_CPU_ISA`` or ``native``."""
    isa = os.environ.get(ISA_ENV, "").strip() or "native"
    if not _ISA_OK.fullmatch(isa):
        raise ValueError(f"{ISA_ENV}={isa!r} is not a -march value (e.g. native, x86-64-v3)")
    return isa


def _ext_cflags(isa: str) -> list[str]:
    return [
        "-O3",
        f"-march={isa}",
        "-fopenmp",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-std=c++20",
        "-w",  # torch's headers warn a lot; failures still show in the error
    ]


def _ext_build_dir(cxx: str, isa: str) -> Path:
    """The extension's build folder in the cache, named by everything its binary depends on:
    the sources, the flags and instruction set, the compiler, torch and Python; for ``native``
    also the CPU (a native binary may not run on another), so a cache shared between machines
    never loads code a CPU cannot run."""
    import sys

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [
        *(src.read_bytes() for src in (_OPS_SOURCE, *KERNEL_SOURCES, *KERNEL_HEADERS)),
        " ".join(_ext_cflags(isa)).encode(),
        version.encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(),
    ]
    if isa == "native":
        parts.append(_cpu_signature().encode())
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return cache_dir() / "cpu_ext" / f"groupnorm_cpu_ops-{isa}-{key}"


def remove_other_builds(keep: Path) -> tuple[int, int]:
    """Delete every build folder of the extension in the cache except ``keep`` (older
    versions, other instruction sets, other machines' native builds: each is rebuilt if it is
    ever needed again). Returns (folders removed, bytes freed)."""
    root = cache_dir() / "cpu_ext"
    removed = freed = 0
    if not root.is_dir():
        return 0, 0
    for folder in root.iterdir():
        if not folder.is_dir() or not folder.name.startswith("groupnorm_cpu_ops-"):
            continue  # (only what the builds made)
        if folder.resolve() == keep.resolve():
            continue
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed, freed


def _ninja_on_path() -> None:
    """Put the ninja of the ``ninja`` package (a dependency) on PATH for torch's builder, which
    looks for the command; a system ninja already there serves as well."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # torch's builder then says that ninja is missing
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_extension(cxx: str) -> Path:
    """Build the extension into the cache unless it is there; returns the module's file. Says on
    stderr when a build starts (what, for which instruction set, how long it usually takes)
    and when it ends (how long it took)."""
    import sys
    import time

    isa = target_isa()
    folder = _ext_build_dir(cxx, isa)
    target = folder / "groupnorm_cpu_ops.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"groupnorm: building the fused CPU kernels (extension groupnorm_cpu_ops, -march={isa}) "
        f"into {folder}; once per version and machine, {_USUAL_BUILD}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    _ninja_on_path()
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="groupnorm_cpu_ops",
        sources=[str(s) for s in (_OPS_SOURCE, *KERNEL_SOURCES)],
        extra_cflags=_ext_cflags(isa),
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_HERE)],
        build_directory=str(folder),
        is_python_module=False,  # (imported below, by path, once)
        verbose=False,
    )
    print(
        f"groupnorm: built the fused CPU kernels in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return target


def fused_op():
    """``fused_norm(x, w, b, G, eps, act)`` of :func:`extension`, or ``None``."""
    ext = extension()
    return ext.fused_norm if ext is not None else None


def fused_batch_op():
    """``batch_norm(x, w, b, running_mean, running_var, training, momentum, eps, act)`` of
    :func:`extension` (batch norm without autograd), or ``None``."""
    ext = extension()
    return ext.batch_norm if ext is not None else None


def extension():
    """The extension module built from ``gn_ops.cpp`` (the kernels behind pybind11 calls;
    group/layer/instance norm with a C++ autograd node), building it on the first call;
    ``None`` when it cannot be had (no compiler or Python headers, a failed build,
    ``GROUPNORM_CPU_EXT=0`` or ``GROUPNORM_CPU_OPS=0``), and the cpu backend then uses torch's
    kernels.

    A failure warns once, naming the reason (also in :func:`fused_op_unavailable_reason`).
    The answer is kept for the process: ``GROUPNORM_CPU_OPS`` and ``GROUPNORM_CPU_ISA`` are
    read at the first call. The first call waits for the build if it is not cached yet (see
    :func:`build_extension`; ``groupnorm build`` builds it ahead)."""
    if "value" in _ops_state:  # (the common case, without building the arguments below)
        return _ops_state["value"]
    if os.environ.get("GROUPNORM_CPU_OPS", "1") == "0":
        disabled = "disabled by GROUPNORM_CPU_OPS=0"
    elif os.environ.get("GROUPNORM_CPU_EXT", "1") == "0":
        disabled = "disabled by GROUPNORM_CPU_EXT=0"
    else:
        disabled = None

    def load(cxx):
        return _import_extension("groupnorm_cpu_ops", build_extension(cxx))

    return _load_once(
        _ops_state,
        disabled,
        load,
        "groupnorm: the fused CPU kernels are unavailable ({reason}); using torch's kernels",
    )


def _import_extension(name: str, path: Path):
    """The extension module ``name`` built at ``path`` (once per process)."""
    import importlib.machinery
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def fused_op_unavailable_reason() -> str | None:
    """Why :func:`extension` returned ``None`` (after it was called), else ``None``."""
    return _ops_state.get("reason")  # type: ignore[return-value]
