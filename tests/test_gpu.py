"""The GPU paths, on a real GPU: skipped with the reason on a machine without CUDA.

``scripts/gpu_check.sh`` runs this file (and writes the figures it prints to a file); CI runs it too,
where every test skips. What runs on CUDA: the trainer's gradient against the CPU's, the kernels'
refusal of device tensors, the hardware profile's GPU fields and NVML utilisation, a CUDA worker
beside a CPU worker in one BSP job (the union-batch step, and both workers' throughput), and the
profiler trace of a CUDA step, a CUDA worker beside a CPU worker on the gloo plane (the union-batch
step, tcp vs gloo throughput), and an nccl plane with a GPU per member (skipped with fewer than two).
"""

from __future__ import annotations

import glob
import json
import os
import re
import urllib.request

import numpy as np
import pytest
import torch
from conftest import metrics_path, read_jsonl, still_running, wait_until

from hetero_ps import kernels
from hetero_ps.config import JobConfig
from hetero_ps.testing import LocalCluster
from hetero_ps.training import data, models
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.sampler import EpochSampler
from hetero_ps.training.trainer import LocalTrainer
from hetero_ps.worker.profile import hardware_profile

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here); scripts/gpu_check.sh"),
]
REPORT = os.environ.get("HETERO_PS_GPU_REPORT", "")  # gpu_check.sh: where the figures go (JSON lines)


def _report(name: str, **figures) -> None:
    print(f"[gpu] {name}: {figures}")
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"check": name, **figures}) + "\n")


def _trainer(device: str):
    job = JobConfig(model="simple_cnn", dataset="digits", seed=0)
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info).to(device)
    flat = FlatParams(model)
    return LocalTrainer(job, model, flat, train, info, device), flat


def test_the_gradient_on_cuda_is_the_cpus():
    idx = np.arange(48)
    (cpu, cpu_flat), (gpu, gpu_flat) = _trainer("cpu"), _trainer("cuda")
    gpu_flat.load_(cpu_flat.params.cuda())
    a, b = cpu.compute_gradient(idx), gpu.compute_gradient(idx)
    assert not b.nonfinite and abs(a.loss - b.loss) < 1e-4
    torch.testing.assert_close(gpu_flat.grads.cpu(), cpu_flat.grads, rtol=2e-3, atol=1e-4)  # TF32 convolutions
    assert gpu_flat.check_views()


def test_the_kernels_refuse_device_tensors_with_a_clear_error():
    with pytest.raises(TypeError, match="is on cuda"):
        kernels.weighted_accumulate(torch.zeros(8, device="cuda"), np.zeros(8, np.float32), 1.0)


def test_the_hardware_profile_names_the_gpus_and_nvml_reads_them():
    gpus = hardware_profile("cuda")["gpus"]
    assert len(gpus) == torch.cuda.device_count() and all(g["memory_bytes"] > 0 and g["name"] for g in gpus)
    assert all("utilization_pct" in g for g in gpus), "nvidia-ml-py could not read the GPU (driver/NVML?)"
    _report("hardware profile", gpus=gpus)


def _mixed(tmp_path, name: str, extra: list[str]) -> tuple[str, list[dict]]:
    args = ["--world-size", "3", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--experiment", name, "--no-dashboard", *extra]
    workers = [["--rank", "1", "--device", "cuda"], ["--rank", "2", "--device", "cpu"]]
    with LocalCluster(tmp_path / name, args, workers=workers) as c:
        assert c.wait(timeout=300) == 0, c.output("server")[-3000:]
        exp = c.experiment_dir()
    return exp, read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))


def _assert_one_union_step(exp: str) -> None:
    """The run's one SGD step (lr 0.5) equals one process's step on the first 64 samples."""
    job = JobConfig(model="simple_cnn", dataset="digits", global_batch=64, optimizer="sgd", lr=0.5)
    trainer, flat = _trainer("cpu")
    before = flat.params.clone()
    trainer.compute_gradient(EpochSampler(len(trainer.train_set), job.seed).indices(0, 0, 64))
    expected = before - 0.5 * flat.grads
    state = torch.load(os.path.join(exp, "model.pt"), weights_only=True)
    trainer.model.load_state_dict(state.get("model", state))
    got = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-4)


def test_a_cuda_worker_and_a_cpu_worker_take_the_union_batch_step(tmp_path):
    extra = ["--global-batch-size", "64", "--worker-batch-sizes", "1:24,2:40", "--max-steps", "1"]
    extra += ["--optimizer", "sgd", "--lr", "0.5", "--lr-schedule", "constant"]
    exp, steps = _mixed(tmp_path, "union", extra)
    assert {r: w["batch"] for r, w in steps[0]["workers"].items()} == {"1": 24, "2": 40}
    _assert_one_union_step(exp)


