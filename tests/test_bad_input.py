"""Input that cannot be honoured is an error that says the fix, and leaves nothing half-done."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import wait_until

from hetero_ps.errors import RemoteError
from hetero_ps.server.control import check_control
from hetero_ps.testing import LocalCluster
from hetero_ps.tools.control import main as control_main
from hetero_ps.wire import transport
from hetero_ps.wire.protocol import Message, MsgType


def _master(tmp_path, *args: str) -> subprocess.CompletedProcess:
    dashboard = [] if "--dashboard-port" in args else ["--no-dashboard"]
    cmd = [
        sys.executable,
        "-m",
        "hetero_ps.server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *dashboard,
        "--experiments-dir",
        str(tmp_path / "experiments"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--world-size", "4", "--no-local-worker", "--worker-batch-sizes", "1:5,2:17,3:42"],
            "sums to 64, but the global batch is 96; pass --global-batch-size 64",
        ),
        (
            ["--world-size", "3", "--no-local-worker", "--global-batch-size", "64", "--worker-batch-sizes", "1:64"],
            "names 1 rank(s), but the job has 2 training worker(s)",
        ),
        (
            ["--world-size", "2", "--global-batch-size", "8", "--worker-batch-sizes", "0:8,1:0"],
            "every size must be at least 1",
        ),
    ],
)
def test_a_batch_split_that_cannot_be_honoured_stops_the_master_before_anything_is_written(tmp_path, args, message):
    r = _master(tmp_path, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr
    assert not (tmp_path / "experiments").exists() or not os.listdir(tmp_path / "experiments")


def test_an_abbreviated_flag_is_an_error_not_a_guess(tmp_path):
    r = _master(tmp_path, "--epoch", "3")
    assert r.returncode == 2 and "unrecognized arguments: --epoch" in r.stderr


@pytest.mark.parametrize(
    "header, message",
    [
        ({"rank": 1, "simulate_slowdown": 0.5}, "simulate_slowdown must be a number >= 1"),
        ({"rank": 1, "simulate_bandwidth": -5}, "simulate_bandwidth must be a number >= 0"),
        ({"rank": 1, "simulate_slowdown": "fast"}, "simulate_slowdown must be a number"),
        ({"rank": 1, "simulate_slowdown": True}, "simulate_slowdown must be a number"),
        ({"rank": 1, "simulate_slowdown": float("nan")}, "simulate_slowdown must be a number"),
        ({"rank": 1, "volume": 11}, "unknown=['volume']"),
        ({"rank": "1", "simulate_slowdown": 2}, "needs an int rank"),
    ],
)
def test_control_knobs_out_of_range_are_refused(header, message):
    with pytest.raises(RemoteError, match="bad_control") as exc:
        check_control(header)
    assert message in str(exc.value)


def test_control_values_in_range_are_taken_as_floats():
    assert check_control({"rank": 2, "simulate_slowdown": 3, "simulate_bandwidth": 0}) == (
        2,
        {"simulate_slowdown": 3.0, "simulate_bandwidth": 0.0},
    )


def test_the_control_tool_refuses_a_knob_out_of_range_before_sending_it(capsys):
    with pytest.raises(SystemExit) as exc:
        control_main(["--master-port", "1", "--rank", "1", "--simulate-slowdown", "0.5"])
    assert exc.value.code == 2 and "--simulate-slowdown must be a number >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_the_master_refuses_a_knob_out_of_range_from_any_client(tmp_path):
    """A client that skips the tool's check (another language, an old version) gets bad_control."""
    args = ["--world-size", "2", "--no-local-worker", "--experiment", "ctl"]
    with LocalCluster(tmp_path, args) as c:  # no worker needed: the knob is checked first

        async def ask(header: dict) -> Message:
            conn, _ = await transport.connect("127.0.0.1", c.port, token=c.token, hello={"role": "control"}, timeout=30)
            try:
                await conn.send(MsgType.CONTROL, header)
                return await conn.recv(timeout=30)
            finally:
                await conn.close()

        reply = asyncio.run(ask({"rank": 1, "simulate_slowdown": 0.5}))
        assert reply.type == MsgType.ERROR and reply.header["code"] == "bad_control"
        assert "simulate_slowdown must be a number >= 1" in reply.header["message"]
        reply = asyncio.run(ask({"rank": 1, "simulate_slowdown": 2}))  # valid, but nobody has rank 1
        assert reply.type == MsgType.ERROR and reply.header["code"] == "no_such_worker"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_local_worker_that_dies_stops_the_master_at_once_with_its_last_lines(tmp_path):
    # The join timeout is the default 600 s: the master must not wait for it.
    r = _master(tmp_path, "--world-size", "1", "--local-device", "cuda", "--max-steps", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the master's local worker (rank 0) exited with code" in r.stderr
    assert "cuda" in r.stderr.split("its last lines:")[1].lower()  # the worker's own reason is quoted


@pytest.mark.slow
def test_with_log_format_json_every_stdout_line_is_one_json_object(tmp_path):
    r = _master(
        tmp_path,
        "--world-size",
        "1",
        "--model",
        "simple_cnn",
        "--dataset",
        "digits",
        "--max-steps",
        "3",
        "--log-format",
        "json",
        "--dashboard-port",
        "0",
        "--experiment",
        "js",
    )
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stderr
    parsed = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all(isinstance(p, dict) for p in parsed)
    assert {"listening", "summary"} <= {p.get("event") for p in parsed}
    assert next(p for p in parsed if p.get("event") == "summary")["summary"]["steps"] == 3


def _no_experiment_left(tmp_path) -> bool:
    root = tmp_path / "experiments"
    return not root.exists() or not os.listdir(root)


def test_a_taken_port_is_one_line_that_says_what_to_do_and_leaves_no_folder(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hetero_ps.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
                "--experiments-dir",
                str(tmp_path / "experiments"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "pick another --port" in r.stderr
    assert "Traceback" not in r.stderr
    assert _no_experiment_left(tmp_path)


def test_a_missing_data_set_stops_the_start_and_leaves_no_folder(tmp_path):
    r = _master(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"))
    assert (
        r.returncode == 1 and "CIFAR-10 is not where hetero_ps looks for it" in r.stderr and "Traceback" not in r.stderr
    )
    assert _no_experiment_left(tmp_path)


def test_the_scripts_name_the_python_they_need_before_installing_anything(tmp_path):
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *version_info*) exit 1;; -V) echo 'Python 3.9.18';; esac\n")
    fake.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        ["bash", "-c", f"source {root}/scripts/_env.sh && ensure_venv"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHON=str(fake), HETERO_PS_VENV=str(tmp_path / "venv")),
    )
    assert r.returncode == 1
    assert "needs Python 3.11 or newer" in r.stderr and "Python 3.9.18" in r.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_a_worker_pointed_at_the_dashboard_says_so_and_a_worker_without_rank_logs_the_one_it_got(tmp_path):
    args = ["--world-size", "2", "--no-local-worker", "--max-steps", "2", "--experiment", "dash"]
    with LocalCluster(tmp_path, args) as c:
        url = wait_until(
            lambda: re.search(r"dashboard: (http://\S+)", c.output("server")),
            timeout=60,
            what="the dashboard's address",
        ).group(1)
        dash_port = url.rstrip("/").rsplit(":", 1)[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hetero_ps.worker",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                dash_port,
                "--connect-timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=c.env,
        )
        assert r.returncode == 1
        assert "speaks HTTP" in r.stderr and "MASTER_PORT" in r.stderr, r.stderr
        c.add_worker([])  # no --rank: the master picks one
        assert c.wait(timeout=180) == 0, c.output("server")
        worker_log = c.output("worker0")
    after_welcome = worker_log[worker_log.index("worker[1]") :]
    assert "worker[?]" not in after_welcome


def _env_vars_read() -> set[str]:
    """Names the package, benchmarks, tests and scripts read from the environment."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    patterns = [
        r"environ(?:\.get)?\(\s*\"([A-Z][A-Z0-9_]+)\"",
        r"environ\[\"([A-Z][A-Z0-9_]+)\"\]",
        r"env_int\(\"([A-Z][A-Z0-9_]+)\"",
        r"ENV_VAR = \"([A-Z][A-Z0-9_]+)\"",
        r"\$\{([A-Z][A-Z0-9_]+):-",
    ]
    names: set[str] = set()
    for folder in ("hetero_ps", "benchmarks", "tests", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if name.endswith((".py", ".sh")):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        text = f.read()
                    for pattern in patterns:
                        names.update(re.findall(pattern, text))
    return names - {"TERM", "MASTER_IP", "PATH", "HOME", "CI", "PYTHONPATH"}


def test_every_environment_variable_that_is_read_is_in_the_readme():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    read = _env_vars_read()
    assert {"HETERO_PS_TOKEN", "MASTER_PORT", "HETERO_PS_KERNELS"} <= read  # the scan finds them
    assert sorted(v for v in read if f"`{v}`" not in readme) == []


def test_a_learning_rate_that_diverges_stops_the_run_with_the_step_and_the_hint(tmp_path):
    args = ["--world-size", "2", "--no-local-worker", "--lr", "20", "--global-batch-size", "32"]
    with LocalCluster(tmp_path, args + ["--experiment", "diverges"], workers=[["--rank", "1"]]) as c:
        assert c.wait(timeout=180) == 1, c.output("server")
        out = c.output("server")
        assert c.workers[0].wait(timeout=60) == 0  # let go with a BYE, not left to find a dead socket
        events = [json.loads(line) for line in open(os.path.join(c.experiment_dir(), "metrics", "events.jsonl"))]
        with open(os.path.join(c.experiment_dir(), "config.json")) as f:
            config = json.load(f)
    # The flag won over the model's recipe, and config.json says which knob came from where.
    assert config["job"]["lr"] == 20 and config["recipe"]["source"]["lr"] == "flag"
    assert config["job"]["optimizer"] == "momentum" and config["recipe"]["source"]["optimizer"] == "recipe"
    said = re.search(r"training diverged at step (\d+): .*Lower the learning rate \(--lr, ([\d.]+) at this step\)", out)
    assert said, out
    diverged = [e for e in events if e["event"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["step"] == int(said.group(1)) + 1  # stamped after its record
    assert "master says bye (training diverged)" in c.output("worker0")
