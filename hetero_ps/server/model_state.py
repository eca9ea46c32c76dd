"""The master's copy of the model: parameters in one flat buffer, the optimizer, and their wire form.

The parameters are cut into the same chunks the workers cut their gradients into
(:func:`~hetero_ps.wire.messages.chunk_layout`); each chunk has a push decoder and a pull encoder.
``version`` counts the optimizer updates applied; the encoded parameters are cached per version, so
every worker is sent the same frames.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import RemoteError
from hetero_ps.server import codec_choice, pull_delta
from hetero_ps.training import models, optim
from hetero_ps.training.flat import FlatParams
from hetero_ps.wire import codecs, protocol
from hetero_ps.wire.messages import Push, chunk_layout, params_from_codec
from hetero_ps.wire.protocol import MsgType


class ModelState:
    def __init__(self, job: JobConfig, info: Any, total_steps: int):
        self.job = job
        self.model = models.build_model(job, info)
        self.flat = FlatParams(self.model)
        self.param = torch.nn.Parameter(self.flat.params)  # shares storage with the model's views
        self.optimizer, self.lr_scheduler = optim.build_optimizer(job, self.param, total_steps)
        self.chunks = chunk_layout(self.flat.numel, job.chunk_bytes)
        # Per codec spec, one decoder (pushes) or encoder (full pulls) per chunk: with --compression
        # auto each worker may use its own (codec_choice.py).
        self._decoders: dict[str, list[codecs.Codec]] = {}
        self._encoders: dict[str, list[codecs.Codec]] = {}
        self.version = 0
        self._params_frames: dict[str, tuple[int, list[Any]]] = {}  # spec -> (version, frames)

    @property
    def numel(self) -> int:
        return self.flat.numel

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def push_codecs(self) -> tuple[str, ...]:
        """Every codec a worker may push with."""
        return codec_choice.LADDER if codec_choice.is_auto(self.job.compression) else (self.job.compression,)

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

    def apply(self, grad: torch.Tensor) -> bool:
        """One optimizer update with ``grad``; skipped (False) if it holds NaN/Inf."""
        if not bool(torch.isfinite(grad).all()):
            return False
        self.param.grad = grad
        self.optimizer.step()
        self.version += 1
        return True

    def step_lr(self) -> None:
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
        """The current parameters as PARAMS frames of the full-pull codec ``spec`` (none, fp16, bf16),
        encoded once per version and shared by every worker that pulls with it.

        In BSP nothing changes the parameters while they are being sent, so uncompressed frames
        point straight at the parameter buffer. SSP/ASP may update them mid-send, so there every
        version's frames own a copy of their bytes.
        """
        cached = self._params_frames.get(spec)
        if cached and cached[0] == self.version:
            return cached[1]
        params = self.flat.params.detach().numpy()
        snapshot = self.job.sync != "bsp"
        encoders = self._codecs(self._encoders, spec)
        frames = []
        for i, (off, n) in enumerate(self.chunks):
            fields, segments = encoders[i].encode(params[off : off + n])
            if snapshot:
                segments = [bytes(memoryview(s).cast("B")) for s in segments]
            header = params_from_codec(fields, version=self.version, chunk=i, offset=off, numel=n, codec=spec)
            frames.append(protocol.encode_frame(MsgType.PARAMS, header.to_header(), segments))
        self._params_frames[spec] = (self.version, frames)
        return frames
