"""Who is in the cluster: one ``WorkerHandle`` per connected worker, and rank bookkeeping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hetero_ps.errors import RemoteError

if TYPE_CHECKING:
    from hetero_ps.server.assignment import Assignment


@dataclass
class WorkerHandle:
    """The master's view of one worker."""

    wid: int  # unique for the life of the master (a rejoin gets a new one)
    rank: int  # the user's rank (RANK), unique among live workers
    host: str
    device: str
    profile: dict
    conn: Any  # transport.Connection
    status: str = "joined"  # joined (waiting for its first step) | training | suspended | lost
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    activity: str = "joined"  # what it was last doing, for "still waiting for ..." messages
    activity_since: float = field(default_factory=time.monotonic)
    batch: int = 0  # its batch size in the current step
    samples: int = 0  # samples it has computed so far
    steps: int = 0
    ready: bool = False  # built the job and reported its calibration probe
    params_version: int = -1  # the parameter version it last received
    assignment: Assignment | None = None  # the work in flight for it, if any
    discarded_step: int = -1  # a BSP step whose attempt it was given was aborted (its push thrown away)
    clock: int = 0  # SSP/ASP: updates it has pushed
    suspended: bool = False  # stalled past its limit in a step: given no work until it answers again
    pull: Any = None  # pull_delta.ReplicaPull: what it holds, while its pull codec is a delta one
    link: Any = None  # codec_choice.LinkChoice: its link's measured rate and its codecs
    schedule_ahead: bool = False  # said in HELLO: it takes a SCHEDULE before the PARAMS of its version

    def set_activity(self, what: str) -> None:
        self.activity, self.activity_since = what, time.monotonic()

    @property
    def name(self) -> str:
        return f"rank {self.rank} ({self.host}, {self.device})"


class Registry:
    """Live workers by id; ranks stay unique among them."""

    def __init__(self) -> None:
        self.workers: dict[int, WorkerHandle] = {}
        self._next_wid = 1

    def admit(self, requested_rank: int, host: str, device: str, profile: dict, conn) -> WorkerHandle:
        taken = {h.rank for h in self.workers.values()}
        if requested_rank >= 0:
            if requested_rank in taken:
                raise RemoteError(
                    "rank_taken",
                    f"rank {requested_rank} is already in use by a live worker; "
                    "give each worker its own RANK (or leave RANK unset to get a free one)",
                )
            rank = requested_rank
        else:
            rank = 1
            while rank in taken:
                rank += 1
        h = WorkerHandle(wid=self._next_wid, rank=rank, host=host, device=device, profile=profile, conn=conn)
        self._next_wid += 1
        self.workers[h.wid] = h
        return h

    def remove(self, wid: int) -> WorkerHandle | None:
        h = self.workers.pop(wid, None)
        if h:
            h.status = "lost"
        return h

    def live(self) -> list[WorkerHandle]:
        return sorted(self.workers.values(), key=lambda h: h.rank)

    def __len__(self) -> int:
        return len(self.workers)
