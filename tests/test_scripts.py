"""The launch scripts of the seed guide: interface detection, and a master + worker started by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import still_running, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net(fn: str, env: dict | None = None) -> str:
    r = subprocess.run(
        ["bash", "-c", f"source scripts/_net.sh; {fn}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, **(env or {})),
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) is not installed")
def test_worker_uses_the_interface_of_the_route_to_the_master():
    assert _net("detect_interface 127.0.0.1") == "lo"
    assert _net("interface_ip lo") == "127.0.0.1"


def test_interface_override_wins():
    assert _net("detect_interface 127.0.0.1", {"NETWORK_INTERFACE": "wlp3s0"}) == "wlp3s0"


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) is not installed")
def test_master_interface_is_the_default_route_or_the_guides_order():
    dev = _net("detect_interface")
    default = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True).stdout
    if default.strip():
        assert f"dev {dev} " in default + " "
    else:
        assert dev == "lo" or os.path.exists(f"/sys/class/net/{dev}")


def test_cuda_detection_falls_back_to_cpu():
    import torch

    assert _net("detect_cuda", {"PYTHON": os.environ.get("PYTHON", "python3")}) in ("cuda", "cpu")
    if not torch.cuda.is_available():
        assert _net("detect_cuda") == "cpu"


def test_start_worker_requires_master_addr():
    env = {k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}
    r = subprocess.run(
        ["bash", "scripts/start_worker.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr


@pytest.mark.slow
def test_master_and_worker_scripts_train_on_loopback(tmp_path):
    port_file = tmp_path / "port"
    env = dict(os.environ, WORLD_SIZE="2", MASTER_PORT="0", HETERO_PS_TOKEN="t0k", PYTHONUNBUFFERED="1")
    master_log = open(tmp_path / "master.log", "w")
    master = subprocess.Popen(
        [
            "bash",
            os.path.join(ROOT, "scripts/master.sh"),
            "--host",
            "127.0.0.1",
            "--port-file",
            str(port_file),
            "--global-batch-size",
            "32",
            "--max-steps",
            "6",
            "--experiments-dir",
            str(tmp_path / "exp"),
        ],
        cwd=ROOT,
        env=env,
        stdout=master_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        # The master writes the port file whole (write, then rename) once it listens.
        wait_until(
            lambda: still_running(master, (tmp_path / "master.log").read_text) and port_file.exists(),
            timeout=120,
            what=f"the master's port file {port_file}",
        )
        wenv = dict(env, RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port_file.read_text().strip())
        worker = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts/start_worker.sh"), "--experiments-dir", str(tmp_path / "exp")],
            cwd=ROOT,
            env=wenv,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert master.wait(timeout=120) == 0, (tmp_path / "master.log").read_text()[-4000:]
    finally:
        for p in (master,):
            if p.poll() is None:
                os.killpg(p.pid, 15)
                p.wait(timeout=10)
        master_log.close()
    out = (tmp_path / "master.log").read_text()
    assert "Network Interface:" in out and "Waiting for 1 workers to connect" in out, out
    assert "worker joined: rank 1" in out, out
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert "Network Interface: lo (127.0.0.1)" in worker.stdout, worker.stdout


def test_gpu_check_passes_without_a_gpu_and_says_why(tmp_path):
    """scripts/gpu_check.sh on a machine without CUDA: every GPU check skips with its reason, it passes."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run scripts/gpu_check.sh itself")
    out = tmp_path / "gpu.jsonl"
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts/gpu_check.sh"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "needs CUDA (no GPU here)" in done.stdout and "no CUDA here: the GPU checks skipped" in done.stdout
    first = json.loads(out.read_text().splitlines()[0])
    assert first["check"] == "machine" and first["gpus"] == []
