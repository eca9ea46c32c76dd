"""One rank of the plain synchronous all-reduce baseline (``bench_planes.py``): what DDP does.

Equal batches (B / N per rank, whatever its speed), the mean gradient averaged over the ranks with
one gloo all-reduce per step, every rank stepping its own optimizer — DDP's algorithm, without a
parameter server or a scheduler. The same model, data order and ``--simulate-slowdown`` as the
workers of the cluster runs (compute stretched by sleeping ``(f − 1)`` × its time), so the two are
compared like for like. Prints one JSON line: the rank's samples/s after the warm-up steps.

    python -m benchmarks.allreduce_baseline --rank 0 --world-size 3 --port 29600 --steps 12 --slowdown 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.distributed as dist

from hetero_ps.config import JobConfig
from hetero_ps.training import data, models, optim
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.sampler import EpochSampler
from hetero_ps.training.trainer import LocalTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=4)
    p.add_argument("--slowdown", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.05)
    a = p.parse_args()
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", a.port, a.world_size, a.rank == 0, datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=a.rank, world_size=a.world_size)
    job = JobConfig(model="simple_cnn", dataset="digits", lr=a.lr, optimizer="momentum", momentum=0.9)
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    flat = FlatParams(model)
    trainer = LocalTrainer(job, model, flat, train, info, "cpu")
    param = torch.nn.Parameter(flat.params)
    opt, _ = optim.build_optimizer(job, param, a.steps)
    sampler, n = EpochSampler(len(train), job.seed), len(train)
    share = a.global_batch // a.world_size
    epoch = offset = 0
    t_start = samples = 0.0
    for step in range(a.steps):
        if step == a.skip:
            dist.barrier()
            t_start, samples = time.perf_counter(), 0.0
        if offset + a.global_batch > n:
            epoch, offset = epoch + 1, 0
        stats = trainer.compute_gradient(sampler.indices(epoch, offset + a.rank * share, share))
        if a.slowdown > 1.0:
            time.sleep(stats.compute_s * (a.slowdown - 1.0))
        dist.all_reduce(flat.grads)
        flat.grads.div_(a.world_size)
        param.grad = flat.grads
        opt.step()
        offset += a.global_batch
        samples += share * a.world_size
    elapsed = time.perf_counter() - t_start
    dist.destroy_process_group()
    if a.rank == 0:
        print(json.dumps({"samples_per_s": samples / elapsed, "steps": a.steps - a.skip}), flush=True)


if __name__ == "__main__":
    main()
