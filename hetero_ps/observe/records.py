"""Every record the master writes to ``metrics/*.jsonl`` and ``summary.json``, typed, in one place.

The step loops build these; :class:`~hetero_ps.server.run_records.RunRecords` writes them (the JSON
form, ``to_json()``) to the experiment folder, the dashboard and TensorBoard, and ``report`` reads them
back (``from_json``). docs/ARCHITECTURE.md's record tables are generated from the field docs here
(``python -m hetero_ps.observe.records``) and a test keeps them equal.

The JSON keys are the experiment folder's format: renaming a field here changes it for every reader.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

JSONObject = dict[str, Any]


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (rendered into docs/ARCHITECTURE.md)."""
    return field(metadata={"doc": text}, **kwargs)


def _float(report: Mapping[str, Any], key: str) -> float:
    value = report.get(key, 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


@dataclass(frozen=True)
class WorkerTiming:
    """One worker's part of a step (``workers[rank]`` in a step record)."""

    batch: int = doc("samples it computed in this step")
    loss: float = doc("its mean training loss over those samples")
    compute_s: float = doc("forward + backward")
    encode_s: float = doc("compressing the gradient chunks (after backward; what overlapped it is not counted)")
    push_s: float = doc("sending them (after backward; pushes during backward overlap compute and are not counted)")
    wait_s: float = doc("waiting for the new parameters after its push")
    pull_s: float = doc("receiving and decoding the parameters")
    bytes_out: float = doc("bytes it pushed")
    bytes_in: float = doc("bytes it pulled")
    early_chunks: int = doc(
        "gradient chunks it pushed while its backward pass still ran (seen by the master)", default=0
    )
    scheduled_ahead: bool = doc(
        "its SCHEDULE went out before the parameters it computed on (BSP with overlap): it started while they arrived",
        default=False,
    )
    local_steps: int = doc(
        "its part was a round of this many inner steps whose parameter change this update applied (`--sync local`, "
        "or a BSP worker on standby with `--standby-role local`); 0: a gradient",
        default=0,
    )

    @classmethod
    def from_report(
        cls,
        batch: int,
        report: Mapping[str, Any],
        early_chunks: int = 0,
        scheduled_ahead: bool = False,
        local_steps: int = 0,
    ) -> WorkerTiming:
        """From the ``report`` of the worker's METRICS frame; absent or non-numeric fields count as 0."""
        own = ("batch", "early_chunks", "scheduled_ahead", "local_steps")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in own]
        timings: dict[str, Any] = {k: _float(report, k) for k in names}
        return cls(
            batch=batch, early_chunks=early_chunks, scheduled_ahead=scheduled_ahead, local_steps=local_steps, **timings
        )


@dataclass(frozen=True)
class ServerTiming:
    """Where the master's time in a step went (``server`` in a step record)."""

    aggregate_s: float = doc("from the step's start until every push of it was in")
    optimizer_s: float = doc("the optimizer update (BSP: stepped chunk by chunk inside broadcast_s)")
    broadcast_s: float = doc(
        "from the update's start until every worker had the new parameters (BSP; 0 in SSP/ASP, where the next "
        "slice carries them)"
    )


