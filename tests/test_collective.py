"""The collective data plane (``--backend gloo|nccl``), end to end: real master and worker processes.

The union-batch invariant holds on it as on the TCP plane (several steps with momentum, so the
workers' own optimizers must match the master's); a worker killed mid-run costs a redone step in a
new group, not a hang; a newcomer gets the parameters and the optimizer's state; bad setups are
clear errors that name the node and the fix.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import find_all, read_jsonl, wait_until

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError, RemoteError
from hetero_ps.testing import LocalCluster, netlinks
from hetero_ps.wire import collective
from hetero_ps.wire.messages import Hello

pytestmark = pytest.mark.slow

STEPS = 4


def _job_args(backend: str, *extra: str) -> list[str]:
    return [
        "--world-size",
        "3",
        "--no-local-worker",
        "--model",
        "simple_cnn",
        "--dataset",
        "digits",
        "--global-batch-size",
        "64",
        "--optimizer",
        "momentum",
        "--momentum",
        "0.9",
        "--weight-decay",
        "0.0001",
        "--lr",
        "0.05",
        "--lr-schedule",
        "constant",
        "--backend",
        backend,
        "--collective-timeout",
        "60",
        "--chunk-mb",
        "0.02",  # several chunks (one all-reduce each) even for this small model
        *extra,
    ]


def _reference(steps: int, optimizer: str = "momentum", lr: float = 0.05) -> tuple[torch.Tensor, list[float]]:
    """One process on the union batches: the parameters after ``steps`` steps and each step's loss."""
    from hetero_ps.training import data, models, optim
    from hetero_ps.training.flat import FlatParams
    from hetero_ps.training.sampler import EpochSampler
    from hetero_ps.training.trainer import LocalTrainer

    job = JobConfig(
        model="simple_cnn",
        dataset="digits",
        global_batch=64,
        optimizer=optimizer,
        momentum=0.9,
        weight_decay=0.0001,
        lr=lr,
        lr_schedule="constant",
        warmup_steps=0,
    )
    train, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    flat = FlatParams(model)
    trainer = LocalTrainer(job, model, flat, train, info, "cpu")
    param = torch.nn.Parameter(flat.params)
    opt, _ = optim.build_optimizer(job, param, steps)
    sampler, losses, n = EpochSampler(len(train), job.seed), [], len(train)
    epoch = offset = 0
    for _ in range(steps):
        count = min(64, n - offset)
        stats = trainer.compute_gradient(sampler.indices(epoch, offset, count))
        losses.append(float(stats.loss))
        param.grad = flat.grads.clone()
        opt.step()
        offset += count
        if offset == n:
            epoch, offset = epoch + 1, 0
    return flat.params.detach().clone(), losses


def _master_params(exp: str) -> torch.Tensor:
    from hetero_ps.training import data, models

    job = JobConfig(model="simple_cnn", dataset="digits")
    _, _, info = data.load_datasets(job)
    model = models.build_model(job, info)
    state = torch.load(os.path.join(exp, "model.pt"), weights_only=True)
    model.load_state_dict(state.get("model", state))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=pytest.mark.skipif(
                torch.cuda.device_count() < 3, reason="nccl: the master and two workers each need a GPU of their own"
            ),
        ),
    ],
)
def test_union_batch_invariant_on_the_collective_plane(tmp_path, backend):
    """Unequal shares, all-reduced: every step equals one process's step on the union batch — the
    master's copy (model.pt) and the workers' own (each step's loss is computed on theirs)."""
    device = ["--device", "cuda"] if backend == "nccl" else []
    args = _job_args(backend, "--worker-batch-sizes", "1:24,2:40", "--max-steps", str(STEPS), "--experiment", "inv")
    with LocalCluster(tmp_path, args, workers=[["--rank", "1", *device], ["--rank", "2", *device]]) as c:
        assert c.wait(timeout=180) == 0, c.output("server")
        exp = c.experiment_dir()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert sorted(r["step"] for r in steps) == list(range(STEPS))
    for r in steps:
        assert sorted(w["batch"] for w in r["workers"].values()) == [24, 40]
    expected, losses = _reference(STEPS)
    got_losses = [r["loss"] for r in sorted(steps, key=lambda r: r["step"])]
    assert got_losses == pytest.approx(losses, rel=1e-5), "a worker's own copy drifted from the union-batch run"
    torch.testing.assert_close(_master_params(exp), expected, rtol=1e-5, atol=1e-6)
    events = read_jsonl(os.path.join(exp, "metrics", "events.jsonl"))
    assert not find_all(events, event="worker_lost")
    # a ring of the master and two workers: each member sends 2·(3−1)/3 of the fp32 gradient, no push
    n = expected.numel()
    for r in steps:
        for w in r["workers"].values():
            assert w["bytes_out"] == pytest.approx(2 * 2 / 3 * 4 * n, abs=2)