def test_a_mixed_job_balances_the_cuda_worker_and_the_dashboard_shows_its_gpu(tmp_path):
    args = ["--world-size", "3", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--experiment", "mixed", "--global-batch-size", "256", "--epochs", "10000", "--enable-load-balancing"]
    workers = [["--rank", "1", "--device", "cuda"], ["--rank", "2", "--device", "cpu"]]
    with LocalCluster(tmp_path, args, workers=workers) as c:
        steps_file = metrics_path(c.workdir, "mixed", "steps")

        def ready():
            still_running(c.server, lambda: c.output("server"))
            m = re.search(r"dashboard: (http://\S+)", c.output("server"))
            return m and len(read_jsonl(steps_file, missing_ok=True)) >= 40 and m.group(1)

        url = wait_until(ready, 300, what="the dashboard and 40 steps")
        with urllib.request.urlopen(url.rstrip("/") + "/api/status", timeout=30) as r:
            rows = {int(w["rank"]): w for w in json.load(r)["workers"]}
        steps = read_jsonl(steps_file)
    assert rows[1].get("gpu_mem_bytes"), rows[1]
    assert rows[1].get("gpu_util") is not None, "NVML gave no GPU utilisation (nvidia-ml-py, driver?)"
    last = steps[len(steps) // 2 :]
    share = {r: float(np.mean([s["workers"][r]["batch"] for s in last])) for r in ("1", "2")}
    rates = {r: float(np.mean([s["workers"][r]["batch"] / s["workers"][r]["compute_s"] for s in last])) for r in share}
    cluster = sum(s["samples"] for s in last) / sum(s["step_s"] for s in last)
    assert share["1"] > share["2"], "the scheduler gives the GPU worker the larger share"
    _report(
        "mixed job (cuda + cpu, dynamic BSP)", batch=share, compute_samples_per_s=rates, cluster_samples_per_s=cluster
    )


def test_a_cuda_step_is_profiled(tmp_path):
    args = ["--world-size", "2", "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--experiment", "prof", "--no-dashboard", "--max-steps", "3"]
    with LocalCluster(tmp_path, args, workers=[["--rank", "1", "--device", "cuda", "--profile", "1"]]) as c:
        assert c.wait(timeout=300) == 0, c.output("server")[-3000:]
    traces = glob.glob(str(tmp_path / "**" / "profiles" / "*.json"), recursive=True)
    assert traces, "no trace written"
    with open(traces[0]) as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    assert any("cuda" in n.lower() for n in names), "no CUDA activity in the trace"
    _report("profiler", trace=os.path.basename(traces[0]), events=len(names))


def test_a_cuda_worker_and_a_cpu_worker_on_the_gloo_plane(tmp_path):
    """--backend gloo with a CUDA worker (its gradient staged through host memory) beside a CPU one:
    the union-batch step over the all-reduce, then the plane's throughput over 40 steps."""
    extra = ["--global-batch-size", "64", "--worker-batch-sizes", "1:24,2:40", "--max-steps", "1"]
    extra += ["--optimizer", "sgd", "--lr", "0.5", "--lr-schedule", "constant", "--backend", "gloo"]
    exp, steps = _mixed(tmp_path, "gloo-union", extra)
    assert {r: w["batch"] for r, w in steps[0]["workers"].items()} == {"1": 24, "2": 40}
    _assert_one_union_step(exp)
    rates = {}
    for backend in ("tcp", "gloo"):
        extra = ["--global-batch-size", "256", "--max-steps", "40", "--epochs", "10", "--backend", backend]
        extra += ["--enable-load-balancing"]
        _, steps = _mixed(tmp_path, f"rate-{backend}", extra)
        late = steps[10:]
        rates[backend] = sum(s["samples"] for s in late) / sum(s["step_s"] for s in late)
    _report("mixed job (cuda + cpu): tcp vs gloo plane", samples_per_s=rates)


def test_an_nccl_plane_with_a_gpu_per_member(tmp_path):
    """--backend nccl: the master (rank 0, on cuda:0) and a worker on each other GPU."""
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(
            f"--backend nccl needs a GPU per member, the master's included (NCCL refuses two ranks on one GPU); "
            f"this machine has {n}"
        )
    args = ["--world-size", str(n), "--no-local-worker", "--model", "simple_cnn", "--dataset", "digits"]
    args += ["--experiment", "nccl", "--no-dashboard", "--max-steps", "30", "--backend", "nccl"]
    workers = [["--rank", str(i), "--device", f"cuda:{i}"] for i in range(1, n)]
    with LocalCluster(tmp_path, args, workers=workers) as c:
        assert c.wait(timeout=300) == 0, c.output("server")[-3000:]
        steps = read_jsonl(os.path.join(c.experiment_dir(), "metrics", "steps.jsonl"))
    assert len(steps) == 30
    late = steps[10:]
    _report("nccl plane", ranks=n, samples_per_s=sum(s["samples"] for s in late) / sum(s["step_s"] for s in late))
