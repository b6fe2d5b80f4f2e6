"""The package's build backend: setuptools, with the kernels compiled against the right torch.

The CPU kernels are a torch extension and must be compiled against the torch they will run
with. In an isolated build (plain ``pip install .``) pip makes a fresh environment for the
build; this backend asks it for the torch version installed where the package is going (read
with ``python -I``, which leaves out the build environment's paths), so the build compiles
against the same release. ``GROUPNORM_BUILD_TORCH`` names a requirement instead (for example
``torch==2.13.0``). With ``pip install --no-build-isolation .`` the installed torch is used
directly and none of this runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks this one does not change)


def _torch_requirement() -> list[str]:
    spec = os.environ.get("GROUPNORM_BUILD_TORCH", "").strip()
    if spec:
        return [spec]
    probe = "from importlib.metadata import version; print(version('torch'))"
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return [f"torch=={out.stdout.strip().split('+')[0]}"]
    return ["torch"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _torch_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _torch_requirement()
