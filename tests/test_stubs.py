"""hetero_ps/_C.pyi describes the built extension: the same public names, the same argument names."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

_C = pytest.importorskip("hetero_ps._C", reason="the C++ extension is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(ROOT, "hetero_ps", "_C.pyi")


def _stub_members() -> dict[str, list[str] | None]:
    """Public names in the stub: a function's argument names, or None for a constant."""
    tree = ast.parse(open(STUB, encoding="utf-8").read())
    out: dict[str, list[str] | None] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = None
    return {k: v for k, v in out.items() if not k.startswith("_")}


def _runtime_args(fn) -> list[str]:
    # pybind11 puts the signature on the docstring's first line: name(a: T, b: T = ...) -> R
    first = (fn.__doc__ or "").splitlines()[0]
    params = first[first.index("(") + 1 : first.rindex(") ->")]
    return re.findall(r"(?:^|,\s*)(\w+):", params)


def test_the_stub_and_the_extension_name_the_same_members():
    runtime = {n for n in dir(_C) if not n.startswith("_")}
    stub = set(_stub_members())
    assert runtime - stub == set(), "exported by hetero_ps._C but missing from _C.pyi"
    assert stub - runtime == set(), "in _C.pyi but not exported by hetero_ps._C"


def test_the_stub_has_the_extensions_argument_names():
    for name, args in _stub_members().items():
        obj = getattr(_C, name)
        if args is None:
            assert not callable(obj), f"{name} is a function in the extension, a constant in the stub"
        else:
            assert _runtime_args(obj) == args, name


def test_the_helper_reads_pybind11_signatures():
    assert _runtime_args(_C.topk) == ["x", "k", "idx_out", "val_out"]
    assert _runtime_args(_C.checksum) == ["buf", "value"]


def test_mypy_stubtest_agrees():
    pytest.importorskip("mypy", reason="mypy is not installed (requirements.txt pins it)")
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "hetero_ps._C"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