def test_a_worker_killed_mid_run_costs_a_redone_step_not_a_hang(tmp_path):
    """Three gloo workers; one is killed while the others may be inside an all-reduce with it. The
    step is redone in a new group by the two left, and the run ends with every step recorded."""
    args = _job_args("gloo", "--world-size", "4", "--epochs", "2", "--max-steps", "40", "--experiment", "kill")
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"], ["--rank", "2"], ["--rank", "3"]]) as c:
        steps_path = os.path.join(c.experiment_dir("kill"), "metrics", "steps.jsonl")
        wait_until(lambda: len(read_jsonl(steps_path, missing_ok=True)) >= 5, 120, what="five steps")
        c.workers[2].send_signal(signal.SIGKILL)
        assert c.wait(timeout=240) == 0, c.output("server")
        exp = c.experiment_dir()
        server_log = c.output("server")
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert sorted(r["step"] for r in steps) == list(range(40))
    events = read_jsonl(os.path.join(exp, "metrics", "events.jsonl"))
    assert find_all(events, event="worker_lost", rank=3)
    assert re.search(r"group \d+ of the master and 2 worker", server_log), "the two left formed a new group"
    late = [r for r in steps if set(r["workers"]) == {"1", "2"}]
    assert late, "the steps after the loss ran on the two workers left"


def test_a_newcomer_gets_the_parameters_and_the_optimizer_state(tmp_path):
    """A worker joining a running gloo job (Adam: state that every step depends on) joins the next
    group with the master's parameters and moments: the whole run, before and after it joined, still
    equals one process's run on the union batches (its copy would drift at once from empty moments)."""
    args = _job_args("gloo", "--world-size", "2", "--max-steps", "30", "--experiment", "late")  # one worker starts
    args[args.index("momentum")] = "adam"
    args[args.index("--lr") + 1] = "0.002"
    args += ["--epochs", "2"]
    # Slowed until the newcomer is ready (so the run is still going), then released.
    with LocalCluster(tmp_path, args, workers=[["--rank", "1", "--simulate-slowdown", "50"]]) as c:
        events_path = os.path.join(c.experiment_dir("late"), "metrics", "events.jsonl")
        steps_path = os.path.join(c.experiment_dir("late"), "metrics", "steps.jsonl")
        wait_until(lambda: len(read_jsonl(steps_path, missing_ok=True)) >= 2, 120, what="two steps")
        c.add_worker(["--rank", "2"])
        wait_until(
            lambda: find_all(read_jsonl(events_path, missing_ok=True), event="worker_ready", rank=2),
            120,
            what="the newcomer ready",
        )
        control = [sys.executable, "-m", "hetero_ps.control", "--master-addr", "127.0.0.1"]
        control += ["--master-port", str(c.port), "--rank", "1", "--simulate-slowdown", "1"]
        r = subprocess.run(control, capture_output=True, text=True, timeout=60, env=c.env)
        assert r.returncode == 0, r.stderr
        assert c.wait(timeout=240) == 0, c.output("server")
        exp = c.experiment_dir()
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    both = [r for r in steps if set(r["workers"]) == {"1", "2"}]
    assert both, "the newcomer took part in the steps after it joined"
    expected, losses = _reference(30, "adam", 0.002)
    got_losses = [r["loss"] for r in sorted(steps, key=lambda r: r["step"])]
    assert got_losses == pytest.approx(losses, rel=1e-4)
    # Adam's step is ~lr wherever a gradient is ~0 and moves with its rounding: within one lr step
    torch.testing.assert_close(_master_params(exp), expected, rtol=1e-3, atol=2e-3)


# -- bad input: one clear error naming the node and the fix ----------------------------------------------


