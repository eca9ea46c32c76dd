"""``python -m hetero_ps.server``: the master. It owns the job; workers learn it when they join.

WORLD_SIZE (as in the seed guide) counts the master too. By default the master also trains, through
a local worker process it starts itself, so WORLD_SIZE=3 means this machine plus two workers;
``--no-local-worker`` keeps the master to serving (then WORLD_SIZE=3 still means two workers).
``--batch-size`` is per device: the global batch is batch-size × training workers, unless
``--global-batch-size`` sets it directly. The global batch never changes during a job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time

import torch

from hetero_ps.config import (
    BACKENDS,
    LR_SCHEDULES,
    OPTIMIZERS,
    POLICIES,
    STALENESS_SCALINGS,
    SYNC_MODES,
    JobConfig,
    check_port,
    env_int,
)
from hetero_ps.errors import ConfigError, HeteroPSError
from hetero_ps.observe.logs import add_file_log, remove_file_logs, setup_logging
from hetero_ps.observe.progress import Progress
from hetero_ps.server import checkpoint, token
from hetero_ps.server.local_worker import LocalWorker
from hetero_ps.training.plugins import parse_kv
from hetero_ps.training.recipes import recipe_for

log = logging.getLogger("hetero_ps.server")
_RUNNING: list = []  # the master of this process, once built: an interrupt says what it stopped
_INTERRUPTED_WHILE: list[str] = []


def build_parser() -> argparse.ArgumentParser:
    d = JobConfig()
    # allow_abbrev=False: a typo such as --epoch is an error, not silently --epochs
    p = argparse.ArgumentParser(
        prog="python -m hetero_ps.server",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--host",
        default=os.environ.get("HETERO_PS_HOST", "0.0.0.0"),
        help="address to listen on (default 0.0.0.0: every interface)",
    )
    g.add_argument(
        "--port",
        "--master-port",
        dest="port",
        type=int,
        default=env_int("MASTER_PORT", 29500),
        help="port to listen on (env MASTER_PORT, default 29500; 0 picks a free one)",
    )
    g.add_argument(
        "--token",
        default=os.environ.get("HETERO_PS_TOKEN", ""),
        help="shared secret workers must know (env HETERO_PS_TOKEN)",
    )
    g.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="bound to a network address without a token, let anyone who reaches the port join "
        "(default: the master generates a token and prints the worker command with it)",
    )
    g.add_argument(
        "--tls-cert",
        default=os.environ.get("HETERO_PS_TLS_CERT", ""),
        metavar="PATH",
        help="use TLS on every connection, with this PEM certificate (env HETERO_PS_TLS_CERT; make one with "
        "python -m hetero_ps.tools.tls make-cert); workers then need --tls-fingerprint or --tls-ca",
    )
    g.add_argument(
        "--tls-key",
        default=os.environ.get("HETERO_PS_TLS_KEY", ""),
        metavar="PATH",
        help="the certificate's private key, PEM, unencrypted (env HETERO_PS_TLS_KEY)",
    )
    g.add_argument("--port-file", default="", help="write the port actually bound here (useful with --port 0)")
    g.add_argument(
        "--world-size",
        type=int,
        default=env_int("WORLD_SIZE", 1),
        help="nodes in the job, the master included (env WORLD_SIZE, default 1)",
    )
    g.add_argument("--no-local-worker", action="store_true", help="the master does not train itself")
    g.add_argument("--local-device", default="auto", help="device of the master's own worker (auto|cpu|cuda[:N])")
    g.add_argument("--local-slowdown", type=float, default=1.0, help=argparse.SUPPRESS)
    g.add_argument(
        "--join-timeout",
        type=float,
        default=600.0,
        help="fail if the workers have not all joined after this many seconds (default 600)",
    )
    g.add_argument(
        "--worker-timeout",
        type=float,
        default=30.0,
        help="declare a silent worker lost after this many seconds (default 30; both sides heartbeat every quarter)",
    )
    g.add_argument(
        "--backend",
        default="tcp",
        choices=list(BACKENDS),
        help="where the gradients go: tcp (default: through the master, any mix of links, every codec and "
        "sync mode), gloo (torch.distributed all-reduce among the workers, CPUs and GPUs; BSP) or nccl "
        "(the same on GPUs only, the master's included). The control plane is always the master's TCP",
    )
    g.add_argument(
        "--collective-port",
        type=int,
        default=None,
        help="gloo/nccl: the port of the master's rendezvous store (default MASTER_PORT + 1; open it too)",
    )
    g.add_argument(
        "--collective-timeout",
        type=float,
        default=300.0,
        help="gloo/nccl: a group's setup or all-reduce fails after this many seconds (default 300); a lost "
        "worker's group is abandoned at once, this only bounds a hang nobody noticed",
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default=d.model,
        help="simple_cnn | resnet50 | bert | gpt2 | package.module:factory (default simple_cnn)",
    )
    g.add_argument(
        "--model-size",
        default=d.model_size,
        choices=["default", "tiny"],
        help="tiny: small bert/gpt2 that train on a CPU",
    )
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for a model factory (repeatable)",
    )
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help="digits | synthetic_image | synthetic_text | cifar10 | package.module:factory",
    )
    g.add_argument(
        "--dataset-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for a data-set factory (repeatable)",
    )
    g.add_argument(
        "--data-dir",
        default=os.environ.get("HETERO_PS_DATA_DIR", ""),
        help="where file-based data sets live on every node (cifar10)",
    )
    g.add_argument("--loss", default="", help="package.module:fn(output, target) (default cross-entropy)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="batch size per device (default 32)")
    g.add_argument("--global-batch-size", type=int, default=0, help="the global batch B, overriding --batch-size")
    g.add_argument(
        "--worker-batch-sizes",
        default="",
        help="fixed per-rank split, e.g. 0:5,1:17,2:42 (must sum to the global batch)",
    )
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training split (default {d.epochs})")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = all epochs)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the model init and every epoch's sample order")
    recipe = " (default: the model's recipe, see the README's model table)"
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="the master's optimizer" + recipe)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate" + recipe)
    g.add_argument("--momentum", type=float, default=None, help="momentum of --optimizer momentum" + recipe)
    g.add_argument("--weight-decay", type=float, default=None, help="L2 (decoupled for adamw)" + recipe)
    g.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default=None, help="learning-rate schedule after warmup" + recipe
    )
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps" + recipe)
    g.add_argument("--lr-step-size", type=int, default=d.lr_step_size, help="step schedule: decay every N steps")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="step schedule: decay factor")
    g = p.add_argument_group("synchronisation and compression")
    g.add_argument(
        "--sync",
        choices=SYNC_MODES,
        default=d.sync,
        help="bsp (default), ssp, asp, or local: H inner steps per worker, then one outer step on their "
        "parameter change",
    )
    g.add_argument(
        "--local-steps",
        default=None,
        metavar="H|auto",
        help="--sync local: inner steps per round (default auto: enough that the slowest link costs at most a "
        "tenth of the round)",
    )
    g.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help="--sync local: outer Nesterov step size (default: 0.7 after adam/adamw, as DiLoCo; 1 after sgd/momentum)",
    )
    g.add_argument(
        "--outer-momentum",
        type=float,
        default=None,
        help="--sync local: outer Nesterov momentum (default: 0.9 after adam/adamw, as DiLoCo; 0, plain averaging, "
        "after sgd/momentum)",
    )
    g.add_argument(
        "--staleness",
        type=int,
        default=d.staleness,
        help="SSP bound S: a worker may run at most S updates ahead of the slowest (default 2)",
    )
    g.add_argument(
        "--staleness-scaling",
        choices=STALENESS_SCALINGS,
        default=d.staleness_scaling,
        help="SSP/ASP: scale a gradient of staleness t by 1/(1+t) (inverse), 1/sqrt(1+t), or not",
    )
    g.add_argument(
        "--compression",
        default=d.compression,
        help="push codec: none|fp16|bf16|int8|topk:RATIO|powersgd[:RANK], or auto: each worker's, chosen from its link",
    )
    g.add_argument(
        "--pull-compression",
        default=d.pull_compression,
        help="pull codec: none|fp16|bf16 send the parameters; int8[:BLOCK]|topk:RATIO send each worker the change "
        "since what it holds, with error feedback; auto: each worker's, chosen from its link",
    )
    g.add_argument(
        "--pull-bound",
        type=float,
        default=d.pull_bound,
        metavar="F",
        help=f"delta pulls: resync a worker whose parameters are off by more than F, relative (default {d.pull_bound})",
    )
    g.add_argument(
        "--pull-resync-every",
        type=int,
        default=d.pull_resync_every,
        metavar="N",
        help=f"delta pulls: a full resync every N pulls (default {d.pull_resync_every}; 0: at join and past the "
        "bound only)",
    )
    g.add_argument("--chunk-mb", type=float, default=d.chunk_bytes / 2**20, help="gradient chunk size on the wire")
    g.add_argument(
        "--momentum-correction",
        action="store_true",
        help="with --compression topk:R and --optimizer momentum: DGC's momentum correction (each worker keeps "
        "the momentum, the top-k of its accumulated velocity is pushed, the master steps without momentum) and "
        "its sparsity warm-up over --warmup-steps",
    )
    g.add_argument(
        "--no-overlap",
        dest="overlap",
        action="store_false",
        help="push after backward and step the whole update before sending it (the serial step: a baseline)",
    )
    g = p.add_argument_group("load balancing")
    g.add_argument(
        "--enable-load-balancing",
        action="store_true",
        help="size each worker's batch to its speed (without it: equal shares)",
    )
    g.add_argument(
        "--load-balance-policy",
        choices=[x for x in POLICIES if x != "uniform"],
        default="dynamic",
        help="proportional (join-time probe), dynamic (measured, default) or hybrid",
    )
    g.add_argument("--rebalance-interval", type=int, default=d.rebalance_interval, help="steps between rebalances")
    g = p.add_argument_group("watching the run")
    g.add_argument("--dashboard-port", type=int, default=3000, help="live dashboard port (default 3000)")
    g.add_argument("--dashboard-host", default="", help="dashboard address (default: the same as --host)")
    g.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to experiments/NAME/tb")
    g.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        metavar="N",
        help="evaluate on at most N samples of the eval split (default 0: all of it)",
    )
    g.add_argument(
        "--stall-factor",
        type=float,
        default=4.0,
        metavar="K",
        help="BSP: a worker not done after K × its predicted step time (and --stall-floor) is suspended "
        "and its samples redone by the others in the same step (default 4; 0: wait for it)",
    )
    g.add_argument(
        "--stall-floor",
        type=float,
        default=2.0,
        metavar="S",
        help="never suspend a worker before S seconds into a step (default 2)",
    )
    g.add_argument(
        "--no-standby",
        dest="standby",
        action="store_false",
        help="BSP with dynamic balancing: give every worker a share of every step, even one whose link makes "
        "every step longer (by default such a worker stands by)",
    )
    g.add_argument(
        "--standby-role",
        choices=("local", "idle"),
        default="local",
        help="what a worker on standby does: local (default) rounds of inner steps on its own slice, whose "
        "parameter change joins a later update; idle: nothing but a probe step now and then",
    )
    g.add_argument(
        "--checkpoint-every",
        default="300s",
        metavar="N|Ts",
        help="write experiments/NAME/checkpoint.pt every N steps or T seconds (default 300s), and at "
        "exit; 0: only at exit",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run --experiment NAME from its checkpoint (same flags otherwise)",
    )
    g.add_argument(
        "--divergence-factor",
        type=float,
        default=4.0,
        metavar="F",
        help="stop with an error when the loss climbs over F times its start, or is NaN 3 steps "
        "in a row (default 4; 0: never stop)",
    )
    g = p.add_argument_group("experiment and output")
    g.add_argument("--experiment", default="", help="experiment name (default: timestamp-model-dataset)")
    g.add_argument("--experiments-dir", default="experiments", help="where experiments/NAME goes")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    g.add_argument(
        "--log-format",
        choices=["plain", "json"],
        default="plain",
        help="plain lines (a progress bar on a terminal) or JSON lines",
    )
    return p


def job_from_args(a: argparse.Namespace, trainers: int) -> JobConfig:
    from hetero_ps.wire.codecs import is_auto, parse_codec

    global_batch = a.global_batch_size or a.batch_size * trainers
    if a.eval_samples < 0:
        raise ConfigError(f"--eval-samples must be >= 0 (0 = the whole eval split), got {a.eval_samples}")
    if a.stall_factor < 0 or (a.stall_factor and a.stall_factor < 1) or a.stall_floor < 0:
        raise ConfigError("--stall-factor must be 0 (off) or >= 1, and --stall-floor >= 0")
    if not (a.divergence_factor == 0 or a.divergence_factor > 1):
        raise ConfigError(f"--divergence-factor must be 0 (off) or > 1, got {a.divergence_factor}")
    if a.staleness < 0:
        raise ConfigError(f"--staleness must be >= 0, got {a.staleness}")
    if global_batch < trainers:
        raise ConfigError(f"a global batch of {global_batch} cannot be shared by {trainers} workers")
    for spec in (a.compression, a.pull_compression):
        if not is_auto(spec):
            parse_codec(spec)  # raises ConfigError with the valid choices
    if not 0 < a.pull_bound < float("inf") or a.pull_resync_every < 0:
        raise ConfigError(
            f"--pull-bound must be a number > 0 and --pull-resync-every >= 0, "
            f"got {a.pull_bound} and {a.pull_resync_every}"
        )
    return JobConfig(
        local_steps=parse_local_steps(a.local_steps, a.sync),
        outer_lr=a.outer_lr,
        outer_momentum=a.outer_momentum,
        model=a.model,
        model_size=a.model_size,
        model_args=parse_kv(a.model_arg, "--model-arg"),
        dataset=a.dataset,
        dataset_args=parse_kv(a.dataset_arg, "--dataset-arg"),
        data_dir=a.data_dir,
        loss=a.loss,
        optimizer=a.optimizer,
        lr=a.lr,
        momentum=a.momentum,
        weight_decay=a.weight_decay,
        lr_schedule=a.lr_schedule,
        warmup_steps=a.warmup_steps,
        lr_step_size=a.lr_step_size,
        lr_gamma=a.lr_gamma,
        global_batch=global_batch,
        epochs=a.epochs,
        max_steps=a.max_steps,
        seed=a.seed,
        sync=a.sync,
        staleness=a.staleness,
        staleness_scaling=a.staleness_scaling,
        compression=a.compression,
        pull_compression=a.pull_compression,
        pull_bound=a.pull_bound,
        pull_resync_every=a.pull_resync_every,
        load_balancing=a.enable_load_balancing,
        policy=a.load_balance_policy,
        rebalance_interval=a.rebalance_interval,
        chunk_bytes=max(4096, int(a.chunk_mb * 2**20)) // 4 * 4,
        overlap=a.overlap,
        momentum_correction=a.momentum_correction,
        backend=a.backend,
        collective_timeout=a.collective_timeout,
    )


def check_collective_master(job: JobConfig, a: argparse.Namespace) -> int:
    """--backend gloo|nccl on this node (the master is a member of every group): the store's port."""
    if not job.collective:
        return 0
    from hetero_ps.wire.collective import backend_available

    missing = backend_available(job.backend)
    if missing:
        raise ConfigError(f"--backend {job.backend} on the master: {missing}")
    if job.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "--backend nccl: the master takes part in every all-reduce (its copy of the model serves evaluation, "
            "checkpoints and newcomers), and NCCL reduces on GPUs only; this node has no usable GPU. Run the master "
            "on a GPU node, or use --backend gloo (CPUs and GPUs)"
        )
    if job.backend == "nccl" and not a.no_local_worker:
        a.local_device = nccl_local_device(a.local_device)
    if a.collective_port is None:
        port = a.port + 1 if a.port else 0
    else:
        port = a.collective_port
    check_port(port, "--collective-port")
    if port and port == a.port:
        raise ConfigError(f"--collective-port {port} is MASTER_PORT: the rendezvous store needs a port of its own")
    return port


