"""``python -m hetero_ps.control``: change a running worker's knobs through its master.

    python -m hetero_ps.control --master-addr HOST --rank 2 --simulate-slowdown 3
    python -m hetero_ps.control --master-addr HOST --rank 2 --simulate-bandwidth 50

It authenticates like a worker (same token), asks the master to forward a CONTROL message to the
worker with that rank, waits for the acknowledgement and exits: 0 when applied, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from hetero_ps.wire import transport
from hetero_ps.errors import HeteroPSError, RemoteError
from hetero_ps.wire.protocol import MsgType


async def send_control(host: str, port: int, token: str, rank: int, knobs: dict, timeout: float = 10.0) -> dict:
    """Forward ``knobs`` to the worker of ``rank``; returns the master's acknowledgement header."""
    conn, _ = await transport.connect(host, port, token=token, hello={"role": "control"}, timeout=timeout)
    try:
        await conn.send(MsgType.CONTROL, {"rank": rank, **knobs})
        reply = await conn.recv(timeout=timeout)
        if reply.type == MsgType.ERROR:
            raise RemoteError(reply.header.get("code", "error"), reply.header.get("message", ""))
        await conn.send(MsgType.BYE, {"reason": "control done"})
        return reply.header
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hetero_ps.control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT") or 29500))
    p.add_argument("--token", default=os.environ.get("HETERO_PS_TOKEN", ""))
    p.add_argument("--rank", type=int, required=True, help="the worker to change")
    p.add_argument("--simulate-slowdown", type=float, help="its compute takes F times as long (F >= 1)")
    p.add_argument("--simulate-bandwidth", type=float, metavar="MBIT", help="pace its link (0 = off)")
    a = p.parse_args(argv)
    knobs = {k: v for k, v in (("simulate_slowdown", a.simulate_slowdown),
                               ("simulate_bandwidth", a.simulate_bandwidth)) if v is not None}
    if not knobs:
        p.error("give at least one of --simulate-slowdown, --simulate-bandwidth")
    try:
        ack = asyncio.run(send_control(a.master_addr, a.master_port, a.token, a.rank, knobs))
    except HeteroPSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"rank {ack.get('rank')}: {', '.join(f'{k}={v}' for k, v in knobs.items())} applied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
