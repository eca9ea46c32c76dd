"""The worker the master starts on its own machine (WORLD_SIZE counts the master as a trainer).

The master supervises it: its output is passed through line by line (so the last lines are at hand),
and if it exits with an error while the job runs, the master stops at once and shows why, instead
of waiting ``--join-timeout`` for a worker that will never come.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import threading

from hetero_ps.errors import HeteroPSError

TAIL_LINES = 20


class LocalWorker:
    def __init__(
        self,
        port: int,
        token: str,
        device: str,
        experiments_dir: str,
        slowdown: float,
        log_format: str,
        tls_fingerprint: str = "",
    ):
        env = dict(os.environ, HETERO_PS_TOKEN=token)  # never on the command line, where ps shows it
        for k in ("RANK", "MASTER_ADDR", "MASTER_PORT", "HETERO_PS_TLS_CA", "HETERO_PS_TLS_FINGERPRINT"):
            env.pop(k, None)
        if tls_fingerprint:  # a TLS master: pinning its own certificate needs no CA and no host name in it
            env["HETERO_PS_TLS_FINGERPRINT"] = tls_fingerprint
        cmd = [
            sys.executable,
            "-m",
            "hetero_ps.worker",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--rank",
            "0",
            "--device",
            device,
            "--experiments-dir",
            experiments_dir,
            "--log-format",
            log_format,
            "--simulate-slowdown",
            str(slowdown),
            "--reconnect-timeout",
            "0",  # it lives and dies with this master
        ]
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._relay = threading.Thread(target=self._pass_through, name="local-worker-output", daemon=True)
        self._relay.start()

    def _pass_through(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    async def watch(self, poll_s: float = 0.2) -> None:
        """Return never while it runs; raise when it exits with an error (with its last lines)."""
        while (rc := self.proc.poll()) is None or rc == 0:
            if rc == 0:  # finished cleanly (the job is ending): nothing to watch any more
                await asyncio.Event().wait()
            await asyncio.sleep(poll_s)
        await asyncio.to_thread(self._relay.join, 2.0)  # its last lines, before we quote them
        last = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        raise HeteroPSError(
            f"the master's local worker (rank 0) exited with code {rc}; its last lines:\n{last}\n"
            "fix its cause, or run with --no-local-worker and start workers yourself"
        )

    def stop(self, grace: float = 10.0) -> None:
        """Let it finish (it got BYE), else terminate, else kill."""
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._relay.join(timeout=2.0)
