"""The commands and flags the README and docs show exist: the docs cannot drift from the CLIs.

Every command written out (fenced shell blocks and inline ``python -m hetero_ps.X ...`` or
``scripts/X.sh ...``) is checked against that program's ``--help``; every other ``--flag`` the docs
mention must be a flag of at least one of the programs. The commands themselves run elsewhere on
loopback: the demo in test_demo.py, master.sh + start_worker.sh in test_scripts.py.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/TROUBLESHOOTING.md shows wrong commands on purpose (tests/test_troubleshooting.py runs them).
DOCS = [
    "README.md",
    "CONTRIBUTING.md",
    *(os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs"))) if n != "TROUBLESHOOTING.md"),
]

# What each script passes its arguments to.
SCRIPT_PROGRAM = {"master.sh": "server", "start_worker.sh": "worker", "demo.sh": "server"}
PROGRAMS = ("server", "worker", "control", "report")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


@functools.cache
def flags_of(program: str) -> frozenset[str]:
    r = subprocess.run(
        [sys.executable, "-m", f"hetero_ps.{program}", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    return frozenset(FLAG.findall(r.stdout))


def _text(name: str) -> str:
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def commands() -> list[tuple[str, str, str]]:
    """``(doc, program, command)`` for every command the docs write out."""
    found = []
    for doc in DOCS:
        text = _text(doc)
        pieces = re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S)
        pieces += re.findall(r"`([^`\n]*(?:python -m hetero_ps\.\w+|scripts/\w+\.sh)[^`\n]*)`", text)
        for piece in pieces:
            for line in piece.splitlines():
                line = line.split("#")[0]
                m = re.search(r"python -m hetero_ps\.(\w+)|scripts/(\w+\.sh)", line)
                if not m:
                    continue
                program = m.group(1) or SCRIPT_PROGRAM.get(m.group(2))
                if program in PROGRAMS:
                    found.append((doc, program, line[m.start() :].strip()))
    return found


COMMANDS = commands()


def test_the_docs_show_the_commands_users_type():
    programs = {p for _, p, _ in COMMANDS}
    assert {"server", "worker", "control", "report"} <= programs, programs


@pytest.mark.parametrize("doc, program, command", COMMANDS, ids=[f"{d}:{c[:50]}" for d, _, c in COMMANDS])
def test_every_flag_of_a_documented_command_exists(doc, program, command):
    unknown = sorted(set(FLAG.findall(command)) - flags_of(program))
    assert unknown == [], f"{doc}: `{command}` uses flags `python -m hetero_ps.{program}` does not have"


@pytest.mark.parametrize(
    "doc", ["README.md", os.path.join("docs", "PROTOCOL.md"), os.path.join("docs", "ARCHITECTURE.md")]
)
def test_every_flag_the_docs_mention_belongs_to_a_program(doc):
    known = set().union(*(flags_of(p) for p in PROGRAMS))
    mentioned = set()
    for span in re.findall(r"`([^`\n]+)`", _text(doc)):
        mentioned.update(FLAG.findall(span))
    assert sorted(mentioned - known) == [], f"{doc} mentions flags no program has"
