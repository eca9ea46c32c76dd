"""The worker's life: connect, learn the job, then compute gradients for as long as the master asks.

One connection, one loop, messages in the order the master sent them:

* PARAMS   — new parameters (a chunk each); loaded straight into the flat parameter buffer.
* SCHEDULE — compute the mean gradient over this step's slice of the epoch's sample order, then
  push it chunk by chunk with the job's codec. The step runs as a task beside the loop: a SCHEDULE
  may come before the PARAMS of its version (we say ``schedule_ahead``), and then the loop goes on
  reading them while the step fetches its samples and runs each layer once its chunk is in
  (``worker/overlap.py``). The next SCHEDULE, and any PARAMS the step does not wait for, wait for
  the step to end.
* CONTROL  — change run-time knobs (``simulate_slowdown``) without restarting.
* BYE      — the job is over (or the master is shutting down): leave cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict, TypeVar

import numpy as np
import psutil
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import (
    ConfigError,
    ConnectionClosed,
    HeteroPSError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
    TransportTimeout,
)
from hetero_ps.observe.profiling import StepProfiler
from hetero_ps.observe.progress import Progress
from hetero_ps.training.trainer import inner_optimizer
from hetero_ps.wire import codecs, collective, transport
from hetero_ps.wire.collective import CollectiveError, Group
from hetero_ps.wire.messages import (
    Bye,
    Control,
    Heartbeat,
    Hello,
    Metrics,
    Params,
    Schedule,
    StepReport,
    Welcome,
    chunk_layout,
    push_from_codec,
)
from hetero_ps.wire.protocol import Message, MsgType, raise_if_error
from hetero_ps.wire.tls import ClientTLS
from hetero_ps.worker.collective_step import CollectiveMember
from hetero_ps.worker.dgc import MomentumCorrection
from hetero_ps.worker.overlap import ChunkReadiness, PullArrival
from hetero_ps.worker.pacing import BandwidthPacer
from hetero_ps.worker.profile import (
    calibrate,
    estimate_max_batch,
    hardware_profile,
    resolve_device,
)

log = logging.getLogger("hetero_ps.worker")
_T = TypeVar("_T")


@dataclass(frozen=True)
class WorkerConfig:
    """How this node reaches the master and behaves; the job itself comes from the master."""

    master_addr: str = "127.0.0.1"  # the master's address (MASTER_ADDR)
    master_port: int = 29500  # the master's port (MASTER_PORT)
    token: str = ""  # shared secret (HETERO_PS_TOKEN)
    tls: ClientTLS | None = None  # TLS to the master, checking its certificate (--tls-ca / --tls-fingerprint)
    rank: int = -1  # RANK; -1 lets the master pick
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    connect_timeout: float = 60.0  # give up reaching the master after this many seconds
    reconnect_timeout: float = 600.0  # after losing a master we had joined, try to rejoin this long (0: exit)
    simulate_slowdown: float = 1.0  # compute takes this many times as long (heterogeneity in tests)
    simulate_bandwidth: float = 0.0  # pace pushes and pulls to this many Mbit/s (0 = the real link)
    calibrate: bool = True  # probe the job's model at join so the first split fits
    torch_threads: int = 0  # torch.set_num_threads (0 = torch's default)
    experiments_dir: str = "experiments"  # where this node writes its log (experiment name from master)
    profile_steps: int = 0  # record a torch.profiler trace of this many steps (after one warm-up)
    log_format: str = "plain"  # plain | json (progress output)


async def connect_with_retry(cfg: WorkerConfig, hello: Hello) -> tuple[transport.Connection, Message]:
    """Connect to the master, retrying with exponential backoff until ``connect_timeout``.

    Refused or unreachable addresses are retried (the master may still be starting); a wrong
    token or version is final and raised at once.
    """
    deadline = time.monotonic() + cfg.connect_timeout
    delay, attempt, last = 0.2, 0, None
    while True:
        attempt += 1
        try:
            return await transport.connect(
                cfg.master_addr,
                cfg.master_port,
                token=cfg.token,
                hello=hello,
                timeout=min(10.0, max(1.0, deadline - time.monotonic())),
                tls=cfg.tls,
            )
        except (OSError, TransportError) as exc:
            last = exc
        if time.monotonic() + delay > deadline:
            raise ConnectionClosed(
                f"could not reach the master at {cfg.master_addr}:{cfg.master_port} after {attempt} attempts "
                f"in {cfg.connect_timeout:.0f} s (last error: {last}). Is `python -m hetero_ps.server` running "
                f"there, is MASTER_ADDR right, and is the port open (e.g. `sudo ufw allow {cfg.master_port}/tcp`)?"
            )
        log.info(
            "master %s:%d not reachable yet (%s); retrying in %.1f s", cfg.master_addr, cfg.master_port, last, delay
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0) * (0.8 + 0.4 * random.random())


class _Interval(TypedDict):
    """What a StepReport says about the interval before its step (since our previous push)."""

    push_s: float
    wait_s: float
    pull_s: float
    bytes_in: int


@dataclass
class _Pushing:
    """One step's pushes: which chunks are ready (``None``: backward is over, push the rest) and the totals."""

    step: int
    attempt: int
    carry: list[np.ndarray | None] | None  # owed by the previous push codec, added to this step's chunks
    ready: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    backward_done: bool = False  # pushes from now on are not "early"
    encode_s: float = 0.0
    push_s: float = 0.0
    nbytes: int = 0


