"""``python -m hetero_ps.control``: change a running worker's knobs through its master.

    python -m hetero_ps.control --master-addr HOST --rank 2 --simulate-slowdown 3
    python -m hetero_ps.control --master-addr HOST --rank 2 --simulate-bandwidth 50

It authenticates like a worker (same token), asks the master to forward a CONTROL message to the
worker with that rank, waits for the acknowledgement and exits: 0 when applied, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys

from hetero_ps.errors import ConfigError, HeteroPSError, RemoteProtocolError
from hetero_ps.wire import transport
from hetero_ps.wire.messages import Bye, Control, ControlWelcome, Hello
from hetero_ps.wire.protocol import MsgType, raise_if_error
from hetero_ps.wire.tls import ClientTLS, client_tls


async def send_control(
    host: str, port: int, token: str, rank: int, knobs: dict, timeout: float = 10.0, tls: ClientTLS | None = None
) -> Control:
    """Forward ``knobs`` (``Control.KNOBS``) to the worker of ``rank``; returns the master's acknowledgement."""
    request = Control(rank=rank, **knobs)
    conn, welcome = await transport.connect(
        host, port, token=token, hello=Hello(role="control"), timeout=timeout, tls=tls
    )
    try:
        ControlWelcome.from_header(welcome.header)
        await conn.send(MsgType.CONTROL, request.to_header())
        reply = raise_if_error(await conn.recv(timeout=timeout))
        if reply.type != MsgType.CONTROL:
            raise RemoteProtocolError(f"the master answered CONTROL with {reply.type.name}")
        ack = Control.from_header(reply.header)
        await conn.send(MsgType.BYE, Bye("control done").to_header())
        return ack
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hetero_ps.control",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a typo is an error, not a guess at another flag
    )
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT") or 29500))
    p.add_argument("--token", default=os.environ.get("HETERO_PS_TOKEN", ""))
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("HETERO_PS_TLS_CA", ""),
        metavar="PATH",
        help="a TLS master: check its certificate against this file (env HETERO_PS_TLS_CA)",
    )
    p.add_argument(
        "--tls-fingerprint",
        default=os.environ.get("HETERO_PS_TLS_FINGERPRINT", ""),
        metavar="SHA256",
        help="a TLS master: pin its certificate's SHA-256 fingerprint (env HETERO_PS_TLS_FINGERPRINT)",
    )
    p.add_argument("--rank", type=int, required=True, help="the worker to change")
    p.add_argument("--simulate-slowdown", type=float, help="its compute takes F times as long (F >= 1)")
    p.add_argument("--simulate-bandwidth", type=float, metavar="MBIT", help="pace its link (0 = off)")
    a = p.parse_args(argv)
    knobs = {
        k: v
        for k, v in (("simulate_slowdown", a.simulate_slowdown), ("simulate_bandwidth", a.simulate_bandwidth))
        if v is not None
    }
    if not knobs:
        p.error("give at least one of --simulate-slowdown, --simulate-bandwidth")
    # the worker refuses anything else (messages.Control), so say it here, before anything is sent
    if (
        not all(math.isfinite(v) for v in knobs.values())
        or knobs.get("simulate_slowdown", 1.0) < 1.0
        or knobs.get("simulate_bandwidth", 0.0) < 0.0
    ):
        p.error("--simulate-slowdown must be a number >= 1 and --simulate-bandwidth a number >= 0")
    try:
        tls = client_tls(a.tls_ca, a.tls_fingerprint)
    except ConfigError as exc:
        p.error(str(exc))
    try:
        ack = asyncio.run(send_control(a.master_addr, a.master_port, a.token, a.rank, knobs, tls=tls))
    except HeteroPSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"rank {ack.rank}: {', '.join(f'{k}={v}' for k, v in knobs.items())} applied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
