"""Delivery of the fused CPU kernels: the level chosen for a CPU, the builds found, the run-time
build's lock, and what happens when something is missing.

Compiling for real takes minutes, so the lock and fault tests replace the compiler step with a
stand-in that writes a build's files the way the real one does (temporary folder first, the
information file last); the real compiler runs in ``make setup`` (``pip install``), whose build
every kernel test then loads, and ``make test-wheel`` checks an installed wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import check_against_reference, ext_or_skip

from groupnorm import cli
from groupnorm.kernels import cpu, cpu_ext
from groupnorm.kernels.cpu_ext import build

INTEL_AVX512 = (
    "fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm abm movbe xsave avx f16c fma bmi1 "
    "avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl"
).split()
AMD_AVX2 = [f for f in INTEL_AVX512 if not f.startswith("avx512")]
OLD_SSE42 = "fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm".split()


@pytest.fixture
def fresh_state(monkeypatch):
    """A process state as before the first CPU call (restored afterwards)."""
    monkeypatch.setattr(cpu_ext, "_ops_state", {})


@pytest.mark.parametrize(
    "flags, levels",
    [
        (INTEL_AVX512, ["x86-64-v2", "x86-64-v3", "x86-64-v4"]),
        (AMD_AVX2, ["x86-64-v2", "x86-64-v3"]),
        (OLD_SSE42, ["x86-64-v2"]),
        (["fpu", "sse", "sse2"], []),
        ([f for f in AMD_AVX2 if f != "fma"], ["x86-64-v2"]),  # one v3 feature missing
    ],
)
def test_cpu_levels_from_flags(monkeypatch, flags, levels):
    monkeypatch.setattr(build, "is_x86_64", lambda machine=None: True)
    monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda: set(flags))
    assert cpu_ext.cpu_levels() == levels


def test_other_architectures_get_the_generic_build(monkeypatch):
    assert build.levels_for("aarch64") == ["generic"]
    assert build.levels_for("x86_64") == ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
    monkeypatch.setattr(build, "is_x86_64", lambda machine=None: False)
    assert cpu_ext.cpu_levels() == ["generic"]


def test_target_level_and_its_cap(monkeypatch):
    monkeypatch.setattr(build, "is_x86_64", lambda machine=None: True)
    monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda: set(INTEL_AVX512))
    monkeypatch.delenv("GROUPNORM_CPU_ISA", raising=False)
    assert cpu_ext.target_level() == "x86-64-v4"
    monkeypatch.setenv("GROUPNORM_CPU_ISA", "x86-64-v3")
    assert cpu_ext.target_level() == "x86-64-v3"
    monkeypatch.setenv("GROUPNORM_CPU_ISA", "x86-64-v2")
    assert cpu_ext.target_level() == "x86-64-v2"
    monkeypatch.setenv("GROUPNORM_CPU_ISA", "native")  # (no cap)
    assert cpu_ext.target_level() == "x86-64-v4"
    # a build that lacks the best level: the best it has
    monkeypatch.delenv("GROUPNORM_CPU_ISA")
    assert cpu_ext.target_level(["x86-64-v2", "x86-64-v3"]) == "x86-64-v3"
    # a cap above what the CPU runs: what the CPU runs
    monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda: set(AMD_AVX2))
    monkeypatch.setenv("GROUPNORM_CPU_ISA", "x86-64-v4")
    assert cpu_ext.target_level() == "x86-64-v3"


@pytest.mark.parametrize("bad", ["-O0", "avx2", "x86-64-v5", "x; rm -rf /"])
def test_bad_isa_value_is_refused_with_the_choices(monkeypatch, bad):
    monkeypatch.setenv("GROUPNORM_CPU_ISA", bad)
    with pytest.raises(ValueError, match="GROUPNORM_CPU_ISA") as info:
        cpu_ext.isa_cap()
    assert build.levels_for()[0] in str(info.value)


def test_installed_build_is_found_and_loaded():
    """make setup compiles into the package folder; the first call loads it, for this CPU's best
    level, without a compiler step (here: no build in the cache is involved)."""
    if cpu_ext.extension() is None:
        pytest.skip(f"kernels unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    info = build.read_info(cpu_ext.loaded_folder())
    assert info["torch"] == torch.__version__
    assert info["sources"] == build.sources_digest()
    assert cpu_ext.loaded_level() in info["levels"]
    if os.environ.get("GROUPNORM_CPU_ISA") in (None, "", "native"):
        assert cpu_ext.loaded_level() == cpu_ext.cpu_levels()[-1]


def test_every_level_the_cpu_runs_loads_and_computes():
    """Switch the loaded kernels through every level this CPU runs: each says its level and
    gives group norm (+SiLU) within float32 error of the float64 reference."""
    import groupnorm

    if cpu_ext.extension() is None:
        pytest.skip(f"kernels unavailable: {cpu_ext.fused_op_unavailable_reason()}")
    before = cpu_ext.loaded_level()
    x = torch.randn(3, 12, 5, 7) * 2 + 1
    w, b = torch.randn(12), torch.randn(12)
    ref = groupnorm.reference_norm(x, "group", num_groups=4, weight=w, bias=b, activation="silu")
    try:
        for level in cpu_ext.cpu_levels():
            cpu_ext.use_level(level)
            assert cpu_ext.loaded_level() == level
            y = groupnorm.normalize(x, "group", num_groups=4, weight=w, bias=b, activation="silu")
            assert (y.double() - ref.output).abs().max() < 1e-5
    finally:
        cpu_ext.use_level(before)


def test_use_level_refuses_what_the_cpu_cannot_run(monkeypatch):
    if cpu_ext.extension() is None:
        pytest.skip("kernels unavailable")
    monkeypatch.setattr(cpu_ext, "cpu_levels", lambda: ["x86-64-v2"])
    with pytest.raises(ValueError, match="cannot run x86-64-v4"):
        cpu_ext.use_level("x86-64-v4")


def _fake_build_folder(folder: Path, torch_version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch_version, "python": "3.11", "machine": "x86_64", "levels": []}
    (folder / build.INFO_FILE).write_text(json.dumps(info))


def test_build_for_another_torch_warns_once_and_uses_torch_kernels(
    monkeypatch, tmp_path, fresh_state
):
    """Installed kernels compiled against another torch are not loaded: one warning names both
    versions and how to rebuild; nothing is compiled behind the user's back."""
    _fake_build_folder(tmp_path / "pkg", "1.13.0")
    monkeypatch.setattr(cpu_ext, "package_build_dir", lambda: tmp_path / "pkg")
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_ext, "build_into_cache", lambda *a, **k: pytest.fail("built"))
    with pytest.warns(RuntimeWarning) as record:
        assert cpu_ext.extension() is None
    assert len(record) == 1
    message = str(record[0].message)
    assert "torch 1.13.0" in message and f"torch {torch.__version__}" in message
    assert "groupnorm build" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_ext.extension() is None  # (once)
    x = torch.randn(2, 6, 4, 4)
    y = torch.nn.functional.group_norm(x, 3)
    import groupnorm

    assert torch.allclose(groupnorm.group_norm(x, 3), y, atol=1e-5)


