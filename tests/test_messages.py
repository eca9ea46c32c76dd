"""hetero_ps.wire.messages: every header's fields typed and checked in one place, and docs/PROTOCOL.md
listing exactly those fields."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from hetero_ps.errors import RemoteProtocolError
from hetero_ps.wire import codecs
from hetero_ps.wire.messages import (
    MESSAGES,
    Auth,
    Bye,
    Challenge,
    Control,
    ControlWelcome,
    Error,
    Heartbeat,
    Hello,
    Metrics,
    Params,
    Pull,
    Push,
    Schedule,
    StepReport,
    Welcome,
    params_from_codec,
    push_from_codec,
)
from hetero_ps.wire.protocol import MsgType

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

REPORT = {
    "loss": 0.5,
    "samples": 64,
    "compute_s": 0.25,
    "encode_s": 0.01,
    "push_s": 0.02,
    "bytes_out": 4096,
    "nonfinite": False,
    "version": 6,
    "wait_s": 0.1,
    "pull_s": 0.03,
    "bytes_in": 4096,
    "util": {"cpu_util": 90.0, "mem_bytes": 1 << 30, "gpu_util": None, "gpu_mem_bytes": None},
}
REPORT_HEADING = "METRICS `report`"

# One header per docs/PROTOCOL.md section 5.2 heading, as hetero_ps sends it, with every key set.
SAMPLES = {
    "HELLO": (
        Hello,
        {
            "rank": 2,
            "host": "node-a",
            "device": "cpu",
            "profile": {"cpus": 4},
            "role": "worker",
            "schedule_ahead": True,
            "protocol": 1,
            "software": "0.1.0",
            "client_nonce": b"c" * 32,
        },
    ),
    "CHALLENGE": (Challenge, {"server_nonce": b"s" * 32}),
    "AUTH": (Auth, {"mac": b"m" * 32}),
    "WELCOME": (
        Welcome,
        {
            "worker_id": 3,
            "rank": 1,
            "job": {"model": "mlp"},
            "numel": 1000,
            "experiment": "e1",
            "total_steps": 40,
            "heartbeat_s": 30.0,
        },
    ),
    "WELCOME (control client)": (ControlWelcome, {"role": "control", "workers": [0, 2]}),
    "SCHEDULE": (
        Schedule,
        {
            "step": 7,
            "attempt": 1,
            "epoch": 0,
            "offset": 128,
            "count": 64,
            "version": 7,
            "total": 256,
            "compression": "topk:0.01",
            "discarded": 5,
            "ahead": True,
            "local_steps": 16,
            "lr": 0.01,
            "group": 3,
            "group_rank": 2,
            "group_size": 4,
        },
    ),
    "PUSH": (
        Push,
        {
            "step": 7,
            "attempt": 1,
            "chunk": 2,
            "offset": 2048,
            "numel": 1024,
            "codec": "int8:256",
            "codec_id": 3,
            "block": 256,
            "k": 10,
            "rank": 4,
            "rows": 32,
            "cols": 32,
            "early": True,
        },
    ),
    "PARAMS": (
        Params,
        {
            "version": 7,
            "chunk": 0,
            "offset": 0,
            "numel": 1024,
            "codec": "topk:0.01",
            "codec_id": 4,
            "block": 64,
            "k": 10,
            "rank": 4,
            "rows": 32,
            "cols": 32,
            "delta": True,
            "base": 6,
            "state": "exp_avg",
            "opt_step": 7,
        },
    ),
    "PULL": (Pull, {}),
    "METRICS (ready)": (Metrics, {"ready": True, "probe": {"probe_samples_per_s": 900.0, "max_batch": 0}}),
    "METRICS (report)": (Metrics, {"step": 7, "attempt": 1, "report": REPORT}),
    "HEARTBEAT": (Heartbeat, {"t": 1.7e9}),
    "ERROR": (Error, {"code": "auth_failed", "message": "wrong token"}),
    "BYE": (Bye, {"reason": "training finished"}),
    "CONTROL": (Control, {"ok": True, "rank": 2, "simulate_slowdown": 3.0, "simulate_bandwidth": 50.0}),
}


def _cases():
    return [pytest.param(cls, header, id=name) for name, (cls, header) in SAMPLES.items()]


def _doc_tables() -> dict[str, list[tuple[str, str, bool]]]:
    """Section 5.2 of PROTOCOL.md: heading -> [(key, type, required)] from its table."""
    text = DOC.read_text()
    section = text[text.index("### 5.2 Header keys") : text.index("## 6. Errors")]
    tables: dict[str, list[tuple[str, str, bool]]] = {}
    heading = None
    for line in section.splitlines():
        if line.startswith("#### "):
            heading = line[5:].strip()
            tables[heading] = []
            continue
        m = re.match(r"^\| `(\w+)` \| ([^|]+) \| (yes|no) \|", line)
        if m:
            assert heading is not None, line
            tables[heading].append((m.group(1), m.group(2).strip(), m.group(3) == "yes"))
    return tables


def test_every_message_type_has_a_class():
    assert set(MESSAGES) == set(MsgType)
    for t, cls in MESSAGES.items():
        assert t == cls.TYPE


@pytest.mark.parametrize("cls,header", _cases())
def test_round_trip(cls, header):
    msg = cls.from_header(header)
    assert msg.to_header() == header
    assert list(msg.to_header()) == list(header)  # same key order, so the same msgpack bytes
    assert cls.from_header(msg.to_header()) == msg


@pytest.mark.parametrize("cls,header", _cases())
def test_unknown_keys_are_ignored(cls, header):
    assert cls.from_header({**header, "from_a_newer_peer": [1, 2]}) == cls.from_header(header)


@pytest.mark.parametrize("cls,header", _cases())
def test_a_field_of_the_wrong_type_is_named(cls, header):
    name = cls.TYPE.name
    for key in header:
        wrong = "text" if not isinstance(header[key], str) else 12
        with pytest.raises(RemoteProtocolError, match=rf"^{name}\.{key}: expected"):
            cls.from_header({**header, key: wrong})


# PROTOCOL.md: "no", and "with `delta`" (or `local_steps`, `group`, `state`) in its meaning
NEEDED_WITH = {
    ("PARAMS", "base"): ("delta",),
    ("PARAMS", "opt_step"): ("state",),
    ("SCHEDULE", "lr"): ("local_steps", "group"),
    ("SCHEDULE", "group_rank"): ("group",),
    ("SCHEDULE", "group_size"): ("group",),
}


def test_required_fields_are_the_documented_ones_and_a_missing_one_is_named():
    tables = _doc_tables()
    tables.pop(REPORT_HEADING)
    for heading, (cls, header) in SAMPLES.items():
        name = cls.TYPE.name
        required = {k for k, _, req in tables[heading] if req}
        for key in header:
            rest = {k: v for k, v in header.items() if k != key}
            if key in required:
                with pytest.raises(RemoteProtocolError, match=rf"^{name}\.(\w+): "):
                    cls.from_header(rest)
                if key != "ready":
                    with pytest.raises(RemoteProtocolError, match=rf"^{name}\.{key}: required field is missing"):
                        cls.from_header(rest)
            elif (name, key) in NEEDED_WITH:  # optional, but required when another key is set
                with pytest.raises(RemoteProtocolError, match=rf"^{name}\.{key}: required field is missing"):
                    cls.from_header(rest)
                alone = {k: v for k, v in rest.items() if k not in NEEDED_WITH[name, key]}
                assert key not in cls.from_header(alone).to_header()
            else:
                assert key not in cls.from_header(rest).to_header() or key == "probe"


def test_ranges_and_sizes_are_checked():
    with pytest.raises(RemoteProtocolError, match=r"^SCHEDULE\.count: expected an int in \[0,"):
        Schedule.from_header({**SAMPLES["SCHEDULE"][1], "count": -1})
    with pytest.raises(RemoteProtocolError, match=r"^SCHEDULE\.group_rank: expected an int in \[1, 3\]"):
        Schedule.from_header({**SAMPLES["SCHEDULE"][1], "group_rank": 4})  # the master is 0; below the size
    with pytest.raises(RemoteProtocolError, match=r"^PARAMS\.state: one of momentum_buffer, exp_avg, exp_avg_sq"):
        Params.from_header({**SAMPLES["PARAMS"][1], "state": "params"})
    with pytest.raises(RemoteProtocolError, match=r"^SCHEDULE\.total: expected an int in \[1,"):
        Schedule.from_header({**SAMPLES["SCHEDULE"][1], "total": 0})
    with pytest.raises(RemoteProtocolError, match=r"^PUSH\.step: expected an int"):
        Push.from_header({**SAMPLES["PUSH"][1], "step": True})  # a bool is not an int on the wire
    with pytest.raises(RemoteProtocolError, match=r"^CHALLENGE\.server_nonce: expected 32 bytes"):
        Challenge.from_header({"server_nonce": b"short"})
    with pytest.raises(RemoteProtocolError, match=r"^CONTROL\.simulate_slowdown: expected a finite number >= 1"):
        Control.from_header({"simulate_slowdown": 0.5})
    with pytest.raises(RemoteProtocolError, match=r"^HEARTBEAT\.t: expected a finite number"):
        Heartbeat.from_header({"t": float("nan")})
    with pytest.raises(RemoteProtocolError, match=r"^WELCOME\.workers: expected a list of int ranks"):
        ControlWelcome.from_header({"role": "control", "workers": ["a"]})
    with pytest.raises(RemoteProtocolError, match=r"^BYE: the header must be a map"):
        Bye.from_header(["reason"])  # type: ignore[arg-type]
    # nil is absent: allowed for an optional key, refused for a required one
    assert Bye.from_header({"reason": None}) == Bye()
    with pytest.raises(RemoteProtocolError, match=r"^ERROR\.code: expected a str, got NoneType"):
        Error.from_header({"code": None, "message": "x"})


def test_optional_fields_are_left_out_of_the_header():
    assert Control(simulate_slowdown=2.0).to_header() == {"simulate_slowdown": 2.0}
    assert Control(rank=1, simulate_bandwidth=0.0).to_header() == {"rank": 1, "simulate_bandwidth": 0.0}
    assert Heartbeat().to_header() == {} and Bye().to_header() == {}
    assert Hello(rank=-1, host="h").caller_fields() == {"rank": -1, "host": "h"}


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "int8:64", "topk:0.1", "powersgd:2"])
def test_push_and_params_carry_what_the_codecs_write_and_read(spec):
    src = np.linspace(-1, 1, 300, dtype=np.float32)
    codec = codecs.make_codec(spec, src.size)
    fields, segments = codec.encode(src)
    push = push_from_codec(fields, step=3, attempt=0, chunk=1, offset=300, numel=300, codec=spec)
    # the header hetero_ps has always sent: its own keys, then the codec's fields
    assert push.to_header() == {
        "step": 3,
        "attempt": 0,
        "chunk": 1,
        "offset": 300,
        "numel": 300,
        "codec": spec,
        **fields,
    }
    got = Push.from_header(push.to_header())
    out = np.zeros_like(src)
    codecs.make_codec(spec, src.size).decode_into(out, got.codec_header(), [memoryview(s).cast("B") for s in segments])
    assert np.abs(out - src).max() <= (0 if spec == "none" else 1.0)
    params = params_from_codec(fields, version=9, chunk=0, offset=0, numel=300, codec=spec)
    assert Params.from_header(params.to_header()).codec_header() == got.codec_header()


def test_a_codec_field_the_messages_do_not_declare_is_refused_when_sending():
    with pytest.raises(ValueError, match="CODEC_PARAM_KEYS"):
        push_from_codec(
            {"codec_id": 3, "numel": 4, "scale_bits": 8}, step=0, attempt=0, chunk=0, offset=0, numel=4, codec="int8"
        )


def test_a_step_report_names_its_bad_field():
    assert StepReport.from_map(REPORT).to_map() == REPORT
    assert list(StepReport.from_map(REPORT).to_map()) == list(REPORT)
    assert StepReport.from_map({**REPORT, "loss": float("nan"), "nonfinite": True}).nonfinite
    with pytest.raises(RemoteProtocolError, match=r"^METRICS\.report\.compute_s: expected a finite number >= 0"):
        Metrics.from_header({"step": 1, "attempt": 0, "report": {**REPORT, "compute_s": -1.0}})
    with pytest.raises(RemoteProtocolError, match=r"^METRICS\.report\.bytes_in: required field is missing"):
        StepReport.from_map({k: v for k, v in REPORT.items() if k != "bytes_in"})
    with pytest.raises(RemoteProtocolError, match=r"^METRICS\.report\.util: expected a map"):
        StepReport.from_map({**REPORT, "util": 3})
    failed = {**REPORT, "collective_error": "rank 2 (node-b): all-reduce in group 3 failed: timed out"}
    assert StepReport.from_map(failed).to_map() == failed
    with pytest.raises(RemoteProtocolError, match=r"^METRICS\.report\.collective_error: expected a str"):
        StepReport.from_map({**REPORT, "collective_error": 5})


def test_protocol_doc_lists_exactly_the_fields_of_each_message():
    tables = _doc_tables()
    report_rows = tables.pop(REPORT_HEADING)
    assert [k for k, _, _ in report_rows] == [f for f in StepReport.__dataclass_fields__]
    assert all(required for k, _, required in report_rows if k != "collective_error")
    assert set(tables) == set(SAMPLES), "every 5.2 heading has a sample here, and the other way round"
    by_class: dict[type, set[str]] = {}
    for heading, rows in tables.items():
        cls = SAMPLES[heading][0]
        keys = [k for k, _, _ in rows]
        assert len(keys) == len(set(keys)), f"{heading}: a key is listed twice"
        assert set(keys) == set(SAMPLES[heading][1]), f"{heading}: the sample and the doc differ"
        by_class.setdefault(cls, set()).update(keys)
    assert set(by_class) >= set(MESSAGES.values())
    for cls, keys in by_class.items():
        assert keys == set(cls.wire_fields()), f"{cls.__name__}: PROTOCOL.md lists {sorted(keys)}"


def test_a_worker_names_the_malformed_field_to_its_master_and_stops():
    """A WELCOME without ``numel``: the worker raises the named error and tells the master why."""
    import asyncio

    from hetero_ps.wire.transport import start_server
    from hetero_ps.worker.worker import Worker, WorkerConfig

    seen = []
    received = asyncio.Event()

    async def on_hello(conn, hello):
        seen.append(Hello.from_fields(hello))
        return {k: v for k, v in SAMPLES["WELCOME"][1].items() if k != "numel"}

    async def on_connection(conn):
        seen.append(await conn.recv(timeout=10))
        received.set()

    async def scenario():
        async with await start_server("127.0.0.1", 0, token="t", on_hello=on_hello, on_connection=on_connection) as srv:
            worker = Worker(
                WorkerConfig(master_port=srv.port, token="t", device="cpu", calibrate=False, connect_timeout=10)
            )
            with pytest.raises(RemoteProtocolError, match=r"^WELCOME\.numel: required field is missing"):
                await worker.run()
            await asyncio.wait_for(received.wait(), 10)  # the master's handler got the ERROR frame

    asyncio.run(asyncio.wait_for(scenario(), 30))
    hello, error = seen
    assert hello.rank == -1 and hello.device == "cpu" and hello.profile
    assert error.type == MsgType.ERROR
    expected = Error("protocol_error", "rank -1: WELCOME.numel: required field is missing")
    assert Error.from_header(error.header) == expected