@dataclass(frozen=True)
class AsyncStep:
    """SSP/ASP steps only: whose push the update applied and how stale it was (top-level fields of the step)."""

    worker: int = doc("rank whose push this update applied")
    tau: int = doc("staleness: updates applied by others since that worker's parameters")
    scale: float = doc("the staleness damping s(tau) the push was multiplied by")
    clock: int = doc("that worker's clock (updates it has pushed) after this one")


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step (``metrics/steps.jsonl``)."""

    step: int = doc("0-based step index (BSP: a global batch; SSP/ASP: one worker's update)")
    epoch: int = doc("0-based epoch the step's samples belong to")
    attempts: int = doc("1, or more when a worker was lost mid-step and the step was redone")
    loss: float = doc("mean training loss over the step's samples")
    lr: float = doc("learning rate the update used")
    version: int = doc("parameter version after the update")
    samples: int = doc("samples in the step (the global batch, or an epoch's remainder)")
    step_s: float = doc("wall time of the step on the master")
    samples_per_s: float = doc("throughput (SSP/ASP: over the recent updates)")
    applied: bool = doc("false when the gradient held NaN/Inf and the update was skipped")
    staleness: int = doc("BSP: 0; SSP/ASP: the worker's clock lead over the slowest when it got the slice")
    server: ServerTiming = doc("the master's timings")
    workers: dict[str, WorkerTiming] = doc("rank -> that worker's part of the step")
    asynchronous: AsyncStep | None = doc("SSP/ASP only; written as top-level fields", default=None)
    local_steps: int = doc(
        "--sync local: inner steps each worker ran in this round (the step is a round of them); else 0", default=0
    )

    def to_json(self) -> JSONObject:
        out: JSONObject = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("server", "workers", "asynchronous")
        }
        if self.asynchronous is not None:
            out.update(dataclasses.asdict(self.asynchronous))
        out["server"] = dataclasses.asdict(self.server)
        out["workers"] = {rank: dataclasses.asdict(w) for rank, w in self.workers.items()}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StepRecord:
        plain = {
            f.name: d[f.name]
            for f in dataclasses.fields(cls)
            if f.name not in ("server", "workers", "asynchronous") and (f.name in d or f.name != "local_steps")
        }
        asynchronous = None
        if "worker" in d:
            asynchronous = AsyncStep(**{f.name: d[f.name] for f in dataclasses.fields(AsyncStep)})
        return cls(
            **plain,
            server=ServerTiming(**d["server"]),
            workers={str(r): WorkerTiming(**w) for r, w in d["workers"].items()},
            asynchronous=asynchronous,
        )


@dataclass(frozen=True)
class EpochRecord:
    """One evaluation of the held-out split (``metrics/epochs.jsonl``)."""

    epoch: int = doc("0-based epoch just finished")
    step: int = doc("steps done when the snapshot was taken")
    version: int = doc("the parameter version evaluated (optimizer updates applied)")
    eval_loss: float = doc("mean loss on the eval split")
    eval_accuracy: float | None = doc("accuracy on the eval split (null for language models)")
    eval_s: float = doc("how long the evaluation took")
    elapsed_s: float = doc("seconds since the master started")

    def to_json(self) -> JSONObject:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EpochRecord:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


# Each kind of event and the fields it carries besides event/step/t.
EVENT_KINDS: dict[str, str] = {
    "worker_joined": "`rank`, `host`, `device`, `profile` (its hardware): a worker passed the handshake",
    "worker_ready": "`rank`, `probe` (calibration: samples/s, largest batch): it is counted from now on",
    "worker_lost": "`rank`, `host`, `reason`: its connection ended or timed out; its work is redone",
    "schedule": "`policy`, `sizes` (rank -> batch), `reason`, `predicted_step_s`, `previous_predicted_s`, "
    "`inputs` (rank -> the measurements behind the decision): a new batch split",
    "control": "`rank` and the knobs changed (`simulate_slowdown`, `simulate_bandwidth`)",
    "nonfinite_gradient": "`workers` (names of those whose report flagged NaN/Inf): the update was skipped",
    "evaluation_skipped": "`epoch`, `version`: that epoch's snapshot was dropped unscored (evaluating is "
    "slower than training; `--eval-samples` makes it faster)",
    "worker_suspended": "`rank`, `waited_s`, `limit_s`: it stalled in a step past its limit; the step is "
    "redone by the others and it gets no work until it answers",
    "worker_resumed": "`rank`: a suspended worker answered again; it gets work from the next step",
    "worker_role": "`rank`, `role` (`standby` or `training`), `reason`: BSP with dynamic balancing: waiting for that "
    "worker would lengthen every step (its fixed cost, mostly its link, against the others' whole step), so it "
    "stands by, probed now and then; or it is back in the steps",
    "pull_resync": "`rank`, `reason`, `version`: delta pulls: that worker got the full parameters (first pull, "
    "every N pulls, or its copy past `--pull-bound`)",
    "codec_choice": "`rank`, `push`, `pull`, `reason`: `--compression`/`--pull-compression auto` moved that worker "
    "to these codecs (its link's measured rate, the transfer time before and after, the step's compute)",
    "resumed": "`epoch`, `offset`, `version`, `evaluations` (re-scored): a restarted master continues from its "
    "checkpoint here",
    "diverged": "`loss`, `lr`, `message`: the loss became non-finite or exploded; the run stops",
    "local_steps": "`local_steps` (H), `previous`, `reason`: `--sync local --local-steps auto` changed the inner "
    "steps per round (the slowest worker's measured transfer against its compute per inner step)",
    "local_round": "`rank`, `samples`, `local_steps`, `staleness` (updates since its parameters), `weight`, `outcome` "
    "(`applied`, `lost`, `nonfinite`): `--standby-role local`: a BSP worker on standby ran a round of inner steps on "
    "its own slice; its change was applied, scaled by `weight` (the staleness scaling of staleness / H), or dropped",
    "round_salvaged": "`rank`, `reason`, `samples`: `--sync local`: that worker was lost before pushing its "
    "round; the round goes on with the others' work, re-weighted, and only its samples are lost",
}


@dataclass(frozen=True)
class Event:
    """Something the master decided or saw (`metrics/events.jsonl`); its kinds are in ``EVENT_KINDS``."""

    event: str = doc("the kind of event (a key of `EVENT_KINDS`, below)")
    step: int = doc("steps done when it happened")
    t: float = doc("Unix time")
    fields: JSONObject = doc("the kind's own fields, written at the top level", default_factory=dict)

    def __post_init__(self) -> None:
        if self.event not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.event!r}; document it in EVENT_KINDS")

    def to_json(self) -> JSONObject:
        return {"event": self.event, "step": self.step, "t": self.t, **self.fields}


@dataclass(frozen=True)
class WorkerTotals:
    """One worker's sums over the run (``workers[rank]`` in ``summary.json``)."""

    samples: int = doc("samples it computed")
    steps: int = doc("steps it took part in")
    compute_s: float = doc("total forward + backward time")
    push_s: float = doc("total push time")
    wait_s: float = doc("total time waiting for parameters")
    pull_s: float = doc("total pull time")