def test_unwritable_cache_without_a_packaged_build(monkeypatch, tmp_path, fresh_state):
    """No build in the package and a cache that cannot be made (a read-only home): one warning
    that says so, then torch's kernels."""
    monkeypatch.setattr(cpu_ext, "package_build_dir", lambda: tmp_path / "empty")
    monkeypatch.setattr(cpu_ext, "_compiler", lambda: "c++")  # (never reached: no cache first)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(blocker / "cache"))  # (under a file)
    with pytest.warns(RuntimeWarning, match="none could be made in the cache"):
        assert cpu_ext.extension() is None


def test_packaged_build_needs_no_writable_cache(monkeypatch, tmp_path, fresh_state):
    if build.read_info(cpu_ext.package_build_dir()) is None:
        pytest.skip("no build in the package folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cpu_ext, "_compiler", lambda: pytest.fail("looked for a compiler"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_ext.extension() is not None


def test_explicit_off_switch_is_silent_and_the_old_name_deprecated(monkeypatch, fresh_state):
    monkeypatch.setenv("GROUPNORM_CPU_EXT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_ext.extension() is None
    assert "GROUPNORM_CPU_EXT=0" in cpu_ext.fused_op_unavailable_reason()
    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.delenv("GROUPNORM_CPU_EXT")
    monkeypatch.setenv("GROUPNORM_CPU_OPS", "0")
    with pytest.warns(DeprecationWarning, match="GROUPNORM_CPU_EXT=0"):
        assert cpu_ext.extension() is None


# --- the run-time build's lock, in real processes -------------------------------------------

# A stand-in for build.build: writes the build's files like the real one (a temporary folder
# inside the target first, build-info.json last), after SECONDS seconds, and appends a line to
# LOG for each build that starts.
_FAKE_BUILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from groupnorm.kernels import cpu_ext
    from groupnorm.kernels.cpu_ext import build

    SECONDS = float(os.environ["FAKE_BUILD_SECONDS"])
    LOG = os.environ["FAKE_BUILD_LOG"]

    def fake_build(out_dir, levels=None, **kwargs):
        import torch
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()}\\n")
        tmp = Path(out_dir) / f".build-{os.getpid()}"
        tmp.mkdir(parents=True)
        (tmp / "gn_ops.o").write_bytes(b"partial")
        time.sleep(SECONDS)
        (Path(out_dir) / build.ops_filename()).write_bytes(b"")
        info = {"torch": torch.__version__, "python": "%d.%d" % sys.version_info[:2],
                "machine": "x86_64", "levels": [], "seconds": SECONDS,
                "sources": build.sources_digest()}
        (tmp / "info").write_text(json.dumps(info))
        os.replace(tmp / "info", Path(out_dir) / build.INFO_FILE)
        (tmp / "gn_ops.o").unlink()
        tmp.rmdir()
        return info

    build.build = fake_build
    folder = cpu_ext.build_into_cache("c++")
    print("FOLDER", folder)
    """
)


def _start(tmp_path: Path, seconds: float, **env) -> subprocess.Popen:
    script = tmp_path / "fake_build.py"
    if not script.exists():  # (rewriting it could truncate it under a process reading it)
        script.write_text(_FAKE_BUILD)
    full_env = {
        **os.environ,
        "GROUPNORM_CACHE_DIR": str(tmp_path / "cache"),
        "FAKE_BUILD_SECONDS": str(seconds),
        "FAKE_BUILD_LOG": str(tmp_path / "builds.log"),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, str(script)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _builds(tmp_path: Path) -> list[str]:
    log = tmp_path / "builds.log"
    return log.read_text().split() if log.exists() else []


def _wait_for_build_start(tmp_path: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_builds(tmp_path)) < count:
        assert time.monotonic() < deadline, "the build did not start"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_build_never_blocks_the_next(tmp_path):
    """A build killed part-way (SIGKILL: no clean-up runs) leaves its partial files; the next
    process takes the lock at once, says the earlier build did not finish, builds again."""
    first = _start(tmp_path, 60)
    _wait_for_build_start(tmp_path, 1)
    first.kill()
    first.wait(timeout=30)
    start = time.monotonic()
    second = _start(tmp_path, 0.2)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert time.monotonic() - start < 30  # (no waiting on the dead holder)
    assert "did not finish" in err and "building again" in err
    assert len(_builds(tmp_path)) == 2
    folder = Path(out.split("FOLDER", 1)[1].strip())
    assert build.read_info(folder) is not None and not list(folder.glob(".build-*"))


@pytest.mark.slow
def test_processes_starting_together_build_once(tmp_path):
    """Three first calls at once (DDP ranks): one builds, the others wait for it, say whom they
    wait for, and load its result."""
    procs = [_start(tmp_path, 2.0) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    assert len(_builds(tmp_path)) == 1
    folders = {o.split("FOLDER", 1)[1].strip() for o, _ in outs}
    assert len(folders) == 1
    waiting = [e for _, e in outs if "waiting for process" in e]
    assert len(waiting) >= 1  # (a late starter may find the build already finished)
    builder_pid = _builds(tmp_path)[0]
    assert all(builder_pid in e for e in waiting)


def test_wait_for_a_stuck_build_is_bounded(tmp_path):
    """A live holder that never finishes: the wait ends after GROUPNORM_BUILD_WAIT seconds with
    an error that names the holder."""
    import fcntl

    env = {"GROUPNORM_CACHE_DIR": str(tmp_path / "cache")}
    probe = "from groupnorm.kernels import cpu_ext; print(cpu_ext.cache_build_dir())"
    folder = Path(
        subprocess.run(
            [sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    folder.parent.mkdir(parents=True)
    with open(folder.parent / (folder.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        proc = _start(tmp_path, 0.1, GROUPNORM_BUILD_WAIT="1")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "TimeoutError" in err and "4242" in err and "GROUPNORM_BUILD_WAIT" in err
    assert _builds(tmp_path) == []


def test_build_command_reports_the_build_and_level(capsys):
    """``groupnorm build`` finds the build (here the package's), names it and the level."""
    if cpu_ext.extension() is None:
        assert cli.main(["build"]) == 1
        assert "unavailable" in capsys.readouterr().err
        return
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert str(cpu_ext.loaded_folder()) in out and cpu_ext.loaded_level() in out


def test_build_command_lists_levels(capsys):
    assert cli.main(["build", "--levels"]) == 0
    assert capsys.readouterr().out.split() == cpu_ext.cpu_levels()


def test_build_command_fails_when_disabled(monkeypatch, capsys, fresh_state):
    monkeypatch.setenv("GROUPNORM_CPU_EXT", "0")
    assert cli.main(["build"]) == 1
    assert "GROUPNORM_CPU_EXT=0" in capsys.readouterr().err


def test_remove_other_builds_keeps_the_one_in_use(monkeypatch, tmp_path):
    """``groupnorm build --clean`` deletes the cache's other build folders, and nothing else."""
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path))
    root = tmp_path / "cpu_ext"
    keep = root / "torch2.13.0-py311-aaaa"
    for name in ("torch2.13.0-py311-aaaa", "torch2.12.0-py311-bbbb",
                 "groupnorm_cpu_ops-native-cccc", "someone-elses"):  # fmt: skip
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "lib.so").write_bytes(b"x" * 1000)
    assert cpu_ext.remove_other_builds(keep) == (2, 2000)
    assert sorted(p.name for p in root.iterdir()) == ["someone-elses", "torch2.13.0-py311-aaaa"]
    assert cpu_ext.remove_other_builds(keep) == (0, 0)


