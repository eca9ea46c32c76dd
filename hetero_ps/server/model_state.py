"""The master's copy of the model: parameters in one flat buffer, the optimizer, and their wire form.

The parameters are cut into the same chunks the workers cut their gradients into
(:func:`~hetero_ps.wire.messages.chunk_layout`); each chunk has a push decoder and a pull encoder.
``version`` counts the optimizer updates applied; the encoded parameters are cached per version, so
every worker is sent the same frames. Updates run through the native optimizer kernels
(``chunked_step.py``) on torch's optimizer state: all at once (``apply``), or chunk by chunk beside
the broadcast (``start_update``, BSP; ``streamed_update.py``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError, RemoteError
from hetero_ps.kernels.chunked_step import ChunkedStep
from hetero_ps.server import codec_choice, pull_delta
from hetero_ps.server.streamed_update import Changes, StreamedUpdate, subtract_changes
from hetero_ps.training import models, optim
from hetero_ps.training.flat import FlatParams
from hetero_ps.wire import codecs, protocol
from hetero_ps.wire.messages import OPTIMIZER_STATES, Push, chunk_layout, params_from_codec
from hetero_ps.wire.protocol import MsgType


class ModelState:
    def __init__(self, job: JobConfig, info: Any, total_steps: int):
        self.job = job
        self.model = models.build_model(job, info)
        self.flat = FlatParams(self.model)
        self.param = torch.nn.Parameter(self.flat.params)  # shares storage with the model's views
        # DGC: the workers' pushes already carry the momentum, so the master's step must not add it again.
        opt_job = dataclasses.replace(job, momentum=0.0) if momentum_correction_of(job) else job
        if job.sync == "local":  # the master's step is the outer one; the job's optimizer runs on the workers
            self.optimizer, self.lr_scheduler = optim.build_outer_optimizer(job, self.param)
            self.inner_lr = optim.lr_factor(job, total_steps)  # × job.lr, at the round's first step
        else:
            self.optimizer, self.lr_scheduler = optim.build_optimizer(opt_job, self.param, total_steps)
        self.stepper = ChunkedStep(self.optimizer)
        self.update: StreamedUpdate | None = None  # the update being stepped and sent (BSP)
        self.chunks = chunk_layout(self.flat.numel, job.chunk_bytes)
        # Per codec spec, one decoder (pushes) or encoder (full pulls) per chunk: with --compression
        # auto each worker may use its own (codec_choice.py).
        self._decoders: dict[str, list[codecs.Codec]] = {}
        self._encoders: dict[str, list[codecs.Codec]] = {}
        self.version = 0
        self._params_frames: dict[str, tuple[int, list[Any]]] = {}  # spec -> (version, frames; None: not yet)

    @property
    def numel(self) -> int:
        return self.flat.numel

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def push_codecs(self) -> tuple[str, ...]:
        """Every codec a worker may push with."""
        if codec_choice.is_auto(self.job.compression):
            return codec_choice.ladder_for(self.job.optimizer)
        return (self.job.compression,)

    def _codecs(self, table: dict[str, list[codecs.Codec]], spec: str) -> list[codecs.Codec]:
        if spec not in table:
            table[spec] = [codecs.make_codec(spec, n) for _, n in self.chunks]
        return table[spec]

    def max_push_bytes(self) -> int:
        """The largest payload one pushed chunk may have."""
        return max(d.max_encoded_bytes() for spec in self.push_codecs() for d in self._codecs(self._decoders, spec))

    def accumulate(self, push: Push, segments: Any, acc: np.ndarray, weight: float, codec: str) -> None:
        """``acc[chunk] += weight · decode(pushed chunk)``, after checking the push matches our chunking
        and ``codec``, the one this worker was told to push with."""
        chunk = push.chunk
        if (push.offset, push.numel) != self.chunks[chunk]:
            raise RemoteError(
                "bad_chunk",
                f"chunk {chunk} ({push.offset}+{push.numel}) does not match this model's chunking {self.chunks[chunk]}",
            )
        if push.codec != codec:
            raise RemoteError("bad_codec", f"expected codec {codec}, got {push.codec!r}")
        off, n = self.chunks[chunk]
        decoder = self._codecs(self._decoders, codec)[chunk]
        decoder.decode_accumulate(acc[off : off + n], push.codec_header(), segments, weight)

    def apply(self, grad: torch.Tensor, changes: Changes = ()) -> bool:
        """One optimizer update with ``grad``, all of it now, then ``θ −= w·Δ`` for each of ``changes``
        (finite: the caller checked); skipped (False) if ``grad`` holds NaN/Inf."""
        if not optim.all_finite(grad):
            return False
        self.stepper.step(grad.numpy())
        subtract_changes(self.flat.params.detach().numpy(), changes)
        self.version += 1
        return True

    def start_update(self, grad: torch.Tensor, changes: Changes = ()) -> bool:
        """Begin one update with ``grad`` and ``changes`` (as ``apply``), stepped chunk by chunk on a
        thread (``chunk_ready``, ``update_finished``); skipped (False) if ``grad`` holds NaN/Inf.
        ``grad`` and the changes must stay untouched until ``update_finished``."""
        if not optim.all_finite(grad):
            return False
        self.update = StreamedUpdate(self.stepper, self.chunks, grad, changes)
        self.version += 1
        return True

    def apply_changes(self, changes: Changes) -> None:
        """``θ −= w·Δ`` for each change, as an update of its own (a new version, no optimizer step)."""
        subtract_changes(self.flat.params.detach().numpy(), changes)
        self.version += 1

    async def chunk_ready(self, i: int) -> None:
        """Chunk ``i`` holds the current version's parameters (at once unless an update is being stepped)."""
        if self.update is not None:
            await self.update.chunk(i)

    async def update_finished(self) -> float:
        """Wait for the update being stepped, if any; the seconds its stepping took."""
        update = self.update
        if update is None:
            return 0.0
        await update.finished()
        if self.update is update:  # cleared only now: until then every chunk_ready must wait for it
            self.update = None
        return update.seconds

    def step_lr(self) -> None:
        with warnings.catch_warnings():  # torch warns since it never saw optimizer.step(): ChunkedStep steps it
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.lr_scheduler.step()

    def checkpoint_state(self) -> dict[str, Any]:
        """Parameters, optimizer and LR schedule, as plain tensors and numbers (for ``checkpoint.save``)."""
        return {
            "params": self.flat.params.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "version": self.version,
            "numel": self.numel,
        }

    def load_checkpoint_state(self, ckpt: dict[str, Any]) -> None:
        with torch.no_grad():
            self.flat.params.copy_(ckpt["params"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.version = int(ckpt["version"])
        self._params_frames.clear()

    def replica_pull(self, spec: str) -> pull_delta.ReplicaPull:
        """A worker's delta pulls with the delta codec ``spec``."""
        job = self.job
        return pull_delta.ReplicaPull(spec, self.chunks, job.pull_bound, job.pull_resync_every)

    def encoded_params(self, spec: str) -> list[Any]:
        """Every chunk of the current parameters as PARAMS frames of the full-pull codec ``spec`` (none,
        fp16, bf16), encoded here at once, so all of them hold one version (SSP/ASP update the
        parameters between two sends). Not while an update is being stepped: use ``params_frame``."""
        assert self.update is None, "an update is being stepped: its chunks go out with params_frame"
        return [self._frame(spec, i) for i in range(len(self.chunks))]

    def optimizer_state_frames(self) -> list[Any]:
        """The optimizer's state (momentum, Adam's moments and step) as PARAMS frames with ``state``:
        a worker of a collective plane steps its own copy, which must start from the master's."""
        state = self.optimizer.state.get(self.param, {})
        step = state.get("step")
        opt_step = int(step.item()) if isinstance(step, torch.Tensor) else int(step or 0)
        frames = []
        for name in OPTIMIZER_STATES:
            buf = state.get(name)
            if not isinstance(buf, torch.Tensor):
                continue
            values = buf.detach().numpy()
            for i, (off, n) in enumerate(self.chunks):
                fields, segments = self._codecs(self._encoders, "none")[i].encode(values[off : off + n])
                header = dataclasses.replace(
                    params_from_codec(fields, version=self.version, chunk=i, offset=off, numel=n, codec="none"),
                    state=name,
                    opt_step=opt_step,
                )
                copied = [bytes(memoryview(seg).cast("B")) for seg in segments]  # (sent later; the state moves on)
                frames.append(protocol.encode_frame(MsgType.PARAMS, header.to_header(), copied))
        return frames

    async def params_frame(self, spec: str, i: int) -> Any:
        """Chunk ``i`` of the current parameters as a PARAMS frame, once that chunk is stepped (BSP)."""
        await self.chunk_ready(i)
        return self._frame(spec, i)

    def _frame(self, spec: str, i: int) -> Any:
        """Chunk ``i``'s frame, encoded once per version and shared by every worker that pulls with ``spec``.

        In BSP nothing changes a stepped chunk while it is being sent, so uncompressed frames point
        straight at the parameter buffer. SSP/ASP may update them mid-send, so there every version's
        frames own a copy of their bytes."""
        cached = self._params_frames.get(spec)
        if not cached or cached[0] != self.version:
            cached = self._params_frames[spec] = (self.version, [None] * len(self.chunks))
        frames = cached[1]
        if frames[i] is None:
            off, n = self.chunks[i]
            params = self.flat.params.detach().numpy()[off : off + n]
            fields, segments = self._codecs(self._encoders, spec)[i].encode(params)
            if not self.job.bulk_synchronous:
                segments = [bytes(memoryview(s).cast("B")) for s in segments]
            header = params_from_codec(fields, version=self.version, chunk=i, offset=off, numel=n, codec=spec)
            frames[i] = protocol.encode_frame(MsgType.PARAMS, header.to_header(), segments)
        return frames[i]


def momentum_correction_of(job: JobConfig) -> bool:
    """Whether ``job`` (its knobs resolved) runs DGC's momentum correction; ConfigError if it cannot."""
    if not job.momentum_correction:
        return False
    spec = "" if codecs.is_auto(job.compression) else job.compression
    if not spec or codecs.parse_codec(spec).id != codecs.CodecId.TOPK:
        raise ConfigError(
            f"--momentum-correction needs top-k pushes (--compression topk:RATIO), not {job.compression}: it "
            "corrects the momentum of the values top-k holds back"
        )
    if job.optimizer != "momentum" or not job.momentum:
        raise ConfigError(
            f"--momentum-correction needs --optimizer momentum with a momentum > 0 (this job: {job.optimizer}, "
            f"momentum {job.momentum}): it moves that momentum to the workers"
        )
    return True