class Worker:
    """One training node."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.slowdown = cfg.simulate_slowdown
        self.conn: transport.Connection | None = None
        self.heartbeat_s = 0.0  # from WELCOME: say HEARTBEAT when nothing else was sent for this long
        self.joined = False  # a master has welcomed us (in this run)
        self.steps_done = 0
        self.samples_done = 0
        self._prev: _Interval = {"push_s": 0.0, "wait_s": 0.0, "pull_s": 0.0, "bytes_in": 0}
        self._push_done_at = 0.0
        # callback(experiment, rank): the CLI adds the experiment's log file
        self.on_welcome: Callable[[str, int], None] | None = None
        self._proc = psutil.Process()
        self.pacer: BandwidthPacer | None = None
        self._set_bandwidth(cfg.simulate_bandwidth)
        self._feedback: list[np.ndarray | None] | None = None  # top-k residuals before the current step
        self._feedback_step = -1  # the step they were saved for
        self._carry: list[np.ndarray | None] | None = None  # owed by the push codec before a switch...
        self._carry_step = -1  # ...added to this step's gradient
        self._stepping: asyncio.Task[None] | None = None  # the step being computed, beside the loop
        self._awaiting: int | None = None  # the parameter version that step waits for (PARAMS still to come)
        self._pulled = asyncio.Event()  # set while no parameters are awaited
        self._pulled.set()
        self._step_group: int | None = None  # gloo/nccl: the group of the step in flight...
        self._step_abandoned = asyncio.Event()  # ...set when the master gave that group up
        self.member: CollectiveMember | None = None  # gloo/nccl: this node's part of the plane
        self._inner: torch.optim.Optimizer | None = None  # --sync local: the inner optimizer
        self._inner_build: asyncio.Future | None = None  # ...being built in the background

    async def run_and_rejoin(self) -> dict:
        """``run``; when the master goes away mid-job, rejoin it (with our rank) for ``reconnect_timeout``.

        A master restarted on the same address and port takes us back; the job comes again in its
        WELCOME. A wrong token, another version or an ERROR from the master are final, as at the start.
        """
        rejoin_until = None  # set once we have lost a master we had joined
        while True:
            self.joined = False
            try:
                return await self.run()
            except RemoteError as exc:
                # The master may still hold our old connection (it has not seen it die yet): wait for it.
                if rejoin_until is None or exc.code != "rank_taken" or time.monotonic() > rejoin_until:
                    raise
                log.info("rank %d is still held by our old connection on the master; retrying", self.rank)
                await asyncio.sleep(2.0)
            except ConnectionClosed as exc:
                if not self.joined or self.cfg.reconnect_timeout <= 0:
                    raise
                log.warning(
                    "lost the master at %s:%d (%s); waiting for it to come back, rejoining as rank %d "
                    "for up to %.0f s (--reconnect-timeout)",
                    self.cfg.master_addr,
                    self.cfg.master_port,
                    exc,
                    self.rank,
                    self.cfg.reconnect_timeout,
                )
                self.cfg = dataclasses.replace(self.cfg, rank=self.rank, connect_timeout=self.cfg.reconnect_timeout)
                rejoin_until = time.monotonic() + self.cfg.reconnect_timeout

    async def run(self) -> dict:
        """Join, train until BYE, return a small summary."""
        hello = Hello(
            rank=self.cfg.rank,
            host=socket.gethostname(),
            device=self.device,
            profile=hardware_profile(self.device),
            schedule_ahead=True,
        )
        self.conn, welcome = await connect_with_retry(self.cfg, hello)
        w = await self._parse(Welcome, welcome.header)
        self.wid, self.rank = w.worker_id, w.rank
        self.joined = True
        # A rejoin starts afresh: nothing from the previous master's job carries over.
        self._feedback, self._feedback_step, self._push_done_at = None, -1, 0.0
        self._carry, self._carry_step = None, -1
        self._prev = {"push_s": 0.0, "wait_s": 0.0, "pull_s": 0.0, "bytes_in": 0}
        self._stepping, self._awaiting = None, None
        self._pulled.set()
        self._inner, self._inner_build = None, None
        self._batches = 0
        self.heartbeat_s = w.heartbeat_s
        self.job = JobConfig.from_wire(w.job)
        if self.on_welcome:
            self.on_welcome(w.experiment, self.rank)
        log.info(
            "joined master %s:%d as rank %d (worker id %d) on %s; experiment %s%s",
            self.cfg.master_addr,
            self.cfg.master_port,
            self.rank,
            self.wid,
            self.device,
            w.experiment,
            f"; over {self.conn.tls_version}" if self.conn.tls_version else "",
        )
        keep_alive = asyncio.ensure_future(self._keep_alive(self.conn)) if self.heartbeat_s else None
        try:
            return await self._take_part(w)
        finally:
            if keep_alive is not None:
                keep_alive.cancel()
            await self.conn.close()

    async def _take_part(self, w: Welcome) -> dict:
        """Set up the job the master sent, calibrate, say we are ready, and train until BYE."""
        from hetero_ps.training import data, models
        from hetero_ps.training.flat import FlatParams
        from hetero_ps.training.trainer import LocalTrainer

        conn = self.conn
        assert conn is not None, "run() connects first"

        def build() -> tuple:  # in a thread: a big data set or model takes a while to load
            train_set, _, info = data.load_datasets(self.job)
            model = models.build_model(self.job, info).to(self.device)
            return train_set, info, model

        try:
            train_set, info, model = await asyncio.to_thread(build)
            self.flat = FlatParams(model)
            if self.flat.numel != w.numel:
                raise ConfigError(
                    f"this node builds {self.job.model} with {self.flat.numel} parameters but the master's has "
                    f"{w.numel}: the two nodes run different code or library versions"
                )
            self.trainer = LocalTrainer(self.job, model, self.flat, train_set, info, self.device)
        except (HeteroPSError, ImportError, RuntimeError) as exc:
            await conn.send_error("job_setup_failed", f"rank {self.rank}: {exc}")
            raise HeteroPSError(f"cannot set up the job: {exc}") from exc
        self.sampler = data_sampler(self.job, len(train_set))
        self.progress = Progress(w.total_steps, f"worker[{self.rank}]", self.cfg.log_format, epochs=self.job.epochs)
        self.profiler = None
        if self.cfg.profile_steps:
            self.profiler = StepProfiler(
                os.path.join(self.cfg.experiments_dir, w.experiment or "default", "profiles"),
                steps=self.cfg.profile_steps,
                rank=self.rank,
                skip=1,
                device=self.device,
            )
        self._setup_codecs()
        self.member = None
        if self.job.collective:
            missing = collective.backend_available(self.job.backend)
            if missing:
                await conn.send_error("backend_unsupported", f"rank {self.rank} ({socket.gethostname()}): {missing}")
                raise HeteroPSError(f"cannot join the {self.job.backend} plane: {missing}")
            self.member = CollectiveMember(
                self.job,
                self.params_cpu,
                self.chunks,
                self.cfg.master_addr,
                f"rank {self.rank} ({socket.gethostname()})",
                w.total_steps,
                self.device,
            )
        conn.set_payload_allocator(self._allocate)
        ready = Metrics(ready=True, probe=await self._calibrate(len(train_set)))
        await conn.send(MsgType.METRICS, ready.to_header())
        if self.job.sync == "local" or (self.job.sync == "bsp" and self.job.load_balancing):
            # Rounds of local steps (--sync local, or a BSP worker on standby) step the job's optimizer,
            # and torch's first one imports torch._dynamo: 1.5 s, 4+ s on a loaded machine. Built now,
            # beside the first steps, a first round does not spend that (and pass its stall limit).
            self._inner_build = asyncio.ensure_future(asyncio.to_thread(inner_optimizer, self.job, self.flat))
        try:
            with self.progress.redirect_logging():
                return await self._loop()
        finally:
            self.progress.close()
            if self.member is not None:
                self.member.close()

    async def _recv_from_master(self, conn: transport.Connection) -> Message:
        """The next message; a master silent for four heartbeat periods is gone (cable pulled, host
        frozen: no reset ever comes), which ``run_and_rejoin`` treats like a closed connection.

        A live master is never that quiet: it sends an idle worker a HEARTBEAT whenever it has heard
        nothing from it for one period, and this worker answers each one."""
        silence = 4 * self.heartbeat_s if self.heartbeat_s else None
        try:
            return await conn.recv(timeout=silence)
        except TransportTimeout:
            raise ConnectionClosed(
                f"no word from the master in {silence:.0f} s, though it heartbeats idle workers: "
                "it is gone or unreachable"
            ) from None

    async def _keep_alive(self, conn: transport.Connection) -> None:
        """Say HEARTBEAT whenever nothing was sent for ``heartbeat_s``, so the master hears from us while
        we compute, calibrate, load data or receive a long pull (it then sends us nothing we could answer).

        A frame being sent counts only once it is out: a HEARTBEAT then queues behind it, which is fine."""
        sent = -1
        while not conn.closed:
            await asyncio.sleep(self.heartbeat_s)
            if conn.frames_sent == sent:
                try:
                    await conn.send(MsgType.HEARTBEAT, Heartbeat(time.time()).to_header())
                except (TransportError, OSError):
                    return  # the receive loop sees the connection end and says why
            sent = conn.frames_sent

    async def _parse(self, cls, header: dict):
        """The typed message, or tell the master what was malformed and stop."""
        try:
            return cls.from_header(header)
        except RemoteProtocolError as exc:
            conn = self.conn
            assert conn is not None, "messages arrive only once connected"
            await conn.send_error("protocol_error", f"rank {getattr(self, 'rank', -1)}: {exc}")
            raise

    async def _calibrate(self, n_samples: int) -> dict:
        """A short probe of the real model so the master's first split already fits this node."""
        if not self.cfg.calibrate:
            return {}
        probe = await asyncio.to_thread(calibrate, self.trainer, n_samples, slowdown=self.slowdown)
        probe["max_batch"] = await asyncio.to_thread(
            estimate_max_batch, self.trainer, self.device, max(self.job.global_batch // 4, 8)
        )
        log.info(
            "calibration: %.0f samples/s, largest batch %s",
            probe.get("probe_samples_per_s", 0.0),
            probe["max_batch"] or "unbounded",
        )
        return probe

    # -- buffers and codecs -------------------------------------------------------------------
    def _setup_codecs(self) -> None:
        n = self.flat.numel
        self.chunks = chunk_layout(n, self.job.chunk_bytes)
        # With --compression auto the master names the push codec in each SCHEDULE: none until then.
        self.push_spec = "none" if codecs.is_auto(self.job.compression) else self.job.compression
        self.push_codecs = [codecs.make_codec(self.push_spec, numel) for _, numel in self.chunks]
        self.pull_codecs: dict[str, list[codecs.Codec]] = {}  # by the codec each PARAMS frame names
        # Parameters live on the CPU for the wire; on a GPU node they are copied in once per step.
        self.params_cpu = self.flat.params if self.device == "cpu" else torch.empty(n, dtype=torch.float32)
        self.grads_cpu = self.flat.grads if self.device == "cpu" else torch.empty(n, dtype=torch.float32)
        self.readiness = ChunkReadiness(self.flat, self.chunks)
        # Layer by layer on the CPU with a built-in model; else the whole pull first (worker/overlap.py).
        from hetero_ps.training.plugins import is_plugin_name

        per_layer = self.device == "cpu" and not is_plugin_name(self.job.model)
        self.arrival = PullArrival(self.trainer.model, self.flat, self.chunks, per_layer)
        self.dgc: MomentumCorrection | None = None  # the job's --momentum-correction (top-k pushes)
        if self.job.momentum_correction:
            ratio = codecs.parse_codec(self.job.compression).ratio
            self.dgc = MomentumCorrection(self.job.momentum or 0.0, ratio, self.job.warmup_steps or 0, len(self.chunks))
        self.params_np = self.params_cpu.numpy()

    def _allocate(self, msg_type, header, nbytes):
        """Uncompressed parameter chunks land straight in the parameter buffer (zero copy), unless a
        step is computing on the parameters and does not wait for these (the loop holds them back)."""
        if msg_type != MsgType.PARAMS or header.get("codec") != "none" or header.get("state") is not None:
            return None
        if self._stepping is not None and header.get("version") != self._awaiting:
            return None
        off, numel = header.get("offset"), header.get("numel")
        if not (
            isinstance(off, int)
            and isinstance(numel, int)
            and off >= 0
            and off + numel <= self.flat.numel
            and nbytes == 4 * numel
        ):
            return None  # let the decoder allocate; the handler rejects the header with a clear error
        return memoryview(self.params_np[off : off + numel]).cast("B")

    # -- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> dict:
        conn = self.conn
        assert conn is not None, "run() connects before the loop"
        try:
            while True:
                msg = await self._next_message(conn)
                t = msg.type
                if t == MsgType.PARAMS:
                    p = await self._parse(Params, msg.header)
                    if self._stepping is not None and p.version != self._awaiting:
                        if self.member is not None:  # a collective step still out was given up: new parameters
                            self._step_abandoned.set()
                        await self._finish_step()  # not the step's own parameters: not while it computes
                    self._on_params(p, msg.segments)
                    if self.pacer is not None:  # a simulated slow link: the pull takes its time
                        self._prev["pull_s"] += await self.pacer.pace(
                            sum(memoryview(seg).nbytes for seg in msg.segments)
                        )
                elif t == MsgType.SCHEDULE:
                    s = await self._parse(Schedule, msg.header)
                    if self.member is not None and s.group != self._step_group:
                        self._step_abandoned.set()  # its group was given up: stop waiting for it (below)
                    await self._finish_step()
                    self._begin_step(s)
                elif t == MsgType.CONTROL:
                    self._on_control(await self._parse(Control, msg.header))
                elif t == MsgType.HEARTBEAT:
                    await conn.send(MsgType.HEARTBEAT, Heartbeat(time.time()).to_header())
                elif t == MsgType.BYE:
                    reason = (await self._parse(Bye, msg.header)).reason or ""
                    await self._cancel_step()  # a step still in flight no longer matters
                    log.info(
                        "master says bye (%s) after %d steps, %d samples", reason, self.steps_done, self.samples_done
                    )
                    return {"steps": self.steps_done, "samples": self.samples_done, "rank": self.rank, "reason": reason}
                elif t == MsgType.ERROR:
                    raise_if_error(msg)
                else:
                    log.warning("ignoring unexpected %s from master", t.name)
        finally:
            await self._cancel_step()

    async def _next_message(self, conn: transport.Connection) -> Message:
        """The next message from the master; a step that fails meanwhile raises here at once."""
        recv = asyncio.ensure_future(self._recv_from_master(conn))
        try:
            while self._stepping is not None and not recv.done():
                await asyncio.wait({recv, self._stepping}, return_when=asyncio.FIRST_COMPLETED)
                if self._stepping.done():
                    await self._finish_step()
            return await recv
        finally:
            if not recv.done():
                recv.cancel()

    def _begin_step(self, s: Schedule) -> None:
        """Start the step ``s`` as a task; when its version's parameters are still to come, its layers
        wait for their chunks (set up here, before the loop reads the first of them)."""
        if s.ahead and s.version != getattr(self, "version", -1):
            self._awaiting = s.version
            self._pulled.clear()
            self.arrival.expect()
        self._step_group = s.group
        self._step_abandoned = asyncio.Event()
        self._stepping = asyncio.ensure_future(self._on_schedule(s))

    async def _finish_step(self) -> None:
        """Wait for the step in flight, if any (its failure is raised)."""
        task = self._stepping
        if task is None:
            return
        try:
            await task
        finally:
            self._stepping = None

    async def _cancel_step(self) -> None:
        """Stop the step in flight, if any, and release its compute thread from any wait for parameters."""
        task, self._stepping = self._stepping, None
        if task is None:
            return
        self.arrival.abort()
        if not task.done():
            task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - it is being thrown away
            pass

    def _on_params(self, p: Params, segments: tuple) -> None:
        t0 = time.perf_counter()
        off, numel = p.offset, p.numel
        if p.chunk >= len(self.chunks) or self.chunks[p.chunk] != (off, numel):
            raise ConfigError(f"master sent a parameter chunk {p.chunk} ({off}+{numel}) this node does not have")
        if p.state is not None and self.member is None:
            raise RemoteProtocolError("PARAMS.state: optimizer state is sent only on a collective plane")
        if self.member is not None:  # a collective plane: full parameters (and the optimizer's state)
            if p.state is not None:
                self.member.load_state(p, segments[0])
                return
            self.member.drop_pending()
        if p.delta:  # the change since what we hold: added, exactly as the master added it to our replica
            if p.base != getattr(self, "version", -1):
                raise ConfigError(
                    f"master sent a parameter change from version {p.base}, this node holds "
                    f"{getattr(self, 'version', 'none')}"
                )
            self._pull_codec(p.codec, p.chunk).decode_accumulate(
                self.params_cpu[off : off + numel].numpy(), p.codec_header(), segments, 1.0
            )
        elif p.codec != "none":
            self._pull_codec(p.codec, p.chunk).decode_into(
                self.params_cpu[off : off + numel].numpy(), p.codec_header(), segments
            )
        elif not _same_buffer(segments[0], self.params_np, off):
            self.params_np[off : off + numel] = np.frombuffer(segments[0], dtype=np.float32)
        if self._awaiting is not None and self.device == "cpu":
            self.arrival.arrived(p.chunk)  # the layers reading it may run
        if p.chunk == len(self.chunks) - 1:
            if self.device != "cpu":
                self.flat.params.copy_(self.params_cpu, non_blocking=False)
            self.version = p.version
            if self._awaiting is not None:
                self._awaiting = None
                self.arrival.complete()  # (on a GPU: only now, once copied over)
                self._pulled.set()
        self._prev["pull_s"] += time.perf_counter() - t0
        self._prev["bytes_in"] += sum(len(s) for s in segments)

    def _pull_codec(self, spec: str, chunk: int) -> codecs.Codec:
        if spec not in self.pull_codecs:
            try:
                self.pull_codecs[spec] = [codecs.make_codec(spec, numel) for _, numel in self.chunks]
            except ConfigError as exc:
                raise RemoteProtocolError(f"PARAMS.codec: {exc}") from None
        return self.pull_codecs[spec][chunk]

    def _use_push_codec(self, spec: str, step: int) -> None:
        """Push with ``spec`` from this step on (the master's choice under --compression auto).

        What an error-feedback codec (top-k, PowerSGD) still owed is not lost: it is added to this
        step's gradient (``_carry``), again if the step is redone, and dropped once a later step starts."""
        if codecs.is_auto(spec):
            raise RemoteProtocolError("SCHEDULE.compression: required (a codec, not auto) when the job's is auto")
        try:
            fresh = [codecs.make_codec(spec, numel) for _, numel in self.chunks]
        except ConfigError as exc:
            raise RemoteProtocolError(f"SCHEDULE.compression: {exc}") from None
        owed = [c.feedback() for c in self.push_codecs]
        if any(r is not None for r in owed):
            self._carry = [None if r is None else r.copy() for r in owed]
            self._carry_step = step
        self.push_codecs, self.push_spec = fresh, spec
        self._feedback, self._feedback_step = None, -1
        log.info("pushing with %s from step %d on (the master's choice for this link)", spec, step)

    def _on_control(self, c: Control) -> None:
        if c.simulate_slowdown is not None:
            self.slowdown = max(1.0, c.simulate_slowdown)
            log.info("simulate_slowdown set to %.2f by the master", self.slowdown)
        if c.simulate_bandwidth is not None:
            self._set_bandwidth(c.simulate_bandwidth)
            log.info("simulate_bandwidth set to %s Mbit/s by the master", c.simulate_bandwidth or "unlimited")

    def _set_bandwidth(self, mbit: float) -> None:
        if mbit and mbit > 0:
            if self.pacer is None:
                self.pacer = BandwidthPacer(mbit)
            else:
                self.pacer.set_rate(mbit)
        else:
            self.pacer = None

    async def _on_schedule(self, s: Schedule) -> None:
        conn = self.conn
        assert conn is not None, "schedules arrive only once connected"
        step, attempt, count = s.step, s.attempt, s.count
        try:
            indices = self.sampler.indices(s.epoch, s.offset, count)
        except ValueError as exc:
            await conn.send_error("bad_schedule", f"rank {self.rank}: {exc}")
            raise ConfigError(f"the master scheduled samples this node does not have: {exc}") from exc
        if self.member is not None:
            await self._collective_step(s, indices)
            return
        if s.discarded is not None:
            self._take_back(s.discarded, step)
        if self._carry is not None and step != self._carry_step:
            self._carry = None  # delivered with the step it was added to
        spec = s.compression or self.job.compression
        if spec != self.push_spec:
            try:
                self._use_push_codec(spec, step)
            except RemoteProtocolError as exc:
                await conn.send_error("protocol_error", f"rank {self.rank}: {exc}")
                raise
        if self._push_done_at:  # from our last push to this schedule: barrier, optimizer and pull
            self._prev["wait_s"] = time.perf_counter() - self._push_done_at - self._prev["pull_s"]
        self._keep_feedback_exact(step, attempt)  # before any chunk is encoded (encoding moves the residuals)
        pushing = _Pushing(step, attempt, self._carry if self._carry_step == step else None)
        pusher = asyncio.ensure_future(self._push_as_ready(pushing))
        profiled = self.profiler is not None and not self.profiler.done and not s.local_steps
        if profiled or s.local_steps:  # computed on this thread (below) / steps every parameter: needs all of them
            t_wait = time.perf_counter()
            await self._pulled.wait()
            if s.local_steps:  # the pull's time, as a step's forward waiting for it counts it below
                self._prev["pull_s"] = max(self._prev["pull_s"], time.perf_counter() - t_wait)
        inner = await self._inner_optimizer() if s.local_steps else None
        held = self.arrival.expecting  # forward may be held for parameters still on the wire...
        t0 = time.perf_counter()
        try:
            if inner is not None:  # a round of local steps (--sync local, standby): pushes the parameter change
                stats = await asyncio.to_thread(
                    self.trainer.local_round, indices, s.local_steps, inner, float(s.lr or 0.0)
                )
                if stats.nonfinite:
                    log.warning("step %d: a non-finite inner step; its round is not applied, optimizer reset", step)
                    self._inner = None
            elif profiled:
                assert self.profiler is not None
                # torch's profiler records the thread that started it: compute here for profiled steps.
                with self.profiler.step(step):
                    stats = self.trainer.compute_gradient(indices)
            else:
                # On the CPU each chunk is pushed as soon as backward finished it (worker/overlap.py).
                arm = self._arm_readiness(pushing) if self.device == "cpu" and self.job.overlap else None
                stats = await asyncio.to_thread(self.trainer.compute_gradient, indices, arm)
            compute_s = time.perf_counter() - t0
            if held:  # ...which is the pull's time, not compute's (the scheduler's model needs compute alone):
                compute_s = max(0.0, compute_s - self.arrival.waited_s)
                # what the pull cost this step (its decoding and a paced link ran inside that wait)
                self._prev["pull_s"] = max(self._prev["pull_s"], self.arrival.waited_s)
            if self.slowdown > 1.0:  # a slower machine, simulated: stretch the compute time
                await asyncio.sleep(compute_s * (self.slowdown - 1.0))  # (its backward would still run)
                compute_s *= self.slowdown
            pushing.backward_done = True
            if self.device != "cpu":
                self.grads_cpu.copy_(self.flat.grads)
            pushing.ready.put_nowait(None)  # and the rest, in order
            await pusher
        finally:
            self.readiness.disarm()
            if not pusher.done():
                pusher.cancel()
            elif not pusher.cancelled():
                pusher.exception()  # seen: a push that failed while compute raised is not "never retrieved"
        encode_s, push_s, nbytes = pushing.encode_s, pushing.push_s, pushing.nbytes
        await self._pulled.wait()  # the version we report (its last chunks may hold unused parameters)
        # wait_s / pull_s / bytes_in: from our last push to this step's start, and the pull of its parameters.
        prev, self._prev = self._prev, {"push_s": 0.0, "wait_s": 0.0, "pull_s": 0.0, "bytes_in": 0}
        report = StepReport(
            loss=float(stats.loss),
            samples=stats.count,
            compute_s=compute_s,
            encode_s=encode_s,
            push_s=push_s,
            bytes_out=nbytes,
            nonfinite=bool(stats.nonfinite),
            version=getattr(self, "version", 0),
            wait_s=prev["wait_s"],
            pull_s=prev["pull_s"],
            bytes_in=prev["bytes_in"],
            util=self._utilisation(),
        )
        await conn.send(MsgType.METRICS, Metrics(step=step, attempt=attempt, report=report).to_header())
        self._push_done_at = time.perf_counter()
        self.steps_done += 1
        self.samples_done += count
        # The progress clock counts global batches: a --sync local round is local_steps of them
        # (counted from this node's first round: one joining late shows less than the master's).
        self._batches = self._batches + s.local_steps if s.local_steps else step + 1
        self.progress.update(
            self._batches - 1, s.epoch, stats.loss, count / max(1e-9, compute_s + encode_s + push_s), count
        )

    async def _collective_step(self, s: Schedule, indices) -> None:
        """One step on a collective plane (worker/collective_step.py): settle the last step's update,
        join the step's group, compute (each chunk's all-reduce starting as backward finishes it on the
        CPU), finish the all-reduce, report. A group it cannot join is reported at once."""
        conn, member = self.conn, self.member
        assert conn is not None and member is not None, "a collective plane's steps come once connected"
        t_wait = time.perf_counter()
        group, error = await self._settle_and_join(s)
        self._prev["wait_s"] = time.perf_counter() - t_wait  # (settling the last update: an optimizer step)
        if group is None:
            if error is not None:  # (None: the master gave this group up meanwhile: nothing to say)
                log.warning("step %d: %s", s.step, error)
                await self._report_collective(s, None, 0.0, None, error)
            return
        staged = self.device != "cpu" and member.backend == "gloo"  # (a GPU's gradient goes through host memory)
        reduction = member.reduction(group, self.grads_cpu if staged else self.flat.grads, s.count / s.total)
        arm = None
        if self.device == "cpu" and self.job.overlap:

            def arm() -> None:  # each chunk's all-reduce starts as soon as backward has finished it
                self.readiness.arm(reduction.on_ready)

        t0 = time.perf_counter()
        try:
            stats = await asyncio.to_thread(self.trainer.compute_gradient, indices, arm)
        finally:
            self.readiness.disarm()
        compute_s = time.perf_counter() - t0
        if self.slowdown > 1.0:  # a slower machine, simulated: stretch the compute time
            await asyncio.sleep(compute_s * (self.slowdown - 1.0))
            compute_s *= self.slowdown
        if self._step_abandoned.is_set():
            return  # the group was given up while we computed: the redo's SCHEDULE is next
        if staged:
            self.grads_cpu.copy_(self.flat.grads)
        cost = None
        try:
            result = await self._unless_abandoned(collective.in_thread(reduction.finish, "hetero_ps-reduce"))
            if result is None:
                return
            total, cost = result
            member.keep(s.step, total, s.lr or 0.0)  # (_settle_and_join checked it is there)
        except CollectiveError as exc:
            error = str(exc)
            log.warning("step %d: %s", s.step, error)
        await self._report_collective(s, stats, compute_s, cost, error)

    async def _settle_and_join(self, s: Schedule) -> tuple[Group | None, str | None]:
        """Apply (or drop) the last step's update as ``s`` says, check we hold ``s.version``, and be
        in ``s``'s group: ``(group, None)``, or ``(None, why not)``."""
        conn, member = self.conn, self.member
        assert conn is not None and member is not None, "a collective plane's steps come once connected"
        if s.group is None or s.lr is None:
            await conn.send_error("protocol_error", f"rank {self.rank}: SCHEDULE.group: required on a collective plane")
            raise RemoteProtocolError("SCHEDULE.group: required on a collective plane")
        if await asyncio.to_thread(member.settle, s, getattr(self, "version", -1)):
            self.version = getattr(self, "version", 0) + 1
            if self.device != "cpu":
                self.flat.params.copy_(self.params_cpu, non_blocking=False)
        if getattr(self, "version", -1) != s.version:
            held = getattr(self, "version", None)
            msg = f"rank {self.rank} holds parameter version {held}, the step is on {s.version}"
            await conn.send_error("out_of_step", msg)
            raise ConfigError(f"out of step with the master: {msg}")
        if not member.needs_group(s):
            return member.group, None
        member.use(None)  # (the last group is over: this step names another)
        joining = collective.in_thread(lambda: member.join(s, conn.local_address), "hetero_ps-join")
        try:
            group = await self._unless_abandoned(joining)
        except CollectiveError as exc:
            return None, str(exc)
        except ConfigError as exc:  # this node cannot take part: say why and leave; the others go on
            await conn.send_error("collective_setup_failed", str(exc))
            raise HeteroPSError(f"cannot join the {member.backend} plane: {exc}") from None
        if group is None:  # given up: a group it still forms is left at once
            joining.add_done_callback(_abandon_joined)
        member.use(group)
        return group, None  # (None, None): the master gave the group up meanwhile

    async def _unless_abandoned(self, fut: asyncio.Future[_T]) -> _T | None:
        """The result of ``fut`` (a join or an all-reduce on its own thread), or None as soon as the
        master gives the step's group up: the thread may stay blocked in it until its
        timeout, but this node goes on (its compute and optimizer threads are always awaited: they end)."""
        gave_up: asyncio.Future[object] = asyncio.ensure_future(self._step_abandoned.wait())
        waiting: set[asyncio.Future[object]] = {fut, gave_up}  # type: ignore[arg-type]  # (either ends the wait)
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gave_up.cancel()
        if fut.done():
            return fut.result()
        fut.add_done_callback(_retrieved)
        return None

    async def _report_collective(self, s: Schedule, stats, compute_s: float, cost, error: str | None) -> None:
        """The METRICS of a collective step (``stats`` None: it never computed, its group failed)."""
        conn = self.conn
        assert conn is not None, "reports go out once connected"
        prev, self._prev = self._prev, {"push_s": 0.0, "wait_s": 0.0, "pull_s": 0.0, "bytes_in": 0}
        nbytes = cost.nbytes if cost else 0
        report = StepReport(
            loss=float(stats.loss) if stats else float("nan"),
            samples=stats.count if stats else 0,
            compute_s=compute_s,
            encode_s=cost.cast_s if cost else 0.0,
            push_s=cost.reduce_s if cost else 0.0,  # with its wait for the slowest member (the master splits them)
            bytes_out=nbytes,
            nonfinite=bool(stats.nonfinite) if stats else False,
            version=s.version,
            wait_s=prev["wait_s"],
            pull_s=prev["pull_s"],
            bytes_in=prev["bytes_in"] + nbytes,
            util=self._utilisation(),
            collective_error=error,
        )
        await conn.send(MsgType.METRICS, Metrics(step=s.step, attempt=s.attempt, report=report).to_header())
        if stats is None:
            return
        self.steps_done += 1
        self.samples_done += s.count
        self._batches = s.step + 1
        self.progress.update(s.step, s.epoch, stats.loss, s.count / max(1e-9, compute_s), s.count)

    async def _inner_optimizer(self) -> torch.optim.Optimizer:
        """Rounds of local steps: this node's own optimizer, kept from round to round (DiLoCo's inner
        optimizer); the one built in the background since the node was ready, or a new one (after a
        non-finite round) built off the event loop."""
        if self._inner is None:
            build, self._inner_build = self._inner_build, None
            if build is None:
                build = asyncio.ensure_future(asyncio.to_thread(inner_optimizer, self.job, self.flat))
            self._inner = await build
        return self._inner

    def _arm_readiness(self, pushing: _Pushing) -> Callable[[], None]:
        """What the trainer calls before its last backward: from then on, each chunk backward finishes
        is queued for the pusher (from backward's thread)."""
        loop = asyncio.get_running_loop()

        def queue(chunk: int) -> None:
            loop.call_soon_threadsafe(pushing.ready.put_nowait, chunk)

        def arm() -> None:
            self.readiness.arm(queue)

        return arm

    async def _push_as_ready(self, pushing: _Pushing) -> None:
        """Push each chunk as it is queued; on ``None`` (backward is over) every chunk not pushed yet."""
        pushed = [False] * len(self.chunks)
        while True:
            chunk = await pushing.ready.get()
            todo = [c for c in range(len(self.chunks)) if not pushed[c]] if chunk is None else [chunk]
            for c in todo:
                if not pushed[c]:
                    pushed[c] = True
                    await self._push_chunk(pushing, c)
            if chunk is None:
                return

    async def _push_chunk(self, pushing: _Pushing, i: int) -> None:
        conn = self.conn
        assert conn is not None, "pushes happen only once connected"
        off, numel = self.chunks[i]
        te = time.perf_counter()
        chunk = self.grads_cpu.numpy()[off : off + numel]
        carry = pushing.carry
        if carry is not None and carry[i] is not None:
            chunk = chunk + carry[i]  # a copy: a redone step adds it to its new gradient again
        codec = self.push_codecs[i]
        if self.dgc is not None:  # top-k of the accumulated velocity (worker/dgc.py)
            assert isinstance(codec, codecs.TopKCodec), "the job refuses momentum correction without top-k"
            codec.k = self.dgc.k(pushing.step, numel)
            chunk = self.dgc.velocity(i, chunk)
        fields, segments = codec.encode(chunk)
        if self.dgc is not None:
            self.dgc.mask(i, np.frombuffer(segments[0], dtype=np.int32))
        tp = time.perf_counter()
        push = push_from_codec(
            fields, step=pushing.step, attempt=pushing.attempt, chunk=i, offset=off, numel=numel, codec=self.push_spec
        )
        early = not pushing.backward_done
        if early:
            push = dataclasses.replace(push, early=True)
        await conn.send(MsgType.PUSH, push.to_header(), segments)
        sent = sum(memoryview(s).nbytes for s in segments)
        if self.pacer is not None:
            await self.pacer.pace(sent)
        pushing.nbytes += sent
        if not early:  # time spent while backward ran did not lengthen the step: the scheduler must not count it
            pushing.encode_s += tp - te
            pushing.push_s += time.perf_counter() - tp

    def _keep_feedback_exact(self, step: int, attempt: int) -> None:
        """An error-feedback codec's residual (top-k, PowerSGD) must not count an aborted attempt's values as sent.

        Before each step the residuals are copied (one memcpy of the gradient); when the master
        redoes the same step (a worker was lost), they are put back first.
        """
        carried = [c for c in self.push_codecs if c.error_feedback]
        if not carried:
            return
        if attempt > 0 and self._feedback_step == step:
            self._restore_feedback()
            return
        if self._feedback is None or any(x is None for x in self._feedback):
            self._feedback = [None if (r := c.feedback()) is None else np.empty_like(r) for c in carried]
        for c, saved in zip(carried, self._feedback):
            if saved is not None:
                saved[:] = c.feedback()
        if self.dgc is not None:
            self.dgc.save()  # the velocities move with the residuals
        self._feedback_step = step

    def _restore_feedback(self) -> None:
        """Put the error-feedback residuals back as they were before ``_feedback_step``'s push."""
        feedback = self._feedback
        assert feedback is not None, "saved when _feedback_step was set"
        for c, saved in zip([c for c in self.push_codecs if c.error_feedback], feedback):
            if saved is None:
                c.reset()  # the aborted attempt was the first ever: nothing was owed
            else:
                residual = c.feedback()
                assert residual is not None, "a saved copy means the residual existed (reset keeps it)"
                residual[:] = saved
        if self.dgc is not None:
            self.dgc.restore()

    def _take_back(self, step: int, now: int) -> None:
        """The master threw away our push for ``step`` (the others redid it without us): what it sent
        must count as never sent, or the residual would send it again later, on top of the redo.
        A carry that push delivered is owed still: it goes with step ``now`` instead."""
        if self._feedback_step == step and self._feedback is not None:
            self._restore_feedback()
            log.info("our push for step %d was discarded (redone by the others): residual restored", step)
        if self._carry is not None and self._carry_step == step:
            self._carry_step = now
        self._feedback_step = -1

    def _utilisation(self) -> dict:
        """CPU/GPU utilisation and memory of this node, for the dashboard's worker table."""
        u = {
            "cpu_util": psutil.cpu_percent(interval=None),
            "mem_bytes": self._proc.memory_info().rss,
            "gpu_util": None,
            "gpu_mem_bytes": None,
        }
        if self.device.startswith("cuda"):
            u["gpu_mem_bytes"] = int(torch.cuda.memory_allocated(self.device))
            try:
                u["gpu_util"] = float(torch.cuda.utilization(self.device))
            except Exception:  # needs NVML; the memory figure is still right
                pass
        return u


def _abandon_joined(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().abandon()


def _retrieved(fut: asyncio.Future) -> None:
    """A future nobody awaits any more: its failure is expected, not to be logged as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def _same_buffer(view: memoryview, arr: np.ndarray, off: int) -> bool:
    """True when the payload already landed in ``arr`` at ``off`` (the zero-copy allocator path)."""
    try:
        return (
            np.frombuffer(view, dtype=np.float32).__array_interface__["data"][0]
            == arr[off:].__array_interface__["data"][0]
        )
    except ValueError:
        return False


def data_sampler(job: JobConfig, n: int):
    from hetero_ps.training.sampler import EpochSampler

    return EpochSampler(n, job.seed)