def test_build_reuses_a_finished_build_of_the_same_sources(tmp_path):
    """A wheel built after the in-place build copies it (same sources, torch, Python) instead
    of compiling again; a build whose sources differ is not reused."""
    src = cpu_ext.package_build_dir()
    info = build.read_info(src)
    if info is None or info.get("sources") != build.sources_digest():
        pytest.skip("no finished in-place build of these sources")
    lines = []
    got = build.build(
        tmp_path / "out", info["levels"], cxx="/nonexistent", log=lines.append, reuse=src
    )
    assert got == info and "copying" in lines[0]
    for level in info["levels"]:
        assert (tmp_path / "out" / build.kernel_library(level)).exists()
    stale = dict(info, sources="0" * 16)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / build.INFO_FILE).write_text(json.dumps(stale))
    with pytest.raises(build.BuildError, match="could not run|command failed"):
        build.build(tmp_path / "out2", info["levels"], cxx="/nonexistent", reuse=tmp_path / "stale")


def test_object_names_follow_the_command_and_every_source(monkeypatch, tmp_path):
    """A kept object is reused only for the same command and the same sources: its name is a
    hash of the command, the unit and the headers, so a changed header or flag compiles the
    unit again, and a change to another unit does not."""
    src = tmp_path / "src"
    src.mkdir()
    for f in build.source_files():
        (src / f.name).write_text(f"// {f.name}\n")
    monkeypatch.setattr(build, "HERE", src)
    cmd = ["c++", "-O3", "-c", str(src / "gn_nchw.cpp")]
    first = build._object(list(cmd), tmp_path / "gn_nchw.o", tmp_path / "objs")
    assert first == build._object(list(cmd), tmp_path / "gn_nchw.o", tmp_path / "objs")
    assert first != build._object([*cmd, "-mavx2"], tmp_path / "gn_nchw.o", tmp_path / "objs")
    (src / "gn_ops.cpp").write_text("// another unit changed\n")
    assert first == build._object(list(cmd), tmp_path / "gn_nchw.o", tmp_path / "objs")
    (src / "gn_common.h").write_text("// changed\n")
    assert first != build._object(list(cmd), tmp_path / "gn_nchw.o", tmp_path / "objs")
    assert build._object(list(cmd), tmp_path / "x.o", None) == str(tmp_path / "x.o")