def _refused(tmp_path, args: list[str]) -> str:
    """What the master says when it refuses ``args`` at start (it must exit non-zero, at once)."""
    cmd = [sys.executable, "-m", "hetero_ps.server", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_nccl_on_a_master_without_a_gpu_is_refused_at_start(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the master may take part in an nccl plane")
    out = _refused(tmp_path, _job_args("nccl", "--max-steps", "1"))
    assert "--backend nccl" in out and "no usable GPU" in out and "--backend gloo" in out


def test_an_nccl_plane_refuses_a_cpu_worker_by_name():
    hello = Hello(rank=3, host="laptop", device="cpu", profile={"torch": torch.__version__})
    with pytest.raises(RemoteError, match=r"laptop \(rank 3\) runs on cpu.*--backend nccl needs every worker on a GPU"):
        from hetero_ps.server.admission import check_collective_member

        check_collective_member("nccl", hello)


def test_mismatched_torch_versions_are_refused_on_a_collective_plane():
    from hetero_ps.server.admission import check_collective_member

    hello = Hello(rank=1, host="desk", device="cpu", profile={"torch": "1.13.0"})
    with pytest.raises(RemoteError, match=r"desk \(rank 1\) runs torch 1\.13\.0 but the master runs torch"):
        check_collective_member("gloo", hello)
    check_collective_member("gloo", Hello(rank=1, host="desk", device="cpu", profile={"torch": torch.__version__}))


def test_an_unreachable_rendezvous_port_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"cannot reach the master's rendezvous store at 127\.0\.0\.1:{port}.*ufw"):
        collective.connect_store("127.0.0.1", port, 2.0)


def test_a_missing_interface_is_named_with_the_ones_there_are(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch0")
    with pytest.raises(
        ConfigError, match=r"GLOO_SOCKET_IFNAME=nosuch0: that interface does not exist.*lo \(127\.0\.0\.1\)"
    ):
        collective.bind_address("gloo", "127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert collective.bind_address("gloo", "10.0.0.5") == ("127.0.0.1", "GLOO_SOCKET_IFNAME=lo")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    assert collective.bind_address("gloo", "127.0.0.1") == ("127.0.0.1", "lo, the control connection's interface")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"  # what torch reads


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"sync": "ssp"}, "--backend gloo runs bulk-synchronous steps"),
        ({"sync": "local"}, "--sync local needs the master to apply each worker's push"),
        ({"compression": "topk:0.01"}, "must be decoded by the master"),
        ({"pull_compression": "fp16"}, "there are no pulls to compress"),
        ({"collective_timeout": 0.0}, "--collective-timeout must be > 0"),
    ],
)
def test_impossible_collective_jobs_are_refused(knobs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        JobConfig(backend="gloo", **knobs)


def test_the_master_refuses_an_impossible_collective_job_at_start(tmp_path):
    assert "--backend gloo runs bulk-synchronous steps" in _refused(tmp_path, _job_args("gloo", "--sync", "asp"))


def test_a_worker_naming_a_missing_interface_leaves_with_its_reason_and_the_run_goes_on(tmp_path):
    """A worker whose GLOO_SOCKET_IFNAME names no interface cannot take part: it tells the master why
    (naming itself, the interface and the fix) and exits; the other worker trains the job alone."""
    args = _job_args("gloo", "--max-steps", "6", "--experiment", "badif")
    with LocalCluster(tmp_path, args, workers=[["--rank", "1"]]) as c:
        bad = c.add_worker(["--rank", "2"], env={**c.env, "GLOO_SOCKET_IFNAME": "nosuch0"})
        assert c.wait(timeout=180) == 0, c.output("server")[-3000:]
        assert bad.wait(timeout=60) != 0
        out, theirs = c.output("server"), c.output("worker1")
        exp = c.experiment_dir()
    why = "GLOO_SOCKET_IFNAME=nosuch0: that interface does not exist on this node"
    assert "collective_setup_failed" in out and "rank 2" in out and why in out, out[-3000:]
    assert why in theirs
    steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
    assert sorted(r["step"] for r in steps) == list(range(6))


# -- interfaces: two network namespaces joined by a veth pair -------------------------------------------

NETNS = netlinks.unavailable()
needs_netns = pytest.mark.skipif(bool(NETNS), reason=NETNS or "network namespaces available")


@needs_netns
def test_each_node_binds_its_groups_to_the_interface_it_names(tmp_path):
    """The master and one worker here, another worker in a namespace behind a veth pair: each binds
    its groups to the interface its GLOO_SOCKET_IFNAME names, and they train together."""
    with netlinks.Link() as link:
        args = _job_args("gloo", "--max-steps", "3", "--experiment", "ifaces", "--host", "0.0.0.0")
        with LocalCluster(tmp_path, args, workers=[], env={"GLOO_SOCKET_IFNAME": link.host_dev}) as c:
            c.add_worker(["--rank", "1", "--master-addr", link.outer])
            c.add_worker(["--rank", "2"], env={**c.env, "GLOO_SOCKET_IFNAME": link.ns_dev}, link=link)
            assert c.wait(timeout=180) == 0, c.output("server")[-3000:]
            here, there = c.output("worker0"), c.output("worker1")
    assert f"bound to {link.outer} (GLOO_SOCKET_IFNAME={link.host_dev})" in here, here[-2000:]
    assert f"bound to {link.inner} (GLOO_SOCKET_IFNAME={link.ns_dev})" in there, there[-2000:]


@needs_netns
def test_an_interface_the_others_cannot_reach_is_a_clear_error_not_a_hang(tmp_path):
    """The namespace's worker names an interface that exists but that nobody can reach (one end of a
    veth pair inside its namespace, on a subnet of its own): its groups cannot form, and the run stops
    within a few collective timeouts with an error that names that interface and its address."""
    with netlinks.Link() as link:
        n = link.ns_dev[4:]
        dummy, addr = f"hpsx{n}", f"10.199.{int(n) % 250}.1"
        for cmd in (
            ["ip", "link", "add", dummy, "type", "veth", "peer", "name", f"hpsy{n}"],
            ["ip", "addr", "add", f"{addr}/24", "dev", dummy],
            ["ip", "link", "set", dummy, "up"],
            ["ip", "link", "set", f"hpsy{n}", "up"],
        ):
            subprocess.run(link.command(cmd), check=True, capture_output=True, timeout=30)
        args = _job_args("gloo", "--max-steps", "3", "--experiment", "unreachable", "--host", "0.0.0.0")
        args[args.index("--collective-timeout") + 1] = "6"
        with LocalCluster(tmp_path, args, workers=[]) as c:
            c.add_worker(["--rank", "1", "--master-addr", link.outer])
            c.add_worker(["--rank", "2"], env={**c.env, "GLOO_SOCKET_IFNAME": dummy}, link=link)
            assert c.wait(timeout=150) != 0
            out = c.output("server")
    assert "the gloo plane failed 3 times in a row with no worker lost" in out, out[-3000:]
    assert "rank 2 (" in out and f"at {addr} (GLOO_SOCKET_IFNAME={dummy})" in out, out[-3000:]


def test_a_reduction_launches_chunks_in_descending_order_as_backward_finishes_them():
    """Every member must launch its all-reduces in one order (the master's: descending): a chunk is
    launched once it and every chunk after it are final, the rest when backward is over."""
    from hetero_ps.wire.collective import Group
    from hetero_ps.worker.collective_step import Reduction

    launched = []

    class Work:
        def wait(self, timeout):
            return True

    class FakeGroup:
        def allreduce(self, tensors):
            launched.append(tensors[0].clone())
            tensors[0].mul_(3)  # three members with the same values
            return Work()

    grad = torch.arange(8, dtype=torch.float32)
    chunks = [(0, 2), (2, 2), (4, 2), (6, 2)]
    r = Reduction(Group(1, 1, 3, FakeGroup(), "127.0.0.1 (lo)"), grad, 0.5, chunks, torch.float32, 5.0, "rank 1")
    r.on_ready(3)
    r.on_ready(1)  # waits for 2
    assert [t.tolist() for t in launched] == [[3.0, 3.5]]
    r.on_ready(2)
    assert [t.tolist() for t in launched] == [[3.0, 3.5], [2.0, 2.5], [1.0, 1.5]]
    total, cost = r.finish()  # chunk 0 was never reported ready (no gradient): launched now
    assert [t.tolist() for t in launched][-1] == [0.0, 0.5] and r.launched_early == 3
    assert total.tolist() == (grad * 0.5 * 3).tolist()
    assert cost.nbytes == int(2 * 2 / 3 * 4 * 8)


def test_nccl_keeps_the_masters_own_worker_off_the_masters_gpu(monkeypatch):
    """NCCL refuses two members on one GPU: the master's member is on cuda:0, so its local worker
    goes to cuda:1, or the start is refused with the fix when there is no second GPU."""
    from hetero_ps.server.cli import nccl_local_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"NCCL refuses two members on one GPU.*--no-local-worker"):
        nccl_local_device("auto")
    with pytest.raises(ConfigError, match=r"the master's own worker is on the CPU"):
        nccl_local_device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert nccl_local_device("auto") == "cuda:1"
    assert nccl_local_device("cuda:3") == "cuda:3"
