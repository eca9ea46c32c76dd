"""Real, rate-limited network links on one machine: a network namespace per "remote" node.

``Link(rate_mbit)`` makes a namespace joined to this one by a veth pair. This side's end gets
``outer`` (the address a master listens on), the namespace's end ``inner``. With a rate, each end's
egress goes through a token-bucket filter (``tc qdisc ... tbf``), so both directions are limited
as a home link is; the kernel has no ``netem`` here, so latency is not modelled (the worker's
``--simulate-bandwidth`` pacer is the fallback where ``ip netns`` is not permitted).

    with Link(100) as link:                       # 100 Mbit/s each way
        subprocess.run(link.command(["python", "-m", "hetero_ps.worker", "--master-addr", link.outer]))

Needs root and the ``ip`` and ``tc`` commands; ``unavailable()`` says why not, for a skip message.
Leaving the ``with`` block deletes the veth pair and the namespace, whatever happened inside.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

_COUNTER = itertools.count()
_MIN_BURST = 32 * 1024  # bytes: tbf needs at least one jiffy's worth of tokens at the rate


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.decode().strip()}")


def unavailable() -> str:
    """Why a namespace link cannot be made here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    for cmd in ("ip", "tc"):
        if not shutil.which(cmd):
            return f"needs the {cmd} command (iproute2)"
    probe = f"hpsprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
    except RuntimeError as exc:
        return f"cannot make a network namespace here: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return ""


class Link:
    """A namespace reachable from here over a veth pair limited to ``rate_mbit`` each way (0: unlimited)."""

    def __init__(self, rate_mbit: float = 0.0):
        if rate_mbit < 0:
            raise ValueError(f"a link rate must be >= 0 Mbit/s, got {rate_mbit}")
        n = (os.getpid() * 7 + next(_COUNTER)) % 10000
        self.rate_mbit = float(rate_mbit)
        self.ns, self.host_dev, self.ns_dev = f"hpsn{n}", f"hpso{n}", f"hpsi{n}"
        subnet = f"10.{214 + n // 250 % 40}.{n % 250}"
        self.outer, self.inner = f"{subnet}.1", f"{subnet}.2"
        self._made = False

    def __enter__(self) -> Link:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        _run("ip", "netns", "add", self.ns)
        self._made = True
        try:
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            _run("ip", "link", "set", self.ns_dev, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.outer}/24", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            self._in_ns("ip", "addr", "add", f"{self.inner}/24", "dev", self.ns_dev)
            self._in_ns("ip", "link", "set", self.ns_dev, "up")
            self._in_ns("ip", "link", "set", "lo", "up")
            if self.rate_mbit:
                self._shape([], self.host_dev)  # this side → the namespace
                self._shape(["ip", "netns", "exec", self.ns], self.ns_dev)  # the namespace → this side
        except BaseException:
            self.close()
            raise

    def _in_ns(self, *args: str) -> None:
        _run("ip", "netns", "exec", self.ns, *args)

    def _shape(self, prefix: list[str], dev: str) -> None:
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(_MIN_BURST, int(rate_bytes / 100))  # 10 ms of tokens: smooth, yet above HZ's needs
        args = ["rate", f"{self.rate_mbit:g}mbit", "burst", str(burst), "latency", "100ms"]
        _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", *args)

    def close(self) -> None:
        if not self._made:
            return
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        self._made = False

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def set_up(self, up: bool) -> None:
        """Bring this side's end up or down: down drops every packet both ways, with no reset sent."""
        _run("ip", "link", "set", self.host_dev, "up" if up else "down")

    def measure_mbit(self, nbytes: int = 4 << 20, timeout: float = 60.0) -> float:
        """Send ``nbytes`` from the namespace to this side over TCP and return the rate seen (Mbit/s)."""
        lsock = socket.create_server((self.outer, 0))
        port = lsock.getsockname()[1]
        seen = {"bytes": 0, "s": 0.0}

        def drain() -> None:  # timed from the connection to its end: the sender's start-up is left out
            lsock.settimeout(timeout)
            conn, _ = lsock.accept()
            t0 = time.perf_counter()
            with conn:
                while chunk := conn.recv(1 << 20):
                    seen["bytes"] += len(chunk)
            seen["s"] = time.perf_counter() - t0

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        send = f"import socket; s = socket.create_connection(('{self.outer}', {port})); s.sendall(bytes({nbytes}))"
        try:
            subprocess.run(self.command([sys.executable, "-c", send]), check=True, capture_output=True, timeout=timeout)
            t.join(timeout)
        finally:
            lsock.close()
        if not seen["s"]:
            raise RuntimeError(f"nothing arrived over the link to {self.ns} within {timeout} s")
        return seen["bytes"] * 8 / seen["s"] / 1e6