_WORKER_SUMS = ("compute_s", "push_s", "wait_s", "pull_s")


@dataclass
class RunTotals:
    """Running sums over a run's step records: what its summary needs, in memory that does not grow
    with the number of steps (the records themselves are in ``metrics/steps.jsonl``)."""

    steps: int = 0
    samples: int = 0
    step_s: float = 0.0
    busy_s: float = 0.0  # per step, the slowest worker's compute
    final_loss: float | None = None  # the last step's, whatever the order of the losses
    workers: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, history: list[StepRecord]) -> RunTotals:
        totals = cls()
        for rec in history:
            totals.add(rec)
        return totals

    def add(self, rec: StepRecord) -> None:
        self.steps += 1
        self.samples += rec.samples
        self.step_s += rec.step_s
        self.busy_s += max((w.compute_s for w in rec.workers.values()), default=0.0)
        self.final_loss = rec.loss
        for rank, w in rec.workers.items():
            s = self.workers.setdefault(rank, dict.fromkeys(("samples", "steps", *_WORKER_SUMS), 0.0))
            s["samples"] += w.batch
            s["steps"] += 1
            for k in _WORKER_SUMS:
                s[k] += getattr(w, k)

    def worker_totals(self) -> dict[str, WorkerTotals]:
        """Each rank's totals."""
        return {
            rank: WorkerTotals(
                samples=int(s["samples"]),
                steps=int(s["steps"]),
                compute_s=s["compute_s"],
                push_s=s["push_s"],
                wait_s=s["wait_s"],
                pull_s=s["pull_s"],
            )
            for rank, s in self.workers.items()
        }


