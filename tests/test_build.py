"""The extension builds the two documented ways: plain CMake and setup.py (the editable install).

The plain CMake build compiles csrc/ from scratch into a temporary directory with this
interpreter's pybind11, then imports the module in a fresh process and runs a kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hetero_ps

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_cmake_build_imports_and_runs(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    build = tmp_path / "build"
    configure = subprocess.run(
        [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build),
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    jobs = str(os.cpu_count() or 1)
    compiled = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=240)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    built = list(build.glob("_C*.so")) + list(build.glob("_C*.pyd"))
    assert len(built) == 1, sorted(p.name for p in build.iterdir())
    code = (
        "import _C, numpy as np\n"
        "x = np.array([1.0, -2.5, 65520.0, 1e-8], dtype=np.float32)\n"
        "out = np.empty(4, dtype=np.uint16)\n"
        "_C.f32_to_f16(x, out)\n"
        "assert (out == x.astype(np.float16).view(np.uint16)).all(), out\n"
        "assert _C.checksum(b'123456789') == 0xE3069283\n"
        "print(_C.cpu_features()['active'])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(build))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() in ("scalar", "sse4.2", "avx2", "avx512")


def test_setup_py_reads_the_package_version():
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == hetero_ps.__version__


def test_editable_install_puts_the_extension_in_the_package():
    try:
        from hetero_ps import _C
    except ImportError as e:
        pytest.skip(f"extension not built here: {e}")
    assert Path(_C.__file__).resolve().parent == Path(hetero_ps.__file__).resolve().parent
