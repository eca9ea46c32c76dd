"""What a worker tells the master about its hardware and its speed when it joins.

* ``hardware_profile(device)`` — CPU model, cores, frequency, RAM; GPUs (name, memory, compute
  capability, utilisation through NVML). Best effort: a missing GPU, driver or NVML library gives
  an empty field, never an error, because a CPU-only laptop is a first-class worker.
* ``calibrate(trainer, n)`` — a short probe of the job's real model: seconds per gradient at two
  batch sizes, fitted to ``t = c + b / r``, so the master's very first split is already close.
* ``estimate_max_batch(trainer, device, b)`` — the largest batch that fits this node's memory, from
  the memory one gradient at ``b`` samples needs.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time

import numpy as np
import psutil
import torch

# estimate_max_batch: the share of free memory a step may use (the rest is headroom for the
# allocator, data, other processes), and a cap for "effectively unbounded" answers on big machines.
MEMORY_SAFETY = 0.6
MAX_BATCH_CAP = 1 << 20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": p.name,
                "memory_bytes": int(p.total_memory),
                "compute_capability": f"{p.major}.{p.minor}",
            }
        )
    try:  # utilisation needs NVML (nvidia-ml-py); absent drivers only lose this field
        import pynvml

        pynvml.nvmlInit()
        for g in gpus:
            h = pynvml.nvmlDeviceGetHandleByIndex(g["index"])
            g["utilization_pct"] = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        pynvml.nvmlShutdown()
    except Exception:
        pass
    return gpus


def hardware_profile(device: str) -> dict:
    """A msgpack-friendly description of this node."""
    freq = psutil.cpu_freq()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "cpu_threads": os.cpu_count() or 1,
        "cpu_mhz": float(freq.max or freq.current) if freq else 0.0,
        "ram_bytes": int(psutil.virtual_memory().total),
        "torch_threads": torch.get_num_threads(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; an explicit CUDA request must be satisfiable."""
    from hetero_ps.errors import ConfigError

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {requested} was requested but CUDA is not available here "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False). Install an NVIDIA driver "
                "and a CUDA build of torch, or run with --device cpu (or auto)."
            )
        idx = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
        return requested
    if requested != "cpu":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    return "cpu"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(trainer, n_samples: int, batch_sizes=(8, 32), slowdown: float = 1.0, repeats: int = 2) -> dict:
    """Time the job's real gradient at two batch sizes and fit ``t(b) = c + b / r``.

    For each size ``b`` the trainer's ``compute_gradient`` runs once untimed (warm-up: allocations,
    kernel selection) and ``repeats`` times timed on consecutive sample slices; the fastest run is
    kept (noise only ever adds time). With ``t1``, ``t2`` at ``b1 < b2``:

        1 / r = (t2 − t1) / (b2 − b1),    c = t1 − b1 / r

    clamped so ``c ≥ 0`` (else ``c = 0``, ``r = b2 / t2``). ``slowdown`` F (``--simulate-slowdown``)
    stretches compute F-fold, so the report is ``c·F`` and ``r / F``. Returns a msgpack-friendly dict:
    ``probe_samples_per_s`` (``b2 / t2``, the rate at the larger size), ``probe_c_s``, ``probe_r``,
    ``probe_batch_sizes``, ``probe_seconds`` (per size) and ``probe_wall_s`` (what the probe took).
    The trainer's gradient buffer is overwritten; parameters are untouched.
    """
    if n_samples < 1:
        raise ValueError(f"calibration needs at least one training sample, got {n_samples}")
    if not (slowdown > 0 and math.isfinite(slowdown)):
        raise ValueError(f"slowdown must be a positive number, got {slowdown}")
    sizes = sorted({max(1, min(int(b), n_samples)) for b in batch_sizes})
    if len(sizes) < 2:  # a tiny data set: fall back to what it has
        sizes = sorted({1, max(1, n_samples)}) if n_samples > 1 else [1]
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = getattr(trainer, "device", "cpu")
    t_start = time.perf_counter()
    cursor = 0
    seconds = []
    for b in sizes:
        best = math.inf
        for k in range(repeats + 1):
            idx = (np.arange(cursor, cursor + b) % n_samples).astype(np.int64)
            cursor = (cursor + b) % n_samples
            _sync(device)
            t0 = time.perf_counter()
            trainer.compute_gradient(idx)
            _sync(device)
            if k:  # run 0 is the warm-up
                best = min(best, time.perf_counter() - t0)
        seconds.append(best)
    if len(sizes) >= 2:
        b1, b2, t1, t2 = sizes[0], sizes[-1], seconds[0], seconds[-1]
        slope = (t2 - t1) / (b2 - b1)
        c = t1 - b1 * slope
        if slope <= 0 or c < 0:  # noise beat the signal: a pure rate through the origin
            c, slope = 0.0, t2 / b2
    else:
        b2, t2 = sizes[0], seconds[0]
        c, slope = 0.0, t2 / b2
    return {
        "probe_samples_per_s": b2 / (t2 * slowdown),
        "probe_c_s": c * slowdown,
        "probe_r": 1.0 / (slope * slowdown),
        "probe_batch_sizes": sizes,
        "probe_seconds": [t * slowdown for t in seconds],
        "probe_wall_s": time.perf_counter() - t_start,
    }