def nccl_local_device(asked: str) -> str:
    """The device of the master's own worker on an nccl plane: not cuda:0, where the master's member
    of every group is (NCCL refuses two members on one GPU), and not the CPU."""
    fix = "give it another GPU (--local-device cuda:N) or run the master without it (--no-local-worker)"
    if asked == "cpu":
        raise ConfigError(f"--backend nccl reduces on GPUs, and the master's own worker is on the CPU: {fix}")
    if asked in ("auto", "cuda", "cuda:0"):
        if torch.cuda.device_count() < 2:
            raise ConfigError(
                "--backend nccl: the master's member of every group is on cuda:0 and NCCL refuses two members "
                f"on one GPU, and this node has one GPU for the master and its own worker: {fix}"
            )
        log.info("--backend nccl: the master's own worker runs on cuda:1 (the master's member is on cuda:0)")
        return "cuda:1"
    return asked


def parse_local_steps(spec: str | None, sync: str) -> int:
    """``--local-steps``: ``H`` >= 1 or ``auto`` (0), for ``--sync local`` only."""
    if spec is None:
        return 0
    if sync != "local":
        raise ConfigError(f"--local-steps {spec} applies to --sync local (this job: --sync {sync})")
    if spec.strip().lower() == "auto":
        return 0
    try:
        h = int(spec)
    except ValueError:
        h = 0
    if h < 1:
        raise ConfigError(f"--local-steps expects a number of inner steps >= 1 or auto, got {spec!r}")
    return h


