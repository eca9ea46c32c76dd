"""The job description: everything the master decides and every worker learns in the welcome.

A ``JobConfig`` travels to workers as a plain dict (``to_wire``/``from_wire``) inside the msgpack
header of the WELCOME frame, so every field is a str, int, float, bool, list or dict of those.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from hetero_ps.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
SYNC_MODES = ("bsp", "ssp", "asp", "local")
POLICIES = ("uniform", "proportional", "dynamic", "hybrid")
STALENESS_SCALINGS = ("inverse", "sqrt", "none")
# The data plane: the master's TCP (a parameter server), or torch.distributed collectives among the
# workers (server/loops/collective.py). A collective plane all-reduces what these codecs make of a
# gradient (as torch's DDP comm hooks do); the other codecs need the master to decode them.
BACKENDS = ("tcp", "gloo", "nccl")
COLLECTIVE_CODECS = ("none", "fp16", "bf16")
# Push codecs that cannot serve --pull-compression: as a pull, PowerSGD would replace the parameters
# by a low-rank approximation of them (it is not one of the delta-pull codecs, int8 and topk).
PUSH_ONLY_CODECS = ("powersgd",)


@dataclass(frozen=True)
class JobConfig:
    """One training job, as the master was told to run it."""

    model: str = "simple_cnn"  # registry name or "package.module:factory"
    model_size: str = "default"  # "tiny" for CPU-sized transformer variants
    model_args: dict = field(default_factory=dict)  # --model-arg key=value, passed to the factory
    dataset: str = "digits"  # registry name or "package.module:factory"
    dataset_args: dict = field(default_factory=dict)  # --dataset-arg key=value
    data_dir: str = ""  # where file-based data sets (cifar10) live, on every node
    loss: str = ""  # "" = cross-entropy (or the model output's .loss); else module:fn
    # The optimizer knobs: None means "the model's recipe" (training/recipes.py); the master
    # resolves them before the first step, so every worker and config.json see the values.
    optimizer: str | None = None  # one of OPTIMIZERS
    lr: float | None = None  # peak learning rate
    momentum: float | None = None  # for momentum / sgd with momentum
    weight_decay: float | None = None  # L2 (sgd/momentum/adam) or decoupled (adamw)
    lr_schedule: str | None = None  # one of LR_SCHEDULES
    warmup_steps: int | None = None  # linear warmup from 0 to lr
    lr_step_size: int = 1000  # "step" schedule: decay every N steps
    lr_gamma: float = 0.1  # "step" schedule: multiply by this
    global_batch: int = 64  # B = sum of the workers' batch sizes, fixed for the whole job
    epochs: int = 1  # passes over the training split
    max_steps: int = 0  # stop after this many steps (0 = no limit)
    seed: int = 0  # seeds the sampler's permutations and the model init
    sync: str = "bsp"  # one of SYNC_MODES
    local_steps: int = 0  # --sync local: inner steps per round H (0: auto, from each round's measured links)
    # --sync local's outer step on the workers' mean parameter change (None: by the inner optimizer,
    # training/recipes.outer_step: DiLoCo's Nesterov 0.7 / 0.9 for adam/adamw, plain averaging 1 / 0 else)
    outer_lr: float | None = None
    outer_momentum: float | None = None
    staleness: int = 2  # SSP bound S (updates a worker's clock may run ahead of the slowest)
    staleness_scaling: str = "inverse"  # SSP/ASP damping of a stale gradient: inverse | sqrt | none
    compression: str = "none"  # push codec: none|fp16|bf16|int8|topk:RATIO|powersgd:RANK
    pull_compression: str = "none"  # pull codec: none|fp16|bf16 (the parameters) or int8|topk:RATIO (their change)
    pull_bound: float = 0.05  # delta pulls: resync a worker whose replica is off by more than this (relative L2)
    pull_resync_every: int = 100  # delta pulls: a full resync every N pulls (0: only at join and past the bound)
    load_balancing: bool = False  # --enable-load-balancing
    policy: str = "dynamic"  # one of POLICIES (used when load_balancing)
    rebalance_interval: int = 10  # steps between rebalances
    chunk_bytes: int = 4 << 20  # gradient chunk size on the wire (bytes of f32)
    overlap: bool = True  # push chunks during backward, step and send the update chunk by chunk (BSP)
    momentum_correction: bool = False  # DGC: workers keep the momentum of top-k pushes; the master steps without
    eval_every_epoch: bool = True  # evaluate on the held-out split on the master each epoch
    backend: str = "tcp"  # one of BACKENDS: where the gradients go (the control plane is always TCP)
    collective_port: int = 0  # gloo/nccl: the port of the master's rendezvous store (set once it listens)
    collective_timeout: float = 300.0  # gloo/nccl: a collective or group setup waits at most this long

    def __post_init__(self) -> None:
        pull = str(self.pull_compression).strip().lower().partition(":")[0]
        if pull in PUSH_ONLY_CODECS:
            raise ConfigError(
                f"--pull-compression {self.pull_compression}: {pull} compresses pushes only (a pull would "
                "replace the parameters by a low-rank approximation); for pulls use none, fp16, bf16, or "
                "int8[:BLOCK] / topk[:RATIO] to send each worker compressed changes"
            )

        if self.sync == "local":
            self._check_local()
        if self.backend != "tcp":
            self._check_collective()

    @property
    def bulk_synchronous(self) -> bool:
        """BSP and local steps: every worker of a step starts from the same version, and the
        parameters stay still between updates (SSP/ASP update them while others compute)."""
        return self.sync in ("bsp", "local")

    def _check_local(self) -> None:
        """--sync local: a worker pushes its parameter change after H inner steps (server/loops/local_sgd.py)."""
        if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int) or self.local_steps < 0:
            raise ConfigError(f"--local-steps must be a number of steps >= 1 or auto, got {self.local_steps!r}")
        lr = 1.0 if self.outer_lr is None else self.outer_lr
        mu = 0.0 if self.outer_momentum is None else self.outer_momentum
        if not 0 < lr < float("inf") or not 0 <= mu < 1:
            raise ConfigError(
                f"--outer-lr must be > 0 and --outer-momentum in [0, 1), got {self.outer_lr} and {self.outer_momentum}"
            )
        if self.momentum_correction:
            raise ConfigError(
                "--sync local pushes each worker's parameter change after its inner steps; --momentum-correction "
                "pushes a momentum velocity instead and cannot carry it: drop one of the two"
            )

    @property
    def collective(self) -> bool:
        """The gradients go through torch.distributed collectives among the workers."""
        return self.backend != "tcp"

    def _check_collective(self) -> None:
        """--backend gloo|nccl: BSP steps whose gradients are all-reduced (server/loops/collective.py)."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        fix = f"use --backend tcp for it, or drop it with --backend {self.backend}"
        if self.sync != "bsp":
            raise ConfigError(
                f"--backend {self.backend} runs bulk-synchronous steps (every worker's gradient in one all-reduce); "
                f"--sync {self.sync} needs the master to apply each worker's push on its own: {fix}"
            )
        spec = str(self.compression).strip().lower()
        if spec not in COLLECTIVE_CODECS:
            raise ConfigError(
                f"--backend {self.backend} all-reduces the gradients as {'/'.join(COLLECTIVE_CODECS)} (as torch's DDP "
                f"comm hooks do); --compression {self.compression} must be decoded by the master: {fix}"
            )
        if str(self.pull_compression).strip().lower() != "none":
            raise ConfigError(
                f"--backend {self.backend}: every worker steps its own copy of the model, so there are no pulls to "
                f"compress (--pull-compression {self.pull_compression}): drop it"
            )
        if self.momentum_correction:
            raise ConfigError(f"--momentum-correction corrects top-k pushes to the master: {fix}")
        if not self.collective_timeout > 0:
            raise ConfigError(f"--collective-timeout must be > 0 seconds, got {self.collective_timeout}")

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> JobConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_port(port: int, flag: str, allow_any: bool = True) -> None:
    """A TCP port from a flag or the environment: 1..65535 (0 = any free one, where ``allow_any``)."""
    if not (0 if allow_any else 1) <= port <= 65535:
        raise ConfigError(
            f"{flag} {port} is not a TCP port: use 1..65535" + (" (0 = any free one)" if allow_any else "")
        )


def env_int(name: str, default: int) -> int:
    """An integer environment variable (the seed guide's RANK, WORLD_SIZE, MASTER_PORT), or ``default``."""
    v = os.environ.get(name, "")
    try:
        return int(v) if v.strip() else default
    except ValueError:
        raise SystemExit(f"error: environment variable {name}={v!r} is not an integer") from None
