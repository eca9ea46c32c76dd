"""Packaging for hetero_ps. The metadata (name, version, dependencies) is in pyproject.toml. The C++
kernels are built by CMake (CMakeLists.txt); this file only drives that build so that
``pip install [-e] .`` produces ``hetero_ps/_C*.so``.

Environment knobs: ``CMAKE_BUILD_PARALLEL_LEVEL`` (jobs), ``HETERO_PS_CMAKE_ARGS`` (extra
``-D...`` arguments, space separated).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools compiles nothing itself."""

    def __init__(self, name: str, source_dir: Path = ROOT):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building hetero_ps._C needs CMake >= 3.18 on PATH (pip install cmake)")
        # Where setuptools expects the module: hetero_ps/ itself for an editable (in-place) build.
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = "Debug" if self.debug else "Release"
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            "-S",
            str(ext.source_dir),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DHETERO_PS_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            *shlex.split(os.environ.get("HETERO_PS_CMAKE_ARGS", "")),
        ]
        try:
            import pybind11
        except ImportError:
            pass  # CMakeLists.txt says how to get it
        else:
            configure.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", build_type, "-j", jobs], check=True)


setup(
    packages=find_packages(include=["hetero_ps*"]),
    package_data={"hetero_ps": ["observe/dashboard/static/*"]},
    ext_modules=[CMakeExtension("hetero_ps._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