def parse_checkpoint_every(spec: str) -> tuple[int, float]:
    """``--checkpoint-every``: ``N`` steps, ``Ts`` seconds, or ``0`` (only at exit)."""
    try:
        if spec.endswith("s"):
            seconds = float(spec[:-1])
            if seconds >= 0:
                return 0, seconds
        elif int(spec) >= 0:
            return int(spec), 0.0
    except ValueError:
        pass
    raise ConfigError(f"--checkpoint-every expects N (steps), Ts (seconds) or 0, got {spec!r}")


def check_resume(a: argparse.Namespace) -> None:
    """``--resume`` needs the run's folder with a checkpoint; without it, never start over an unfinished run."""
    folder = os.path.join(a.experiments_dir, a.experiment) if a.experiment else ""
    if a.resume and not folder:
        raise ConfigError("--resume continues an experiment: name it with --experiment NAME")
    if a.resume and not checkpoint.exists(folder):
        raise ConfigError(f"{folder} holds no checkpoint to resume from (checkpoint.pt); start without --resume")
    if not a.resume and folder and checkpoint.exists(folder):
        raise ConfigError(
            f"{folder} holds the checkpoint of an unfinished run: pass --resume to continue it, "
            "or choose another --experiment"
        )


def parse_fixed_sizes(spec: str, global_batch: int, trainers: int) -> dict[int, int]:
    """``--worker-batch-sizes``: one ``rank:size`` per training worker, summing to the global batch."""
    out: dict[int, int] = {}
    for part in filter(None, spec.split(",")):
        try:
            r, b = part.split(":")
            out[int(r)] = int(b)
        except ValueError:
            raise ConfigError(f"--worker-batch-sizes expects rank:size,rank:size..., got {spec!r}") from None
    if not out:
        return out
    if any(b < 1 for b in out.values()):
        raise ConfigError(f"--worker-batch-sizes {spec}: every size must be at least 1")
    if len(out) != trainers:
        raise ConfigError(
            f"--worker-batch-sizes {spec} names {len(out)} rank(s), but the job has {trainers} "
            "training worker(s); give one size per worker"
        )
    if sum(out.values()) != global_batch:
        raise ConfigError(
            f"--worker-batch-sizes {spec} sums to {sum(out.values())}, but the global batch is "
            f"{global_batch}; pass --global-batch-size {sum(out.values())} or change the sizes"
        )
    return out


