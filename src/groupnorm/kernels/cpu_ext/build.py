"""Compile the fused CPU kernels: one kernel library per instruction-set level, one extension.

What a build makes (all in one folder):

* ``libgnkernels-<level>.so`` for each level: the kernel sources (``gn_entry.cpp``,
  ``gn_nchw.cpp``, ``gn_nhwc.cpp``, ``bn.cpp``) compiled with that level's flags. Plain C++ with
  OpenMP; no torch, no Python. Only their C entry points are visible.
* ``_ops<EXT_SUFFIX>``: the Python extension (``gn_ops.cpp``: pybind11 calls, the C++ autograd
  nodes), compiled once for the architecture's baseline. It loads one kernel library at run time
  (``dlopen``), so a level's code is never mapped into a process whose CPU lacks its
  instructions, and code that runs at load time is baseline code.
* ``build-info.json``: the torch and Python the extension was compiled against, the levels, the
  compiler. Written last: a folder with it is a finished build.

``setup.py`` calls :func:`build` at install time (into the package); ``groupnorm build`` and
the run-time fallback of :mod:`groupnorm.kernels.cpu_ext` call it into the cache. The
translation units compile in parallel (``jobs``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
#: the kernel sources, one translation unit each, compiled once per level
KERNEL_SOURCES = ("gn_entry.cpp", "gn_nchw.cpp", "gn_nhwc.cpp", "bn.cpp")
#: headers the kernel sources include
KERNEL_HEADERS = ("gn_kernels.h", "gn_common.h", "gn_tuning.h")
#: the Python extension's source, compiled once
OPS_SOURCE = "gn_ops.cpp"
#: the extension module's name inside groupnorm.kernels.cpu_ext
OPS_MODULE = "_ops"
INFO_FILE = "build-info.json"

#: instruction-set levels per architecture, lowest first, and the compiler flags of each. The
#: x86-64 levels are those of the x86-64 psABI: v2 (SSE4.2, POPCNT), v3 (AVX2, FMA, F16C, BMI),
#: v4 (AVX-512 F/BW/CD/DQ/VL). Elsewhere one build for the compiler's default target.
LEVEL_FLAGS = {
    "x86-64-v2": ["-march=x86-64-v2", "-mtune=generic"],
    "x86-64-v3": ["-march=x86-64-v3", "-mtune=generic"],
    "x86-64-v4": ["-march=x86-64-v4", "-mtune=generic"],
    "generic": [],
}
_COMMON_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-w"]


def is_x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def levels_for(machine: str | None = None) -> list[str]:
    """The levels built for an architecture (``platform.machine()`` by default)."""
    if is_x86_64(machine):
        return ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
    return ["generic"]


def kernel_library(level: str) -> str:
    """The file name of a level's kernel library."""
    return f"libgnkernels-{level}.so"


def ops_filename() -> str:
    return OPS_MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on PATH; None if none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def source_files() -> list[Path]:
    """Every file a build reads, in a fixed order (for cache keys)."""
    return [HERE / n for n in (OPS_SOURCE, *KERNEL_SOURCES, *KERNEL_HEADERS)]


def sources_digest() -> str:
    """A hash of every file a build reads (recorded in the build information)."""
    import hashlib

    digest = hashlib.sha256()
    for src in source_files():
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _same_build(info: dict | None, levels: list[str]) -> bool:
    """Whether ``info`` describes a build of these sources, for this torch and Python, with
    ``levels`` among its levels."""
    import torch

    return bool(
        info
        and info.get("sources") == sources_digest()
        and info.get("torch") == torch.__version__
        and info.get("python") == f"{sys.version_info.major}.{sys.version_info.minor}"
        and info.get("machine") == platform.machine()
        and set(levels) <= set(info.get("levels", ()))
    )


def _torch_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags of a torch extension, from the torch being imported."""
    import torch
    from torch.utils import cpp_extension

    cflags = [f"-I{p}" for p in cpp_extension.include_paths()]
    cflags.append(f"-I{sysconfig.get_paths()['include']}")
    cflags += [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-DTORCH_EXTENSION_NAME={OPS_MODULE}",
    ]
    # pybind11's ABI tag must match torch's, or the Tensor casters do not see each other (older
    # torch releases pass it explicitly; newer ones leave it to pybind11 and warn)
    abi = getattr(cpp_extension, "_get_pybind11_abi_build_flags", None)
    if abi is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cflags += list(abi())
    ldflags = [f"-L{p}" for p in cpp_extension.library_paths()]
    ldflags += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    return cflags, ldflags


class BuildError(RuntimeError):
    """A compiler step failed; the message holds its command and output."""


def _object(cmd: list[str], fallback: Path, cache: Path | None) -> str:
    """Append ``-o OBJECT`` to a compile command: a file in ``cache`` named by a hash of the
    command, of the unit's source and of the headers, else ``fallback``."""
    if cache is None:
        obj = str(fallback)
    else:
        import hashlib

        digest = hashlib.sha256("\0".join(cmd).encode())
        unit = Path(cmd[cmd.index("-c") + 1])
        for src in (unit, *(HERE / h for h in KERNEL_HEADERS)):
            digest.update(src.read_bytes())
        obj = str(cache / f"{fallback.stem}-{digest.hexdigest()[:20]}.o")
    cmd += ["-o", obj]
    return obj


