"""``python -m hetero_ps.worker --master-addr HOST``: join a master and train.

The job (model, data, hyper-parameters) comes from the master; a worker needs only the address, the
port and the token (and ``--tls-fingerprint`` or ``--tls-ca`` for a master started with ``--tls-cert``).
The seed guide's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is read
too, and its job flags are accepted so old launch lines keep working — the master's job wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

from hetero_ps.config import env_int
from hetero_ps.errors import ConfigError, HeteroPSError
from hetero_ps.observe.logs import add_file_log, remove_file_logs, set_role, setup_logging
from hetero_ps.wire.tls import client_tls
from hetero_ps.worker.worker import Worker, WorkerConfig

log = logging.getLogger("hetero_ps.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hetero_ps.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a typo is an error, not a guess at another flag
    )
    g = p.add_argument_group("connection")
    g.add_argument(
        "--master-addr", default=os.environ.get("MASTER_ADDR", ""), help="the master's address (env MASTER_ADDR)"
    )
    g.add_argument(
        "--master-port",
        type=int,
        default=env_int("MASTER_PORT", 29500),
        help="the master's port (env MASTER_PORT, default 29500)",
    )
    g.add_argument(
        "--token",
        default=os.environ.get("HETERO_PS_TOKEN", ""),
        help="shared secret, the same as the master's (env HETERO_PS_TOKEN)",
    )
    g.add_argument(
        "--tls-ca",
        default=os.environ.get("HETERO_PS_TLS_CA", ""),
        metavar="PATH",
        help="use TLS and check the master's certificate against this file: its cert.pem, or the CA that "
        "signed it (env HETERO_PS_TLS_CA)",
    )
    g.add_argument(
        "--tls-fingerprint",
        default=os.environ.get("HETERO_PS_TLS_FINGERPRINT", ""),
        metavar="SHA256",
        help="use TLS and pin the master's certificate by its SHA-256 fingerprint, which the master prints "
        "(env HETERO_PS_TLS_FINGERPRINT)",
    )
    g.add_argument(
        "--rank",
        type=int,
        default=env_int("RANK", -1),
        help="this worker's rank (env RANK; default: the master assigns one)",
    )
    g.add_argument(
        "--world-size",
        type=int,
        default=env_int("WORLD_SIZE", 0),
        help="accepted for the seed guide's scripts (env WORLD_SIZE); the master counts workers",
    )
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="keep retrying to reach the master for this many seconds (default 60)",
    )
    g.add_argument(
        "--reconnect-timeout",
        type=float,
        default=600.0,
        help="when the master goes away mid-job, keep trying to rejoin it (same rank) for this many "
        "seconds (default 600; 0: exit at once)",
    )
    g = p.add_argument_group("hardware")
    g.add_argument(
        "--device",
        default=os.environ.get("HETERO_PS_DEVICE", "auto"),
        help="auto (CUDA if available), cpu, cuda or cuda:N (env HETERO_PS_DEVICE)",
    )
    g.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    g = p.add_argument_group("simulated heterogeneity (tests, benchmarks)")
    g.add_argument("--simulate-slowdown", type=float, default=1.0, help="make compute take F times as long (F >= 1)")
    g.add_argument(
        "--simulate-bandwidth",
        type=float,
        default=0.0,
        metavar="MBIT",
        help="pace pushes and pulls to MBIT Mbit/s, like a slow link (0 = off)",
    )
    g.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip the short probe of the model at join (the master then starts from equal shares)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--profile",
        "--profile-steps",
        dest="profile_steps",
        type=int,
        default=0,
        metavar="STEPS",
        help="write a torch.profiler Chrome trace of STEPS steps to experiments/NAME/profiles/",
    )
    g.add_argument("--experiments-dir", default="experiments", help="where this node writes its logs")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    g.add_argument(
        "--log-format",
        choices=["plain", "json"],
        default="plain",
        help="plain lines (a progress bar on a terminal) or JSON lines",
    )
    g = p.add_argument_group("job flags of the seed guide (the master decides; accepted and ignored)")
    for flag in (
        "--model",
        "--dataset",
        "--batch-size",
        "--epochs",
        "--backend",
        "--load-balance-policy",
        "--rebalance-interval",
    ):
        g.add_argument(flag, default=None, help=argparse.SUPPRESS)
    g.add_argument("--enable-load-balancing", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(f"worker[{args.rank if args.rank >= 0 else '?'}]", args.log_level, args.log_format)
    if not args.master_addr:
        log.error("no master address: pass --master-addr HOST or set MASTER_ADDR")
        return 2
    if not 1 <= args.master_port <= 65535:
        log.error(
            "--master-port (MASTER_PORT) %d is not a TCP port: use the port the master prints, 1..65535",
            args.master_port,
        )
        return 2
    if args.simulate_slowdown < 1.0:
        log.error("--simulate-slowdown must be >= 1, got %s", args.simulate_slowdown)
        return 2
    try:
        tls = client_tls(args.tls_ca, args.tls_fingerprint)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    ignored = [f for f in ("model", "dataset", "batch_size", "epochs", "backend") if getattr(args, f) is not None]
    if ignored:
        log.info(
            "job flags %s are decided by the master; this worker uses the master's job",
            ", ".join("--" + f.replace("_", "-") for f in ignored),
        )
    cfg = WorkerConfig(
        master_addr=args.master_addr,
        master_port=args.master_port,
        token=args.token,
        tls=tls,
        rank=args.rank,
        device=args.device,
        connect_timeout=args.connect_timeout,
        reconnect_timeout=args.reconnect_timeout,
        simulate_slowdown=args.simulate_slowdown,
        torch_threads=args.torch_threads,
        simulate_bandwidth=args.simulate_bandwidth,
        calibrate=not args.no_calibrate,
        experiments_dir=args.experiments_dir,
        profile_steps=args.profile_steps,
        log_format=args.log_format,
    )
    try:
        worker = Worker(cfg)

        def on_welcome(exp: str, rank: int) -> None:  # the master may have chosen our rank
            set_role(f"worker[{rank}]", args.log_format)
            remove_file_logs()  # a rejoin: the new master's experiment gets the lines from now on
            add_file_log(
                os.path.join(args.experiments_dir, exp, "logs", f"worker-{rank}-{socket.gethostname()}.log"),
                f"worker[{rank}]",
                args.log_format,
            )

        worker.on_welcome = on_welcome
        summary = asyncio.run(worker.run_and_rejoin())
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except HeteroPSError as exc:
        log.error("%s", exc)
        return 1
    log.info("done: %d steps, %d samples", summary["steps"], summary["samples"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
