"""What a worker tells the master about its hardware when it joins.

Everything here is best effort: a missing GPU, driver or NVML library gives an empty field, never an
error, because a CPU-only laptop is a first-class worker.
"""

from __future__ import annotations

import os
import platform
import socket

import psutil
import torch


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
        gpus.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                     "compute_capability": f"{p.major}.{p.minor}"})
    try:   # utilisation needs NVML (nvidia-ml-py); absent drivers only lose this field
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
                "and a CUDA build of torch, or run with --device cpu (or auto).")
        idx = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
        return requested
    if requested != "cpu":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    return "cpu"
