"""Delta pulls (hetero_ps/server/pull_delta.py): a worker decoding the frames holds its replica bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_ps.server.pull_delta import ReplicaPull, is_delta_codec
from hetero_ps.wire import codecs
from hetero_ps.wire.messages import Params, chunk_layout
from hetero_ps.wire.protocol import FrameDecoder

NUMEL = 10_000
CHUNKS = chunk_layout(NUMEL, 16_000)  # several chunks, the last one short


class Worker:
    """What hetero_ps.worker does with PARAMS frames, from their bytes."""

    def __init__(self, spec: str):
        self.params = np.zeros(NUMEL, dtype=np.float32)
        self.version = -1
        self.codecs = [codecs.make_codec(spec, n) for _, n in CHUNKS]

    def receive(self, frames) -> int:
        dec = FrameDecoder()
        dec.feed(b"".join(bytes(b) for f in frames for b in f.buffers))
        wire_bytes = sum(f.nbytes for f in frames)
        while (msg := dec.next_message()) is not None:
            p = Params.from_header(msg.header)
            chunk = self.params[p.offset : p.offset + p.numel]
            if p.delta:
                assert p.base == self.version
                self.codecs[p.chunk].decode_accumulate(chunk, p.codec_header(), msg.segments, 1.0)
            else:
                assert p.codec == "none"
                chunk[:] = np.frombuffer(msg.segments[0], dtype=np.float32)
            if p.chunk == len(CHUNKS) - 1:
                self.version = p.version
        return wire_bytes


@pytest.mark.parametrize("spec", ["int8", "int8:64", "topk:0.05"])
def test_the_worker_holds_its_replica_bit_for_bit_and_follows_the_master(spec):
    rng = np.random.default_rng(0)
    params = rng.standard_normal(NUMEL).astype(np.float32)
    pull, worker = ReplicaPull(spec, CHUNKS, bound=1.0, resync_every=0), Worker(spec)
    reasons = []
    for version in range(1, 40):
        frames, why = pull.frames(params, version, worker.version)
        reasons.append(why)
        worker.receive(frames)
        assert worker.version == version
        assert np.array_equal(worker.params, pull.replica)  # the same decoded bytes, the same kernel
        params += 0.01 * rng.standard_normal(NUMEL).astype(np.float32)  # the next update
    assert reasons[0] == "first pull" and not any(reasons[1:])
    # error feedback: once the master stops moving, what was dropped goes out until nothing is left
    for version in range(40, 200):
        frames, _ = pull.frames(params, version, worker.version)
        worker.receive(frames)
    assert pull.error < 1e-3
    assert np.abs(worker.params - params).max() < 1e-3


def test_a_delta_costs_a_fraction_of_the_full_parameters():
    params = np.random.default_rng(1).standard_normal(NUMEL).astype(np.float32)
    sizes = {}
    for spec in ("int8", "topk:0.01"):
        pull, worker = ReplicaPull(spec, CHUNKS, bound=1.0, resync_every=0), Worker(spec)
        full = worker.receive(pull.frames(params, 1, -1)[0])
        sizes[spec] = worker.receive(pull.frames(params * 1.01, 2, 1)[0]) / full
    assert sizes["int8"] < 0.3 and sizes["topk:0.01"] < 0.05, sizes


def test_resyncs_come_at_join_every_n_pulls_and_past_the_bound():
    params = np.ones(NUMEL, dtype=np.float32)
    pull, worker = ReplicaPull("int8", CHUNKS, bound=0.5, resync_every=3), Worker("int8")
    reasons = []
    for version in range(1, 9):
        frames, why = pull.frames(params, version, worker.version)
        worker.receive(frames)
        reasons.append(why)
    assert reasons == ["first pull", "", "", "", "every 3 pulls", "", "", ""]

    # top-k of 1 % cannot carry a change to every entry: the copy drifts past the bound and is resynced
    pull, worker = ReplicaPull("topk:0.01", CHUNKS, bound=0.05, resync_every=0), Worker("topk:0.01")
    worker.receive(pull.frames(params, 1, -1)[0])
    worker.receive(pull.frames(params * 2, 2, 1)[0])
    assert pull.error > 0.05 and "past the bound 0.05" in pull.resync_reason()
    frames, why = pull.frames(params * 2, 3, 2)
    worker.receive(frames)
    assert why.startswith("error") and np.array_equal(worker.params, params * 2) and pull.error == 0.0


def test_a_pull_the_worker_may_have_missed_part_of_is_resynced():
    pull = ReplicaPull("int8", CHUNKS, bound=1.0, resync_every=0)
    params = np.ones(NUMEL, dtype=np.float32)
    pull.frames(params, 1, -1)
    pull.frames(params, 2, 1)
    pull.forget()
    assert pull.frames(params, 3, 2)[1] == "first pull"


def test_a_worker_that_holds_the_exact_parameters_needs_no_resync_and_the_codec_may_change():
    rng = np.random.default_rng(1)
    params = rng.standard_normal(NUMEL).astype(np.float32)
    worker = Worker("int8")
    worker.params[:], worker.version = params, 5  # it got version 5 uncompressed
    pull = ReplicaPull("int8", CHUNKS, bound=1.0, resync_every=0)
    pull.assume(params)
    params += 0.01 * rng.standard_normal(NUMEL).astype(np.float32)
    frames, why = pull.frames(params, 6, 5)
    assert why == "" and worker.receive(frames) < 2 * NUMEL  # a delta, a quarter of fp32's bytes
    assert np.array_equal(worker.params, pull.replica)
    pull.use_codec("topk:0.05")  # --pull-compression auto moved it: the replica stays
    worker.codecs = [codecs.make_codec("topk:0.05", n) for _, n in CHUNKS]
    frames, why = pull.frames(params, 7, 6)
    worker.receive(frames)
    assert why == "" and np.array_equal(worker.params, pull.replica)


def test_which_codecs_send_changes():
    assert is_delta_codec("int8") and is_delta_codec("topk:0.01")
    assert not any(is_delta_codec(s) for s in ("none", "fp16", "bf16"))


@pytest.mark.slow
@pytest.mark.parametrize("sync, pull", [("bsp", "topk:0.05"), ("ssp", "int8")])
def test_workers_pulling_changes_train_as_well_as_with_full_pulls(tmp_path, sync, pull):
    import os
    import statistics

    from conftest import find_all, read_jsonl

    from hetero_ps.testing import LocalCluster

    args = ["--world-size", "3", "--no-local-worker", "--no-dashboard", "--epochs", "3", "--sync", sync]
    args += ["--compression", "int8", "--pull-compression", pull, "--pull-resync-every", "20"]
    args += ["--experiment", "delta"]
    workers = [["--rank", str(r), "--torch-threads", "1"] for r in (1, 2)]
    with LocalCluster(tmp_path, args, workers=workers) as c:
        assert c.wait(timeout=300) == 0, c.output("server")
        summary = c.summary()
        exp = c.experiment_dir()
    assert summary["final_eval_accuracy"] >= 0.9, summary
    events = read_jsonl(os.path.join(exp, "metrics", "events.jsonl"))
    resyncs = find_all(events, event="pull_resync")
    for rank in (1, 2):
        reasons = [e["reason"] for e in resyncs if e["rank"] == rank]
        assert reasons[0] == "first pull" and "every 20 pulls" in reasons, reasons
    full = 4 * summary["parameters"]
    pulled = [
        w["bytes_in"] for s in read_jsonl(os.path.join(exp, "metrics", "steps.jsonl")) for w in s["workers"].values()
    ]
    assert statistics.median(pulled) < 0.3 * full, (statistics.median(pulled), full)
