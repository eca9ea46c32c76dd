"""Run-time control of workers (``python -m hetero_ps.tools.control``).

A connection whose HELLO says ``role: control`` is a control client: each CONTROL frame it sends
names a live worker's rank and knobs (``simulate_slowdown``, ``simulate_bandwidth``); they are
checked here, forwarded to that worker, recorded as a ``control`` event and acknowledged. Anything
else from a control client ends its connection with an ERROR.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from hetero_ps.errors import HeteroPSError, RemoteError, TransportError
from hetero_ps.server.registry import Registry
from hetero_ps.wire.messages import Control, Error
from hetero_ps.wire.protocol import MsgType

log = logging.getLogger("hetero_ps.server")

# Each knob and the smallest value it takes: a slowdown stretches compute (1 = none), a bandwidth
# paces the link in Mbit/s (0 = the real link).
CONTROL_KNOBS: dict[str, float] = {"simulate_slowdown": 1.0, "simulate_bandwidth": 0.0}
assert set(CONTROL_KNOBS) == set(Control.KNOBS), "wire/messages.py and this table must name the same knobs"


def check_control(header: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """``(rank, knobs)`` of a CONTROL header, or a ``bad_control`` error saying what is wrong."""
    rank = header.get("rank")
    knobs = {k: v for k, v in header.items() if k != "rank"}
    bad = [k for k in knobs if k not in CONTROL_KNOBS]
    if not isinstance(rank, int) or bad or not knobs:
        raise RemoteError(
            "bad_control",
            f"CONTROL needs an int rank and knobs from {sorted(CONTROL_KNOBS)}; got rank={rank!r}, unknown={bad}",
        )
    values: dict[str, float] = {}
    for k, v in knobs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < CONTROL_KNOBS[k]:
            raise RemoteError("bad_control", f"{k} must be a number >= {CONTROL_KNOBS[k]:g}, got {v!r}")
        values[k] = float(v)
    return rank, values


def _control(knobs: dict[str, float], ok: bool | None = None, rank: int | None = None) -> Control:
    return Control(
        ok=ok,
        rank=rank,
        simulate_slowdown=knobs.get("simulate_slowdown"),
        simulate_bandwidth=knobs.get("simulate_bandwidth"),
    )


class ControlDesk:
    def __init__(self, registry: Registry, event: Callable[..., None], timeout: float):
        self.registry = registry
        self._event = event
        self.timeout = timeout

    async def serve(self, conn: Any) -> None:
        """One control client, until it says BYE or breaks the rules."""
        try:
            while True:
                msg = await conn.recv(timeout=self.timeout)
                if msg.type == MsgType.BYE:
                    return
                if msg.type != MsgType.CONTROL:
                    raise RemoteError("unexpected_message", f"a control client may not send {msg.type.name}")
                try:
                    rank, knobs = check_control(msg.header)
                    await self.send(rank, **knobs)
                except RemoteError as exc:
                    await conn.send(MsgType.ERROR, Error(exc.code, exc.message).to_header())
                    continue
                await conn.send(MsgType.CONTROL, _control(knobs, ok=True, rank=rank).to_header())
        except RemoteError as exc:
            await conn.send_error(exc.code, exc.message)
        except (TransportError, HeteroPSError):
            pass

    async def send(self, rank: int, **knobs: float) -> None:
        """Change a live worker's run-time knobs."""
        h = next((w for w in self.registry.live() if w.rank == rank), None)
        if h is None:
            raise RemoteError("no_such_worker", f"no live worker has rank {rank}")
        await h.conn.send(MsgType.CONTROL, _control(knobs).to_header())
        log.info("control: %s -> %s", h.name, knobs)
        self._event("control", rank=rank, **knobs)
