"""The chaos and load test: a real master, N simulated workers, seeded faults, and exact checks.

``run_chaos(workdir, ChaosConfig(...))`` starts ``python -m hetero_ps.server`` (a ``LocalCluster``
with no worker processes) on a job whose every update is exactly predictable
(``known_gradients.py``: plain SGD at a power-of-two lr on ``simple_cnn`` with a few thousand
parameters), runs N ``SimWorker`` s as asyncio tasks in this process, and, from ``warmup_steps``
on, every few steps (seeded: ``random.Random(seed)``) picks a healthy worker and

* **kills** it (a TCP reset), and rejoins it with the same rank a few steps later;
* **stalls** it (it reads and answers nothing until the others have done ``stall_steps`` updates
  without it): the master's BSP stall suspension must redo its samples with the others after
  ``--stall-floor``, and take it back when it answers;
* **corrupts** one of its frames (a payload bit flipped after the CRC): the master must close that
  connection alone; the worker rejoins by itself.

At most a quarter of the workers are out at once, so the live ones' batch caps always cover the
global batch ``B = 4 N`` (the exactness argument needs it). Meanwhile the master's RSS is sampled.
``ChaosReport.problems()`` then lists every way the run went wrong (empty: all is well):

* the master exited 0 and every worker ended with its BYE (the master served them all to the end);
* every step 0..T-1 is in ``metrics/steps.jsonl`` exactly once (found by its ``step`` field), each
  applied once (``version == step + 1``), its batch all there (Σ batches = B) within the caps, its
  loss the sample mean the workers' known losses give;
* every parameter version any worker received equals the prediction bit for bit, up to version T;
* every kill and corruption is a ``worker_lost`` of that rank (corruptions for a checksum) followed by
  a ``worker_joined``, every stall a ``worker_suspended``; no other worker was lost;
* the master's RSS after the warm-up grew by less than ``rss_bound_mb``, a fixed slack: the master
  keeps running totals of the steps, not the steps (``RunRecords.totals``). The dashboard is off:
  its hub keeps the last 10 000 steps (~0.3 KB per worker and step), which would hide a leak in a
  short run.

``python -m hetero_ps.testing.chaos --workers 64 --epochs 30`` runs one by hand and prints the report.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from hetero_ps.testing.known_gradients import MAX_BATCH, Oracle
from hetero_ps.testing.local_cluster import LocalCluster
from hetero_ps.testing.sim_worker import InjectedFault, SimWorker

KINDS = ("kill", "stall", "corrupt")
LR = 2.0**-6  # a power of two: see known_gradients.py


@dataclass(frozen=True)
class ChaosConfig:
    workers: int = 16  # simulated workers (a power of two: B = 4 N must be one)
    steps_per_epoch: int = 10  # the data set holds steps_per_epoch × B samples
    epochs: int = 16  # steps T = epochs × steps_per_epoch
    faults: int = 9  # faults injected, the kinds in equal numbers (0: a clean run)
    kinds: tuple[str, ...] = KINDS
    warmup_steps: int = 15  # before faults, RSS baseline and steps/s: workers measured, an evaluation done
    gap_steps: tuple[int, int] = (2, 5)  # steps between two faults (uniform, inclusive)
    down_steps: tuple[int, int] = (1, 4)  # steps a killed worker stays away
    stall_steps: int = 2  # a stalled worker is back once the others did this many updates without it...
    stall_max_s: float = 20.0  # ...or after this long (< worker_timeout_s: a suspension, not a loss)
    stall_floor_s: float = 2.0  # the master's --stall-floor
    worker_timeout_s: float = 30.0  # the master's --worker-timeout
    rss_slack_mb: float = 8.0  # RSS growth allowed after the warm-up (allocator slack; nothing grows per step)
    seed: int = 0
    timeout_s: float = 600.0  # the whole run
    experiment: str = "chaos"

    def __post_init__(self) -> None:
        if self.workers < 1 or self.workers & (self.workers - 1):
            raise ValueError(f"workers must be a power of two (the global batch 4 N must be one), got {self.workers}")
        if not set(self.kinds) <= set(KINDS) or not self.steps_per_epoch < self.warmup_steps < self.total_steps:
            raise ValueError(
                f"fault kinds are {KINDS}; the warm-up must hold the first evaluation (after epoch 1: it "
                "allocates torch's buffers once) and the run must be longer than the warm-up"
            )

    @property
    def global_batch(self) -> int:
        return 4 * self.workers

    @property
    def samples(self) -> int:
        return self.steps_per_epoch * self.global_batch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def rss_bound_mb(self) -> float:
        return self.rss_slack_mb

    def server_args(self) -> list[str]:
        return [
            *("--world-size", str(self.workers + 1), "--no-local-worker"),
            *("--model", "simple_cnn", "--model-arg", "width=4", "--model-arg", "hidden=32"),
            *("--dataset", "synthetic_image", "--dataset-arg", f"size={self.samples}", "--dataset-arg", "eval_size=32"),
            *("--global-batch-size", str(self.global_batch), "--epochs", str(self.epochs), "--seed", str(self.seed)),
            *("--optimizer", "sgd", "--lr", repr(LR), "--momentum", "0", "--weight-decay", "0"),
            *("--lr-schedule", "constant", "--warmup-steps", "0"),
            *("--chunk-mb", repr(16384 / 2**20)),  # 16 KiB chunks: every push and pull is two chunks
            *("--stall-factor", "4", "--stall-floor", repr(self.stall_floor_s)),
            *("--worker-timeout", repr(self.worker_timeout_s), "--join-timeout", repr(self.timeout_s)),
            *("--eval-samples", "16", "--checkpoint-every", "0", "--experiment", self.experiment, "--no-dashboard"),
        ]


@dataclass(frozen=True)
class Sample:
    """The master's memory and both sides' CPU time at one moment of the run."""

    t: float  # monotonic seconds
    version: int  # the newest parameter version any worker had
    rss: int  # the master's resident memory, bytes
    master_cpu_s: float  # CPU seconds the master has used so far
    workers_cpu_s: float  # and this process (the simulated workers)


@dataclass
class ChaosReport:
    """What a chaos run did and saw; ``problems()`` judges it."""

    config: ChaosConfig
    exit_code: int | None
    wall_s: float
    oracle: Oracle
    workers: list[SimWorker]
    steps: list[dict]  # metrics/steps.jsonl
    events: list[dict]  # metrics/events.jsonl
    samples: list[Sample]  # every 50 ms
    driver_problems: list[str] = field(default_factory=list)

    @property
    def faults(self) -> list[InjectedFault]:
        return sorted((f for w in self.workers for f in w.faults), key=lambda f: f.at)

    # -- figures ----------------------------------------------------------------------------------
    def steps_per_s(self, start: int | None = None) -> float:
        """Updates per second from version ``start`` (default: the end of the warm-up) to the last."""
        seen = self.oracle.expected.first_seen if self.oracle.expected else {}
        end = self.config.total_steps
        start = self.config.warmup_steps if start is None else start
        if start not in seen or end not in seen or seen[end] <= seen[start]:
            return float("nan")
        return (end - start) / (seen[end] - seen[start])

    def recovery_s(self, f: InjectedFault) -> float | None:
        """Seconds from the fault until the next update reached a worker."""
        seen = self.oracle.expected.first_seen if self.oracle.expected else {}
        later = [v for v in seen if v > f.version]
        return seen[min(later)] - f.at if later else None

    def recoveries(self) -> dict[str, list[float]]:
        """Per kind of fault, ``recovery_s`` of each."""
        out: dict[str, list[float]] = {k: [] for k in self.config.kinds}
        for f in self.faults:
            r = self.recovery_s(f)
            if r is not None:
                out[f.kind].append(r)
        return out

    def back_at_work(self) -> dict[str, list[float]]:
        """Per kind of fault, seconds until its worker had completed a step again (a kill: its
        planned absence included)."""
        out: dict[str, list[float]] = {k: [] for k in self.config.kinds}
        for f in self.faults:
            if f.back_at is not None:
                out[f.kind].append(f.back_at - f.at)
        return out

    def cpu_share(self) -> dict[str, float]:
        """CPU used by the master and by the simulated workers after the warm-up, in cores (1.0 = one busy core)."""
        during = [x for x in self.samples if self.config.warmup_steps <= x.version]
        if len(during) < 2 or during[-1].t <= during[0].t:
            return {}
        first, last = during[0], during[-1]
        return {
            "master": (last.master_cpu_s - first.master_cpu_s) / (last.t - first.t),
            "simulated workers": (last.workers_cpu_s - first.workers_cpu_s) / (last.t - first.t),
        }

    def rss_growth(self) -> tuple[float, float, float]:
        """(RSS at the end of the warm-up, its peak during training after it, growth) in MB.

        Growth is the *lowest* RSS of the last quarter of the samples over the first: a leak raises
        it, a passing allocation (an evaluation's copy, a new thread's arena) does not."""
        warm = self.config.warmup_steps
        during = [x.rss for x in self.samples if warm <= x.version < self.config.total_steps]
        if not during:
            return float("nan"), float("nan"), float("nan")
        settled = min(during[-max(1, len(during) // 4) :])
        return during[0] / 2**20, max(during) / 2**20, (settled - during[0]) / 2**20

    def summary(self) -> str:
        c = self.config
        base, peak, growth = self.rss_growth()
        lines = [
            f"chaos run: {c.workers} workers, {c.total_steps} steps, {len(self.faults)} faults "
            f"({', '.join(f'{k} {n}' for k, n in collections.Counter(f.kind for f in self.faults).items())}), "
            f"seed {c.seed}: {self.wall_s:.1f} s, master exit {self.exit_code}",
            f"  {self.steps_per_s():.2f} steps/s; {sum(s.get('attempts', 1) > 1 for s in self.steps)} steps redone; "
            f"{sum(w.retries for w in self.workers)} connection attempts refused or retried",
            f"  master RSS {base:.1f} MB after the warm-up, peak {peak:.1f} MB, +{growth:.1f} MB at the end "
            f"(bound {c.rss_bound_mb:.1f} MB)",
            "  CPU after the warm-up: " + ", ".join(f"{k} {v:.2f} cores" for k, v in self.cpu_share().items()),
        ]
        back = self.back_at_work()
        for kind, times in self.recoveries().items():
            if times:
                lines.append(
                    f"  {kind} ({len(times)}): next update after {statistics.median(times):.2f} s median, "
                    f"{max(times):.2f} s max; its worker back at work after "
                    f"{statistics.median(back[kind] or [math.nan]):.2f} s median"
                )
        expected = self.oracle.expected
        if expected:
            lines.append(f"  parameters checked bit for bit: {expected.verified} versions × workers")
        return "\n".join(lines)

    # -- judgement --------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        out = list(self.driver_problems) + list(self.oracle.problems)
        if self.exit_code != 0:
            out.append(f"the master exited with {self.exit_code}")
        out += self._step_problems() + self._param_problems() + self._event_problems()
        for w in self.workers:
            if w.state != "finished" or w.bye_reason != "training finished":
                out.append(f"rank {w.rank} ended {w.state} ({w.bye_reason or 'no BYE'}); sessions ended: {w.ended}")
        for f in self.faults:
            if f.back_at is None:
                out.append(f"rank {f.rank} never completed a step again after its {f.kind}")
        _, _, growth = self.rss_growth()
        if not growth < self.config.rss_bound_mb:
            out.append(
                f"the master's RSS grew {growth:.1f} MB after the warm-up (bound {self.config.rss_bound_mb:.1f} MB)"
            )
        return out

    def _step_problems(self) -> list[str]:
        c, out = self.config, []
        known = self.oracle.known
        by_step = collections.defaultdict(list)
        for rec in self.steps:
            by_step[rec["step"]].append(rec)
        missing = [s for s in range(c.total_steps) if s not in by_step]
        twice = [s for s, recs in by_step.items() if len(recs) > 1]
        extra = [s for s in by_step if not 0 <= s < c.total_steps]
        if missing or twice or extra:
            out.append(f"steps.jsonl: missing {missing[:10]}, recorded twice {twice[:10]}, unexpected {extra[:10]}")
        for s, (rec, *_) in sorted(by_step.items()):
            batches = [w["batch"] for w in rec["workers"].values()]
            if rec["version"] != s + 1 or not rec["applied"]:
                out.append(f"step {s}: version {rec['version']}, applied {rec['applied']} (want {s + 1}, true)")
            if rec["samples"] != c.global_batch or sum(batches) != c.global_batch:
                out.append(f"step {s}: {rec['samples']} samples, batches {batches} (want {c.global_batch})")
            if max(batches, default=0) > MAX_BATCH:
                out.append(f"step {s}: a batch of {max(batches)} is over the workers' cap {MAX_BATCH}")
            if known is not None and not math.isclose(rec["loss"], known.step_loss(s), rel_tol=1e-9):
                out.append(f"step {s}: loss {rec['loss']} is not the step's sample mean {known.step_loss(s)}")
        return out

    def _param_problems(self) -> list[str]:
        expected = self.oracle.expected
        if expected is None:
            return ["no worker ever received the job"]
        out = [
            f"version {m.version} at rank {m.rank}: {m.differing} parameters differ (max {m.max_abs_diff:.3g})"
            for m in expected.mismatches[:10]
        ]
        if expected.latest != self.config.total_steps:
            out.append(f"the newest version a worker received is {expected.latest}, not {self.config.total_steps}")
        if expected.unverified:
            out.append(f"{expected.unverified} versions could not be checked")
        return out

    def _event_problems(self) -> list[str]:
        out = []
        count = collections.Counter((e["event"], e.get("rank")) for e in self.events)
        checksum_losses = collections.Counter(
            e["rank"] for e in self.events if e["event"] == "worker_lost" and "checksum" in e.get("reason", "")
        )
        faults = collections.Counter((f.kind, f.rank) for f in self.faults)
        for w in self.workers:
            r = w.rank
            kills, stalls, corrupts = faults["kill", r], faults["stall", r], faults["corrupt", r]
            if count["worker_lost", r] != kills + corrupts:
                lost = count["worker_lost", r]
                out.append(f"rank {r}: {lost} worker_lost events for {kills} kills + {corrupts} corruptions")
            if checksum_losses[r] != corrupts:
                out.append(f"rank {r}: {checksum_losses[r]} losses for a checksum error, {corrupts} corruptions")
            if count["worker_joined", r] != 1 + kills + corrupts:
                out.append(f"rank {r}: joined {count['worker_joined', r]} times after {kills + corrupts} losses")
            if count["worker_suspended", r] < stalls or count["worker_resumed", r] < stalls:
                out.append(
                    f"rank {r}: {stalls} stalls but {count['worker_suspended', r]} suspensions, "
                    f"{count['worker_resumed', r]} resumptions"
                )
        return out


class ChaosDriver:
    """Runs the simulated workers and the faults against one started master."""

    def __init__(self, cluster: LocalCluster, cfg: ChaosConfig):
        self.cluster, self.cfg = cluster, cfg
        # A sample at every new version, besides the timer's: a fast run is over between two ticks.
        self.oracle = Oracle(cfg.samples, on_new_version=self._sample_at_version)
        self._master: psutil.Process | None = None
        self._me = psutil.Process()
        self.workers = [
            SimWorker(rank, "127.0.0.1", cluster.port, cluster.token, self.oracle, seed=cfg.seed)
            for rank in range(1, cfg.workers + 1)
        ]
        self.samples: list[Sample] = []
        self.problems: list[str] = []
        self._rejoins: set[asyncio.Task[None]] = set()

    def latest(self) -> int:
        expected = self.oracle.expected
        return expected.latest if expected else -1

    def master_running(self) -> bool:
        server = self.cluster.server
        return server is not None and server.poll() is None

    async def until(self, predicate: Callable[[], bool]) -> bool:
        """Wait for ``predicate``; False if the master exited first."""
        while not predicate():
            if not self.master_running():
                return False
            await asyncio.sleep(0.02)
        return True

    async def drive(self) -> None:
        server = self.cluster.server
        assert server is not None, "the cluster is started"
        runs = [asyncio.ensure_future(w.run()) for w in self.workers]
        helpers = [asyncio.ensure_future(self._sample(server.pid))]
        if self.cfg.faults:
            helpers.append(asyncio.ensure_future(self._inject()))
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            while self.master_running() and time.monotonic() < deadline:
                for h in helpers:
                    if h.done() and h.exception():
                        raise h.exception()  # type: ignore[misc]  # a bug in the driver: say it now
                await asyncio.sleep(0.1)
            if self.master_running():
                self.problems.append(f"the run did not end within {self.cfg.timeout_s} s (at version {self.latest()})")
            # The workers read their BYE before the master exits; give them a moment to act on it.
            grace = time.monotonic() + 10.0
            while time.monotonic() < grace and not all(r.done() for r in runs):
                await asyncio.sleep(0.05)
        finally:
            for t in [*helpers, *runs, *self._rejoins]:
                t.cancel()
            await asyncio.gather(*helpers, *runs, *self._rejoins, return_exceptions=True)

    def _take_sample(self) -> bool:
        """One sample of the master's RSS and CPU time; False once it has exited."""
        if self._master is None:
            return False
        try:
            rss, cpu = self._master.memory_info().rss, self._master.cpu_times()
        except psutil.Error:  # it has exited
            return False
        mine = self._me.cpu_times()
        self.samples.append(
            Sample(time.monotonic(), self.latest(), rss, cpu.user + cpu.system, mine.user + mine.system)
        )
        return True

    def _sample_at_version(self, version: int) -> None:
        self._take_sample()

    async def _sample(self, pid: int) -> None:
        self._master = psutil.Process(pid)
        while self._take_sample():
            await asyncio.sleep(0.05)

    async def _inject(self) -> None:
        cfg = self.cfg
        rnd = random.Random(cfg.seed)
        kinds = [cfg.kinds[i % len(cfg.kinds)] for i in range(cfg.faults)]
        rnd.shuffle(kinds)
        out_at_once = max(1, cfg.workers // 4)
        if not await self.until(lambda: self.latest() >= cfg.warmup_steps):
            return
        for kind in kinds:
            target = self.latest() + rnd.randint(*cfg.gap_steps)
            ok = await self.until(
                lambda target=target: (
                    self.latest() >= target  # type: ignore[misc]
                    and sum(not w.healthy for w in self.workers) < out_at_once
                    and any(w.healthy for w in self.workers)
                )
            )
            if not ok:
                self.problems.append(f"the run ended before every fault was injected (plan: {kinds})")
                return
            victim = rnd.choice([w for w in self.workers if w.healthy])
            if kind == "kill":
                await victim.kill()
                back = self.latest() + rnd.randint(*cfg.down_steps)
                task = asyncio.ensure_future(self._rejoin_at(victim, back))
                self._rejoins.add(task)
                task.add_done_callback(self._rejoins.discard)
            elif kind == "stall":
                victim.stall_next(cfg.stall_steps, cfg.stall_max_s)
            else:
                victim.corrupt_next()
        # Everyone back before the run ends, so its end shows the master serving them all.
        await self.until(lambda: all(w.healthy for w in self.workers))

    async def _rejoin_at(self, w: SimWorker, version: int) -> None:
        await self.until(lambda: self.latest() >= version)
        w.rejoin()


def read_jsonl(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def run_chaos(workdir: str | os.PathLike[str], cfg: ChaosConfig) -> ChaosReport:
    """Start a master in ``workdir``, drive it with ``cfg``, and report (the master is always stopped)."""
    t0 = time.monotonic()
    os.makedirs(workdir, exist_ok=True)
    earlier = os.path.join(workdir, "experiments", cfg.experiment)
    if os.path.exists(earlier):  # the master would write beside it, and the checks would read the old run
        raise FileExistsError(f"{earlier} holds an earlier run: remove it or give another --workdir")
    cluster = LocalCluster(workdir, cfg.server_args(), start_timeout=120.0)
    try:
        cluster.start()
        driver = ChaosDriver(cluster, cfg)
        asyncio.run(driver.drive())
        server = cluster.server
        exit_code = server.poll() if server is not None else None
    finally:
        cluster.close()
    metrics = os.path.join(cluster.experiment_dir(cfg.experiment), "metrics")
    return ChaosReport(
        config=cfg,
        exit_code=exit_code,
        wall_s=time.monotonic() - t0,
        oracle=driver.oracle,
        workers=driver.workers,
        steps=read_jsonl(os.path.join(metrics, "steps.jsonl")),
        events=read_jsonl(os.path.join(metrics, "events.jsonl")),
        samples=driver.samples,
        driver_problems=driver.problems,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hetero_ps.testing.chaos", description=__doc__.split("\n")[0])
    d = ChaosConfig()
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"of {d.steps_per_epoch} steps each")
    p.add_argument("--faults", type=int, default=d.faults)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", default=".", help="the master runs here (experiments/chaos/)")
    a = p.parse_args(argv)
    cfg = ChaosConfig(workers=a.workers, epochs=a.epochs, faults=a.faults, seed=a.seed)
    try:
        report = run_chaos(a.workdir, cfg)
    except FileExistsError as exc:
        p.error(str(exc))
    print(report.summary())
    problems = report.problems()
    print("\n".join(["problems:", *problems]) if problems else "no problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