def _compile(cmd: list[str]) -> None:
    """Run a compile command whose last argument is its object, written atomically."""
    final = cmd[-1]
    partial = f"{final}.{os.getpid()}.partial"
    _run([*cmd[:-1], partial])
    os.replace(partial, final)


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise BuildError(f"could not run {cmd[0]}: {err}") from err
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        tail = "\n".join(out.splitlines()[-30:])
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def build(
    out_dir: Path,
    levels: list[str] | None = None,
    *,
    cxx: str | None = None,
    jobs: int | None = None,
    log=None,
    reuse: Path | None = None,
    objects: Path | None = None,
) -> dict:
    """Compile the kernel libraries for ``levels`` (default: every level of this architecture)
    and the extension into ``out_dir``; returns the build information written there.

    Objects go to a temporary folder beside ``out_dir``; the finished files are moved in one by
    one, ``build-info.json`` last, so a reader never takes a half-written build for a finished
    one. ``log`` (a callable taking a line) hears about each step. ``reuse``: a folder whose
    finished build is of the same sources, torch and Python (and has these levels) is copied
    instead of compiled again (a wheel built after an in-place build). ``objects``: a folder
    that keeps compiled units by a hash of their command and every source they read, so a
    later build recompiles only the units whose sources or flags changed.
    """
    import torch

    levels = levels or levels_for()
    say = log or (lambda line: None)
    current = read_info(Path(out_dir))
    if _same_build(current, levels) and (Path(out_dir) / ops_filename()).exists():
        say(f"the build in {out_dir} is up to date")
        return current
    if reuse is not None and Path(reuse).resolve() != Path(out_dir).resolve():
        info = read_info(Path(reuse))
        if _same_build(info, levels):
            say(f"copying the build in {reuse} (same sources, torch and Python)")
            _copy_build(Path(reuse), Path(out_dir), info)
            return info
    cxx = cxx or compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    unknown = [lvl for lvl in levels if lvl not in LEVEL_FLAGS]
    if unknown:
        raise ValueError(f"unknown instruction-set level(s) {unknown}; known: {list(LEVEL_FLAGS)}")
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cflags, ldflags = _torch_flags()
    obj_cache = Path(objects) if objects is not None else None
    if obj_cache is not None:
        try:
            obj_cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            obj_cache = None  # (a folder that cannot be written: compile everything)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        compile_jobs: list[list[str]] = []
        objects: dict[str, list[str]] = {}
        for level in levels:
            (tmp / level).mkdir()
            objects[level] = []
            for src in KERNEL_SOURCES:
                cmd = [cxx, *_COMMON_FLAGS, *LEVEL_FLAGS[level], "-fopenmp", "-fvisibility=hidden",
                       f'-DGN_LEVEL="{level}"', f"-I{HERE}", "-c", str(HERE / src)]  # fmt: skip
                objects[level].append(_object(cmd, tmp / level / (src[:-4] + ".o"), obj_cache))
                compile_jobs.append(cmd)
        ops_cmd = [cxx, *_COMMON_FLAGS, *cflags, f"-I{HERE}", "-c", str(HERE / OPS_SOURCE)]
        ops_obj = _object(ops_cmd, tmp / "gn_ops.o", obj_cache)
        compile_jobs.insert(0, ops_cmd)  # (the longest unit first)
        todo = [cmd for cmd in compile_jobs if not Path(cmd[-1]).exists()]
        reused = len(compile_jobs) - len(todo)
        say(
            f"compiling {len(todo)} translation units with {jobs} job(s)"
            + (f" ({reused} unchanged, from {obj_cache})" if reused else "")
        )
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(_compile, todo))
        links = [
            [cxx, "-shared", "-fopenmp", *objs, "-o", str(tmp / kernel_library(lvl))]
            for lvl, objs in objects.items()
        ]
        links.append([cxx, "-shared", ops_obj, *ldflags, "-ldl", "-o", str(tmp / ops_filename())])
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(_run, links))
        info = {
            "torch": torch.__version__,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "machine": platform.machine(),
            "levels": list(levels),
            "sources": sources_digest(),
            "compiler": _compiler_version(cxx),
            "seconds": round(time.perf_counter() - start, 1),
        }
        for name in [kernel_library(lvl) for lvl in levels] + [ops_filename()]:
            os.replace(tmp / name, out_dir / name)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp / INFO_FILE, out_dir / INFO_FILE)
    say(f"built {', '.join(levels)} in {info['seconds']:.0f} s")
    return info


def _copy_build(src: Path, out_dir: Path, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [kernel_library(lvl) for lvl in info["levels"]] + [ops_filename(), INFO_FILE]
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp_name:
        for name in names:  # (build-info.json last)
            shutil.copy2(src / name, Path(tmp_name) / name)
            os.replace(Path(tmp_name) / name, out_dir / name)


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def read_info(folder: Path) -> dict | None:
    """The build information of a finished build in ``folder``, else None."""
    try:
        return json.loads((Path(folder) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
