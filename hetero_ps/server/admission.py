"""Who is in the cluster: joining, becoming ready, and being lost.

A worker's HELLO is checked (software version, rank) and the worker is registered; it then builds
the job locally, calibrates itself and reports ``ready`` with its probe. Only then does the
scheduler count it, so the very first split already reflects each node's measured speed. A lost
worker leaves the scheduler, and the work it owed fails with ``WorkerLost`` so the loop redoes it.
Every join, ready and loss wakes whoever waits on :meth:`Admission.next_change`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

import hetero_ps
from hetero_ps.errors import HeteroPSError, RemoteError
from hetero_ps.server.registry import Registry, WorkerHandle
from hetero_ps.server.scheduler import Scheduler
from hetero_ps.wire.messages import Hello

log = logging.getLogger("hetero_ps.server")


def check_collective_member(backend: str, hello: Hello) -> None:
    """On a collective plane every worker joins the same process groups: an nccl plane needs a GPU
    on each, and torch.distributed needs one torch version across them."""
    profile = hello.profile or {}
    name = f"{hello.host or '?'} (rank {hello.rank if hello.rank is not None else '?'})"
    if backend == "nccl" and not str(hello.device or "").startswith("cuda"):
        raise RemoteError(
            "backend_unsupported",
            f"{name} runs on {hello.device or 'an unknown device'}, but --backend nccl needs every worker on a GPU: "
            "start it with a GPU (--device cuda), or run the master with --backend gloo for a mix of CPUs and GPUs",
        )
    theirs = profile.get("torch")
    if theirs is not None and theirs != torch.__version__:
        raise RemoteError(
            "version_mismatch",
            f"{name} runs torch {theirs} but the master runs torch {torch.__version__}: the --backend {backend} "
            "plane's collectives need one torch version on every node (install the same, or use --backend tcp)",
        )


class Admission:
    def __init__(self, scheduler: Scheduler, event: Callable[..., None], expected_workers: int, join_timeout: float):
        self.registry = Registry()
        self.scheduler = scheduler
        self._event = event
        self.expected_workers = expected_workers
        self.join_timeout = join_timeout
        self.finishing = False  # losses at the end of the run are departures, not failures
        self._changed = asyncio.Event()

    @staticmethod
    def check_version(hello: Hello) -> None:
        sw = hello.software
        if sw != hetero_ps.__version__:
            raise RemoteError(
                "version_mismatch",
                f"this worker runs hetero_ps {sw} but the master runs {hetero_ps.__version__}; "
                "install the same version on every node",
            )

    def admit(self, hello: Hello, conn: Any) -> WorkerHandle:
        h = self.registry.admit(
            -1 if hello.rank is None else hello.rank, hello.host or "?", hello.device or "?", hello.profile or {}, conn
        )
        h.schedule_ahead = bool(hello.schedule_ahead)
        log.info("worker joined: %s; preparing the job", h.name)
        self._event("worker_joined", rank=h.rank, host=h.host, device=h.device, profile=h.profile)
        self._changed.set()
        return h

    def mark_ready(self, h: WorkerHandle, probe: dict[str, Any]) -> None:
        if h.ready:
            return
        h.ready = True
        h.profile.update(probe)
        rate = float(probe.get("probe_samples_per_s") or 0.0)
        self.scheduler.add_worker(
            h.wid,
            rate_hint=rate,
            max_batch=int(probe.get("max_batch") or 0),
            c_hint=float(probe.get("probe_c_s") or 0.0),
            r_hint=float(probe.get("probe_r") or 0.0),
            rank=h.rank,
        )
        log.info(
            "worker ready: %s%s, %d/%d ready",
            h.name,
            f", probe {rate:.0f} samples/s" if rate else "",
            len(self.ready_workers()),
            self.expected_workers,
        )
        self._event("worker_ready", rank=h.rank, probe=probe)
        self._changed.set()

    def lose(self, h: WorkerHandle, reason: str) -> None:
        if self.registry.remove(h.wid) is None:
            return
        self.scheduler.remove_worker(h.wid)
        if self.finishing:
            log.info("worker left: %s", h.name)
        else:
            log.warning("worker lost: %s — %s (%d left)", h.name, reason, len(self.registry))
            self._event("worker_lost", rank=h.rank, host=h.host, reason=reason)
        if h.assignment is not None:
            h.assignment.fail(h.wid, f"{h.name} left mid-step")
        self._changed.set()

    def suspend(self, h: WorkerHandle, waited_s: float, limit_s: float) -> None:
        """``h`` has not finished its part of a step long past its prediction (a closed lid, SIGSTOP):
        give its samples to the others now, and no work to it until it answers again (``wake``)."""
        if h.suspended or not self.is_live(h):
            return
        h.suspended, h.status = True, "suspended"
        self.scheduler.remove_worker(h.wid)
        log.warning(
            "%s has not finished its part of the step after %.1f s (limit %.1f s): suspended, its samples go "
            "to the others; it gets work again once it answers",
            h.name,
            waited_s,
            limit_s,
        )
        self._event("worker_suspended", rank=h.rank, waited_s=round(waited_s, 3), limit_s=round(limit_s, 3))
        if h.assignment is not None:
            h.assignment.fail(h.wid, f"{h.name} stalled")
        self._changed.set()

    def wake(self, h: WorkerHandle) -> None:
        """A suspended worker said something: it is alive, and counted again from the next step."""
        if not h.suspended or not self.is_live(h):
            return
        h.suspended, h.status = False, "training"
        probe = h.profile
        self.scheduler.add_worker(  # a fresh model: what it does now is what counts
            h.wid,
            rate_hint=float(probe.get("probe_samples_per_s") or 0.0),
            max_batch=int(probe.get("max_batch") or 0),
        )
        log.info("%s answers again: it gets work from the next step", h.name)
        self._event("worker_resumed", rank=h.rank)
        self._changed.set()

    def ready_workers(self) -> list[WorkerHandle]:
        return [h for h in self.registry.live() if h.ready and not h.suspended]

    def is_live(self, h: WorkerHandle) -> bool:
        return h.wid in self.registry.workers

    def rank_of(self, wid: int) -> int:
        h = self.registry.workers.get(wid)
        return h.rank if h else -wid

    def next_change(self) -> asyncio.Task[Any]:
        """A task that ends at the next join, ready or loss after this call (none is missed)."""
        self._changed.clear()
        return asyncio.ensure_future(self._changed.wait())

    async def wait_for(self, n: int, port: int) -> None:
        """Block until ``n`` workers are ready, saying every few seconds who is still missing."""
        deadline = time.monotonic() + self.join_timeout
        while len(self.ready_workers()) < n:
            change = self.next_change()
            left = deadline - time.monotonic()
            if left <= 0:
                change.cancel()
                raise HeteroPSError(
                    f"only {len(self.ready_workers())} of {n} workers were ready within "
                    f"{self.join_timeout:.0f} s; check the workers' logs and MASTER_ADDR"
                )
            try:
                await asyncio.wait_for(change, timeout=min(5.0, left))
            except TimeoutError:
                have = ", ".join(f"{h.rank}{'' if h.ready else ' (preparing)'}" for h in self.registry.live())
                log.info(
                    "waiting for %d more worker(s) on port %d (joined ranks: %s)",
                    n - len(self.ready_workers()),
                    port,
                    have or "none",
                )
