"""A protocol-level simulated worker: the real wire protocol, known numpy gradients, no torch.

It does what ``hetero_ps/worker/worker.py`` does on the wire, in the order docs/PROTOCOL.md gives:
HELLO with its rank, WELCOME (the job), METRICS ready (its probe says ``max_batch``), then PARAMS
(a version's chunks, decoded with the job's pull codec and checked bit for bit against the
``Oracle``'s prediction), SCHEDULE (the mean gradient over ``perm(epoch)[offset : offset+count]``,
pushed chunk by chunk with the job's codec, then METRICS report), HEARTBEAT (answered; and its own
whenever it has sent nothing for ``heartbeat_s``), BYE (done).
Its gradients are ``known_gradients.KnownGradients``: exact, so every update can be predicted.

Like a real worker it retries a refused or closed connection with backoff and jitter (the master
admits 8 handshakes in flight per address), rejoins with its rank when the connection ends, and
treats a master silent for four heartbeat periods as gone. Unlike one, it can be told to fail:

* ``kill()`` — reset the connection (RST, as a crashed host or a middlebox does) and stay down until
  ``rejoin()``;
* ``stall_next(steps, max_s)`` — at the next SCHEDULE, stop reading and answering (a closed laptop
  lid) until the others have completed ``steps`` updates without it (which they can only do once the
  master has suspended it) or ``max_s`` seconds have passed, then finish that work as if nothing
  happened;
* ``corrupt_next()`` — flip a payload bit of the next PUSH after its CRC was computed (a NIC or RAM
  fault): the master must drop that connection alone; the worker then rejoins.

Each fault is recorded (``faults``) with the time and parameter version it happened at, and when the
worker had completed a step again (``back_at``).

One room rule shapes this file: ``testing/`` may import ``wire`` but not ``training`` (no torch), and
the connection is opened here (``transport.connect`` keeps its socket private, and a reset needs the
socket).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

from hetero_ps.config import JobConfig
from hetero_ps.errors import (
    ConnectionClosed,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from hetero_ps.testing.known_gradients import MAX_BATCH, KnownGradients, Oracle
from hetero_ps.wire import codecs, transport
from hetero_ps.wire.handshake import client_handshake
from hetero_ps.wire.messages import (
    Bye,
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
from hetero_ps.wire.protocol import Frame, Limits, Message, MsgType, encode_frame, raise_if_error

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.05, 2.0  # reconnect delays, each with ±50 % jitter
HANDSHAKE_TIMEOUT_S = 10.0
HEALTHY_AFTER = 3  # completed steps after a fault before a worker counts as back (the master has measured it)


def corrupted_frame(msg_type: MsgType, header: dict, segments: list, limits: Limits) -> Frame:
    """The frame with its payload CRC computed over ``segments``, then one payload bit flipped on the
    way out: what a fault between the sender's checksum and the wire does."""
    frame = encode_frame(msg_type, header, segments, payload_checksum=True, limits=limits)
    bad = bytearray(frame.buffers[1])  # a copy: the caller's gradient stays as it was
    bad[len(bad) // 2] ^= 0x10
    return Frame(frame.type, (frame.buffers[0], memoryview(bad), *frame.buffers[2:]), frame.nbytes)


@dataclass
class InjectedFault:
    """One injected fault, as it happened."""

    kind: str  # kill | stall | corrupt
    rank: int
    at: float  # monotonic seconds
    version: int  # the newest parameter version any worker had then
    back_at: float | None = None  # when this worker had completed a step again


class SimWorker:
    """One simulated worker; ``await run()`` lives until the master says BYE (or the task is cancelled)."""

    def __init__(self, rank: int, host: str, port: int, token: str, oracle: Oracle, *, seed: int = 0):
        self.rank, self.host, self.port, self.token = rank, host, port, token
        self.oracle = oracle
        self.max_batch = MAX_BATCH
        self.rnd = random.Random(f"{seed}/{rank}")  # backoff jitter
        self.state = "down"  # down | connecting | ready | finished | failed
        self.bye_reason = ""
        self.faults: list[InjectedFault] = []
        self.sessions = 0  # connections that reached WELCOME
        self.retries = 0  # connection attempts refused, closed or timed out before WELCOME
        self.ended: list[str] = []  # why each session that did not end in BYE ended
        self.steps_done = 0  # assignments pushed
        self.steps_since_fault = 0  # steps completed (their update arrived) since the last fault or (re)join
        self.version = -1  # the parameter version held
        self._allowed = asyncio.Event()  # cleared while killed
        self._allowed.set()
        self._task: asyncio.Task[str] | None = None  # the current session
        self._sock: socket.socket | None = None  # the current session's socket (to reset it)
        self._stall: tuple[int, float] | None = None  # (steps, max seconds) for the next SCHEDULE
        self._stalling = False
        self._corrupt = False
        self._pushed: tuple[int, int] | None = None  # (step, attempt) pushed and not superseded

    # -- what the chaos driver asks -------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Working normally, measured by the master, with no fault pending: a fair target for the next one."""
        pending = self._stall is not None or self._corrupt or not self._allowed.is_set()
        return self.state == "ready" and self.steps_since_fault >= HEALTHY_AFTER and not pending

    async def kill(self) -> None:
        """Reset the connection (RST) and stay down until ``rejoin()``."""
        self._allowed.clear()
        task, sock = self._task, self._sock
        if task is None or task.done():
            return
        task.cancel()  # first, so no socket call is in flight when the descriptor closes
        await asyncio.wait({task})
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # with a zero linger: a reset, not a FIN
            except OSError:
                pass
        self._fault("kill")

    def rejoin(self) -> None:
        self._allowed.set()

    def stall_next(self, steps: int, max_s: float) -> None:
        self._stall = (steps, max_s)

    def corrupt_next(self) -> None:
        self._corrupt = True

    def _fault(self, kind: str) -> None:
        expected = self.oracle.expected
        self.faults.append(InjectedFault(kind, self.rank, time.monotonic(), expected.latest if expected else -1))
        self.steps_since_fault = 0

    # -- life -----------------------------------------------------------------------------------
    async def run(self) -> None:
        delay = BACKOFF_FIRST_S
        try:
            while True:
                await self._allowed.wait()
                welcomed = self.sessions
                self._task = task = asyncio.ensure_future(self._session())
                await asyncio.wait({task})
                self._task = None
                if task.cancelled():  # killed: wait for rejoin()
                    continue
                exc = task.exception()
                if exc is None:
                    self.state, self.bye_reason = "finished", task.result()
                    return
                # A lost connection or our own corrupted frame: rejoin. Anything else is final, and a
                # problem for the run (an ERROR we did not provoke, a malformed frame, a wrong token, a bug).
                expected = isinstance(exc, (TransportError, OSError)) or (
                    isinstance(exc, RemoteError) and exc.code == "checksum_error"
                )
                if not expected:
                    self.state = "failed"
                    self.oracle.problem(f"rank {self.rank} stopped: {type(exc).__name__}: {exc}")
                    return
                self.ended.append(f"{type(exc).__name__}: {exc}")
                if self.sessions > welcomed:  # it had joined: start the backoff afresh
                    delay = BACKOFF_FIRST_S
                await asyncio.sleep(delay * self.rnd.uniform(0.5, 1.5))
                delay = min(2 * delay, BACKOFF_MAX_S)
        finally:
            if self._task is not None:  # the driver stops us: end the session too
                self._task.cancel()
                await asyncio.wait({self._task})
            if self.state not in ("finished", "failed"):
                self.state = "down"

    async def _connect(self) -> tuple[transport.Connection, dict]:
        """A WELCOMEd connection, retrying refusals (handshake limits, a rank still held by our old
        connection) with exponential backoff and jitter, as ``worker.connect_with_retry`` does."""
        self.state = "connecting"
        delay = BACKOFF_FIRST_S
        hello = Hello(rank=self.rank, host=f"sim-{self.rank}", device="cpu", profile={"sim": True})
        while True:
            try:
                return await self._handshake(hello)
            except RemoteError as exc:
                if exc.code != "rank_taken":
                    raise
            except (TransportError, OSError):
                pass
            self.retries += 1
            await asyncio.sleep(delay * self.rnd.uniform(0.5, 1.5))
            delay = min(2 * delay, BACKOFF_MAX_S)

    async def _handshake(self, hello: Hello) -> tuple[transport.Connection, dict]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ok = False
        try:
            transport.configure_socket(sock)
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await loop.sock_connect(sock, (self.host, self.port))
                conn = transport.Connection(sock, peer=f"{self.host}:{self.port}")
                welcome = await client_handshake(conn, self.token, hello.caller_fields())
            conn.mark_authenticated()
            ok = True
            self._sock = sock
            return conn, welcome
        except TimeoutError:
            raise TransportTimeout(f"no complete handshake within {HANDSHAKE_TIMEOUT_S} s") from None
        finally:
            if not ok:
                sock.close()

    async def _session(self) -> str:
        """One connection, from HELLO to BYE (returns its reason) or to an error (raised)."""
        conn, welcome = await self._connect()
        self.sessions += 1
        killed = False
        try:
            return await self._serve(conn, Welcome.from_header(welcome))
        except asyncio.CancelledError:
            killed = not self._allowed.is_set()  # kill() resets the socket itself
            raise
        finally:
            self._sock = None
            self.state = "down"
            if not killed:
                await conn.close()

    async def _serve(self, conn: transport.Connection, w: Welcome) -> str:
        job = JobConfig.from_wire(w.job)
        known = self.oracle.attach(job, w.numel)
        chunks = chunk_layout(w.numel, job.chunk_bytes)
        pull = [codecs.make_codec(job.pull_compression, n) for _, n in chunks]
        push = [codecs.make_codec(job.compression, n) for _, n in chunks]
        params = np.zeros(w.numel, dtype=np.float32)
        self.version, self._pushed, self.steps_since_fault = -1, None, 0
        await conn.send(MsgType.METRICS, Metrics(ready=True, probe={"max_batch": self.max_batch}).to_header())
        self.state = "ready"
        silence = 4 * w.heartbeat_s if w.heartbeat_s else None
        keep_alive = asyncio.ensure_future(self._keep_alive(conn, w.heartbeat_s)) if w.heartbeat_s else None
        try:
            while True:
                try:
                    msg = await conn.recv(timeout=silence)
                except TransportTimeout:
                    raise ConnectionClosed(f"no word from the master in {silence} s") from None
                if msg.type == MsgType.PARAMS:
                    self._on_params(Params.from_header(msg.header), msg, chunks, pull, params)
                elif msg.type == MsgType.SCHEDULE:
                    await self._on_schedule(conn, Schedule.from_header(msg.header), job, known, chunks, push)
                elif msg.type == MsgType.HEARTBEAT:
                    await conn.send(MsgType.HEARTBEAT, Heartbeat(time.time()).to_header())
                elif msg.type == MsgType.BYE:
                    return Bye.from_header(msg.header).reason or "bye"
                elif msg.type == MsgType.ERROR:
                    raise_if_error(msg)
                # CONTROL knobs (slowdown, bandwidth) mean nothing to a simulated worker
        finally:
            if keep_alive is not None:
                keep_alive.cancel()
                await asyncio.wait({keep_alive})

    async def _keep_alive(self, conn: transport.Connection, every: float) -> None:
        """A HEARTBEAT whenever nothing else went out for ``every`` seconds (PROTOCOL.md, liveness);
        none while stalled: a stalled worker is silent."""
        sent = -1
        while True:
            await asyncio.sleep(every)
            if conn.frames_sent == sent and not self._stalling:
                try:
                    await conn.send(MsgType.HEARTBEAT, Heartbeat(time.time()).to_header())
                except TransportError:
                    return  # the receive loop sees the connection end
            sent = conn.frames_sent

    def _on_params(self, p: Params, msg: Message, chunks: list, pull: list, params: np.ndarray) -> None:
        if p.chunk >= len(chunks) or chunks[p.chunk] != (p.offset, p.numel):
            self.oracle.problem(f"rank {self.rank}: PARAMS chunk {p.chunk} ({p.offset}+{p.numel}) is not ours")
            return
        if msg.header.get("delta"):  # a change of the parameters (int8/top-k pulls): not exact, never asked for
            self.oracle.problem(f"rank {self.rank}: version {p.version} came as a delta; the job's pulls are full")
            return
        pull[p.chunk].decode_into(params[p.offset : p.offset + p.numel], p.codec_header(), msg.segments)
        if p.chunk != len(chunks) - 1:
            return
        self.version = p.version
        expected = self.oracle.expected
        assert expected is not None, "attached at the welcome"
        expected.observe(p.version, params, self.rank)
        if self._pushed is not None and self._pushed[0] == p.version - 1:  # the step we pushed is applied
            self.steps_since_fault += 1
            if self.steps_since_fault == 1 and self.faults and self.faults[-1].back_at is None:
                self.faults[-1].back_at = time.monotonic()
        self._pushed = None

    async def _on_schedule(
        self, conn: transport.Connection, s: Schedule, job: JobConfig, known: KnownGradients, chunks: list, push: list
    ) -> None:
        self._pushed = None
        if self._stall is not None:
            (steps, max_s), self._stall = self._stall, None
            self._fault("stall")
            await self._stalled(steps, max_s)
        self._check_schedule(s, known)
        t0 = time.perf_counter()
        idx = known.indices(s.epoch, s.offset, s.count)
        grad = known.worker_gradient(idx)
        compute_s = time.perf_counter() - t0
        encode_s = push_s = 0.0
        nbytes = 0
        for i, (off, n) in enumerate(chunks):
            te = time.perf_counter()
            fields, segments = push[i].encode(grad[off : off + n])
            header = push_from_codec(
                fields, step=s.step, attempt=s.attempt, chunk=i, offset=off, numel=n, codec=job.compression
            ).to_header()
            tp = time.perf_counter()
            if self._corrupt:
                self._corrupt = False
                self._fault("corrupt")
                await conn.send_frame(corrupted_frame(MsgType.PUSH, header, segments, conn.limits))
            else:
                await conn.send(MsgType.PUSH, header, segments)
            encode_s += tp - te
            push_s += time.perf_counter() - tp
            nbytes += sum(memoryview(seg).nbytes for seg in segments)
        report = StepReport(
            loss=known.loss(idx),
            samples=s.count,
            compute_s=compute_s,
            encode_s=encode_s,
            push_s=push_s,
            bytes_out=nbytes,
            nonfinite=False,
            version=max(self.version, 0),
            wait_s=0.0,
            pull_s=0.0,
            bytes_in=0,
            util={"cpu_util": 0.0, "mem_bytes": 0, "gpu_util": None, "gpu_mem_bytes": None},
        )
        await conn.send(MsgType.METRICS, Metrics(step=s.step, attempt=s.attempt, report=report).to_header())
        self._pushed = (s.step, s.attempt)
        self.steps_done += 1

    async def _stalled(self, steps: int, max_s: float) -> None:
        """Read nothing, answer nothing, until the others have done ``steps`` updates (or ``max_s``)."""
        expected = self.oracle.expected
        assert expected is not None, "attached at the welcome"
        start, until = expected.latest, time.monotonic() + max_s
        self._stalling = True
        try:
            while expected.latest < start + steps and time.monotonic() < until:
                await asyncio.sleep(0.02)
        finally:
            self._stalling = False

    def _check_schedule(self, s: Schedule, known: KnownGradients) -> None:
        """What PROTOCOL.md promises about a SCHEDULE, and what exactness needs."""
        epoch, offset = known.step_slice(s.step)
        if s.version != self.version:
            self.oracle.problem(f"rank {self.rank}: step {s.step} is on version {s.version}, it holds {self.version}")
        if s.epoch != epoch or s.total != known.B or not offset <= s.offset <= s.offset + s.count <= offset + known.B:
            self.oracle.problem(
                f"rank {self.rank}: step {s.step} slice (epoch {s.epoch}, {s.offset}+{s.count} of {s.total}) "
                f"is not inside the step's samples (epoch {epoch}, {offset}+{known.B})"
            )
        if s.count > self.max_batch:
            self.oracle.problem(
                f"rank {self.rank}: step {s.step} gave it {s.count} samples, over its max_batch {self.max_batch} "
                f"(the master drops the caps when too few workers are live to cover the batch with them)"
            )
