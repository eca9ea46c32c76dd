"""The parameter server: the master's parts put together, and its connections served.

Each part has its own file, and this one wires them up:

* ``admission.py`` — who joins, who is ready, who was lost (the registry, the scheduler's membership);
* ``model_state.py`` — parameters, optimizer, LR schedule and their wire chunks/codecs;
* ``assignment.py`` — the work in flight and the pushes and reports that complete it;
* ``evaluation.py`` — scoring a snapshot on the held-out split;
* ``run_records.py`` — step, epoch and event records to the experiment, dashboard and TensorBoard;
* ``control.py`` — control clients (``hetero_ps.tools.control``);
* ``loops/`` — the step loops (BSP; SSP/ASP), which see this class only as a ``loops.host.LoopHost``.

Here: each worker connection's receive loop (PUSH straight into the accumulator with one fused
decode-scale-add per chunk, METRICS reports, HEARTBEAT, BYE), sending parameters and schedules,
waiting for a step while naming stragglers, and the run's summary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import (
    ConfigError,
    HeteroPSError,
    RemoteError,
    RemoteProtocolError,
    TrainingDiverged,
    TransportError,
)
from hetero_ps.observe.records import EpochRecord, RunSummary, StepRecord
from hetero_ps.server import checkpoint, codec_choice, pull_delta
from hetero_ps.server.admission import Admission, check_collective_member
from hetero_ps.server.assignment import Assignment, CollectiveFailed, per_step
from hetero_ps.server.collective_plane import CollectivePlane
from hetero_ps.server.control import ControlDesk
from hetero_ps.server.divergence import DEFAULT_FACTOR, DivergenceWatch
from hetero_ps.server.evaluation import Evaluator, Score, Snapshot
from hetero_ps.server.loops.async_sgd import AsyncLoop
from hetero_ps.server.loops.bsp import BSPLoop
from hetero_ps.server.loops.collective import CollectiveLoop
from hetero_ps.server.loops.local_sgd import LocalLoop, needed_local_steps
from hetero_ps.server.model_state import ModelState
from hetero_ps.server.registry import WorkerHandle
from hetero_ps.server.run_records import RunRecords
from hetero_ps.server.scheduler import Decision, Scheduler
from hetero_ps.server.streamed_update import Changes
from hetero_ps.training import data, recipes
from hetero_ps.wire import transport
from hetero_ps.wire.messages import Bye, ControlWelcome, Heartbeat, Hello, Metrics, Push, Schedule, Welcome
from hetero_ps.wire.protocol import MsgType

log = logging.getLogger("hetero_ps.server")

UNMEASURED_STALL = 10  # × --worker-timeout: the stall limit of a worker without a measured step time


@dataclass(frozen=True)
class ServerConfig:
    """How the master runs (the job itself is a JobConfig)."""

    host: str = "0.0.0.0"  # address to listen on
    port: int = 29500  # MASTER_PORT
    token: str = ""  # shared secret (HETERO_PS_TOKEN)
    expected_workers: int = 1  # start training once this many workers are ready
    join_timeout: float = 600.0  # give up if they are not ready after this long
    worker_timeout: float = 30.0  # a worker silent this long is declared lost
    straggler_warn_s: float = 10.0  # log who we are waiting for after this long in a step
    worker_batch_sizes: dict[int, int] = field(default_factory=dict)  # rank -> fixed batch size
    experiment: str = ""  # experiment name (for the welcome and logs)
    eval_samples: int = 0  # evaluate on at most this many samples (0: the whole eval split)
    divergence_factor: float = DEFAULT_FACTOR  # stop when the loss exceeds this × its start (0: never)
    stall_factor: float = 4.0  # BSP: a worker past this × its predicted step time...
    stall_floor_s: float = 2.0  # ...and past this many seconds is suspended; its samples go to the others
    standby: bool = True  # BSP: a worker that would only lengthen every step sits it out (scheduler.py)...
    standby_role: str = "local"  # ...and runs local rounds on its own slice ("local") or waits ("idle")
    checkpoint_every_steps: int = 0  # BSP: write experiments/NAME/checkpoint.pt every N steps (0: not by steps)...
    checkpoint_every_s: float = 0.0  # ...or when this many seconds have passed since the last one (0: not by time)
    collective_port: int = 0  # --backend gloo|nccl: the rendezvous store's port (0: any free one)
    tls: ssl.SSLContext | None = field(default=None, compare=False)  # wire.tls.server_context: every connection is TLS


class ParameterServer:
    def __init__(
        self, job: JobConfig, cfg: ServerConfig, experiment: Any = None, sinks: Any = (), progress: Any = None
    ):
        self.job, self.cfg = job, cfg
        self.records = RunRecords(experiment, sinks, progress)
        self.train_set, self.eval_set, self.info = data.load_datasets(job)
        self.steps_per_epoch = math.ceil(len(self.train_set) / job.global_batch)
        self.total_steps = self.steps_per_epoch * job.epochs
        if job.max_steps:
            self.total_steps = min(self.total_steps, job.max_steps)
        # The knobs left to the model's recipe are fixed here, once the run's length is known.
        self.job, self.recipe_source = recipes.resolve(job, self.total_steps)
        job = self.job
        self.state = ModelState(job, self.info, self.total_steps)
        self.evaluator = Evaluator(
            job,
            self.state.model,
            self.eval_set,
            self.train_set,
            cfg.eval_samples,
            on_result=self._record_evaluation,
            on_skip=lambda snap: self.emit_event("evaluation_skipped", epoch=snap.epoch, version=snap.version),
        )
        self.training = False
        self.divergence = DivergenceWatch(cfg.divergence_factor)
        self.loop: BSPLoop | LocalLoop | AsyncLoop | CollectiveLoop | None = None  # the step loop, once training
        self.resumed_loop: dict[str, Any] | None = None  # the loop's state from a checkpoint (resume)
        self._checkpointed = (time.monotonic(), 0)  # when, and at which step, the last checkpoint was
        self._at_boundary = False  # the state is whole (update_done, no update since)
        self._train_s_before = 0.0  # training time of the run before the crash it was resumed from
        self._train_started: float | None = None
        policy = job.policy if job.load_balancing else "uniform"
        self.scheduler = Scheduler(
            job.global_batch,
            policy,
            job.rebalance_interval,
            fixed_sizes=cfg.worker_batch_sizes,
            standby=cfg.standby and job.sync == "bsp",
        )
        self.admission = Admission(self.scheduler, self.records.event, cfg.expected_workers, cfg.join_timeout)
        self.control = ControlDesk(self.admission.registry, self.records.event, cfg.worker_timeout)
        self._server: Any = None
        self._round_transfer: dict[int, float] = {}  # wid -> its last local round's transfer (stall limits)
        self.plane: CollectivePlane | None = None  # --backend gloo|nccl: the master's side of the plane

    # -- what cli.py and the views read ---------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.state.model

    @property
    def progress(self) -> Any:
        return self.records.progress

    @progress.setter
    def progress(self, progress: Any) -> None:
        self.records.progress = progress

    @property
    def port(self) -> int:
        return int(self._server.port)

    # -- connections ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.job.collective:  # its store's port goes out in the job, so it listens before anyone joins
            self.plane = CollectivePlane(self.job, self.cfg.host, self.cfg.collective_port, self.state.chunks)
            self.job = dataclasses.replace(self.job, collective_port=self.plane.port)
            log.info("%s plane: rendezvous store on port %d", self.job.backend, self.plane.port)
        self._server = await transport.start_server(
            self.cfg.host,
            self.cfg.port,
            token=self.cfg.token,
            on_hello=self._on_hello,
            on_connection=self._serve,
            tls=self.cfg.tls,
        )
        log.info(
            "master listening on %s:%d — model %s (%d parameters), data %s (%d train / %d eval), "
            "global batch %d, %d steps, %s",
            self.cfg.host,
            self.port,
            self.job.model,
            self.numel,
            self.job.dataset,
            len(self.train_set),
            len(self.eval_set),
            self.job.global_batch,
            self.total_steps,
            self.job.sync.upper(),
        )
        log.info("%s", recipes.describe(self.job, self.recipe_source))

    async def close(self) -> None:
        self.evaluator.stop()
        if self.plane is not None:
            self.plane.close()
        if self._server:
            await self._server.close()

    @property
    def phase(self) -> str:
        """What the master is doing, in words (for "stopped while ...")."""
        scoring = self.evaluator.scoring
        evaluating = f"evaluating epoch {scoring.epoch + 1} (version {scoring.version})" if scoring else ""
        if self.training:
            return f"training (step {self.step} of {self.total_steps})" + (f"; {evaluating}" if evaluating else "")
        if evaluating:
            return evaluating
        return f"waiting for workers ({len(self.ready_workers())} of {self.cfg.expected_workers} ready)"

    async def _on_hello(self, conn: Any, fields: dict[str, Any]) -> Welcome | ControlWelcome:
        hello = Hello.from_fields(fields)
        self.admission.check_version(hello)
        if hello.role == "control":
            conn.worker = None
            return ControlWelcome(workers=[h.rank for h in self.admission.registry.live()])
        if self.job.collective:
            check_collective_member(self.job.backend, hello)
        h = self.admission.admit(hello, conn)
        conn.worker = h
        conn.set_payload_allocator(self._push_allocator())
        return Welcome(
            worker_id=h.wid,
            rank=h.rank,
            job=self.job.to_wire(),
            numel=self.numel,
            experiment=self.cfg.experiment,
            total_steps=self.total_steps,
            heartbeat_s=self.heartbeat_s,
        )

    @property
    def heartbeat_s(self) -> float:
        """How often a quiet side of a worker connection says it is alive: well inside the timeout."""
        return max(0.05, self.cfg.worker_timeout / 4)

    async def _keep_alive(self, h: WorkerHandle) -> None:
        """HEARTBEAT a worker we have sent nothing to lately (each side does the same), so neither side
        is ever silent for long while its peer lives: ``--worker-timeout`` measures a peer's silence, not
        the idleness the master caused (a worker waiting out an evaluation or a slower peer's step)."""
        every, sent = self.heartbeat_s, -1
        while True:
            await asyncio.sleep(every)
            if h.conn.frames_sent == sent:
                try:  # behind a long PARAMS send it waits its turn: that worker is busy receiving
                    await h.conn.send(MsgType.HEARTBEAT, Heartbeat(time.time()).to_header())
                except (TransportError, OSError):
                    return  # the receive loop sees the connection end and says why
            sent = h.conn.frames_sent

    def _push_allocator(self) -> Any:
        """Each worker's chunks land in one receive buffer that lives as long as the connection."""
        cap = self.state.max_push_bytes() + 4096
        buf = bytearray(0)

        def allocate(msg_type: MsgType, header: dict[str, Any], nbytes: int) -> memoryview | None:
            nonlocal buf
            if msg_type != MsgType.PUSH or nbytes > cap:
                return None  # the decoder allocates (within its limits); the handler rejects bad headers
            if len(buf) < nbytes:
                buf = bytearray(cap)
            return memoryview(buf)[:nbytes]

        return allocate

    async def _serve(self, conn: Any) -> None:
        if conn.worker is None:
            await self.control.serve(conn)
        else:
            await self._serve_worker(conn)

    async def _serve_worker(self, conn: Any) -> None:
        h: WorkerHandle = conn.worker
        reason = "connection closed"
        keep_alive = asyncio.ensure_future(self._keep_alive(h))
        try:
            while True:
                msg = await conn.recv(timeout=self.cfg.worker_timeout)
                h.last_seen = time.monotonic()
                if h.suspended and msg.type != MsgType.HEARTBEAT:
                    # Work (even for the aborted step) is a sign of life; a heartbeat is not: a worker
                    # whose compute thread hangs keeps sending those.
                    self.admission.wake(h)
                if msg.type == MsgType.PUSH:
                    self._on_push(h, Push.from_header(msg.header), msg.segments)
                elif msg.type == MsgType.METRICS:
                    self._on_metrics(h, Metrics.from_header(msg.header))
                elif msg.type == MsgType.HEARTBEAT:
                    pass
                elif msg.type == MsgType.BYE:
                    reason = f"left ({Bye.from_header(msg.header).reason or 'bye'})"
                    break
                elif msg.type == MsgType.ERROR:
                    reason = f"reported an error: {msg.header.get('code')}: {msg.header.get('message')}"
                    break
                else:
                    raise RemoteError("unexpected_message", f"a worker may not send {msg.type.name}")
        except RemoteError as exc:
            reason = str(exc)
            await conn.send_error(exc.code, exc.message)
        except RemoteProtocolError as exc:  # a malformed header: tell the worker which field, then drop it
            reason = f"protocol error: {exc}"
            await conn.send_error("protocol_error", str(exc))
        except (TransportError, HeteroPSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            keep_alive.cancel()
            self.admission.lose(h, reason)

    # -- pushes and reports -------------------------------------------------------------------
    def _on_push(self, h: WorkerHandle, push: Push, segments: Any) -> None:
        a = h.assignment
        if a is None or not a.is_current(push.step, push.attempt):
            return  # a push for an aborted attempt: its samples are being redone
        a.take_chunk(h.wid, push.chunk, h.name, push.early)
        h.set_activity(f"pushing step {a.step} (chunk {push.chunk + 1}/{self.n_chunks})")
        self._link(h).on_push(push.step, push.attempt, sum(memoryview(s).nbytes for s in segments), early=push.early)
        self.state.accumulate(push, segments, a.acc_np, a.weight(h.wid), a.codecs[h.wid])
        self._maybe_done(h, a)

    def _on_metrics(self, h: WorkerHandle, m: Metrics) -> None:
        if m.is_ready:
            self.admission.mark_ready(h, m.probe or {})
            return
        a = h.assignment
        if a is None or m.report is None or not a.is_current(m.step, m.attempt) or h.wid not in a.sizes:
            return
        a.add_report(h.wid, m.report)
        if m.report.collective_error:  # the step's group failed: redo it at once, in a new one
            a.abort(CollectiveFailed(m.report.collective_error))
        self._link(h).on_report(a.step, a.attempt, m.report.encode_s)
        util = m.report.util
        self.records.worker_utilisation(
            h.rank, **{k: util.get(k) for k in ("cpu_util", "mem_bytes", "gpu_util", "gpu_mem_bytes")}
        )
        self._maybe_done(h, a)

    def _maybe_done(self, h: WorkerHandle, a: Assignment) -> None:
        if a.worker_finished(h.wid):
            h.set_activity(f"done with step {a.step}, waiting")
            a.complete_if_all_in()

    # -- LoopHost: what the step loops use --------------------------------------------------------
    @property
    def train_samples(self) -> int:
        return len(self.train_set)

    @property
    def step(self) -> int:
        return self.records.step

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def lr(self) -> float:
        return self.state.lr

    @property
    def numel(self) -> int:
        return self.state.numel

    @property
    def n_chunks(self) -> int:
        return len(self.state.chunks)

    def ready_workers(self) -> list[WorkerHandle]:
        return self.admission.ready_workers()

    def is_live(self, h: WorkerHandle) -> bool:
        return self.admission.is_live(h)

    def on_standby(self, h: WorkerHandle) -> bool:
        return h.wid in self.scheduler.standby

    def rank_of(self, wid: int) -> int:
        return self.admission.rank_of(wid)

    async def wait_for_workers(self, n: int) -> None:
        await self.admission.wait_for(n, self.port)

    def next_membership_change(self) -> asyncio.Task[Any]:
        return self.admission.next_change()

    def split_batch(
        self, workers: list[WorkerHandle], total: int | None = None, step: int | None = None
    ) -> dict[int, int]:
        sizes, decision = self.scheduler.assign(
            self.step if step is None else step, [h.wid for h in workers], total, ranks={h.wid: h.rank for h in workers}
        )
        if decision is not None:
            self._record_decision(decision)
        return sizes

    async def send_params(self, h: WorkerHandle) -> bool:
        """Bring ``h`` to the current parameter version; False if it was lost on the way."""
        if h.params_version == self.version:
            return True
        version = self.version
        spec = self._link(h).pull
        try:
            if pull_delta.is_delta_codec(spec):
                await self.state.update_finished()  # a delta needs every chunk of the new version
                frames = await self._delta_frames(h, spec)
                for f in frames:
                    await h.conn.send_frame(f)
            else:
                if h.pull is not None:
                    h.pull = None  # full pulls from now on: the replica would fall behind
                if self.state.update is None:
                    for f in self.state.encoded_params(spec):
                        await h.conn.send_frame(f)
                else:  # BSP's update being stepped: each chunk as soon as it is done
                    for i in range(self.n_chunks):
                        await h.conn.send_frame(await self.state.params_frame(spec, i))
                if self.job.collective:  # it steps its own copy: the optimizer's state goes with it
                    await self.state.update_finished()
                    for f in self.state.optimizer_state_frames():
                        await h.conn.send_frame(f)
        except (TransportError, OSError) as exc:
            self.admission.lose(h, f"could not send parameters: {exc}")
            return False
        except BaseException:
            if h.pull is not None:
                h.pull.forget()  # part of a delta may be out: what it holds is unknown now
            raise
        h.params_version = version
        return True

    async def _delta_frames(self, h: WorkerHandle, spec: str) -> list[Any]:
        """``h``'s delta pull (or resync) from its replica, with the delta codec ``spec``. In BSP the
        parameters stay still while they are sent, so the encoding runs in a thread, beside the other
        workers'; SSP/ASP update them between two awaits, so there it runs here, on one consistent version."""
        if h.pull is None:
            h.pull = self.state.replica_pull(spec)
        h.pull.use_codec(spec)
        params = self.state.flat.params.detach().numpy()
        if self.job.bulk_synchronous:
            frames, why = await asyncio.to_thread(h.pull.frames, params, self.version, h.params_version)
        else:
            frames, why = h.pull.frames(params, self.version, h.params_version)
        if why:
            log.info("%s: full parameters (%s)", h.name, why)
            self.emit_event("pull_resync", rank=h.rank, reason=why, version=self.version)
        return frames

    async def send_schedule(self, h: WorkerHandle, a: Assignment) -> bool:
        epoch, offset, count = a.slices[h.wid]
        a.codecs[h.wid] = push_codec = self._link(h).push
        # A redo of that step gives it a higher attempt, which says the same; another step must say it.
        discarded = h.discarded_step if h.discarded_step not in (-1, a.step) else None
        h.discarded_step = -1
        header = Schedule(
            step=a.step,
            attempt=a.attempt,
            epoch=epoch,
            offset=offset,
            count=count,
            version=self.version,
            total=a.total,
            compression=push_codec if codec_choice.is_auto(self.job.compression) else None,
            discarded=discarded,
            ahead=h.wid in a.ahead and h.params_version != self.version,
            local_steps=a.local_steps,
            lr=a.lr if a.local_steps or a.group is not None else None,
            group=a.group,
            group_rank=a.group_ranks.get(h.wid, 0),
            group_size=a.group_size,
        ).to_header()
        h.batch = count
        h.assignment = a
        h.set_activity(f"computing step {a.step} ({count} samples)")
        try:
            await h.conn.send(MsgType.SCHEDULE, header)
            return True
        except (TransportError, OSError) as exc:
            self.admission.lose(h, f"could not send schedule: {exc}")
            return False

    def _stall_limits(self, a: Assignment) -> dict[int, float]:
        """Seconds after ``a`` started past which each worker it waits for counts as stalled:
        ``max(stall_factor × its predicted time, stall_floor_s)``. A worker not measured yet (new,
        or back from a suspension) gets ``UNMEASURED_STALL × worker_timeout``: generous, but a
        compute thread that hangs while its worker keeps sending heartbeats never holds the job forever."""
        if self.cfg.stall_factor <= 0 or a.group is not None:
            # (a collective step: nobody reports before the all-reduce ends, so a stall cannot be told
            # from its victims; a silent worker is lost after --worker-timeout, a hung one times out)
            return {}
        limits = {}
        for wid in a.waiting_for():
            batch, steps = per_step(a, wid)
            predicted = self.scheduler.predicted_seconds(wid, batch)
            if predicted is not None and a.local_steps:  # H inner steps, then the round's transfer
                predicted = predicted * steps + self._round_transfer.get(wid, 0.0)
            if predicted is None:
                limits[wid] = UNMEASURED_STALL * self.cfg.worker_timeout
            else:
                limits[wid] = max(self.cfg.stall_factor * predicted, self.cfg.stall_floor_s)
        return limits

    async def wait_done(self, a: Assignment, stalls: bool = False, since: float | None = None) -> None:
        """Wait for an assignment; every ``straggler_warn_s`` say who we are waiting for.

        With ``stalls`` (BSP), a worker past its stall limit is suspended and the assignment fails
        with ``WorkerLost``, so the step is redone by the others at once. The limit counts from
        ``since`` (``perf_counter`` time; the assignment's start by default)."""
        warned = time.perf_counter()
        start = a.started if since is None else since
        while True:
            limits = self._stall_limits(a) if stalls else {}
            elapsed = time.perf_counter() - start
            wait = self.cfg.straggler_warn_s - (time.perf_counter() - warned)
            if limits:
                wait = min(wait, min(limits.values()) - elapsed)
            done, _ = await asyncio.wait({a.done}, timeout=max(0.01, wait))
            if done:
                return a.done.result()
            elapsed = time.perf_counter() - start
            for wid, limit in limits.items():
                h = self.admission.registry.workers.get(wid)
                if h is not None and elapsed >= limit and not a.worker_finished(wid):  # done meanwhile: fine
                    self.admission.suspend(h, elapsed, limit)
            if a.done.done() or time.perf_counter() - warned < self.cfg.straggler_warn_s:
                continue
            warned = time.perf_counter()
            now = time.monotonic()
            for wid in a.waiting_for():
                h = self.admission.registry.workers.get(wid)
                if h:
                    log.warning(
                        "step %d: still waiting for %s — last: %s (%.0f s ago)",
                        a.step,
                        h.name,
                        h.activity,
                        now - h.activity_since,
                    )

    def apply_update(self, grad: torch.Tensor, changes: Changes = ()) -> bool:
        self._at_boundary = False
        return self.state.apply(grad, changes)

    def start_update(self, grad: torch.Tensor, changes: Changes = ()) -> bool:
        self._at_boundary = False
        return self.state.start_update(grad, changes)

    def apply_changes(self, changes: Changes) -> None:
        self._at_boundary = False
        self.state.apply_changes(changes)

    @property
    def standby_rounds(self) -> bool:
        # (a collective plane's workers step their own parameters: a round's change has nowhere to go)
        return self.cfg.standby_role == "local" and self.scheduler.allow_standby and not self.job.collective

    def predicted_step_s(self) -> float | None:
        return self.scheduler.predicted_step_s()

    def round_for(self, h: WorkerHandle) -> tuple[int, int, float, float] | None:
        """A standby worker's local round from its measured model: its batch per inner step (an equal
        share of B), the H that keeps its fixed cost (its link) under a tenth of the round's compute,
        the seconds of one inner step and of that fixed cost; None while it is not measured."""
        m = self.scheduler.models.get(h.wid)
        # Its compute rate: the join probe's (its BSP steps, at a share or two, cannot tell its rate
        # from its link's cost), else the fitted one.
        if m is None or (m.rate_hint or m.rate) <= 0 or m.fixed <= 0:
            return None
        rate = m.rate_hint or m.rate
        batch = max(1, self.job.global_batch // len(self.ready_workers()))  # an equal share of B
        steps, _ = needed_local_steps([(m.fixed, batch / rate)])
        return batch, steps, batch / rate, m.fixed

    def set_busy(self, wid: int, busy: bool) -> None:
        (self.scheduler.busy.add if busy else self.scheduler.busy.discard)(wid)

    async def update_finished(self) -> float:
        return await self.state.update_finished()

    def step_lr(self) -> None:
        self.state.step_lr()

    def feed_scheduler(self, a: Assignment) -> None:
        """Feed each worker's measured step time to the scheduler and its counters; re-choose auto codecs."""
        for wid, r in a.reports.items():
            h = self.admission.registry.workers.get(wid)
            if h is None:
                continue
            h.samples += a.sizes[wid]
            h.steps += 1
            transfer = r.encode_s + r.push_s + r.pull_s
            if a.local_steps and self.job.sync == "local":  # one inner step's compute; the link is paid once a round
                batch, steps = per_step(a, wid)
                self.scheduler.observe(wid, batch, (r.compute_s + r.encode_s) / steps)
                self._round_transfer[wid] = transfer
            elif a.local_steps:  # a standby worker's round: what a BSP step of its would take (its link every step)
                batch, steps = per_step(a, wid)
                self.scheduler.observe(wid, batch, r.compute_s / steps + transfer)
            else:
                self.scheduler.observe(wid, a.sizes[wid], r.compute_s + r.encode_s + r.push_s + r.pull_s)
        self._choose_codecs(a)

    def _link(self, h: WorkerHandle) -> codec_choice.LinkChoice:
        if h.link is None:
            ladder = codec_choice.ladder_for(self.job.optimizer)
            h.link = codec_choice.LinkChoice(
                self.job.compression,
                self.job.pull_compression,
                self.state.chunks,
                ladder,
                min_samples=1 if self.job.sync == "local" else codec_choice.MIN_SAMPLES,
            )
        return h.link

    def _choose_codecs(self, a: Assignment) -> None:
        """--compression/--pull-compression auto: re-choose the codecs of the workers that just
        reported, against the step's compute (the slowest worker's: what everyone waits for)."""
        # (a local round: against one inner step's compute, as BSP would; auto's H amortizes the rest)
        compute_s = max((r.compute_s / per_step(a, w)[1] for w, r in a.reports.items()), default=0.0)
        for wid in a.reports:
            h = self.admission.registry.workers.get(wid)
            if h is None or h.link is None:
                continue
            why = h.link.decide(compute_s)
            if why:
                # Its measured step times held its push and pull as it reported them: the scheduler
                # moves them to the new codecs' predicted transfer (measured, not predicted, before:
                # a prediction off by more than the compute would make the worker look infinitely fast).
                r, transfer = a.reports[wid], h.link.transfer_s(h.link.level)
                shift = transfer - (r.push_s + r.pull_s)
                if shift and not a.local_steps:  # (local rounds keep the link out of the scheduler's model)
                    self.scheduler.shift_fixed(
                        wid,
                        shift,
                        f"pushes with {h.link.push}, pulls with {h.link.pull} now ({shift:+.3g} s a step)",
                        floor_fixed_s=transfer,
                        floor_per_sample_s=(r.compute_s + r.encode_s) / max(1, a.sizes[wid]),
                    )
                log.info("%s: push %s, pull %s — %s", h.name, h.link.push, h.link.pull, why)
                self.emit_event("codec_choice", rank=h.rank, push=h.link.push, pull=h.link.pull, reason=why)

    # -- checkpoints ---------------------------------------------------------------------------------
    def update_done(self) -> None:
        """The loop's state is whole (a BSP step boundary; SSP/ASP: an update applied): checkpoint if due."""
        self._at_boundary = True
        at, step = self._checkpointed
        by_steps = self.cfg.checkpoint_every_steps and self.step - step >= self.cfg.checkpoint_every_steps
        by_time = self.cfg.checkpoint_every_s and time.monotonic() - at >= self.cfg.checkpoint_every_s
        if (by_steps or by_time) and self.step > step:
            self.save_checkpoint()

    def train_seconds(self) -> float:
        """Training time so far, the time before a crash included (a resumed run's summary counts it)."""
        since = time.perf_counter() - self._train_started if self._train_started is not None else 0.0
        return self._train_s_before + since

    def save_checkpoint(self, at_exit: bool = False) -> str | None:
        """Write the state at the last consistent point (runs with an experiment folder only).

        At exit (Ctrl-C, an error) the master may be mid-step: parameters updated but the step not yet
        recorded. Then the state is not whole and the last periodic checkpoint stands."""
        exp = self.records.experiment
        if exp is None or self.loop is None or not self.step:
            return None
        if at_exit and not self._at_boundary:
            log.warning("stopped mid-step: the checkpoint of step %d stands", self._checkpointed[1])
            return None
        t0 = time.perf_counter()
        loop_state = self.loop.checkpoint_state()
        path = checkpoint.save(
            exp.path,
            {
                **self.state.checkpoint_state(),
                "job": self.job.to_wire(),
                "step": self.step,
                "loop": loop_state,
                "scheduler": self.scheduler.export_state(),
                "evaluations": [self._snapshot_state(s) for s in self.evaluator.unscored()],
                "train_s": self.train_seconds(),
                "metrics": exp.metrics.positions(durable=True),  # last: every record above is in them
            },
        )
        self._checkpointed = (time.monotonic(), self.step)
        log.info("checkpoint at step %d (epoch %d, sample %d) in %.2f s: %s", self.step, loop_state["epoch"] + 1,
                 loop_state["offset"], time.perf_counter() - t0, path)  # fmt: skip
        return path

    def _snapshot_state(self, snap: Snapshot) -> dict[str, Any]:
        """An evaluation not scored yet; its parameters are left out when they are the checkpoint's own."""
        params = None if snap.version == self.version else snap.params
        return {"epoch": snap.epoch, "step": snap.step, "version": snap.version, "params": params}

    def resume_from(self, folder: str) -> None:
        """Continue from the newest checkpoint in ``folder`` whose metrics files are whole; an older one
        when an OS crash left the files shorter than the newest says (logged)."""
        why: list[str] = []
        for path, ckpt in checkpoint.readable(folder, why):
            checkpoint.check_compatible(ckpt, self.job.to_wire(), self.numel)
            try:
                self.records.experiment.metrics.check_positions(ckpt["metrics"])
            except ValueError as exc:
                log.warning("checkpoint %s cannot be used: %s; trying the one before it", path, exc)
                why.append(f"{path}: {exc}")
                continue
            self.resume(ckpt)
            return
        raise ConfigError(f"no usable checkpoint in {folder}: {'; '.join(why)} — start a new experiment")

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Continue from ``ckpt``: parameters, optimizer, schedule, records, the loop's position, the
        scheduler's worker models and the evaluations that were still to be scored."""
        checkpoint.check_compatible(ckpt, self.job.to_wire(), self.numel)
        done = self.records.restore(ckpt["metrics"], int(ckpt["step"]))
        self.state.load_checkpoint_state(ckpt)
        self.divergence.replay([r.loss for r in done])
        self.resumed_loop = dict(ckpt["loop"])
        self.scheduler.restore(ckpt["scheduler"])
        self._train_s_before = float(ckpt["train_s"])
        self._checkpointed = (time.monotonic(), self.step)
        self._at_boundary = True
        scored = {r.epoch for r in self.records.evaluations}
        snaps = [self._snapshot(e) for e in ckpt["evaluations"] if int(e["epoch"]) not in scored]
        self.evaluator.resubmit(snaps)
        epoch, offset = int(self.resumed_loop["epoch"]), int(self.resumed_loop["offset"])
        self.emit_event("resumed", epoch=epoch, offset=offset, version=self.version, evaluations=len(snaps))
        log.info(
            "resuming at step %d (epoch %d, sample %d, parameter version %d)%s",
            self.step,
            epoch + 1,
            offset,
            self.version,
            f"; scoring {len(snaps)} evaluation(s) the crash interrupted" if snaps else "",
        )

    def _snapshot(self, saved: dict[str, Any]) -> Snapshot:
        params = saved["params"]
        if params is None:  # the checkpoint's own parameters
            params = [p.detach().clone() for p in self.model.parameters()]
        return Snapshot(int(saved["epoch"]), int(saved["step"]), int(saved["version"]), list(params))

    def record_step(self, rec: StepRecord) -> None:
        self.records.add_step(rec)
        try:
            self.divergence.observe(rec.step, rec.loss, rec.lr)
        except TrainingDiverged as exc:
            self.emit_event("diverged", loss=rec.loss, lr=rec.lr, message=str(exc))
            raise

    def emit_event(self, kind: str, **fields: Any) -> None:
        self.records.event(kind, **fields)

    def end_epoch(self, epoch: int) -> None:
        """Score this epoch's parameters in the background; the next step starts at once."""
        if not self.job.eval_every_epoch:
            return
        log.info(
            "epoch %d/%d: evaluating version %d on %s eval samples, beside training",
            epoch + 1,
            self.job.epochs,
            self.version,
            min(self.cfg.eval_samples, len(self.eval_set)) if self.cfg.eval_samples else len(self.eval_set),
        )
        self.evaluator.submit(epoch, self.step, self.version)

    def _record_evaluation(self, snap: Snapshot, score: Score) -> None:
        self.records.add_epoch(
            EpochRecord(
                epoch=snap.epoch,
                step=snap.step,
                version=snap.version,
                eval_loss=score.loss,
                eval_accuracy=score.accuracy,
                eval_s=score.seconds,
                elapsed_s=time.time() - self.records.started,
            )
        )
        log.info(
            "epoch %d/%d evaluated (version %d, %.1f s): eval loss %.4f, accuracy %s",
            snap.epoch + 1,
            self.job.epochs,
            snap.version,
            score.seconds,
            score.loss,
            "n/a" if score.accuracy is None else f"{100 * score.accuracy:.2f} %",
        )  # counted from 1, as the progress line does

    def _record_decision(self, d: Decision) -> None:
        sizes = {str(self.rank_of(w)): b for w, b in d.sizes.items()}
        log.info("batch split (%s): %s — %s", d.policy, sizes, d.reason)
        self.emit_event(
            "schedule",
            policy=d.policy,
            sizes=sizes,
            reason=d.reason,
            predicted_step_s=d.predicted_step_s,
            previous_predicted_s=d.previous_predicted_s,
            inputs={str(self.rank_of(w)): v for w, v in d.inputs.items()},
        )
        for wid, (role, why) in d.roles.items():
            h = self.admission.registry.workers.get(wid)
            if h is None:
                continue
            standby = role == "standby"
            h.set_activity("on standby" if standby else "training")
            log.warning("%s: %s — %s", h.name, "on standby" if standby else "back in the steps", why)
            self.emit_event("worker_role", rank=h.rank, role=role, reason=why)

    # -- the run ------------------------------------------------------------------------------
    async def train(self) -> dict[str, Any]:
        """Run the whole job; returns the summary (``summary.json``)."""
        await self.wait_for_workers(self.cfg.expected_workers)
        self.training = True
        self._train_started = time.perf_counter()
        if self.plane is not None:
            self.loop = CollectiveLoop(self, self.plane)
        else:
            loops = {"bsp": BSPLoop, "local": LocalLoop}
            self.loop = loops.get(self.job.sync, AsyncLoop)(self)
        try:
            epochs = await self.loop.run()
        except TrainingDiverged:
            self._at_boundary = False  # nothing worth resuming: the last periodic checkpoint stands
            await self._say_bye("training diverged")
            raise
        train_s = self.train_seconds()
        self.training = False
        return await self._finish(train_s, epochs)

    async def _say_bye(self, reason: str) -> None:
        """Let every worker go (they exit when they read it)."""
        self.admission.finishing = True
        for h in self.admission.registry.live():
            try:
                await h.conn.send(MsgType.BYE, Bye(reason).to_header())
            except (TransportError, OSError):
                pass

    async def _finish(self, train_s: float, epochs: int) -> dict[str, Any]:
        live = self.admission.registry.live()
        await self._say_bye("training finished")
        await self.evaluator.drain()  # the last epoch's score, after the workers were let go
        probes = [float(h.profile.get("probe_samples_per_s") or 0) for h in live]
        return RunSummary.of_run(
            experiment=self.cfg.experiment,
            model=self.job.model,
            dataset=self.job.dataset,
            parameters=self.numel,
            epochs=epochs,
            train_s=train_s,
            totals=self.records.totals,
            evaluations=self.records.evaluations,
            probes=probes,
            compression=self.job.compression,
            sync=self.job.sync,
        ).to_json()
