"""A master reachable from the network is never open by default (docs: README, "Running on your machines").

The masters here listen on 0.0.0.0, and every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import stat

import pytest
from conftest import wait_until

from hetero_ps.server.token import is_loopback
from hetero_ps.testing import LocalCluster

pytestmark = pytest.mark.slow
JOB = ["--host", "0.0.0.0", "--world-size", "2", "--no-local-worker", "--max-steps", "3", "--no-dashboard"]


def test_without_a_token_the_master_makes_one_and_only_its_holders_join(tmp_path):
    with LocalCluster(tmp_path, [*JOB, "--experiment", "made"], token="") as c:
        path = os.path.join(c.experiment_dir(), "token")
        made = open(path).read().strip()
        assert len(made) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        said = c.output("server")
        assert f"HETERO_PS_TOKEN={made} python -m hetero_ps.worker --master-addr " in said, said
        assert "readable by you only" in said

        stranger = c.add_worker(["--rank", "1", "--connect-timeout", "10"])  # no token
        assert stranger.wait(timeout=60) != 0
        assert "auth_failed" in c.output("worker0") or "wrong token" in c.output("worker0")
        wait_until(lambda: "wrong token" in c.output("server"), timeout=30, what="the master's rejection")

        c.add_worker(["--rank", "1"], env=dict(c.env, HETERO_PS_TOKEN=made))
        assert c.wait(timeout=180) == 0, c.output("server")


def test_insecure_no_token_lets_anyone_join_and_says_so(tmp_path):
    with LocalCluster(tmp_path, [*JOB, "--insecure-no-token", "--experiment", "open"], token="") as c:
        c.add_worker(["--rank", "1"])
        assert c.wait(timeout=180) == 0, c.output("server")
        assert "--insecure-no-token: anyone who can reach port" in c.output("server")
        assert not os.path.exists(os.path.join(c.experiment_dir(), "token"))


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False),
     ("192.168.1.10", False), ("::", False), ("master.lan", False)],
)  # fmt: skip
def test_only_loopback_addresses_go_without_a_token(host, loopback):
    assert is_loopback(host) is loopback