async def run(a: argparse.Namespace) -> dict:
    from hetero_ps.observe.experiment import Experiment
    from hetero_ps.server.server import ParameterServer, ServerConfig
    from hetero_ps.wire import tls

    local = not a.no_local_worker
    trainers = a.world_size if local else a.world_size - 1
    check_port(a.port, "--port (MASTER_PORT)")
    check_port(a.dashboard_port, "--dashboard-port")
    if trainers < 1:
        raise ConfigError(f"WORLD_SIZE={a.world_size} with --no-local-worker leaves nobody to train")
    job = job_from_args(a, trainers)
    collective_port = check_collective_master(job, a)
    fixed_sizes = parse_fixed_sizes(a.worker_batch_sizes, job.global_batch, trainers)  # before any folder exists
    every_steps, every_s = parse_checkpoint_every(a.checkpoint_every)
    check_resume(a)
    server_tls, fingerprint = None, ""
    if a.tls_cert or a.tls_key:  # unreadable or unmatched files fail here, before any folder exists
        server_tls = tls.server_context(a.tls_cert, a.tls_key)
        fingerprint = tls.cert_file_fingerprint(a.tls_cert)
    exp = Experiment(a.experiments_dir, a.experiment or None, job=job, reuse=a.resume)
    add_file_log(exp.log_path("server"), "master", a.log_format)
    generated_token = token.needs_generated_token(a.token, a.host, a.insecure_no_token)
    if generated_token:
        made = token.read_token_file(exp.path) if a.resume else None  # the rejoining workers hold it
        a.token = made or token.generate()
        token.write_token_file(exp.path, a.token)
    elif not a.token and not token.is_loopback(a.host):
        log.warning("--insecure-no-token: anyone who can reach port %d can join this job and train it", a.port)
    cfg = ServerConfig(
        host=a.host,
        port=a.port,
        token=a.token,
        expected_workers=trainers,
        join_timeout=a.join_timeout,
        worker_timeout=a.worker_timeout,
        worker_batch_sizes=fixed_sizes,
        experiment=exp.name,
        eval_samples=a.eval_samples,
        divergence_factor=a.divergence_factor,
        stall_factor=a.stall_factor,
        stall_floor_s=a.stall_floor,
        standby=a.standby,
        standby_role=a.standby_role,
        checkpoint_every_steps=every_steps,
        checkpoint_every_s=every_s,
        collective_port=collective_port,
        tls=server_tls,
    )
    sinks: list = []
    ps = hub = dashboard = local_worker = None
    finished = False
    try:
        if not a.no_dashboard:
            from hetero_ps.observe.dashboard import MetricsHub

            hub = MetricsHub()
            sinks.append(hub)
        if a.tensorboard:
            from hetero_ps.observe.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(os.path.join(exp.path, "tb")))
        ps = ParameterServer(job, cfg, exp, sinks=sinks)
        _RUNNING.append(ps)
        if a.resume:
            ps.resume_from(exp.path)
        ps.progress = Progress(ps.total_steps, "master", a.log_format, epochs=job.epochs)
        await ps.start()
        if hub is not None:
            dashboard = await _start_dashboard(a, hub, ps, exp.name)
        exp.write_config(
            {
                "job": ps.job.to_wire(),  # with the model's recipe filled in
                "recipe": {"source": ps.recipe_source, "why": recipe_for(job.model, job.model_size).why},
                "world_size": a.world_size,
                "local_worker": local,
                "host": a.host,
                "port": a.port,
                "argv": sys.argv,
            }
        )
        say(
            a,
            f"hetero_ps master listening on {a.host}:{ps.port}; experiment {exp.path}",
            event="listening",
            host=a.host,
            port=ps.port,
            experiment=exp.path,
        )
        if dashboard is not None:
            say(a, f"dashboard: {dashboard.url}", event="dashboard", url=dashboard.url)
        if fingerprint:
            say(
                a,
                f"TLS on every connection; this master's certificate ({a.tls_cert}) has the SHA-256 fingerprint\n"
                f"  {fingerprint}\nworkers: --tls-fingerprint {fingerprint} (or --tls-ca with a copy of {a.tls_cert})",
                event="tls",
                certificate=a.tls_cert,
                fingerprint=fingerprint,
            )
        if generated_token:
            command = token.worker_command(a.host, ps.port, a.token, tls_fingerprint=fingerprint)
            say(
                a,
                f"no --token given, so this master made one (also in {os.path.join(exp.path, token.TOKEN_FILE)}, "
                f"readable by you only). On each worker run:\n  {command}",
                event="token",
                worker_command=command,
            )
        if a.port_file:
            tmp = a.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{ps.port}\n")
            os.replace(tmp, a.port_file)  # readers never see a half-written file
        if local:
            local_worker = LocalWorker(
                ps.port,
                a.token,
                a.local_device,
                a.experiments_dir,
                a.local_slowdown,
                a.log_format,
                tls_fingerprint=fingerprint,
            )
        with ps.progress.redirect_logging():
            summary = await _train_watching(ps, local_worker)
        exp.save_checkpoint(ps.model.state_dict(), ps.job)
        exp.write_summary(summary)
        checkpoint.remove(exp.path)  # the run is complete: nothing is left to resume
        if hub is not None:
            hub.finish(summary)
        finished = True
        return summary
    finally:
        if ps is not None and ps.progress is not None:
            ps.progress.close()
        if ps is not None:
            await ps.close()
        if dashboard is not None:
            await dashboard.close()
        for sink in sinks:
            if hasattr(sink, "close"):
                sink.close()
        if local_worker is not None:
            local_worker.stop()
        if not finished and ps is not None and ps.records.step:
            try:  # the last step boundary, so `--resume` continues from here
                ps.save_checkpoint(at_exit=True)
            except Exception:
                log.exception("could not write the checkpoint at exit")
        if not finished and not a.resume and (ps is None or not ps.records.step):
            # It failed before its first step: leave no folder of bare logs behind (the error is on stderr).
            remove_file_logs()
            shutil.rmtree(exp.path, ignore_errors=True)


