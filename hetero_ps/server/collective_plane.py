"""The master's side of a collective data plane (``--backend gloo|nccl``; ``loops/collective.py``).

It owns the rendezvous store (its port goes out in the job), numbers the membership epochs, and is
rank 0 of every epoch's group: a member that contributes zeros and receives the sum, so the master
keeps its own copy of the model exactly in step with the workers' — for evaluation, checkpoints and
newcomers — without any worker sending it a gradient. Its link carries ``2·N/(N+1)`` of the model
each way per step in a ring all-reduce, where the TCP plane's carries ``N``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import torch

from hetero_ps.config import JobConfig
from hetero_ps.wire import collective
from hetero_ps.wire.collective import CollectiveError, Group

log = logging.getLogger("hetero_ps.server")


class CollectivePlane:
    def __init__(self, job: JobConfig, host: str, port: int, chunks: Sequence[tuple[int, int]]):
        self.chunks = list(chunks)  # the job's gradient chunks: one all-reduce each, in this order
        self.backend = job.backend
        self.timeout = job.collective_timeout
        self.codec = job.compression
        # NCCL reduces on GPUs: the master's member on its first one (cli.py refuses nccl without one)
        self.device = "cuda" if job.backend == "nccl" else "cpu"
        self.store = collective.serve_store(host or "0.0.0.0", port, job.collective_timeout)
        self.epoch = 0  # the last membership epoch opened
        self.members: tuple[int, ...] = ()  # its workers (wids, in group-rank order 1..N)
        self._group: asyncio.Future[Group] | None = None  # the master's member of it, joining or joined

    @property
    def port(self) -> int:
        return int(self.store.port)

    def membership(self, wids: Sequence[int], local_addr: str) -> tuple[int, dict[int, int], int]:
        """``(epoch, wid -> group rank, size)`` for a step of ``wids`` (in rank order): the current
        group if it has exactly these workers, else a new epoch, whose group the master starts joining
        now (beside the workers, who join when their SCHEDULE names it)."""
        wids = tuple(wids)
        if wids != self.members or self._group is None:
            self._abandon()
            self.epoch += 1
            self.members = wids
            epoch, size = self.epoch, len(wids) + 1
            self._group = collective.in_thread(
                lambda: self._open(epoch, size, local_addr),
                f"hetero_ps-join-{epoch}",
            )
            log.info("collective plane: group %d of the master and %d worker(s)", epoch, len(wids))
        return self.epoch, {w: i + 1 for i, w in enumerate(self.members)}, len(self.members) + 1

    def _open(self, epoch: int, size: int, local_addr: str) -> Group:
        if self.device == "cuda":  # NCCL's communicator lives on this thread's current device
            torch.cuda.set_device(0)
        return collective.open_group(self.store, self.backend, epoch, 0, size, local_addr, self.timeout, "the master")

    def start_reduce(self) -> asyncio.Future[torch.Tensor]:
        """The master's part of this step's all-reduce (zeros, chunk by chunk as the workers launch
        theirs); the future's result is the sum, in fp32, a fresh tensor."""
        joining = self._group
        assert joining is not None, "membership() comes first"
        dtype = collective.CAST[self.codec]
        loop = asyncio.get_running_loop()

        async def reduce() -> torch.Tensor:
            group = await asyncio.shield(joining)  # (a cancelled step must not cancel the group's joining)
            bufs = [torch.zeros(n, dtype=dtype, device=self.device) for _, n in self.chunks]
            await collective.in_thread(
                lambda: collective.allreduce_sum(group, bufs, self.timeout, "the master"),
                f"hetero_ps-reduce-{group.epoch}",
            )
            return torch.cat([b.float().cpu() for b in bufs]) if len(bufs) > 1 else bufs[0].float().cpu()

        return loop.create_task(reduce())

    def invalidate(self) -> None:
        """That group failed: the next step opens a new epoch, whoever its members are."""
        self._abandon()

    def _abandon(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        if group.done() and not group.cancelled() and group.exception() is None:
            group.result().abandon()
        else:
            group.add_done_callback(_abandon_when_joined)

    def close(self) -> None:
        self._abandon()


def _abandon_when_joined(fut: asyncio.Future[Group]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().abandon()


__all__ = ["CollectiveError", "CollectivePlane"]
