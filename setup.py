"""Compiles the fused CPU kernels at install time (``pip install .``, ``pip wheel .``).

The project's metadata is in pyproject.toml; this file only adds the build step: the kernel
library once per instruction-set level and the extension module, by
``src/groupnorm/kernels/cpu_ext/build.py`` (the same code ``groupnorm build`` uses at run time).
``GROUPNORM_CPU_LEVELS`` (comma-separated, e.g. ``x86-64-v3``) builds fewer levels;
``GROUPNORM_NO_KERNELS=1`` installs without compiling (torch's kernels are then used).
Without a C++ compiler the install goes on with a warning, and so does the library.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_PKG = Path("groupnorm") / "kernels" / "cpu_ext"
_SRC = Path(__file__).resolve().parent / "src" / _PKG


def _builder():
    spec = importlib.util.spec_from_file_location("_groupnorm_build", _SRC / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildKernels(build_ext):
    """Runs the kernels' own build instead of setuptools' compiler steps."""

    def _out_dir(self) -> Path:
        if self.inplace or getattr(self, "editable_mode", False):
            return _SRC
        return Path(self.build_lib) / _PKG

    def run(self):
        if os.environ.get("GROUPNORM_NO_KERNELS") == "1":
            print("groupnorm: GROUPNORM_NO_KERNELS=1: the CPU kernels are not compiled")
            return
        builder = _builder()
        levels = [
            s.strip() for s in os.environ.get("GROUPNORM_CPU_LEVELS", "").split(",") if s.strip()
        ]
        out = self._out_dir()
        print(f"groupnorm: compiling the fused CPU kernels into {out} (a few minutes on 2 cores)")
        try:
            builder.build(
                out,
                levels or None,
                jobs=self.parallel or None,
                log=lambda line: print(f"groupnorm: {line}"),
                reuse=_SRC,  # (an in-place build of the same sources is copied, not redone)
                objects=Path(self.build_temp) / "groupnorm-objects",  # (unchanged units kept)
            )
        except builder.BuildError as err:
            print(
                f"groupnorm: WARNING: the fused CPU kernels did not compile; the library will use "
                f"torch's kernels on CPU.\n{err}",
                file=sys.stderr,
            )

    def get_outputs(self):
        builder = _builder()
        out = self._out_dir()
        levels = builder.levels_for()
        names = [builder.kernel_library(lvl) for lvl in levels]
        names += [builder.ops_filename(), builder.INFO_FILE]
        return [str(out / n) for n in names if (out / n).exists()]

    def get_source_files(self):
        builder = _builder()
        root = Path(__file__).resolve().parent
        return [p.relative_to(root).as_posix() for p in builder.source_files()]


setup(
    # (one placeholder so that the wheel is marked as platform-specific; BuildKernels makes it)
    ext_modules=[Extension("groupnorm.kernels.cpu_ext._ops", sources=[])],
    cmdclass={"build_ext": BuildKernels},
)