async def _start_dashboard(a: argparse.Namespace, hub, ps, experiment: str):
    from hetero_ps.observe.dashboard import start_dashboard

    hub.set_job(
        {
            **ps.job.to_wire(),
            "experiment": experiment,
            "total_steps": ps.total_steps,
            "steps_per_epoch": ps.steps_per_epoch,
            "parameters": ps.numel,
        }
    )
    return await start_dashboard(hub, a.dashboard_host or a.host, a.dashboard_port)  # a taken port: ConfigError


async def _train_watching(ps, local_worker: LocalWorker | None) -> dict:
    """``ps.train()``, stopped at once (with the reason) if the local worker dies on the way."""
    if local_worker is None:
        return await ps.train()
    train = asyncio.ensure_future(ps.train())
    watch = asyncio.ensure_future(local_worker.watch())
    try:
        await asyncio.wait({train, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            watch.result()  # raises: the local worker died
        return train.result()
    finally:
        for task in (train, watch):
            task.cancel()
        await asyncio.gather(train, watch, return_exceptions=True)


def say(a: argparse.Namespace, text: str, **fields) -> None:
    """A line on stdout for people (plain) or one JSON object for machines (``--log-format json``)."""
    if a.log_format == "json":
        print(json.dumps({"t": round(time.time(), 3), "msg": text, **fields}), flush=True)
    else:
        print(text, flush=True)


def _raise_interrupt(*_):
    # What was running is known now; once the interrupt unwinds the run, it no longer is.
    _INTERRUPTED_WHILE.append(_RUNNING[-1].phase if _RUNNING else "starting")
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging("master", a.log_level, a.log_format)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a clean shutdown (local worker reaped) that says what it stopped
        signal.signal(sig, _raise_interrupt)
    try:
        summary = asyncio.run(run(a))
    except KeyboardInterrupt:
        if not _INTERRUPTED_WHILE:  # Ctrl-C: Python raised it, not our handler
            _INTERRUPTED_WHILE.append(_RUNNING[-1].phase if _RUNNING else "starting")
        where = f" while {_INTERRUPTED_WHILE[0]}"
        log.warning("stopped%s (Ctrl-C or SIGTERM); the experiment folder keeps what was written", where)
        return 130
    except HeteroPSError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:  # a port taken, an address not ours: the message says which and what to do
        log.debug("start failed", exc_info=True)
        log.error("%s", exc.strerror or exc)
        return 1
    if a.log_format == "json":  # every stdout line is one JSON object
        print(json.dumps({"t": round(time.time(), 3), "event": "summary", "summary": summary}, default=str), flush=True)
    else:
        print(json.dumps(summary, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