class _SavedBytes:
    """Counts the distinct storage bytes autograd saves for backward (the activations)."""

    def __init__(self):
        self.seen: set = set()
        self.nbytes = 0

    def pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device.type)
            if key not in self.seen and st.data_ptr():
                self.seen.add(key)
                self.nbytes += st.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse or exotic tensors: count the tensor
            self.nbytes += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t):
        return t


def _per_sample_bytes(trainer, device, probe_batch: int, n: int) -> tuple[int, int]:
    """(activation bytes per sample, measured peak growth per sample) of one gradient at ``probe_batch``."""
    idx = (np.arange(probe_batch) % n).astype(np.int64)
    saved = _SavedBytes()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        trainer.compute_gradient(idx)
    peak_growth = 0
    if cuda:
        torch.cuda.synchronize(dev)
        peak_growth = max(0, torch.cuda.max_memory_allocated(dev) - base)
    micro = int(getattr(trainer, "micro_batch", 0) or 0)
    per = probe_batch if not micro else min(probe_batch, micro)
    return saved.nbytes // max(1, per), peak_growth // max(1, per)


def estimate_max_batch(trainer, device, probe_batch: int) -> int:
    """The largest batch one gradient can take in this node's free memory; 0 = no cap known.

    Memory that grows with the batch is what autograd keeps for backward — every saved activation
    — plus the gradients flowing back through it, of the same order. One gradient at ``probe_batch``
    samples is run with a ``saved_tensors_hooks`` counter (exact on any device, unlike the RSS, which
    does not show freed activations, or ``ru_maxrss``, a lifetime high-water mark); on CUDA the
    allocator's peak growth over the step is measured as well and the larger figure is used:

        per_sample = max(2 × saved bytes, peak growth) / probe_batch
        max_batch  = MEMORY_SAFETY × free bytes / per_sample

    Free bytes are ``torch.cuda.mem_get_info`` (plus what torch has cached but not allocated) on
    CUDA and ``psutil.virtual_memory().available`` on the CPU. With micro-batching a step never
    holds more than one micro-batch of activations, so there is no cap (0). The answer is capped at
    ``MAX_BATCH_CAP`` and is at least ``probe_batch`` when the probe itself ran. A probe that runs
    out of memory is retried at half the batch (down to 1), so a small GPU gets a small cap
    rather than a crash at join.
    """
    if probe_batch < 1:
        raise ValueError(f"probe_batch must be at least 1, got {probe_batch}")
    if int(getattr(trainer, "micro_batch", 0) or 0) > 0:
        return 0
    n = len(trainer.train_set)
    if n < 1:
        return 0
    dev = torch.device(device)
    while True:
        try:
            saved, growth = _per_sample_bytes(trainer, device, probe_batch, n)
            break
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or probe_batch == 1:
                raise
            trainer.flat.zero_grad_()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            probe_batch //= 2
    per_sample = max(2 * saved, growth)
    if per_sample <= 0:
        return 0
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        free += max(0, torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    else:
        free = psutil.virtual_memory().available
    est = int(MEMORY_SAFETY * free // per_sample)
    return max(probe_batch, min(est, MAX_BATCH_CAP))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