def _disassembly(path: Path) -> str:
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True
    ).stdout


@pytest.mark.skipif(not build.is_x86_64(), reason="x86-64 levels")
def test_each_level_library_holds_only_its_instructions_and_no_constructors():
    """What makes it safe to ship all levels together: the v2 library uses no AVX registers,
    v3 no AVX-512 registers (v4 does), the extension loaded by every process is baseline code,
    and no level library runs code of its own at load time (its .init_array holds only the
    C runtime's frame_dummy entry)."""
    import shutil

    folder = cpu_ext.package_build_dir()
    info = build.read_info(folder)
    if info is None or shutil.which("objdump") is None or shutil.which("readelf") is None:
        pytest.skip("needs the in-place build and binutils (objdump, readelf)")
    forbidden = {"x86-64-v2": ("%ymm", "%zmm"), "x86-64-v3": ("%zmm",), "x86-64-v4": ()}
    for level in info["levels"]:
        lib = folder / build.kernel_library(level)
        text = _disassembly(lib)
        for reg in forbidden[level]:
            assert reg not in text, f"{lib.name} uses {reg} registers"
        if level == "x86-64-v4":
            assert "%zmm" in text  # (the flags reached the compiler)
        sections = subprocess.run(
            ["readelf", "-W", "-S", str(lib)], capture_output=True, text=True
        ).stdout
        init = [line.split() for line in sections.splitlines() if " .init_array " in line]
        size = int(init[0][init[0].index(".init_array") + 4], 16) if init else 0
        assert size <= 8, f"{lib.name} has {size // 8} load-time constructors"
        symbols = subprocess.run(["nm", str(lib)], capture_output=True, text=True).stdout
        assert "_GLOBAL__sub_I" not in symbols  # (no static initializer of ours)
    ops = _disassembly(folder / build.ops_filename())
    assert "%ymm" not in ops and "%zmm" not in ops


