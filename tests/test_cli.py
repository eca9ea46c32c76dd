"""Both commands' --help is complete (every option explained), grouped, and the env is read."""

from __future__ import annotations

import pytest

from hetero_ps.server import cli as server_cli
from hetero_ps.worker import cli as worker_cli


@pytest.mark.parametrize("build", [server_cli.build_parser, worker_cli.build_parser], ids=["server", "worker"])
def test_every_option_has_help_and_a_group(build):
    p = build()
    undocumented = [a.option_strings for a in p._actions if a.option_strings and a.help is None and a.dest != "help"]
    assert not undocumented
    assert len(p._action_groups) >= 4  # positional, options + our own groups


def test_seed_guide_environment_and_flags(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_PORT", "29600")
    a = server_cli.build_parser().parse_args(
        [
            "--model",
            "simple_cnn",
            "--dataset",
            "digits",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--backend",
            "gloo",
            "--enable-load-balancing",
            "--load-balance-policy",
            "hybrid",
            "--rebalance-interval",
            "7",
        ]
    )
    assert (a.world_size, a.port) == (3, 29600)
    job = server_cli.job_from_args(a, trainers=3)  # --batch-size is per device
    assert job.global_batch == 48 and job.policy == "hybrid" and job.load_balancing and job.rebalance_interval == 7

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    w = worker_cli.build_parser().parse_args([])
    assert (w.rank, w.master_addr, w.master_port) == (2, "10.0.0.5", 29600)


def test_global_batch_overrides_per_device_batch():
    a = server_cli.build_parser().parse_args(["--batch-size", "16", "--global-batch-size", "100"])
    assert server_cli.job_from_args(a, trainers=3).global_batch == 100


def test_bad_codec_is_a_config_error():
    from hetero_ps.errors import ConfigError

    a = server_cli.build_parser().parse_args(["--compression", "zip"])
    with pytest.raises(ConfigError):
        server_cli.job_from_args(a, trainers=1)
