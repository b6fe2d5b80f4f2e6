"""The build of the fused CPU kernels: its cache key, its announcement, the prebuild command.

Building for real takes about a minute, so these tests replace the compiler step where they
can; the real build is exercised by every test that runs the kernels (``make setup`` builds it
first, and CI builds a second instruction set, ``make test-isa``).
"""

from __future__ import annotations

import pytest

from groupnorm import cli
from groupnorm.kernels import cpu_ext


def _cxx() -> str:
    cxx = cpu_ext._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    return cxx


def test_target_isa_default_and_override(monkeypatch):
    monkeypatch.delenv("GROUPNORM_CPU_ISA", raising=False)
    assert cpu_ext.target_isa() == "native"
    monkeypatch.setenv("GROUPNORM_CPU_ISA", "x86-64-v3")
    assert cpu_ext.target_isa() == "x86-64-v3"


@pytest.mark.parametrize("bad", ["-O0", "native -mno-avx", "x; rm -rf /"])
def test_target_isa_rejects_what_is_not_a_march_value(monkeypatch, bad):
    monkeypatch.setenv("GROUPNORM_CPU_ISA", bad)
    with pytest.raises(ValueError, match="GROUPNORM_CPU_ISA"):
        cpu_ext.target_isa()


def test_cache_key_names_the_instruction_set(monkeypatch, tmp_path):
    """Each instruction set gets its own build folder; native's key also holds the CPU (a
    native binary may not run on another CPU sharing the cache), a named one's does not."""
    cxx = _cxx()
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path))
    native = cpu_ext._ext_build_dir(cxx, "native")
    v3 = cpu_ext._ext_build_dir(cxx, "x86-64-v3")
    assert native != v3
    assert native.parent == v3.parent == tmp_path / "cpu_ext"
    assert "-native-" in native.name and "-x86-64-v3-" in v3.name
    monkeypatch.setattr(cpu_ext, "_cpu_signature", lambda: "another CPU")
    assert cpu_ext._ext_build_dir(cxx, "native") != native
    assert cpu_ext._ext_build_dir(cxx, "x86-64-v3") == v3


def test_cache_key_follows_the_sources(monkeypatch, tmp_path):
    cxx = _cxx()
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path))
    before = cpu_ext._ext_build_dir(cxx, "x86-64-v3")
    extra = tmp_path / "extra.h"
    extra.write_text("// changed\n")
    monkeypatch.setattr(cpu_ext, "KERNEL_HEADERS", [*cpu_ext.KERNEL_HEADERS, extra])
    assert cpu_ext._ext_build_dir(cxx, "x86-64-v3") != before


def test_build_announces_start_and_end_once(monkeypatch, tmp_path, capfd):
    """A cold build says what it builds and for which instruction set before it starts, and how
    long it took after; a warm one says nothing. (torch's builder is replaced by one that
    writes the module file, as the real one does.)"""
    cxx = _cxx()
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GROUPNORM_CPU_ISA", "x86-64-v3")
    calls = []

    def fake_load(name, sources, extra_cflags, build_directory, **kwargs):
        calls.append(extra_cflags)
        (tmp_path / build_directory / f"{name}.so").write_bytes(b"")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    path = cpu_ext.build_extension(cxx)
    err = capfd.readouterr().err.splitlines()
    assert path.exists() and path.parent == cpu_ext._ext_build_dir(cxx, "x86-64-v3")
    assert len(calls) == 1 and "-march=x86-64-v3" in calls[0]
    assert len(err) == 2
    assert "building the fused CPU kernels" in err[0] and "-march=x86-64-v3" in err[0]
    assert "minute" in err[0]  # how long it usually takes
    assert err[1].startswith("groupnorm: built the fused CPU kernels in ") and err[1].endswith(" s")
    assert cpu_ext.build_extension(cxx) == path
    assert capfd.readouterr().err == "" and len(calls) == 1


def test_build_command(capsys):
    """``groupnorm build`` prebuilds (here it finds the build already made) and names it."""
    if cpu_ext.extension() is None:
        assert cli.main(["build"]) == 1
        assert "unavailable" in capsys.readouterr().err
        return
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert "groupnorm_cpu_ops" in out and cpu_ext.target_isa() in out


def test_build_command_fails_when_disabled(monkeypatch, capsys):
    monkeypatch.setattr(cpu_ext, "_ops_state", {})
    monkeypatch.setenv("GROUPNORM_CPU_EXT", "0")
    assert cli.main(["build"]) == 1
    assert "GROUPNORM_CPU_EXT=0" in capsys.readouterr().err


def test_remove_other_builds_keeps_the_one_in_use(monkeypatch, tmp_path):
    """``groupnorm build --clean`` deletes the cache's other build folders, and nothing else."""
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path))
    root = tmp_path / "cpu_ext"
    keep = root / "groupnorm_cpu_ops-native-aaaa"
    for name in ("groupnorm_cpu_ops-native-aaaa", "groupnorm_cpu_ops-native-bbbb",
                 "groupnorm_cpu_ops-x86-64-v3-cccc", "someone-elses"):  # fmt: skip
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "lib.so").write_bytes(b"x" * 1000)
    assert cpu_ext.remove_other_builds(keep) == (2, 2000)
    assert sorted(p.name for p in root.iterdir()) == [
        "groupnorm_cpu_ops-native-aaaa",
        "someone-elses",
    ]
    assert cpu_ext.remove_other_builds(keep) == (0, 0)


def test_build_command_clean(monkeypatch, capsys):
    if cpu_ext.extension() is None:
        pytest.skip("no extension here")
    calls = []
    monkeypatch.setattr(cpu_ext, "remove_other_builds", lambda keep: calls.append(keep) or (3, 0))
    assert cli.main(["build", "--clean"]) == 0
    assert "removed 3 other build(s)" in capsys.readouterr().out
    assert calls and (calls[0] / "groupnorm_cpu_ops.so").exists()
