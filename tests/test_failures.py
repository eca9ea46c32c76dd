"""The failure messages a user will meet, each with real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import find, metrics_path, read_jsonl, still_running, wait_until

from hetero_ps.testing import LocalCluster

pytestmark = pytest.mark.slow


def _run(args, timeout=60, env=None, cwd=None):
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_master_not_reachable_names_address_and_firewall():
    port = _closed_port()
    r = _run(
        ["-m", "hetero_ps.worker", "--master-addr", "127.0.0.1", "--master-port", str(port), "--connect-timeout", "2"]
    )
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr and "ufw" in r.stderr, r.stderr
    # It gave up because its own --connect-timeout ran out, and says how often it tried.
    assert re.search(r"after [1-9]\d* attempts in 2 s", r.stderr), r.stderr


def test_worker_without_master_address_is_told_how():
    r = _run(["-m", "hetero_ps.worker"])
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_but_absent():
    r = _run(["-m", "hetero_ps.worker", "--master-addr", "127.0.0.1", "--device", "cuda"])
    assert r.returncode == 1 and "CUDA is not available" in r.stderr and "--device cpu" in r.stderr, r.stderr


def test_missing_dataset_says_where_to_put_files(tmp_path):
    r = _run(
        [
            "-m",
            "hetero_ps.server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--no-local-worker",
            "--world-size",
            "2",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert "data_batch_1" in r.stderr and str(tmp_path / "nowhere") in r.stderr, r.stderr


def _cluster(tmp_path, **kw):
    args = [
        "--world-size",
        "2",
        "--no-local-worker",
        "--model",
        "simple_cnn",
        "--dataset",
        "digits",
        "--global-batch-size",
        "32",
        "--epochs",
        "1",
        "--experiment",
        "f",
    ]
    return LocalCluster(tmp_path, args, **kw)


def test_wrong_token_is_refused_and_master_keeps_serving(tmp_path):
    with _cluster(tmp_path) as c:
        bad = c.add_worker(["--rank", "1"], env=dict(c.env, HETERO_PS_TOKEN="wrong"))
        assert bad.wait(timeout=60) == 1
        out = c.output("worker0")
        assert "token" in out.lower(), out
        c.add_worker(["--rank", "1"])
        assert c.wait(timeout=120) == 0, c.output("server")
        assert c.summary()["steps"] > 0


def test_worker_with_other_code_version_is_refused(tmp_path):
    with _cluster(tmp_path) as c:
        env = dict(c.env)
        code = (
            "import sys, hetero_ps; hetero_ps.__version__ = '0.0.1'; from hetero_ps.worker.cli import main; "
            f"sys.exit(main(['--master-addr', '127.0.0.1', '--master-port', '{c.port}']))"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 1
        assert "0.0.1" in r.stderr and "version" in r.stderr.lower(), r.stderr


@pytest.mark.parametrize("codec", ["none", "topk:0.1"])
def test_worker_vanishing_mid_run_does_not_stop_training(tmp_path, codec):
    args = [
        "--world-size",
        "3",
        "--no-local-worker",
        "--model",
        "simple_cnn",
        "--dataset",
        "digits",
        "--global-batch-size",
        "32",
        "--epochs",
        "3",
        "--experiment",
        "vanish",
        "--worker-timeout",
        "20",
        "--compression",
        codec,
    ]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2", "--simulate-slowdown", "3"]]) as c:
        steps = metrics_path(tmp_path, "vanish", "steps")
        wait_until(
            lambda: (
                still_running(c.server, lambda: c.output("server")) and len(read_jsonl(steps, missing_ok=True)) >= 5
            ),
            timeout=120,
            what="5 steps of training",
        )
        os.killpg(c.workers[1].pid, signal.SIGKILL)
        assert c.wait(timeout=240) == 0, c.output("server")
        summary = c.summary()
        out = c.output("server")
        events = read_jsonl(metrics_path(tmp_path, "vanish", "events"))
    assert "worker lost: rank 2" in out, out[-4000:]
    assert find(events, event="worker_lost", rank=2), events
    # Every sample of every epoch was used exactly once, the redone step included.
    assert summary["samples"] == 3 * 1438 and summary["final_eval_accuracy"] > 0.8, summary
