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

(:func:`library` is the same kernels as a plain shared library called through :mod:`ctypes`,
which the backend used before the extension existed.)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).parent
#: the kernel sources, one translation unit each (gn_kernels.h declares what they export)
KERNEL_SOURCES = [_HERE / name for name in ("gn_entry.cpp", "gn_nchw.cpp", "gn_nhwc.cpp", "bn.cpp")]
#: headers the kernel sources include (part of the build key)
KERNEL_HEADERS = [_HERE / name for name in ("gn_kernels.h", "gn_common.h", "gn_tuning.h")]
_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-std=c++17",
    "-fno-math-errno",
    "-fno-trapping-math",
]
_ABI_VERSION = 1
_lock = threading.Lock()
_state: dict[str, object] = {}

#: dtype codes understood by the library
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: activation codes understood by the library
ACT_CODES = {"": 0, "silu": 1, "gelu": 2, "relu": 3}


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


def _build(
    cxx: str, sources: list[Path], flags: list[str], stem: str, libs: tuple[str, ...] = ()
) -> Path:
    """Compile the ``.cpp`` files of ``sources`` (the others are headers they include) into one
    library in the cache, linking ``libs`` (after the sources: linkers drop libraries named
    before the objects that need them), unless a build of the same sources, compiler, flags,
    libraries and CPU is already there."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(
            [
                *(src.read_bytes() for src in sources),
                version.encode(),
                " ".join([*flags, *libs]).encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:16]
    folder = cache_dir() / "cpu_ext"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}-{key}.so"
    if target.exists():
        return target
    import fcntl

    with open(folder / f"{stem}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            out = Path(tmp) / "lib.so"
            proc = subprocess.run(
                [
                    cxx,
                    *flags,
                    *(str(s) for s in sources if s.suffix == ".cpp"),
                    "-o",
                    str(out),
                    *libs,
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed:\n{proc.stderr[-2000:]}")
            os.replace(out, target)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.gn_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.gn_abi_version()}, expected {_ABI_VERSION}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gn_forward_packed.argtypes = [ctypes.c_char_p]
    lib.gn_forward_packed.restype = i32
    lib.bn_forward_packed.argtypes = [ctypes.c_char_p]
    lib.bn_forward_packed.restype = i32
    lib.gn_backward_packed.argtypes = [ctypes.c_char_p]
    lib.gn_backward_packed.restype = i32
    lib.gn_activation.argtypes = [i32, i32, p, p, i64]
    lib.gn_activation.restype = i32
    return lib


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


def library() -> ctypes.CDLL | None:
    """The compiled library, building it on the first call; ``None`` when it cannot be had."""
    if "value" in _state:  # (the common case, without building the arguments below)
        return _state["value"]  # type: ignore[return-value]
    off = os.environ.get("GROUPNORM_CPU_EXT", "1") == "0"
    return _load_once(
        _state,
        "disabled by GROUPNORM_CPU_EXT=0" if off else None,
        lambda cxx: _bind(
            _build(
                cxx,
                [*KERNEL_SOURCES, *KERNEL_HEADERS],
                [f"-march={target_isa()}" if f == "-march=native" else f for f in _FLAGS],
                "gn_kernels",
            )
        ),
        "groupnorm: the fused CPU kernels are unavailable ({reason}); "
        "using torch's kernels plus the portable core",
    )


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (after it was called), else ``None``."""
    return _state.get("reason")  # type: ignore[return-value]


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
    ``GROUPNORM_CPU_OPS=0``), and the callers then use the plain library through ctypes.

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
        "groupnorm: the fused CPU kernels' Python extension is unavailable ({reason}); "
        "calling the kernels through ctypes, which costs more per call",
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


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


# Arguments of gn_forward_packed / gn_backward_packed (the ForwardArgs / BackwardArgs structs of
# gn_kernels.cpp): one packed buffer instead of 15-17 ctypes conversions (~1.5 us per call).
_FORWARD_ARGS = struct.Struct("=12qd2q")
_BACKWARD_ARGS = struct.Struct("=17q")
_BATCH_FORWARD_ARGS = struct.Struct("=13qd4qd")


