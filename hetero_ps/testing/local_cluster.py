"""A loopback cluster of real processes (a master and its workers on 127.0.0.1) for tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


class LocalCluster:
    """A master and workers as real processes on 127.0.0.1, for tests and benchmarks.

    ``server_args`` are passed to ``python -m hetero_ps.server`` (``--host``, ``--port 0`` and
    ``--port-file`` are added); each entry of ``workers`` is a list of extra arguments for one
    ``python -m hetero_ps.worker``. Every process's output goes to ``<workdir>/<name>.log``.
    ``tls`` is a folder holding ``cert.pem`` and ``key.pem`` (``python -m hetero_ps.tools.tls make-cert``):
    the master then uses TLS, and every worker checks its certificate with ``--tls-ca`` unless its
    arguments choose ``--tls-ca`` or ``--tls-fingerprint`` themselves.
    Leaving the ``with`` block (or ``close()``) terminates whatever still runs, then kills it.

        with LocalCluster(tmp_path, ["--model", "simple_cnn", "--world-size", "3", "--no-local-worker"],
                          workers=[["--rank", "1"], ["--rank", "2"]]) as c:
            assert c.wait(timeout=120) == 0
            summary = c.summary()
    """

    def __init__(
        self,
        workdir,
        server_args,
        workers=(),
        token: str = "test-token",
        env: dict | None = None,
        start_timeout: float = 60.0,
        tls: str = "",
    ):

        self.workdir = os.fspath(workdir)
        self.server_args = list(server_args)
        self.worker_args = [list(w) for w in workers]
        self.token = token
        self.tls = os.path.abspath(tls) if tls else ""  # the processes run in workdir
        self.env = dict(os.environ, HETERO_PS_TOKEN=token, PYTHONUNBUFFERED="1", **(env or {}))
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)
        self.start_timeout = start_timeout
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list = []
        self.port = 0
        self._logs: list = []
        self._dead_masters: list = []  # masters killed by restart_master

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(
        self, name: str, args: list[str], env: dict | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:

        log = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        self._logs.append(log)
        return subprocess.Popen(
            [*prefix, sys.executable, *args],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env or self.env,
            start_new_session=True,
        )

    def start(self) -> None:
        self._start_master("server", 0)
        for args in self.worker_args:
            self.add_worker(args)

    def add_worker(self, args: list[str], env: dict | None = None, link=None):
        """Start ``python -m hetero_ps.worker`` with ``args``; with ``link`` (a ``netlinks.Link``) it
        runs in that link's namespace and reaches the master at ``link.outer`` (start the master
        with ``--host 0.0.0.0`` or that address)."""
        if self.tls and not {"--tls-ca", "--tls-fingerprint"} & set(args):
            args = ["--tls-ca", os.path.join(self.tls, "cert.pem"), *args]
        addr = link.outer if link is not None else "127.0.0.1"
        p = self._spawn(
            f"worker{len(self.workers)}",
            ["-m", "hetero_ps.worker", "--master-addr", addr, "--master-port", str(self.port), *args],
            env,
            prefix=tuple(link.command([])) if link is not None else (),
        )
        self.workers.append(p)
        return p

    def restart_master(self, server_args: list[str] | None = None, name: str = "server2") -> None:
        """Kill the master as a crash would (SIGKILL) and start a new one on the same port.

        ``server_args`` replace the first master's (default: the same); its output goes to
        ``<name>.log``, and ``wait``/``experiment_dir`` then see the new master."""
        assert self.server is not None, "restart_master() needs start() first"
        os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait()
        self._dead_masters.append(self.server)
        if server_args is not None:
            self.server_args = list(server_args)
        self._start_master(name, self.port)

    def _start_master(self, name: str, port: int) -> None:
        port_file = os.path.join(self.workdir, "port")
        if os.path.exists(port_file):  # a previous cluster's, in a reused workdir: its port is not ours
            os.remove(port_file)
        server = self._spawn(
            name,
            [
                "-m",
                "hetero_ps.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--port-file",
                port_file,
                "--dashboard-port",
                "0",
                *(["--tls-cert", os.path.join(self.tls, "cert.pem")] if self.tls else []),
                *(["--tls-key", os.path.join(self.tls, "key.pem")] if self.tls else []),
                *self.server_args,
            ],
        )
        self.server = server
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(port_file):
            if server.poll() is not None:
                raise RuntimeError(f"the master exited with {server.returncode}:\n{self.output(name)}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"the master did not listen within {self.start_timeout} s")
            time.sleep(0.05)
        with open(port_file) as f:
            self.port = int(f.read())

    def wait(self, timeout: float) -> int:
        """Wait for the master to exit; returns its exit status (raises TimeoutError)."""

        server = self.server
        assert server is not None, "wait() needs start() first"
        try:
            return server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"the master did not finish within {timeout} s:\n{self.output('server')[-4000:]}"
            ) from None

    def output(self, name: str) -> str:

        path = os.path.join(self.workdir, f"{name}.log")
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")

    def experiment_dir(self, name: str = "") -> str:
        """The experiment folder ``name``, or the only one under workdir/experiments."""

        root = os.path.join(self.workdir, "experiments")
        if name:
            return os.path.join(root, name)
        names = sorted(os.listdir(root))
        if len(names) != 1:
            raise RuntimeError(f"expected one experiment under {root}, found {names}")
        return os.path.join(root, names[0])

    def summary(self) -> dict:

        with open(os.path.join(self.experiment_dir(), "summary.json")) as f:
            return json.load(f)

    def close(self) -> None:

        procs = [p for p in [self.server, *self.workers] if p is not None]
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        for f in self._logs:
            f.close()
        self._logs.clear()
