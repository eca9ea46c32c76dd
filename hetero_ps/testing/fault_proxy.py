"""Tools for tests, ours and users': a fault-injecting TCP proxy.

``FaultProxy`` sits on loopback between a client and a server and forwards bytes both ways, doing
to each direction what its ``Fault`` says: drop the connection after N bytes, stall (stop
forwarding, keep the connection open), flip one byte at a given offset, or throttle to a rate.
Offsets count bytes of one connection in one direction, from its first byte. Tests await
``proxy.fault_hit`` (an ``asyncio.Event``) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """What happens to the bytes of one direction. None disables each fault."""

    drop_after: int | None = None  # forward this many bytes, then close both sides
    stall_after: int | None = None  # forward this many bytes, then forward nothing more (no close)
    corrupt_at: int | None = None  # XOR 0xFF into the byte at this offset
    throttle_bps: float | None = None  # forward at most this many bytes per second

    def __post_init__(self) -> None:
        for name in ("drop_after", "stall_after", "corrupt_at"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"Fault.{name} must be >= 0, got {v}")
        if self.throttle_bps is not None and not self.throttle_bps > 0:
            raise ValueError(f"Fault.throttle_bps must be > 0, got {self.throttle_bps}")


NO_FAULT = Fault()


class FaultProxy:
    """A loopback TCP proxy to ``target_host:target_port`` that injects faults.

    ``upstream`` applies to client -> server bytes, ``downstream`` to server -> client bytes, on every
    connection through the proxy. Use as ``async with FaultProxy(...) as proxy:`` and connect to
    ``proxy.port``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        upstream: Fault = NO_FAULT,
        downstream: Fault = NO_FAULT,
        host: str = "127.0.0.1",
    ):
        self.target = (target_host, target_port)
        self.upstream = upstream
        self.downstream = downstream
        self.host = host
        self.port = 0
        self.fault_hit = asyncio.Event()  # set when any drop/stall/corrupt happens
        self.faults: list[str] = []  # what happened, in words
        self.forwarded = {"upstream": 0, "downstream": 0}  # bytes, all connections
        self.connections = 0
        self._lsock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._socks: set[socket.socket] = set()
        self._accept_task: asyncio.Task | None = None

    async def start(self) -> FaultProxy:
        loop = asyncio.get_running_loop()
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.host, 0))
        ls.listen(64)
        ls.setblocking(False)
        self._lsock = ls
        self.port = ls.getsockname()[1]
        self._accept_task = loop.create_task(self._accept_loop())
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in list(self._socks):
            s.close()
        self._socks.clear()
        if self._lsock is not None:
            self._lsock.close()

    def _hit(self, what: str) -> None:
        log.info("FaultProxy: %s", what)
        self.faults.append(what)
        self.fault_hit.set()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        lsock = self._lsock
        assert lsock is not None, "start() binds the listener before this task runs"
        while True:
            client, _ = await loop.sock_accept(lsock)
            client.setblocking(False)
            self._socks.add(client)
            self.connections += 1
            t = loop.create_task(self._relay(client))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _relay(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setblocking(False)
        self._socks.add(server)
        try:
            await loop.sock_connect(server, self.target)
        except OSError as exc:
            log.info("FaultProxy: cannot reach %s: %s", self.target, exc)
            self._close_pair(client, server)
            return
        pair = (client, server)
        up = loop.create_task(self._pump(client, server, self.upstream, "upstream", pair))
        down = loop.create_task(self._pump(server, client, self.downstream, "downstream", pair))
        try:
            await asyncio.gather(up, down)
        finally:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._close_pair(client, server)

    def _close_pair(self, *socks: socket.socket) -> None:
        for s in socks:
            self._socks.discard(s)
            s.close()

    async def _pump(self, src: socket.socket, dst: socket.socket, fault: Fault, name: str, pair) -> None:
        loop = asyncio.get_running_loop()
        chunk = 64 << 10
        if fault.throttle_bps:
            chunk = max(1, min(chunk, int(fault.throttle_bps / 50)))  # ~20 ms per piece
        offset = 0
        while True:
            try:
                data = bytearray(await loop.sock_recv(src, chunk))
            except OSError:
                data = bytearray()
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            # the earliest drop/stall point inside this piece cuts it there
            stop, cut = None, len(data)
            for kind, at in (("drop", fault.drop_after), ("stall", fault.stall_after)):
                if at is not None and at - offset <= cut and (stop is None or at - offset < cut):
                    stop, cut = kind, at - offset
            del data[cut:]
            if fault.corrupt_at is not None and offset <= fault.corrupt_at < offset + len(data):
                data[fault.corrupt_at - offset] ^= 0xFF
                self._hit(f"{name}: corrupted byte {fault.corrupt_at}")
            if data:
                try:
                    await loop.sock_sendall(dst, data)
                except OSError:
                    return
                offset += len(data)
                self.forwarded[name] += len(data)
                if fault.throttle_bps:
                    await asyncio.sleep(len(data) / fault.throttle_bps)
            if stop == "drop":
                self._hit(f"{name}: dropped the connection after {offset} bytes")
                for s in pair:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if stop == "stall":
                self._hit(f"{name}: stalled after {offset} bytes")
                await asyncio.Event().wait()  # until the proxy is closed (this task cancelled)


__all__ = ["Fault", "FaultProxy"]
