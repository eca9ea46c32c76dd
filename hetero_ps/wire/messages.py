"""Every message header of the wire protocol, typed, in one place (docs/PROTOCOL.md, section 5).

One frozen dataclass per ``MsgType``. ``to_header()`` builds the msgpack map that goes on the wire
(byte for byte the map hetero_ps has always sent: same keys, same order); ``Cls.from_header(map)``
reads a received one and checks every field it knows, raising ``RemoteProtocolError`` with
``"MSG.field: what was wrong"``, so a malformed frame from a peer is a clear error at the edge, not a
``KeyError`` deep in training code. Keys a class does not know are ignored: a newer peer may add
optional keys without a new protocol version.

Optional fields are ``None`` when absent and are left out of ``to_header()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Self, TypeVar

import hetero_ps
from hetero_ps.errors import RemoteProtocolError
from hetero_ps.wire.protocol import PROTOCOL_VERSION, MsgType

__all__ = [
    "CODEC_PARAM_KEYS",
    "MAC_BYTES",
    "MESSAGES",
    "NONCE_BYTES",
    "Auth",
    "Bye",
    "Challenge",
    "Control",
    "ControlWelcome",
    "Error",
    "Heartbeat",
    "Hello",
    "Metrics",
    "Params",
    "Pull",
    "Push",
    "Schedule",
    "StepReport",
    "Welcome",
    "WireMessage",
    "params_from_codec",
    "parse",
    "push_from_codec",
]

NONCE_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
# A codec's own parameters in PUSH/PARAMS: int8's block, topk's k, powersgd's rank and matrix shape.
CODEC_PARAM_KEYS = ("block", "k", "rank", "rows", "cols")
_U64 = 2**64 - 1
MAX_LOCAL_STEPS = 10_000  # SCHEDULE.local_steps: inner steps in one round (auto picks at most 64)
MAX_GROUP = 4096  # SCHEDULE.group_size: members of a collective plane's process group
# PARAMS.state: the optimizer state a worker of a collective plane steps beside its parameters
OPTIMIZER_STATES = ("momentum_buffer", "exp_avg", "exp_avg_sq")


# -- field readers: each names MSG.field in its error ------------------------------------------------


def _fail(msg: str, key: str, what: str, value: object) -> RemoteProtocolError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return RemoteProtocolError(f"{msg}.{key}: {what}, got {type(value).__name__} {shown}")


def _missing(msg: str, key: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{msg}.{key}: required field is missing")


def _int(h: Mapping[str, Any], msg: str, key: str, lo: int = 0, hi: int = _U64) -> int:
    if key not in h:
        raise _missing(msg, key)
    v = h[key]
    if type(v) is not int or not lo <= v <= hi:
        raise _fail(msg, key, f"expected an int in [{lo}, {hi}]", v)
    return v


def _opt_int(h: Mapping[str, Any], msg: str, key: str, lo: int = 0, hi: int = _U64) -> int | None:
    return None if h.get(key) is None else _int(h, msg, key, lo, hi)


def _float(h: Mapping[str, Any], msg: str, key: str, lo: float = -math.inf, *, finite: bool = True) -> float:
    if key not in h:
        raise _missing(msg, key)
    v = h[key]
    if type(v) not in (int, float):
        raise _fail(msg, key, "expected a number", v)
    if finite and (not math.isfinite(v) or v < lo):
        raise _fail(msg, key, f"expected a finite number >= {lo}", v)
    return float(v)


def _opt_float(h: Mapping[str, Any], msg: str, key: str, lo: float = -math.inf) -> float | None:
    return None if h.get(key) is None else _float(h, msg, key, lo)


def _str(h: Mapping[str, Any], msg: str, key: str) -> str:
    if key not in h:
        raise _missing(msg, key)
    v = h[key]
    if not isinstance(v, str):
        raise _fail(msg, key, "expected a str", v)
    return v


def _opt_str(h: Mapping[str, Any], msg: str, key: str) -> str | None:
    return None if h.get(key) is None else _str(h, msg, key)


def _opt_choice(h: Mapping[str, Any], msg: str, key: str, choices: tuple[str, ...]) -> str | None:
    v = _opt_str(h, msg, key)
    if v is not None and v not in choices:
        raise _fail(msg, key, f"one of {', '.join(choices)}", v)
    return v


def _bin(h: Mapping[str, Any], msg: str, key: str, size: int) -> bytes:
    if key not in h:
        raise _missing(msg, key)
    v = h[key]
    if not isinstance(v, bytes) or len(v) != size:
        raise _fail(msg, key, f"expected {size} bytes (msgpack bin)", v)
    return v


def _map(h: Mapping[str, Any], msg: str, key: str) -> dict[str, Any]:
    if key not in h:
        raise _missing(msg, key)
    v = h[key]
    if not isinstance(v, dict):
        raise _fail(msg, key, "expected a map", v)
    return v


def _opt_map(h: Mapping[str, Any], msg: str, key: str) -> dict[str, Any] | None:
    return None if h.get(key) is None else _map(h, msg, key)


def _bool(h: Mapping[str, Any], msg: str, key: str) -> bool:
    if key not in h:
        raise _missing(msg, key)
    v = h[key]
    if not isinstance(v, bool):
        raise _fail(msg, key, "expected a bool", v)
    return v


def _opt_bool(h: Mapping[str, Any], msg: str, key: str) -> bool | None:
    return None if h.get(key) is None else _bool(h, msg, key)


def _as_map(header: object, msg: str) -> Mapping[str, Any]:
    if not isinstance(header, Mapping):
        raise RemoteProtocolError(f"{msg}: the header must be a map, got {type(header).__name__}")
    return header


def _without_none(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in pairs if v is not None}


class WireMessage:
    """Common surface of the message classes (a base for typing, never instantiated itself)."""

    TYPE: ClassVar[MsgType]

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Self:
        raise NotImplementedError

    def to_header(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def wire_fields(cls) -> tuple[str, ...]:
        """The header keys this class reads and writes (docs/PROTOCOL.md lists the same)."""
        names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        if "codec_fields" in names:
            return tuple(n for n in names if n != "codec_fields") + CODEC_PARAM_KEYS
        return names


# -- handshake -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(WireMessage):
    """Client -> server, first frame. The transport fills ``protocol``, ``software`` and ``client_nonce``;
    the caller's own fields (a worker's rank, host, device, profile; a control client's role) come first."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    rank: int | None = None  # -1 lets the master choose
    host: str | None = None
    device: str | None = None
    profile: dict[str, Any] | None = None  # the hardware profile
    role: str | None = None  # "control" for a control client
    schedule_ahead: bool | None = None  # takes a SCHEDULE before the PARAMS of its version (they follow)
    protocol: int = PROTOCOL_VERSION
    software: str = hetero_ps.__version__
    client_nonce: bytes = b""

    def caller_fields(self) -> dict[str, Any]:
        """The fields the application sets (what ``transport.connect(hello=...)`` takes)."""
        return _without_none(
            [
                ("rank", self.rank),
                ("host", self.host),
                ("device", self.device),
                ("profile", self.profile),
                ("role", self.role),
                ("schedule_ahead", self.schedule_ahead),
            ]
        )

    def to_header(self) -> dict[str, Any]:
        return {
            **self.caller_fields(),
            "protocol": self.protocol,
            "software": self.software,
            "client_nonce": self.client_nonce,
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Hello:
        h = _as_map(header, "HELLO")
        return cls.from_fields(h, client_nonce=_bin(h, "HELLO", "client_nonce", NONCE_BYTES))

    @classmethod
    def from_fields(cls, header: Mapping[str, Any], client_nonce: bytes = b"") -> Hello:
        """Read HELLO without its nonce: what ``start_server``'s ``on_hello`` is given."""
        h = _as_map(header, "HELLO")
        return cls(
            rank=_opt_int(h, "HELLO", "rank", -1, 2**31 - 1),
            host=_opt_str(h, "HELLO", "host"),
            device=_opt_str(h, "HELLO", "device"),
            profile=_opt_map(h, "HELLO", "profile"),
            role=_opt_str(h, "HELLO", "role"),
            schedule_ahead=_opt_bool(h, "HELLO", "schedule_ahead"),
            protocol=_int(h, "HELLO", "protocol", 0, 0xFFFF),
            software=_str(h, "HELLO", "software"),
            client_nonce=client_nonce,
        )


@dataclass(frozen=True)
class Challenge(WireMessage):
    """Server -> client: the server's nonce."""

    TYPE: ClassVar[MsgType] = MsgType.CHALLENGE
    server_nonce: bytes

    def to_header(self) -> dict[str, Any]:
        return {"server_nonce": self.server_nonce}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Challenge:
        h = _as_map(header, "CHALLENGE")
        return cls(_bin(h, "CHALLENGE", "server_nonce", NONCE_BYTES))


@dataclass(frozen=True)
class Auth(WireMessage):
    """Client -> server: HMAC proof that the client knows the token."""

    TYPE: ClassVar[MsgType] = MsgType.AUTH
    mac: bytes

    def to_header(self) -> dict[str, Any]:
        return {"mac": self.mac}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Auth:
        h = _as_map(header, "AUTH")
        return cls(_bin(h, "AUTH", "mac", MAC_BYTES))


@dataclass(frozen=True)
class Welcome(WireMessage):
    """Server -> worker: the job. The transport adds ``server_mac`` on the way out and checks and
    removes it on the way in, so the application never sees it."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    worker_id: int
    rank: int
    job: dict[str, Any]  # JobConfig.to_wire()
    numel: int  # a worker whose model has another size refuses to train
    experiment: str
    total_steps: int
    heartbeat_s: float = 0.0  # while busy, send a HEARTBEAT at least this often (0: no need)

    def to_header(self) -> dict[str, Any]:
        h = {
            "worker_id": self.worker_id,
            "rank": self.rank,
            "job": self.job,
            "numel": self.numel,
            "experiment": self.experiment,
            "total_steps": self.total_steps,
        }
        if self.heartbeat_s:
            h["heartbeat_s"] = self.heartbeat_s
        return h

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Welcome:
        h = _as_map(header, "WELCOME")
        return cls(
            worker_id=_int(h, "WELCOME", "worker_id"),
            rank=_int(h, "WELCOME", "rank", 0, 2**31 - 1),
            job=_map(h, "WELCOME", "job"),
            numel=_int(h, "WELCOME", "numel"),
            experiment=_str(h, "WELCOME", "experiment"),
            total_steps=_int(h, "WELCOME", "total_steps"),
            heartbeat_s=_opt_float(h, "WELCOME", "heartbeat_s", 0.0) or 0.0,
        )


@dataclass(frozen=True)
class ControlWelcome(WireMessage):
    """Server -> control client: the WELCOME a HELLO with ``role: "control"`` gets instead of the job."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    workers: list[int]  # the live workers' ranks
    role: str = "control"

    def to_header(self) -> dict[str, Any]:
        return {"role": self.role, "workers": list(self.workers)}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> ControlWelcome:
        h = _as_map(header, "WELCOME")
        role = _str(h, "WELCOME", "role")
        if role != "control":
            raise _fail("WELCOME", "role", 'expected "control"', role)
        if "workers" not in h:
            raise _missing("WELCOME", "workers")
        workers = h["workers"]
        if not isinstance(workers, list) or not all(type(r) is int for r in workers):
            raise _fail("WELCOME", "workers", "expected a list of int ranks", workers)
        return cls(workers=list(workers), role=role)


# -- training ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule(WireMessage):
    """Server -> worker: compute the mean gradient over ``perm_epoch[offset : offset+count]``."""

    TYPE: ClassVar[MsgType] = MsgType.SCHEDULE
    step: int
    attempt: int
    epoch: int
    offset: int
    count: int
    version: int
    total: int  # the weight's divisor: samples in the BSP step, or the global batch
    compression: str | None = None  # --compression auto: the codec to push this step with
    discarded: int | None = None  # BSP: an earlier step whose push from this worker was thrown away (aborted)
    ahead: bool = False  # the PARAMS of ``version`` follow this SCHEDULE (HELLO schedule_ahead)
    local_steps: int = 0  # --sync local: run the slice as this many inner steps, push the parameter change
    lr: float | None = None  # --sync local: the inner optimizer's LR for this round; gloo/nccl: the step's LR
    group: int | None = None  # gloo/nccl: the membership epoch whose process group reduces this step
    group_rank: int = 0  # ...this worker's rank in it (the master is 0)
    group_size: int = 0  # ...its members, the master included

    def to_header(self) -> dict[str, Any]:
        h: dict[str, Any] = {
            "step": self.step,
            "attempt": self.attempt,
            "epoch": self.epoch,
            "offset": self.offset,
            "count": self.count,
            "version": self.version,
            "total": self.total,
        }
        if self.compression is not None:
            h["compression"] = self.compression
        if self.discarded is not None:
            h["discarded"] = self.discarded
        if self.ahead:
            h["ahead"] = True
        if self.local_steps:
            h["local_steps"] = self.local_steps
        if self.lr is not None:
            h["lr"] = self.lr
        if self.group is not None:
            h.update(group=self.group, group_rank=self.group_rank, group_size=self.group_size)
        return h

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Schedule:
        h = _as_map(header, "SCHEDULE")
        s = cls(
            step=_int(h, "SCHEDULE", "step"),
            attempt=_int(h, "SCHEDULE", "attempt"),
            epoch=_int(h, "SCHEDULE", "epoch"),
            offset=_int(h, "SCHEDULE", "offset"),
            count=_int(h, "SCHEDULE", "count"),
            version=_int(h, "SCHEDULE", "version"),
            total=_int(h, "SCHEDULE", "total", 1),
            compression=_opt_str(h, "SCHEDULE", "compression"),
            discarded=_opt_int(h, "SCHEDULE", "discarded"),
            ahead=bool(_opt_bool(h, "SCHEDULE", "ahead")),
            local_steps=_opt_int(h, "SCHEDULE", "local_steps", 1, MAX_LOCAL_STEPS) or 0,
            lr=_opt_float(h, "SCHEDULE", "lr", 0.0),
        )
        if (s.local_steps or "group" in h) and s.lr is None:
            raise _missing("SCHEDULE", "lr")
        if "group" in h:  # a member's rank and the group's size come with it
            size = _int(h, "SCHEDULE", "group_size", 2, MAX_GROUP)
            s = replace(
                s,
                group=_int(h, "SCHEDULE", "group"),
                group_rank=_int(h, "SCHEDULE", "group_rank", 1, size - 1),
                group_size=size,
            )
        return s


def _codec_fields(h: Mapping[str, Any], msg: str) -> dict[str, int]:
    return {k: _int(h, msg, k, 1) for k in CODEC_PARAM_KEYS if k in h}


def chunk_layout(numel: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``(offset, numel)`` of each PUSH/PARAMS chunk of a flat fp32 buffer of ``numel`` values: the
    master and every worker must cut the same chunks, so all of them call this."""
    per = max(1, chunk_bytes // 4)
    return [(off, min(per, numel - off)) for off in range(0, numel, per)]


@dataclass(frozen=True)
class Push(WireMessage):
    """Worker -> server: one encoded chunk of the worker's gradient. Segments: the codec's."""

    TYPE: ClassVar[MsgType] = MsgType.PUSH
    step: int
    attempt: int
    chunk: int
    offset: int
    numel: int
    codec: str  # the job's codec spec ("int8:64", "topk:0.01", ...)
    codec_id: int
    codec_fields: dict[str, int] = field(default_factory=dict)  # block (int8), k (topk), rank/rows/cols (powersgd)
    early: bool = False  # sent while the worker's backward pass was still running

    def to_header(self) -> dict[str, Any]:
        header = {
            "step": self.step,
            "attempt": self.attempt,
            "chunk": self.chunk,
            "offset": self.offset,
            "numel": self.numel,
            "codec": self.codec,
            "codec_id": self.codec_id,
            **self.codec_fields,
        }
        if self.early:
            header["early"] = True
        return header

    def codec_header(self) -> dict[str, Any]:
        """What ``Codec.decode_*`` reads."""
        return {"codec_id": self.codec_id, "numel": self.numel, **self.codec_fields}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Push:
        h = _as_map(header, "PUSH")
        return cls(
            step=_int(h, "PUSH", "step"),
            attempt=_int(h, "PUSH", "attempt"),
            chunk=_int(h, "PUSH", "chunk"),
            offset=_int(h, "PUSH", "offset"),
            numel=_int(h, "PUSH", "numel"),
            codec=_str(h, "PUSH", "codec"),
            codec_id=_int(h, "PUSH", "codec_id", 0, 255),
            codec_fields=_codec_fields(h, "PUSH"),
            early=bool(_opt_bool(h, "PUSH", "early")),
        )


@dataclass(frozen=True)
class Params(WireMessage):
    """Server -> worker: one encoded chunk of parameter version ``version``. Segments: the codec's.

    With ``delta`` the chunk is the change from version ``base`` (what the worker holds) to
    ``version``: the worker adds it to its parameters instead of replacing them."""

    TYPE: ClassVar[MsgType] = MsgType.PARAMS
    version: int
    chunk: int
    offset: int
    numel: int
    codec: str
    codec_id: int
    codec_fields: dict[str, int] = field(default_factory=dict)
    delta: bool = False
    base: int = -1
    state: str | None = None  # gloo/nccl: this chunk is of the optimizer state OPTIMIZER_STATES[...], not θ
    opt_step: int = 0  # ...with ``state``: the optimizer's step count (Adam's bias correction)

    def to_header(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "chunk": self.chunk,
            "offset": self.offset,
            "numel": self.numel,
            "codec": self.codec,
            "codec_id": self.codec_id,
            **self.codec_fields,
            **({"delta": True, "base": self.base} if self.delta else {}),
            **({"state": self.state, "opt_step": self.opt_step} if self.state is not None else {}),
        }

    def codec_header(self) -> dict[str, Any]:
        """What ``Codec.decode_*`` reads."""
        return {"codec_id": self.codec_id, "numel": self.numel, **self.codec_fields}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Params:
        h = _as_map(header, "PARAMS")
        delta = bool(_opt_bool(h, "PARAMS", "delta"))
        return cls(
            version=_int(h, "PARAMS", "version"),
            chunk=_int(h, "PARAMS", "chunk"),
            offset=_int(h, "PARAMS", "offset"),
            numel=_int(h, "PARAMS", "numel"),
            codec=_str(h, "PARAMS", "codec"),
            codec_id=_int(h, "PARAMS", "codec_id", 0, 255),
            codec_fields=_codec_fields(h, "PARAMS"),
            delta=delta,
            base=_int(h, "PARAMS", "base") if delta else -1,  # a change needs what it changes
            state=_opt_choice(h, "PARAMS", "state", OPTIMIZER_STATES),
            opt_step=_int(h, "PARAMS", "opt_step") if "state" in h else 0,
        )


_C = TypeVar("_C", Push, Params)


def _encoded(cls: type[_C], fields_: Mapping[str, Any], **head: Any) -> _C:
    """A Push/Params from a codec's ``encode()`` fields (codec_id, numel, then its parameters)."""
    extra = {k: v for k, v in fields_.items() if k not in ("codec_id", "numel")}
    unknown = set(extra) - set(CODEC_PARAM_KEYS)
    if unknown:
        raise ValueError(f"codec fields {sorted(unknown)} are not declared in messages.CODEC_PARAM_KEYS")
    return cls(codec_id=int(fields_["codec_id"]), codec_fields=extra, **head)


def push_from_codec(
    fields_: Mapping[str, Any], *, step: int, attempt: int, chunk: int, offset: int, numel: int, codec: str
) -> Push:
    """The PUSH for one chunk, given what its codec's ``encode()`` returned."""
    return _encoded(Push, fields_, step=step, attempt=attempt, chunk=chunk, offset=offset, numel=numel, codec=codec)


def params_from_codec(
    fields_: Mapping[str, Any],
    *,
    version: int,
    chunk: int,
    offset: int,
    numel: int,
    codec: str,
    delta: bool = False,
    base: int = -1,
) -> Params:
    """The PARAMS for one chunk, given what its codec's ``encode()`` returned (``delta``: a change from ``base``)."""
    return _encoded(
        Params, fields_, version=version, chunk=chunk, offset=offset, numel=numel, codec=codec, delta=delta, base=base
    )


@dataclass(frozen=True)
class Pull(WireMessage):
    """Reserved: hetero_ps never sends it (the master sends PARAMS unasked); no fields."""

    TYPE: ClassVar[MsgType] = MsgType.PULL

    def to_header(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Pull:
        _as_map(header, "PULL")
        return cls()


@dataclass(frozen=True)
class StepReport:
    """METRICS' ``report``: what a worker measured for one assignment. ``wait_s``, ``pull_s`` and
    ``bytes_in`` are about the interval before it (from its previous push until this SCHEDULE)."""

    loss: float  # mean loss over the slice; NaN or Inf when it was
    samples: int
    compute_s: float
    encode_s: float
    push_s: float
    bytes_out: int
    nonfinite: bool  # the loss or the gradient held a NaN or Inf
    version: int  # the parameter version computed on
    wait_s: float
    pull_s: float
    bytes_in: int
    util: dict[str, Any]  # cpu_util, mem_bytes, gpu_util, gpu_mem_bytes (None when unknown)
    collective_error: str | None = None  # gloo/nccl: why this step's all-reduce failed (None: it did not)

    def to_map(self) -> dict[str, Any]:
        return _without_none([(f.name, getattr(self, f.name)) for f in fields(self)])

    @classmethod
    def from_map(cls, report: Mapping[str, Any], where: str = "METRICS.report") -> StepReport:
        r = _as_map(report, where)
        return cls(
            loss=_float(r, where, "loss", finite=False),
            samples=_int(r, where, "samples"),
            compute_s=_float(r, where, "compute_s", 0.0),
            encode_s=_float(r, where, "encode_s", 0.0),
            push_s=_float(r, where, "push_s", 0.0),
            bytes_out=_int(r, where, "bytes_out"),
            nonfinite=_bool(r, where, "nonfinite"),
            version=_int(r, where, "version"),
            wait_s=_float(r, where, "wait_s"),
            pull_s=_float(r, where, "pull_s", 0.0),
            bytes_in=_int(r, where, "bytes_in"),
            util=_map(r, where, "util"),
            collective_error=_opt_str(r, where, "collective_error"),
        )


@dataclass(frozen=True)
class Metrics(WireMessage):
    """Worker -> server, two forms: ``ready`` + ``probe`` once after joining, then ``step`` +
    ``attempt`` + ``report`` after the last PUSH of every assignment."""

    TYPE: ClassVar[MsgType] = MsgType.METRICS
    ready: bool | None = None
    probe: dict[str, Any] | None = None  # calibration: probe_samples_per_s, probe_c_s, probe_r, max_batch
    step: int | None = None
    attempt: int | None = None
    report: StepReport | None = None

    @property
    def is_ready(self) -> bool:
        return self.ready is not None

    def to_header(self) -> dict[str, Any]:
        report = None if self.report is None else self.report.to_map()
        return _without_none(
            [
                ("ready", self.ready),
                ("probe", self.probe),
                ("step", self.step),
                ("attempt", self.attempt),
                ("report", report),
            ]
        )

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Metrics:
        h = _as_map(header, "METRICS")
        if h.get("ready") is not None:
            return cls(ready=_bool(h, "METRICS", "ready"), probe=_opt_map(h, "METRICS", "probe") or {})
        return cls(
            step=_int(h, "METRICS", "step"),
            attempt=_int(h, "METRICS", "attempt"),
            report=StepReport.from_map(_map(h, "METRICS", "report")),
        )


@dataclass(frozen=True)
class Heartbeat(WireMessage):
    """Either way: liveness; ``t`` is the sender's Unix time."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    t: float | None = None

    def to_header(self) -> dict[str, Any]:
        return _without_none([("t", self.t)])

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Heartbeat:
        return cls(_opt_float(_as_map(header, "HEARTBEAT"), "HEARTBEAT", "t"))


@dataclass(frozen=True)
class Error(WireMessage):
    """Either way: a fatal error; the sender closes afterwards. ``protocol.raise_if_error`` turns a
    received one into ``RemoteError`` even when it is malformed (an error must never hide)."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: str
    message: str

    def to_header(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Error:
        h = _as_map(header, "ERROR")
        return cls(_str(h, "ERROR", "code"), _str(h, "ERROR", "message"))


@dataclass(frozen=True)
class Bye(WireMessage):
    """Either way: orderly goodbye; the sender closes after it."""

    TYPE: ClassVar[MsgType] = MsgType.BYE
    reason: str | None = None

    def to_header(self) -> dict[str, Any]:
        return _without_none([("reason", self.reason)])

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Bye:
        return cls(_opt_str(_as_map(header, "BYE"), "BYE", "reason"))


@dataclass(frozen=True)
class Control(WireMessage):
    """Run-time knobs. Control client -> server: ``rank`` + knobs; server -> control client:
    ``ok: true`` + ``rank`` + knobs; server -> worker: the knobs alone."""

    TYPE: ClassVar[MsgType] = MsgType.CONTROL
    KNOBS: ClassVar[tuple[str, ...]] = ("simulate_slowdown", "simulate_bandwidth")
    ok: bool | None = None
    rank: int | None = None
    simulate_slowdown: float | None = None  # compute takes this many times as long (>= 1)
    simulate_bandwidth: float | None = None  # Mbit/s, 0 = the real link

    def knobs(self) -> dict[str, float]:
        return _without_none(
            [("simulate_slowdown", self.simulate_slowdown), ("simulate_bandwidth", self.simulate_bandwidth)]
        )

    def to_header(self) -> dict[str, Any]:
        return {**_without_none([("ok", self.ok), ("rank", self.rank)]), **self.knobs()}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Control:
        h = _as_map(header, "CONTROL")
        return cls(
            ok=_opt_bool(h, "CONTROL", "ok"),
            rank=_opt_int(h, "CONTROL", "rank", 0, 2**31 - 1),
            simulate_slowdown=_opt_float(h, "CONTROL", "simulate_slowdown", 1.0),
            simulate_bandwidth=_opt_float(h, "CONTROL", "simulate_bandwidth", 0.0),
        )


MESSAGES: dict[MsgType, type[WireMessage]] = {
    cls.TYPE: cls
    for cls in (Hello, Challenge, Auth, Welcome, Schedule, Push, Params, Pull, Metrics, Heartbeat, Error, Bye, Control)
}


def parse(msg_type: MsgType, header: Mapping[str, Any]) -> WireMessage:
    """The typed message of a received frame (``MESSAGES[msg_type].from_header``)."""
    return MESSAGES[msg_type].from_header(header)