@dataclass(frozen=True)
class RunSummary:
    """The outcome of a run (``summary.json``; also printed by the master at exit)."""

    experiment: str = doc("experiment name")
    model: str = doc("model name")
    dataset: str = doc("data set name")
    parameters: int = doc("trainable parameters")
    steps: int = doc("steps taken")
    epochs: int = doc("epochs started")
    samples: int = doc("samples trained on")
    train_s: float = doc("training wall time")
    samples_per_s: float = doc("samples / train_s")
    final_loss: float | None = doc("training loss of the last step")
    eval: EpochRecord | None = doc("the last evaluation")
    final_eval_accuracy: float | None = doc("its accuracy")
    communication_overhead: float | None = doc(
        "BSP: share of step time not spent computing on the busiest worker (comm + sync + optimizer)"
    )
    ideal_samples_per_s: float | None = doc("sum of the workers' calibration probes: the cluster's ideal")
    workers: dict[str, WorkerTotals] = doc("rank -> the worker's totals")
    compression: str = doc("push codec")
    sync: str = doc("bsp, ssp or asp")

    def to_json(self) -> JSONObject:
        out = dataclasses.asdict(self)
        return out

    @classmethod
    def of_run(
        cls,
        *,
        experiment: str,
        model: str,
        dataset: str,
        parameters: int,
        epochs: int,
        train_s: float,
        totals: RunTotals,
        evaluations: list[EpochRecord],
        probes: list[float],
        compression: str,
        sync: str,
    ) -> RunSummary:
        samples, busy, step_s = totals.samples, totals.busy_s, totals.step_s
        last_eval = evaluations[-1] if evaluations else None
        return cls(
            experiment=experiment,
            model=model,
            dataset=dataset,
            parameters=parameters,
            steps=totals.steps,
            epochs=epochs,
            samples=samples,
            train_s=train_s,
            samples_per_s=samples / train_s if train_s else 0.0,
            final_loss=totals.final_loss,
            eval=last_eval,
            final_eval_accuracy=last_eval.eval_accuracy if last_eval else None,
            communication_overhead=(1 - busy / step_s) if sync in ("bsp", "local") and step_s else None,
            ideal_samples_per_s=sum(probes) if probes and all(probes) else None,
            workers=totals.worker_totals(),
            compression=compression,
            sync=sync,
        )


DOCUMENTED: dict[str, list[type[Any]]] = {
    "metrics/steps.jsonl": [StepRecord, ServerTiming, WorkerTiming, AsyncStep],
    "metrics/epochs.jsonl": [EpochRecord],
    "metrics/events.jsonl": [Event],
    "summary.json": [RunSummary, WorkerTotals],
}


def _type_name(f: dataclasses.Field[Any]) -> str:
    name = str(f.type).replace("JSONObject", "object").replace("dict[str, ", "{rank: ").replace("]", "}")
    return name.replace(" | None", " or null")


def _fields(cls: type[Any]) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


def markdown() -> str:
    """The record tables of docs/ARCHITECTURE.md."""
    lines: list[str] = []
    for where, classes in DOCUMENTED.items():
        for cls in classes:
            summary = (cls.__doc__ or "").strip().split("\n\n")[0].replace("``", "`").replace("\n", " ")
            lines += [
                f"**`{where}` — `{cls.__name__}`**: {summary}",
                "",
                "| field | type | meaning |",
                "| --- | --- | --- |",
            ]
            lines += [
                f"| `{f.name}` | `{_type_name(f)}` | {f.metadata['doc']} |"
                for f in _fields(cls)
                if f.name != "asynchronous"
            ]  # flattened: AsyncStep's own table follows
            lines.append("")
            if cls is Event:
                lines += ["| event | its fields |", "| --- | --- |"]
                lines += [f"| `{kind}` | {what} |" for kind, what in EVENT_KINDS.items()]
                lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
