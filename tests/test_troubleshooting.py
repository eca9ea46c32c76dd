"""Every row of docs/TROUBLESHOOTING.md's bad-input table, run for real (see that file)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import psutil
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows() -> list[tuple[str, int, str]]:
    with open(os.path.join(ROOT, "docs", "TROUBLESHOOTING.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("<!-- bad inputs: begin -->") : text.index("<!-- bad inputs: end -->")]
    return [
        (cmd, int(rc), msg) for cmd, rc, msg in re.findall(r"^\| `([^`]+)`[^|]* \| (\d+) \| `([^`]+)` \|$", table, re.M)
    ]


ROWS = rows()


def test_the_table_is_read():
    assert len(ROWS) >= 15


@pytest.mark.parametrize("command, status, message", ROWS, ids=[r[0][:60] for r in ROWS])
def test_a_bad_input_gets_its_message_and_leaves_nothing_behind(tmp_path, command, status, message):
    if "--local-device cuda" in command and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the local worker would not fail")
    words = shlex.split(command)
    env = dict(os.environ)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "HETERO_PS_PROGRESS_INTERVAL"):
        env.pop(k, None)
    while "=" in words[0]:  # VAR=value prefixes
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    assert words[:2] == ["python", "-m"]
    args = words[3:]
    if words[2] == "hetero_ps.server":  # before the row's flags, so the row's own win
        args = ["--port", "0", "--no-dashboard", *args]
    proc = subprocess.Popen(
        [sys.executable, "-m", words[2], *args],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == status, out
    assert message in out, out
    assert "Traceback" not in out, out
    experiments = tmp_path / "experiments"
    assert not experiments.exists() or os.listdir(experiments) == [], "a failed start left an experiment folder"
    left = [p for p in psutil.process_iter(["pid"]) if _session(p.info["pid"]) == proc.pid]
    assert left == [], f"processes left behind: {left}"


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