# ---- a missing compiler, a failed run-time build, the off switch ----------------------------


def _break_build(monkeypatch, tmp_path) -> None:
    """No build to load, an empty cache, and sources that do not compile, so that the next
    call of cpu_ext.extension() builds and fails."""
    from groupnorm.kernels.cpu_ext import build

    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.setattr(cpu_ext, "find_build", lambda: (None, None))
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "src"
    broken.mkdir()
    for f in build.source_files():
        (broken / f.name).write_text("// empty\n")
    (broken / build.OPS_SOURCE).write_text("this is not C++\n")
    monkeypatch.setattr(build, "HERE", broken)
    monkeypatch.setattr(build, "KERNEL_SOURCES", ())  # (fail fast: nothing else to compile)


def test_fallback_without_compiler(monkeypatch):
    """No build to load and no compiler: one warning, then the torch-only path, still correct."""
    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.setattr(cpu_ext, "find_build", lambda: (None, None))
    monkeypatch.setattr(cpu_ext, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels are unavailable"):
        assert cpu_ext.extension() is None
    assert "compiler" in cpu_ext.fused_op_unavailable_reason()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once only
        assert cpu_ext.extension() is None
        check_against_reference((2, 6, 4, 4), 3, torch.float32, "channels_last", "silu", True)


def test_env_switch_uses_torch_kernels(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_ops_state", {})  # (the variable is read at the first call)
    monkeypatch.setenv("GROUPNORM_CPU_EXT", "0")
    assert cpu_ext.extension() is None
    assert cpu.whole_call(torch.randn(2, 4, 3), None, None, 2, False, 1e-5, "", None, True) is None
    check_against_reference((2, 6, 4, 4), 3, torch.bfloat16, "contiguous", "gelu", False)


def test_extension_fallback_on_failed_build_and_switch(monkeypatch, tmp_path):
    """A broken run-time build warns once and leaves torch's kernels, still correct;
    GROUPNORM_CPU_EXT=0 turns the extension off without a warning."""
    ext_or_skip()
    if cpu_ext._compiler() is None:
        pytest.skip("no C++ compiler")
    _break_build(monkeypatch, tmp_path)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels are unavailable"):
        assert cpu_ext.extension() is None
    assert "build failed" in cpu_ext.fused_op_unavailable_reason()
    check_against_reference((2, 6, 4, 4), 3, torch.float32, "channels_last", "silu", False)
    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.setenv("GROUPNORM_CPU_EXT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert cpu_ext.extension() is None
    assert "GROUPNORM_CPU_EXT=0" in cpu_ext.fused_op_unavailable_reason()


def test_the_cpp_activation_list_has_the_python_tables_codes():
    """The C++ list (GN_ACTIVATIONS in gn_common.h) and the Python table give every fused
    activation the same code, and neither has one the other lacks."""
    import re

    from groupnorm.kernels.activations import CODES

    header = (Path(cpu_ext.__file__).parent / "gn_common.h").read_text()
    block = header[header.index("#define GN_ACTIVATIONS(X)") :].split("\n\n", 1)[0]
    cpp = {name.lower(): int(code) for name, code in re.findall(r"X\(ACT_(\w+),\s*(\d+),", block)}
    assert cpp.pop("none") == 0
    assert cpp == {name: code for name, code in CODES.items() if name}
