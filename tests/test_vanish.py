"""A peer that vanishes without a reset (cable pulled, host frozen) is noticed on both sides.

The worker runs in a network namespace of its own, joined to this one by a veth pair; setting the
veth down drops every packet both ways and no FIN or RST is ever sent, as when a laptop's WiFi
goes. Needs root and ``ip netns`` (``testing/netlinks.py``; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import find_all, metrics_path, read_jsonl, still_running, wait_until

from hetero_ps.testing import LocalCluster, netlinks

pytestmark = [pytest.mark.slow, pytest.mark.network]
TIMEOUT_S = 8  # --worker-timeout: the master's heartbeat period is a quarter of it, the worker's patience 4 of those


@pytest.fixture
def netns():
    """A namespace reachable from this one over an unlimited veth link."""
    why = netlinks.unavailable()
    if why:
        pytest.skip(why)
    with netlinks.Link() as link:
        yield link


def test_a_vanished_link_is_noticed_on_both_sides_and_the_worker_comes_back(tmp_path, netns):
    args = ["--host", netns.outer, "--world-size", "2", "--no-local-worker", "--no-dashboard", "--epochs", "200"]
    args += ["--worker-timeout", str(TIMEOUT_S), "--experiment", "vanish"]
    with LocalCluster(tmp_path, args) as c:
        log = open(tmp_path / "worker-ns.log", "wb")
        worker = subprocess.Popen(
            netns.command([sys.executable, "-m", "hetero_ps.worker"])
            + ["--master-addr", netns.outer, "--master-port", str(c.port), "--rank", "1"]
            + ["--reconnect-timeout", "120", "--simulate-slowdown", "4", "--torch-threads", "1"],
            env=c.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            events, steps = metrics_path(tmp_path, "vanish", "events"), metrics_path(tmp_path, "vanish", "steps")
            alive = lambda: still_running(c.server, lambda: c.output("server"))  # noqa: E731
            wait_until(lambda: alive() and len(read_jsonl(steps, missing_ok=True)) >= 3, 120, what="three steps")

            netns.set_up(False)  # every packet dropped, no reset: the peer "vanishes"
            lost = wait_until(
                lambda: alive() and find_all(read_jsonl(events, missing_ok=True), event="worker_lost", rank=1),
                timeout=120,
                what="the master noticing the silent worker",
            )
            wait_until(
                lambda: "no word from the master" in (tmp_path / "worker-ns.log").read_text(),
                timeout=120,
                what="the worker noticing the silent master",
            )
            at = len(read_jsonl(steps))
            netns.set_up(True)
            wait_until(
                lambda: alive() and any(s["step"] >= at and "1" in s["workers"] for s in read_jsonl(steps)),
                timeout=180,
                what="the worker back at work after the link came back",
            )
            said = (tmp_path / "worker-ns.log").read_text()
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
            log.close()

    assert f"within {float(TIMEOUT_S)} s" in lost[0]["reason"], lost[0]
    assert f"no word from the master in {TIMEOUT_S} s" in said and "rejoining as rank 1" in said, said
    joins = find_all(read_jsonl(events), event="worker_joined", rank=1)
    assert len(joins) == 2  # the same rank, twice: before the link went down and after it came back
