"""The import contract of docs/ARCHITECTURE.md, enforced: layers, no circles, no reach-ins.

Imports are read as text (``ast``), so the check needs nothing installed and sees imports inside
functions too: a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hetero_ps"

# Which rooms of hetero_ps each room may import (besides itself). "<root>" is hetero_ps/__init__.py
# (the version), "_C" the C++ extension. Keep in step with the table in docs/ARCHITECTURE.md.
ALLOWED: dict[str, set[str]] = {
    "<root>": set(),
    "errors": set(),
    "config": {"errors"},
    "_C": set(),
    "kernels": {"errors", "_C"},
    "wire": {"<root>", "errors", "config", "kernels"},
    "training": {"errors", "config"},
    "observe": {"errors", "config"},
    "server": {"<root>", "errors", "config", "kernels", "wire", "training", "observe"},
    "worker": {"<root>", "errors", "config", "kernels", "wire", "training", "observe"},
    "tools": {"errors", "config", "wire", "observe"},
    "testing": {"<root>", "errors", "config", "wire"},
    # `python -m hetero_ps.report` / `.control`: entry points kept for the commands users type.
    "report": {"tools"},
    "control": {"tools"},
}

# Inside the server, the step loops see the server only through their interface (server/loops/).
LOOPS_MAY_NOT_IMPORT = ("hetero_ps.server.server", "hetero_ps.server.cli")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every hetero_ps module (or package) that ``name`` imports, at any depth of its code."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base != "hetero_ps":  # `from hetero_ps import x` is an import of x, not of the root's contents
                out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "hetero_ps" or m.startswith("hetero_ps.")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _resolve(imported: str) -> str | None:
    """The module an import names: ``from hetero_ps.wire import codecs`` names hetero_ps.wire.codecs."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


GRAPH = {m: {r for i in _imports(m, p) if (r := _resolve(i)) and r != m} for m, p in MODULES.items()}


def test_every_room_is_listed():
    rooms = {_room(m) for m in MODULES} | {"_C"}
    assert rooms <= set(ALLOWED), f"rooms missing from ALLOWED (and docs/ARCHITECTURE.md): {rooms - set(ALLOWED)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    room = _room(module)
    bad = sorted(i for i in _imports(module, MODULES[module]) if _room(i) != room and _room(i) not in ALLOWED[room])
    assert not bad, f"{module} ({room}/) may import only {sorted(ALLOWED[room])} besides itself, but imports {bad}"


def test_step_loops_use_their_interface_only():
    for module, deps in GRAPH.items():
        if module.startswith("hetero_ps.server.loops"):
            bad = sorted(d for d in deps if d.startswith(LOOPS_MAY_NOT_IMPORT))
            assert not bad, f"{module} imports {bad}; the loops talk to the server through server/loops/'s interface"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # A package importing its own submodules (an __init__ re-exporting) is not a circle of design.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _reach_ins(path: Path) -> list[str]:
    """``obj._name`` where ``_name`` is private to another module's object.

    Allowed: ``self._x``/``cls._x``; private names defined in this same module (module-private
    helpers of one file); attributes of imported modules' internals (``torch.nn...._BatchNorm``),
    which are a library's business; sunder/dunder names (``_value2member_map_``, ``__dict__``).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    modules = {
        (a.asname or a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    own: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
            own.add(n.attr)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            own.add(n.target.id)
        elif isinstance(n, ast.Assign):
            own.update(t.id for t in n.targets if isinstance(t, ast.Name))
    found = []
    for n in ast.walk(tree):
        if not (isinstance(n, ast.Attribute) and n.attr.startswith("_")) or n.attr.endswith("_") or n.attr in own:
            continue
        root = n.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and (root.id in ("self", "cls") or root.id in modules):
            continue
        found.append(f"{path}:{n.lineno}: {ast.unparse(n)}")
    return found


def test_no_reach_into_another_objects_private_attributes():
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in _reach_ins(p)]
    assert found == [], "use a public method instead of:\n" + "\n".join(found)


def test_reach_in_finder_flags_a_reach_in(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import torch\nclass A:\n    def f(self, ps):\n        self._ok = torch._C\n        return ps._event\n"
    )
    found = _reach_ins(src)
    assert len(found) == 1 and found[0].endswith("ps._event")


DOC = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


def _doc_section(name: str) -> str:
    begin, end = f"<!-- {name}: begin", f"<!-- {name}: end -->"
    return DOC[DOC.index(begin) : DOC.index(end)]


def test_the_layers_table_in_the_docs_is_the_contract_enforced_here():
    rows = [line.split("|")[1:3] for line in _doc_section("layers").splitlines() if line.startswith("| `")]
    documented = {
        room.strip().strip("`"): {d.strip().strip("`") for d in deps.split(",") if d.strip() != "—"}
        for room, deps in rows
    }
    assert documented == ALLOWED


def _has_code(path: Path) -> bool:
    """More than a docstring: a package's __init__ that only describes the room needs no row."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def test_every_module_is_in_the_docs_and_every_file_the_docs_name_exists():
    section = _doc_section("modules")
    named = set(re.findall(r"`(hetero_ps/[\w/.]+)`", section))
    files = {
        str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or _has_code(p)
    }
    assert files - named == set(), "add these to docs/ARCHITECTURE.md's module table"
    missing = sorted(
        p
        for p in set(re.findall(r"`((?:hetero_ps|tests|csrc|scripts)/[\w/.]+\.\w+)`", DOC))
        if not (PACKAGE.parent / p).exists()
    )
    assert missing == [], "docs/ARCHITECTURE.md names files that do not exist"
