"""The parameter server: admits workers, runs synchronous (BSP) steps, evaluates, checkpoints.

One BSP step, as DESIGN.md describes it:

1. the scheduler splits this step's batch (the global batch B, or an epoch's remainder) into
   per-worker sizes b_i; each worker gets a consecutive slice (epoch, offset, count) of the epoch's
   seeded permutation, so every sample is used exactly once per epoch;
2. each worker pushes its mean gradient in chunks; each chunk is decoded straight into the
   accumulator with weight b_i / B (one fused kernel call), so the result is exactly the gradient
   of the union batch;
3. when every worker's share is in, the optimizer steps once on the flat parameter tensor and the
   new parameters are encoded once and the same bytes written to every worker.

A worker lost mid-step aborts the attempt: the accumulator is cleared and the same samples are
re-split among the workers that remain, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import torch

import hetero_ps
from hetero_ps import codecs, protocol, transport
from hetero_ps.config import JobConfig
from hetero_ps.errors import HeteroPSError, RemoteError, TransportError
from hetero_ps.protocol import MsgType
from hetero_ps.server.registry import Registry, WorkerHandle
from hetero_ps.server.scheduler import Scheduler

log = logging.getLogger("hetero_ps.server")


@dataclass(frozen=True)
class ServerConfig:
    """How the master runs (the job itself is a JobConfig)."""

    host: str = "0.0.0.0"              # address to listen on
    port: int = 29500                  # MASTER_PORT
    token: str = ""                    # shared secret (HETERO_PS_TOKEN)
    expected_workers: int = 1          # start training once this many workers have joined
    join_timeout: float = 600.0        # give up if they have not joined after this long
    worker_timeout: float = 120.0      # a worker silent this long is declared lost
    straggler_warn_s: float = 10.0     # log who we are waiting for after this long in a step
    worker_batch_sizes: dict = field(default_factory=dict)   # rank -> fixed batch size
    experiment: str = ""               # experiment name (for the welcome and logs)


class WorkerLost(Exception):
    """A worker left during a step; the step must be retried without it."""


@dataclass
class StepState:
    """The step in flight."""

    step: int
    attempt: int
    total: int                               # samples in this step (sum of sizes)
    sizes: dict                              # wid -> batch size
    pending: dict                            # wid -> set of chunk indices still expected
    reports: dict = field(default_factory=dict)   # wid -> report dict
    done: asyncio.Future = None
    started: float = field(default_factory=time.perf_counter)


class ParameterServer:
    def __init__(self, job: JobConfig, cfg: ServerConfig, experiment=None, sinks=(), progress=None):
        from hetero_ps import data, models, optim
        from hetero_ps.flat import FlatParams
        from hetero_ps.sampler import EpochSampler

        self.job, self.cfg, self.exp = job, cfg, experiment
        # Everything that watches the run (dashboard hub, TensorBoard) gets each step, epoch and event.
        self.sinks = list(sinks)
        self.progress = progress
        torch.manual_seed(job.seed)
        self.train_set, self.eval_set, self.info = data.load_datasets(job)
        self.model = models.build_model(job, self.info)
        self.flat = FlatParams(self.model)
        self.param = torch.nn.Parameter(self.flat.params)   # shares storage with the model's views
        self.steps_per_epoch = math.ceil(len(self.train_set) / job.global_batch)
        self.total_steps = self.steps_per_epoch * job.epochs
        if job.max_steps:
            self.total_steps = min(self.total_steps, job.max_steps)
        self.optimizer, self.lr_scheduler = optim.build_optimizer(job, self.param, self.total_steps)
        self.sampler = EpochSampler(len(self.train_set), job.seed)
        self.acc = torch.zeros(self.flat.numel, dtype=torch.float32)
        self.acc_np = self.acc.numpy()
        per = max(1, job.chunk_bytes // 4)
        self.chunks = [(o, min(per, self.flat.numel - o)) for o in range(0, self.flat.numel, per)]
        self.decoders = [codecs.make_codec(job.compression, n) for _, n in self.chunks]
        self.encoders = [codecs.make_codec(job.pull_compression, n) for _, n in self.chunks]
        policy = job.policy if job.load_balancing else "uniform"
        self.scheduler = Scheduler(job.global_batch, policy, job.rebalance_interval,
                                   fixed_sizes=cfg.worker_batch_sizes)
        self.registry = Registry()
        self.version = 0
        self.step = 0
        self.state: StepState | None = None
        self._params_frames: tuple[int, list] | None = None
        self._membership = asyncio.Event()
        self._server = None
        self.history: list[dict] = []
        self.epoch_results: list[dict] = []
        self.started = time.time()

    # -- connections ------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await transport.start_server(
            self.cfg.host, self.cfg.port, token=self.cfg.token, on_hello=self._on_hello,
            on_connection=self._serve_worker)
        log.info("master listening on %s:%d — model %s (%d parameters), data %s (%d train / %d eval), "
                 "global batch %d, %d steps", self.cfg.host, self.port, self.job.model, self.flat.numel,
                 self.job.dataset, len(self.train_set), len(self.eval_set), self.job.global_batch,
                 self.total_steps)

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
        h = self.registry.admit(int(hello.get("rank", -1)), str(hello.get("host", "?")),
                                str(hello.get("device", "?")), hello.get("profile") or {}, conn)
        conn.worker = h
        conn.set_payload_allocator(self._push_allocator(h))
        self.scheduler.add_worker(h.wid, rate_hint=float(h.profile.get("probe_samples_per_s", 0) or 0),
                                  max_batch=int(h.profile.get("max_batch", 0) or 0))
        log.info("worker joined: %s, %d/%d workers", h.name, len(self.registry), self.cfg.expected_workers)
        self._event("worker_joined", rank=h.rank, host=h.host, device=h.device, profile=h.profile)
        self._membership.set()
        return {"worker_id": h.wid, "rank": h.rank, "job": self.job.to_wire(), "numel": self.flat.numel,
                "experiment": self.cfg.experiment, "total_steps": self.total_steps}

    def _push_allocator(self, h: WorkerHandle):
        """Each worker's chunks land in one receive buffer that lives as long as the connection."""
        buf = bytearray(0)

        def allocate(msg_type, header, nbytes):
            nonlocal buf
            if msg_type != MsgType.PUSH or nbytes > 2 * self.job.chunk_bytes + 65536:
                return None
            if len(buf) < nbytes:
                buf = bytearray(max(nbytes, min(self.job.chunk_bytes + 65536, 2 * self.job.chunk_bytes)))
            return memoryview(buf)[:nbytes]

        return allocate

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
                    self._on_report(h, msg.header)
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

    def _lose(self, h: WorkerHandle, reason: str) -> None:
        if self.registry.remove(h.wid) is None:
            return
        self.scheduler.remove_worker(h.wid)
        log.warning("worker lost: %s — %s (%d left)", h.name, reason, len(self.registry))
        self._event("worker_lost", rank=h.rank, host=h.host, reason=reason)
        s = self.state
        if s is not None and h.wid in s.sizes and not s.done.done():
            s.done.set_exception(WorkerLost(h.name))
        self._membership.set()

    # -- pushes -------------------------------------------------------------------------------
    def _on_push(self, h: WorkerHandle, msg) -> None:
        hd, s = msg.header, self.state
        if s is None or hd.get("step") != s.step or hd.get("attempt") != s.attempt:
            return   # a push for an aborted attempt: its samples are being redone
        if h.wid not in s.pending:
            raise RemoteError("unexpected_push", f"{h.name} was not scheduled in step {s.step}")
        i = hd.get("chunk")
        if not isinstance(i, int) or i not in s.pending[h.wid] or \
                (hd.get("offset"), hd.get("numel")) != self.chunks[i]:
            raise RemoteError("bad_chunk", f"chunk {i!r} ({hd.get('offset')}+{hd.get('numel')}) does not match "
                              f"this model's chunking or was already received")
        if hd.get("codec") != self.job.compression:
            raise RemoteError("bad_codec", f"expected codec {self.job.compression}, got {hd.get('codec')!r}")
        off, n = self.chunks[i]
        h.set_activity(f"pushing step {s.step} (chunk {i + 1}/{len(self.chunks)})")
        self.decoders[i].decode_accumulate(self.acc_np[off:off + n], hd, msg.segments, s.sizes[h.wid] / s.total)
        s.pending[h.wid].discard(i)
        self._maybe_done(h, s)

    def _on_report(self, h: WorkerHandle, hd: dict) -> None:
        s = self.state
        if s is None or hd.get("step") != s.step or hd.get("attempt") != s.attempt or h.wid not in s.sizes:
            return
        s.reports[h.wid] = report = hd.get("report") or {}
        util = report.get("util")
        if isinstance(util, dict):
            fields = {k: util.get(k) for k in ("cpu_util", "mem_bytes", "gpu_util", "gpu_mem_bytes")}
            for sink in self.sinks:
                if hasattr(sink, "update_worker"):
                    sink.update_worker(h.rank, **fields)
        self._maybe_done(h, s)

    def _maybe_done(self, h: WorkerHandle, s: StepState) -> None:
        if s.pending[h.wid] or h.wid not in s.reports:
            return
        h.set_activity(f"done with step {s.step}, waiting for the others")
        if all(not p for p in s.pending.values()) and len(s.reports) == len(s.pending) and not s.done.done():
            s.done.set_result(None)

    # -- the run ------------------------------------------------------------------------------
    async def wait_for_workers(self, n: int) -> None:
        """Block until ``n`` workers have joined, saying every few seconds who is still missing."""
        deadline = time.monotonic() + self.cfg.join_timeout
        while len(self.registry) < n:
            self._membership.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise HeteroPSError(f"only {len(self.registry)} of {n} workers joined within "
                                    f"{self.cfg.join_timeout:.0f} s; check the workers' logs and MASTER_ADDR")
            try:
                await asyncio.wait_for(self._membership.wait(), timeout=min(5.0, left))
            except asyncio.TimeoutError:
                have = ", ".join(str(h.rank) for h in self.registry.live()) or "none"
                log.info("waiting for %d more worker(s) on port %d (joined ranks: %s)",
                         n - len(self.registry), self.port, have)

    async def train(self) -> dict:
        """Run the whole job; returns the summary."""
        await self.wait_for_workers(self.cfg.expected_workers)
        t_train = time.perf_counter()
        epoch = 0
        n = len(self.train_set)
        while self.step < self.total_steps:
            offset = 0
            while offset < n and self.step < self.total_steps:
                total = min(self.job.global_batch, n - offset)
                await self._run_step(epoch, offset, total)
                offset += total
            await self._end_epoch(epoch)
            epoch += 1
        return await self._finish(time.perf_counter() - t_train, epoch)

    async def _run_step(self, epoch: int, offset: int, total: int) -> None:
        attempt = 0
        t0 = time.perf_counter()
        while True:
            if not self.registry.live():
                log.warning("no workers left; waiting for one to join")
                await self.wait_for_workers(1)
            await self._admit_pending()
            live = self.registry.live()
            sizes, decision = self.scheduler.assign(self.step, [h.wid for h in live], total,
                                                    ranks={h.wid: h.rank for h in live})
            if decision is not None:
                self._log_decision(decision)
            self.acc.zero_()
            s = StepState(step=self.step, attempt=attempt, total=total, sizes={w: b for w, b in sizes.items() if b},
                          pending={w: set(range(len(self.chunks))) for w, b in sizes.items() if b},
                          done=asyncio.get_running_loop().create_future())
            self.state = s
            try:
                await self._send_schedules(s, epoch, offset, live)
                await self._wait_step(s)
                break
            except WorkerLost as exc:
                attempt += 1
                log.warning("step %d: %s left mid-step; redoing the step with the %d remaining worker(s)",
                            self.step, exc, len(self.registry))
            finally:
                self.state = None
        t_agg = time.perf_counter()
        await self._apply(s, epoch, t0, t_agg)

    async def _admit_pending(self) -> None:
        """Workers that joined since the last step get the current parameters first."""
        frames = self._encoded_params()
        for h in self.registry.live():
            if h.status == "joined":
                try:
                    for f in frames:
                        await h.conn.send_frame(f)
                    h.status = "training"
                except (TransportError, OSError) as exc:
                    self._lose(h, f"could not send parameters: {exc}")

    async def _send_schedules(self, s: StepState, epoch: int, offset: int, live) -> None:
        cursor = offset
        for h in live:
            b = s.sizes.get(h.wid, 0)
            h.batch = b
            if not b:
                continue
            header = {"step": s.step, "attempt": s.attempt, "epoch": epoch, "offset": cursor, "count": b,
                      "version": self.version, "total": s.total}
            cursor += b
            h.set_activity(f"computing step {s.step} ({b} samples)")
            try:
                await h.conn.send(MsgType.SCHEDULE, header)
            except (TransportError, OSError) as exc:
                self._lose(h, f"could not send schedule: {exc}")
        if s.done.done():
            s.done.result()   # raises WorkerLost if someone left while we were sending

    async def _wait_step(self, s: StepState) -> None:
        while True:
            done, _ = await asyncio.wait({s.done}, timeout=self.cfg.straggler_warn_s)
            if done:
                return s.done.result()
            now = time.monotonic()
            for wid in s.pending:
                h = self.registry.workers.get(wid)
                if h and (s.pending[wid] or wid not in s.reports):
                    log.warning("step %d: still waiting for %s — last: %s (%.0f s ago)",
                                s.step, h.name, h.activity, now - h.activity_since)

    async def _apply(self, s: StepState, epoch: int, t0: float, t_agg: float) -> None:
        reports = s.reports
        nonfinite = [self.registry.workers[w].name for w, r in reports.items()
                     if r.get("nonfinite") and w in self.registry.workers]
        t_opt = time.perf_counter()
        finite = bool(torch.isfinite(self.acc).all())
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.param.grad = self.acc
            self.optimizer.step()
            self.version += 1
        else:
            log.error("step %d: non-finite gradient (from %s); step skipped, parameters unchanged",
                      s.step, ", ".join(nonfinite) or "the aggregate")
            self._event("nonfinite_gradient", step=s.step, workers=nonfinite)
        self.lr_scheduler.step()
        t_bcast = time.perf_counter()
        await self._broadcast()
        t_end = time.perf_counter()
        for wid, r in reports.items():
            h = self.registry.workers.get(wid)
            if h:
                h.samples += s.sizes[wid]
                h.steps += 1
                h.last_report = r
                self.scheduler.observe(wid, s.sizes[wid], r.get("compute_s", 0) + r.get("encode_s", 0)
                                       + r.get("push_s", 0))
        loss = sum(r.get("loss", 0.0) * s.sizes[w] for w, r in reports.items()) / max(1, s.total)
        step_s = t_end - t0
        rec = {
            "step": s.step, "epoch": epoch, "attempts": s.attempt + 1, "loss": loss, "lr": lr,
            "version": self.version, "samples": s.total, "step_s": step_s, "samples_per_s": s.total / step_s,
            "applied": finite,
            "server": {"aggregate_s": t_agg - t0, "optimizer_s": t_bcast - t_opt, "broadcast_s": t_end - t_bcast},
            "workers": {str(self._rank_of(w)): {"batch": s.sizes[w], **_timing(r)} for w, r in reports.items()},
        }
        self.history.append(rec)
        self._publish("step", rec)
        if self.progress is not None:
            self.progress.update(s.step, epoch, loss, rec["samples_per_s"], s.total)
        elif s.step % 10 == 0 or s.step == self.total_steps - 1:
            log.info("step %d/%d epoch %d loss %.4f  %.0f samples/s  batches %s", s.step + 1, self.total_steps,
                     epoch, loss, rec["samples_per_s"],
                     " ".join(f"r{self._rank_of(w)}={b}" for w, b in sorted(s.sizes.items())))
        self.step += 1

    def _rank_of(self, wid: int) -> int:
        h = self.registry.workers.get(wid)
        return h.rank if h else -wid

    def _encoded_params(self) -> list:
        """The current parameters as frames, encoded once per version and reused for every worker."""
        if self._params_frames and self._params_frames[0] == self.version:
            return self._params_frames[1]
        params = self.flat.params.detach().numpy()
        frames = []
        for i, (off, n) in enumerate(self.chunks):
            fields, segments = self.encoders[i].encode(params[off:off + n])
            header = {"version": self.version, "chunk": i, "offset": off, "numel": n,
                      "codec": self.job.pull_compression, **fields}
            frames.append(protocol.encode_frame(MsgType.PARAMS, header, segments))
        self._params_frames = (self.version, frames)
        return frames

    async def _broadcast(self) -> None:
        frames = self._encoded_params()

        async def send_all(h):
            try:
                for f in frames:
                    await h.conn.send_frame(f)
            except (TransportError, OSError) as exc:
                self._lose(h, f"could not send parameters: {exc}")

        await asyncio.gather(*(send_all(h) for h in self.registry.live() if h.status == "training"))

    async def _end_epoch(self, epoch: int) -> None:
        if not self.job.eval_every_epoch:
            return
        from hetero_ps.trainer import evaluate

        t0 = time.perf_counter()
        # BatchNorm statistics are never trained on the master: re-estimate them on training data first.
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        loss, acc = await asyncio.to_thread(evaluate, self.model, self.eval_set, 256, self.job,
                                            calib_set=self.train_set if has_bn else None)
        rec = {"epoch": epoch, "step": self.step, "eval_loss": loss, "eval_accuracy": acc,
               "eval_s": time.perf_counter() - t0, "elapsed_s": time.time() - self.started}
        self.epoch_results.append(rec)
        self._publish("epoch", rec)
        log.info("epoch %d done: eval loss %.4f, accuracy %s", epoch, loss,
                 "n/a" if acc is None else f"{100 * acc:.2f} %")

    async def _finish(self, train_s: float, epochs: int) -> dict:
        for h in self.registry.live():
            try:
                await h.conn.send(MsgType.BYE, {"reason": "training finished"})
            except (TransportError, OSError):
                pass
        samples = sum(r["samples"] for r in self.history)
        slowest_compute = [max((w["compute_s"] for w in r["workers"].values()), default=0) for r in self.history]
        step_s = [r["step_s"] for r in self.history]
        summary = {
            "experiment": self.cfg.experiment, "model": self.job.model, "dataset": self.job.dataset,
            "parameters": self.flat.numel, "steps": len(self.history), "epochs": epochs, "samples": samples,
            "train_s": train_s, "samples_per_s": samples / train_s if train_s else 0.0,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "eval": self.epoch_results[-1] if self.epoch_results else None,
            "final_eval_accuracy": self.epoch_results[-1]["eval_accuracy"] if self.epoch_results else None,
            "communication_overhead": 1 - sum(slowest_compute) / sum(step_s) if step_s else None,
            "workers": {str(h.rank): {"host": h.host, "device": h.device, "samples": h.samples, "steps": h.steps}
                        for h in self.registry.live()},
            "compression": self.job.compression, "sync": self.job.sync,
        }
        return summary

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

    def _log_decision(self, d) -> None:
        sizes = {str(self._rank_of(w)): b for w, b in d.sizes.items()}
        log.info("batch split (%s): %s — %s", d.policy, sizes, d.reason)
        self._event("schedule", policy=d.policy, sizes=sizes, reason=d.reason,
                    predicted_step_s=d.predicted_step_s, previous_predicted_s=d.previous_predicted_s,
                    inputs={str(self._rank_of(w)): v for w, v in d.inputs.items()})


def _timing(r: dict) -> dict:
    keys = ("loss", "compute_s", "encode_s", "push_s", "wait_s", "pull_s", "bytes_out", "bytes_in")
    return {k: r.get(k, 0.0) for k in keys}