def forward(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    activation: str,
    channels_last: bool,
    statistics: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y, mean, rstd for ``x`` (N, C, *) stored as (N, C, S) or, with ``channels_last``, (N, S, C).

    ``weight``/``bias`` must be contiguous float32 (or None). Without ``statistics`` mean and
    rstd are not written (None): what the no-autograd fast path needs."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    y = torch.empty_like(x)  # keeps the layout
    mean = torch.empty((n, num_groups), dtype=torch.float32) if statistics else None
    rstd = torch.empty((n, num_groups), dtype=torch.float32) if statistics else None
    rc = lib.gn_forward_packed(
        _FORWARD_ARGS.pack(
            DTYPE_CODES[x.dtype],
            x.data_ptr(),
            y.data_ptr(),
            0 if weight is None else weight.data_ptr(),  # (inlined: this is the small-call path)
            0 if bias is None else bias.data_ptr(),
            mean.data_ptr() if statistics else 0,
            rstd.data_ptr() if statistics else 0,
            n,
            c,
            s,
            num_groups,
            int(channels_last),
            eps,
            ACT_CODES[activation],
            torch.get_num_threads(),
        )
    )
    if rc:
        raise RuntimeError(f"gn_forward returned {rc}")
    return y, mean, rstd


def batch_forward(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    given_mean: torch.Tensor | None,
    given_var: torch.Tensor | None,
    eps: float,
    activation: str,
    rows: bool,
    running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    statistics: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Batch norm: y, mean, rstd (float32, shape (C,)) for ``x`` (N, C, *).

    Training statistics, or with ``given_mean``/``given_var`` (float32, contiguous) those.
    ``rows`` means x is (N * S, C) in memory (channels-last, or S = 1), else (N, C, S).
    ``weight``/``bias`` must be contiguous float32 (or None). ``running`` (running mean,
    running var, momentum; float32 contiguous) are updated in place in training. Without
    ``statistics`` mean and rstd are not returned (None)."""
    n, c = x.shape[0], x.shape[1]
    y = torch.empty_like(x)
    mean = torch.empty(c, dtype=torch.float32) if statistics else None
    rstd = torch.empty(c, dtype=torch.float32) if statistics else None
    run_mean, run_var, momentum = running if running is not None else (None, None, 0.0)
    rc = lib.bn_forward_packed(
        _BATCH_FORWARD_ARGS.pack(
            DTYPE_CODES[x.dtype],
            x.data_ptr(),
            y.data_ptr(),
            _ptr(weight),
            _ptr(bias),
            _ptr(given_mean),
            _ptr(given_var),
            _ptr(mean),
            _ptr(rstd),
            n,
            c,
            x.numel() // (n * c),
            int(rows),
            eps,
            ACT_CODES[activation],
            torch.get_num_threads(),
            _ptr(run_mean),
            _ptr(run_var),
            momentum,
        )
    )
    if rc:
        raise RuntimeError(f"bn_forward returned {rc}")
    return y, mean, rstd


def activation(lib: ctypes.CDLL, z: torch.Tensor, name: str, grad: bool = False) -> torch.Tensor:
    """The fused kernels' activation (or, with ``grad``, its derivative) applied elementwise to
    a float32 tensor, with the same inlined code; used to test their accuracy on their own."""
    z = z.contiguous()
    if z.dtype != torch.float32:
        raise TypeError(f"activation() takes float32, got {z.dtype}")
    out = torch.empty_like(z)
    rc = lib.gn_activation(ACT_CODES[name], int(grad), z.data_ptr(), out.data_ptr(), z.numel())
    if rc:
        raise RuntimeError(f"gn_activation returned {rc}")
    return out


def backward(
    lib: ctypes.CDLL,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    activation: str,
    channels_last: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dx (like x), dweight and dbias (float32) or None where not asked for.

    ``dy`` must have ``x``'s layout; ``mean``/``rstd`` float32 contiguous (N, G)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(c, dtype=torch.float32) if need_dw else None
    db = torch.empty(c, dtype=torch.float32) if need_db else None
    rc = lib.gn_backward_packed(
        _BACKWARD_ARGS.pack(
            DTYPE_CODES[x.dtype],
            dy.data_ptr(),
            x.data_ptr(),
            _ptr(weight),
            _ptr(bias),
            mean.data_ptr(),
            rstd.data_ptr(),
            _ptr(dx),
            _ptr(dw),
            _ptr(db),
            n,
            c,
            s,
            num_groups,
            int(channels_last),
            ACT_CODES[activation],
            torch.get_num_threads(),
        )
    )
    if rc:
        raise RuntimeError(f"gn_backward returned {rc}")
    return dx, dw, db
