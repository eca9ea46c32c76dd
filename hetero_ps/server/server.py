"""The parameter server: admits workers, owns parameters and optimizer, evaluates, checkpoints.

The step loops live beside it — ``bsp.py`` (synchronous, the union-batch invariant) and
``async_sgd.py`` (SSP and ASP) — and share what is here: admission and rank bookkeeping, receiving
pushes straight into an accumulator (one fused decode-scale-add per chunk), applying an update,
encoding parameters once per version, evaluation on the held-out split, and the metrics stream.

Admission: a worker's HELLO is checked (software version, rank), then the worker builds the job
locally, calibrates itself and reports ``ready`` (a METRICS frame carrying its probe); only then does
the scheduler count it, so the very first split already reflects each node's measured speed. A
connection whose HELLO says ``role: control`` is a control client instead (``hetero_ps.tools.control``):
it may send CONTROL frames that are forwarded to one worker, nothing else.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch

import hetero_ps
from hetero_ps.wire import codecs, protocol, transport
from hetero_ps.config import JobConfig
from hetero_ps.errors import HeteroPSError, RemoteError, TransportError
from hetero_ps.wire.protocol import MsgType
from hetero_ps.server.registry import Registry, WorkerHandle
from hetero_ps.server.scheduler import Scheduler

log = logging.getLogger("hetero_ps.server")

CONTROL_KNOBS = {"simulate_slowdown": float, "simulate_bandwidth": float}


@dataclass(frozen=True)
class ServerConfig:
    """How the master runs (the job itself is a JobConfig)."""

    host: str = "0.0.0.0"              # address to listen on
    port: int = 29500                  # MASTER_PORT
    token: str = ""                    # shared secret (HETERO_PS_TOKEN)
    expected_workers: int = 1          # start training once this many workers are ready
    join_timeout: float = 600.0        # give up if they are not ready after this long
    worker_timeout: float = 120.0      # a worker silent this long is declared lost
    straggler_warn_s: float = 10.0     # log who we are waiting for after this long in a step
    worker_batch_sizes: dict = field(default_factory=dict)   # rank -> fixed batch size
    experiment: str = ""               # experiment name (for the welcome and logs)


class WorkerLost(Exception):
    """A worker left while work was assigned to it; that work must be redone by others."""


@dataclass
class Assignment:
    """Work in flight: one BSP step (all workers) or one SSP/ASP task (one worker)."""

    step: int
    attempt: int
    total: int                      # the divisor of the weights: samples in the BSP step, or B
    sizes: dict                     # wid -> samples
    pending: dict                   # wid -> chunk indices still expected
    acc: torch.Tensor               # where the weighted gradients accumulate
    version: int = 0                # parameter version the work was computed on
    slices: dict = field(default_factory=dict)   # wid -> (epoch, offset, count)
    reports: dict = field(default_factory=dict)  # wid -> the worker's report
    done: asyncio.Future | None = None
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.acc_np = self.acc.numpy()


class ParameterServer:
    def __init__(self, job: JobConfig, cfg: ServerConfig, experiment=None, sinks=(), progress=None):
        from hetero_ps.training import data, models, optim
        from hetero_ps.training.flat import FlatParams, chunk_layout
        from hetero_ps.training.sampler import EpochSampler

        self.job, self.cfg, self.exp = job, cfg, experiment
        # Everything that watches the run (dashboard hub, TensorBoard) gets each step, epoch and event.
        self.sinks = list(sinks)
        self.progress = progress
        self.train_set, self.eval_set, self.info = data.load_datasets(job)
        self.model = models.build_model(job, self.info)
        self.flat = FlatParams(self.model)
        self.param = torch.nn.Parameter(self.flat.params)   # shares storage with the model's views
        self.eval_model = copy.deepcopy(self.model)          # evaluated on a snapshot, never mid-update
        self.steps_per_epoch = math.ceil(len(self.train_set) / job.global_batch)
        self.total_steps = self.steps_per_epoch * job.epochs
        if job.max_steps:
            self.total_steps = min(self.total_steps, job.max_steps)
        self.optimizer, self.lr_scheduler = optim.build_optimizer(job, self.param, self.total_steps)
        self.sampler = EpochSampler(len(self.train_set), job.seed)
        self.chunks = chunk_layout(self.flat.numel, job.chunk_bytes)
        self.decoders = [codecs.make_codec(job.compression, n) for _, n in self.chunks]
        self.encoders = [codecs.make_codec(job.pull_compression, n) for _, n in self.chunks]
        policy = job.policy if job.load_balancing else "uniform"
        self.scheduler = Scheduler(job.global_batch, policy, job.rebalance_interval,
                                   fixed_sizes=cfg.worker_batch_sizes)
        self.registry = Registry()
        self.version = 0
        self.step = 0                     # optimizer updates applied (BSP: steps)
        self._params_frames: tuple[int, list] | None = None
        self._membership = asyncio.Event()
        self._server = None
        self._finishing = False
        self.history: list[dict] = []
        self.epoch_results: list[dict] = []
        self.started = time.time()

    # -- connections ------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await transport.start_server(
            self.cfg.host, self.cfg.port, token=self.cfg.token, on_hello=self._on_hello,
            on_connection=self._serve)
        log.info("master listening on %s:%d — model %s (%d parameters), data %s (%d train / %d eval), "
                 "global batch %d, %d steps, %s", self.cfg.host, self.port, self.job.model, self.flat.numel,
                 self.job.dataset, len(self.train_set), len(self.eval_set), self.job.global_batch,
                 self.total_steps, self.job.sync.upper())

    @property
    def port(self) -> int:
        return self._server.port

    async def close(self) -> None:
        if self._server:
            await self._server.close()

    async def _on_hello(self, conn, hello: dict) -> dict:
        sw = hello.get("software")
        if sw != hetero_ps.__version__:
            raise RemoteError("version_mismatch",
                              f"this worker runs hetero_ps {sw} but the master runs {hetero_ps.__version__}; "
                              "install the same version on every node")
        if hello.get("role") == "control":
            conn.worker = None
            return {"role": "control", "workers": [h.rank for h in self.registry.live()]}
        h = self.registry.admit(int(hello.get("rank", -1)), str(hello.get("host", "?")),
                                str(hello.get("device", "?")), hello.get("profile") or {}, conn)
        conn.worker = h
        conn.set_payload_allocator(self._push_allocator(h))
        log.info("worker joined: %s; preparing the job", h.name)
        self._event("worker_joined", rank=h.rank, host=h.host, device=h.device, profile=h.profile)
        return {"worker_id": h.wid, "rank": h.rank, "job": self.job.to_wire(), "numel": self.flat.numel,
                "experiment": self.cfg.experiment, "total_steps": self.total_steps}

    def _push_allocator(self, h: WorkerHandle):
        """Each worker's chunks land in one receive buffer that lives as long as the connection."""
        cap = max(d.max_encoded_bytes() for d in self.decoders) + 4096
        buf = bytearray(0)

        def allocate(msg_type, header, nbytes):
            nonlocal buf
            if msg_type != MsgType.PUSH or nbytes > cap:
                return None   # the decoder allocates (within its limits); the handler rejects bad headers
            if len(buf) < nbytes:
                buf = bytearray(cap)
            return memoryview(buf)[:nbytes]

        return allocate

    async def _serve(self, conn) -> None:
        if conn.worker is None:
            await self._serve_control(conn)
        else:
            await self._serve_worker(conn)

    async def _serve_worker(self, conn) -> None:
        h: WorkerHandle = conn.worker
        reason = "connection closed"
        try:
            while True:
                msg = await conn.recv(timeout=self.cfg.worker_timeout)
                h.last_seen = time.monotonic()
                if msg.type == MsgType.PUSH:
                    self._on_push(h, msg)
                elif msg.type == MsgType.METRICS:
                    self._on_metrics(h, msg.header)
                elif msg.type == MsgType.HEARTBEAT:
                    pass
                elif msg.type == MsgType.BYE:
                    reason = f"left ({msg.header.get('reason', 'bye')})"
                    break
                elif msg.type == MsgType.ERROR:
                    reason = f"reported an error: {msg.header.get('code')}: {msg.header.get('message')}"
                    break
                else:
                    raise RemoteError("unexpected_message", f"a worker may not send {msg.type.name}")
        except RemoteError as exc:
            reason = str(exc)
            await conn.send_error(exc.code, exc.message)
        except (TransportError, HeteroPSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._lose(h, reason)

    async def _serve_control(self, conn) -> None:
        """A control client: each CONTROL names a rank and knobs; we forward and acknowledge."""
        try:
            while True:
                msg = await conn.recv(timeout=self.cfg.worker_timeout)
                if msg.type == MsgType.BYE:
                    return
                if msg.type != MsgType.CONTROL:
                    raise RemoteError("unexpected_message", f"a control client may not send {msg.type.name}")
                try:
                    rank, knobs = self._check_control(msg.header)
                    await self.control(rank, **knobs)
                except RemoteError as exc:
                    await conn.send(MsgType.ERROR, {"code": exc.code, "message": exc.message})
                    continue
                await conn.send(MsgType.CONTROL, {"ok": True, "rank": rank, **knobs})
        except RemoteError as exc:
            await conn.send_error(exc.code, exc.message)
        except (TransportError, HeteroPSError):
            pass

    def _check_control(self, hd: dict) -> tuple[int, dict]:
        rank = hd.get("rank")
        knobs = {k: v for k, v in hd.items() if k != "rank"}
        bad = [k for k in knobs if k not in CONTROL_KNOBS]
        if not isinstance(rank, int) or bad or not knobs:
            raise RemoteError("bad_control", f"CONTROL needs an int rank and knobs from {sorted(CONTROL_KNOBS)}; "
                              f"got rank={rank!r}, unknown={bad}")
        try:
            knobs = {k: CONTROL_KNOBS[k](v) for k, v in knobs.items()}
        except (TypeError, ValueError):
            raise RemoteError("bad_control", f"CONTROL knob values must be numbers, got {knobs}") from None
        return rank, knobs

    async def control(self, rank: int, **knobs) -> None:
        """Change a worker's run-time knobs (``simulate_slowdown``, ``simulate_bandwidth``)."""
        h = next((w for w in self.registry.live() if w.rank == rank), None)
        if h is None:
            raise RemoteError("no_such_worker", f"no live worker has rank {rank}")
        await h.conn.send(MsgType.CONTROL, knobs)
        log.info("control: %s -> %s", h.name, knobs)
        self._event("control", rank=rank, **knobs)

    def _lose(self, h: WorkerHandle, reason: str) -> None:
        if self.registry.remove(h.wid) is None:
            return
        self.scheduler.remove_worker(h.wid)
        if self._finishing:
            log.info("worker left: %s", h.name)
        else:
            log.warning("worker lost: %s — %s (%d left)", h.name, reason, len(self.registry))
            self._event("worker_lost", rank=h.rank, host=h.host, reason=reason)
        a = h.assignment
        if a is not None and h.wid in a.sizes and a.done is not None and not a.done.done():
            a.done.set_exception(WorkerLost(h.name))
        self._membership.set()

    # -- pushes and reports -------------------------------------------------------------------
    def _on_push(self, h: WorkerHandle, msg) -> None:
        hd, a = msg.header, h.assignment
        if a is None or hd.get("step") != a.step or hd.get("attempt") != a.attempt:
            return   # a push for an aborted attempt: its samples are being redone
        if h.wid not in a.pending:
            raise RemoteError("unexpected_push", f"{h.name} was not given step {a.step}")
        i = hd.get("chunk")
        if not isinstance(i, int) or i not in a.pending[h.wid] or \
                (hd.get("offset"), hd.get("numel")) != self.chunks[i]:
            raise RemoteError("bad_chunk", f"chunk {i!r} ({hd.get('offset')}+{hd.get('numel')}) does not match "
                              f"this model's chunking or was already received")
        if hd.get("codec") != self.job.compression:
            raise RemoteError("bad_codec", f"expected codec {self.job.compression}, got {hd.get('codec')!r}")
        off, n = self.chunks[i]
        h.set_activity(f"pushing step {a.step} (chunk {i + 1}/{len(self.chunks)})")
        self.decoders[i].decode_accumulate(a.acc_np[off:off + n], hd, msg.segments, a.sizes[h.wid] / a.total)
        a.pending[h.wid].discard(i)
        self._maybe_done(h, a)

    def _on_metrics(self, h: WorkerHandle, hd: dict) -> None:
        if "ready" in hd:
            self._on_ready(h, hd.get("probe") or {})
            return
        a = h.assignment
        if a is None or hd.get("step") != a.step or hd.get("attempt") != a.attempt or h.wid not in a.sizes:
            return
        a.reports[h.wid] = report = hd.get("report") or {}
        util = report.get("util")
        if isinstance(util, dict):
            fields = {k: util.get(k) for k in ("cpu_util", "mem_bytes", "gpu_util", "gpu_mem_bytes")}
            for sink in self.sinks:
                if hasattr(sink, "update_worker"):
                    sink.update_worker(h.rank, **fields)
        self._maybe_done(h, a)

    def _on_ready(self, h: WorkerHandle, probe: dict) -> None:
        if h.ready:
            return
        h.ready = True
        h.profile.update(probe)
        rate = float(probe.get("probe_samples_per_s") or 0.0)
        self.scheduler.add_worker(h.wid, rate_hint=rate, max_batch=int(probe.get("max_batch") or 0),
                                  c_hint=float(probe.get("probe_c_s") or 0.0), r_hint=float(probe.get("probe_r") or 0.0))
        log.info("worker ready: %s%s, %d/%d ready", h.name, f", probe {rate:.0f} samples/s" if rate else "",
                 sum(w.ready for w in self.registry.live()), self.cfg.expected_workers)
        self._event("worker_ready", rank=h.rank, probe=probe)
        self._membership.set()

    def _maybe_done(self, h: WorkerHandle, a: Assignment) -> None:
        if a.pending[h.wid] or h.wid not in a.reports:
            return
        h.set_activity(f"done with step {a.step}, waiting")
        if all(not p for p in a.pending.values()) and len(a.reports) == len(a.pending) and not a.done.done():
            a.done.set_result(None)

    # -- shared pieces of the step loops --------------------------------------------------------
    def ready_workers(self) -> list[WorkerHandle]:
        return [h for h in self.registry.live() if h.ready]

    async def wait_for_workers(self, n: int) -> None:
        """Block until ``n`` workers are ready, saying every few seconds who is still missing."""
        deadline = time.monotonic() + self.cfg.join_timeout
        while len(self.ready_workers()) < n:
            self._membership.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise HeteroPSError(f"only {len(self.ready_workers())} of {n} workers were ready within "
                                    f"{self.cfg.join_timeout:.0f} s; check the workers' logs and MASTER_ADDR")
            try:
                await asyncio.wait_for(self._membership.wait(), timeout=min(5.0, left))
            except asyncio.TimeoutError:
                have = ", ".join(f"{h.rank}{'' if h.ready else ' (preparing)'}" for h in self.registry.live())
                log.info("waiting for %d more worker(s) on port %d (joined ranks: %s)",
                         n - len(self.ready_workers()), self.port, have or "none")

    async def send_params(self, h: WorkerHandle) -> bool:
        """Bring ``h`` to the current parameter version; False if it was lost on the way."""
        if h.params_version == self.version:
            return True
        frames = self.encoded_params()
        version = self.version
        try:
            for f in frames:
                await h.conn.send_frame(f)
        except (TransportError, OSError) as exc:
            self._lose(h, f"could not send parameters: {exc}")
            return False
        h.params_version = version
        return True

    def encoded_params(self) -> list:
        """The current parameters as frames, encoded once per version and shared by every worker.

        In BSP nothing changes the parameters while they are being sent, so uncompressed frames
        point straight at the parameter buffer. SSP/ASP may update them mid-send, so there every
        version's frames own a copy of their bytes.
        """
        if self._params_frames and self._params_frames[0] == self.version:
            return self._params_frames[1]
        params = self.flat.params.detach().numpy()
        snapshot = self.job.sync != "bsp"
        frames = []
        for i, (off, n) in enumerate(self.chunks):
            fields, segments = self.encoders[i].encode(params[off:off + n])
            if snapshot:
                segments = [bytes(memoryview(s).cast("B")) for s in segments]
            header = {"version": self.version, "chunk": i, "offset": off, "numel": n,
                      "codec": self.job.pull_compression, **fields}
            frames.append(protocol.encode_frame(MsgType.PARAMS, header, segments))
        self._params_frames = (self.version, frames)
        return frames

    async def send_schedule(self, h: WorkerHandle, a: Assignment) -> bool:
        epoch, offset, count = a.slices[h.wid]
        header = {"step": a.step, "attempt": a.attempt, "epoch": epoch, "offset": offset, "count": count,
                  "version": self.version, "total": a.total}
        h.batch = count
        h.assignment = a
        h.set_activity(f"computing step {a.step} ({count} samples)")
        try:
            await h.conn.send(MsgType.SCHEDULE, header)
            return True
        except (TransportError, OSError) as exc:
            self._lose(h, f"could not send schedule: {exc}")
            return False

    async def wait_done(self, a: Assignment) -> None:
        """Wait for an assignment; every ``straggler_warn_s`` say who we are waiting for."""
        while True:
            done, _ = await asyncio.wait({a.done}, timeout=self.cfg.straggler_warn_s)
            if done:
                return a.done.result()
            now = time.monotonic()
            for wid in a.pending:
                h = self.registry.workers.get(wid)
                if h and (a.pending[wid] or wid not in a.reports):
                    log.warning("step %d: still waiting for %s — last: %s (%.0f s ago)",
                                a.step, h.name, h.activity, now - h.activity_since)

    def apply(self, grad: torch.Tensor) -> bool:
        """One optimizer update with ``grad``; skipped (False) if it holds NaN/Inf."""
        if not bool(torch.isfinite(grad).all()):
            return False
        self.param.grad = grad
        self.optimizer.step()
        self.version += 1
        return True

    def observe(self, a: Assignment) -> None:
        """Feed each worker's measured step time to the scheduler and its counters."""
        for wid, r in a.reports.items():
            h = self.registry.workers.get(wid)
            if h is None:
                continue
            h.samples += a.sizes[wid]
            h.steps += 1
            h.last_report = r
            self.scheduler.observe(wid, a.sizes[wid], r.get("compute_s", 0.0) + r.get("encode_s", 0.0)
                                   + r.get("push_s", 0.0) + r.get("pull_s", 0.0))

    def record_step(self, rec: dict) -> None:
        self.history.append(rec)
        self._publish("step", rec)
        if self.progress is not None:
            self.progress.update(rec["step"], rec["epoch"], rec["loss"], rec["samples_per_s"], rec["samples"])

    def rank_of(self, wid: int) -> int:
        h = self.registry.workers.get(wid)
        return h.rank if h else -wid

    # -- the run ------------------------------------------------------------------------------
    async def train(self) -> dict:
        """Run the whole job; returns the summary."""
        from hetero_ps.server.loops.async_sgd import AsyncLoop
        from hetero_ps.server.loops.bsp import BSPLoop

        await self.wait_for_workers(self.cfg.expected_workers)
        t0 = time.perf_counter()
        loop = BSPLoop(self) if self.job.sync == "bsp" else AsyncLoop(self)
        epochs = await loop.run()
        return await self._finish(time.perf_counter() - t0, epochs)

    async def end_epoch(self, epoch: int) -> None:
        if not self.job.eval_every_epoch:
            return
        from hetero_ps.training.trainer import evaluate

        t0 = time.perf_counter()
        with torch.no_grad():   # a snapshot: SSP/ASP keep updating the live parameters meanwhile
            for dst, src in zip(self.eval_model.parameters(), self.model.parameters()):
                dst.copy_(src)
        # BatchNorm statistics are never trained on the master: re-estimate them on training data first.
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.eval_model.modules())
        loss, acc = await asyncio.to_thread(evaluate, self.eval_model, self.eval_set, 256, self.job,
                                            calib_set=self.train_set if has_bn else None)
        if has_bn:
            self.model.load_state_dict(self.eval_model.state_dict())   # keep the estimated statistics
        rec = {"epoch": epoch, "step": self.step, "eval_loss": loss, "eval_accuracy": acc,
               "eval_s": time.perf_counter() - t0, "elapsed_s": time.time() - self.started}
        self.epoch_results.append(rec)
        self._publish("epoch", rec)
        log.info("epoch %d done: eval loss %.4f, accuracy %s", epoch, loss,
                 "n/a" if acc is None else f"{100 * acc:.2f} %")

    async def _finish(self, train_s: float, epochs: int) -> dict:
        self._finishing = True
        for h in self.registry.live():
            try:
                await h.conn.send(MsgType.BYE, {"reason": "training finished"})
            except (TransportError, OSError):
                pass
        samples = sum(r["samples"] for r in self.history)
        busy = [max((w["compute_s"] for w in r["workers"].values()), default=0.0) for r in self.history]
        step_s = [r["step_s"] for r in self.history]
        worker_stats = {}
        for r in self.history:
            for rank, w in r["workers"].items():
                ws = worker_stats.setdefault(rank, {"samples": 0, "steps": 0, "compute_s": 0.0, "push_s": 0.0,
                                                    "wait_s": 0.0, "pull_s": 0.0})
                ws["samples"] += w["batch"]
                ws["steps"] += 1
                for k in ("compute_s", "push_s", "wait_s", "pull_s"):
                    ws[k] += w.get(k, 0.0)
        probes = [float(h.profile.get("probe_samples_per_s") or 0) for h in self.registry.live()]
        return {
            "experiment": self.cfg.experiment, "model": self.job.model, "dataset": self.job.dataset,
            "parameters": self.flat.numel, "steps": len(self.history), "epochs": epochs, "samples": samples,
            "train_s": train_s, "samples_per_s": samples / train_s if train_s else 0.0,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "eval": self.epoch_results[-1] if self.epoch_results else None,
            "final_eval_accuracy": self.epoch_results[-1]["eval_accuracy"] if self.epoch_results else None,
            # Share of step time not spent computing on the busiest worker (BSP: comm + sync + optimizer).
            "communication_overhead": (1 - sum(busy) / sum(step_s)) if self.job.sync == "bsp" and step_s else None,
            "ideal_samples_per_s": sum(probes) if probes and all(probes) else None,
            "workers": worker_stats,
            "compression": self.job.compression, "sync": self.job.sync,
        }

    # -- metrics helpers ------------------------------------------------------------------------
    def _publish(self, kind: str, rec: dict) -> None:
        """One record to the experiment's JSONL and to every sink (``add_step``/``add_epoch``/``add_event``)."""
        if self.exp:
            getattr(self.exp.metrics, f"log_{kind}")(rec)
        for sink in self.sinks:
            try:
                getattr(sink, f"add_{kind}")(rec)
            except Exception:   # a broken view must never stop training
                log.exception("metrics sink %r failed on a %s record", sink, kind)

    def _event(self, kind: str, **fields) -> None:
        self._publish("event", {"event": kind, "step": self.step, "t": time.time(), **fields})

    def log_decision(self, d) -> None:
        sizes = {str(self.rank_of(w)): b for w, b in d.sizes.items()}
        log.info("batch split (%s): %s — %s", d.policy, sizes, d.reason)
        self._event("schedule", policy=d.policy, sizes=sizes, reason=d.reason,
                    predicted_step_s=d.predicted_step_s, previous_predicted_s=d.previous_predicted_s,
                    inputs={str(self.rank_of(w)): v for w, v in d.inputs.items()})


def timing(r: dict) -> dict:
    """The per-worker fields of a step record, from the worker's report."""
    keys = ("loss", "compute_s", "encode_s", "push_s", "wait_s", "pull_s", "bytes_out", "bytes_in")
    return {k: r.get(k, 0.0) for k in keys}
