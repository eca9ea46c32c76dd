"""Transport push/pull of large f32 tensors on loopback vs raw blocking ``sendall``/``recv_into``.

Arrangement (the same for both): the client is this process, the server a separate process (spawned),
so each end has its own interpreter and its own core, as a worker and the master have. Both use the
same socket buffer sizes (``hetero_ps.wire.transport.SOCKET_BUFFER_BYTES``) and TCP_NODELAY.

* push: the client sends the tensor (one PUSH frame, one segment); the server receives it into a
  preallocated buffer (payload allocator) and answers a 1-frame ack. Raw: ``sendall`` of the same
  bytes, ``recv_into`` a preallocated buffer, a 1-byte ack.
* pull: the client asks (PULL); the server encodes a PARAMS frame of its preallocated parameter
  buffer and sends it; the client receives it into a preallocated buffer. Raw: 1-byte request,
  ``sendall``, ``recv_into``.

Each variant runs interleaved with the raw baseline, best of N. Reported: push, pull and push+pull
without the payload CRC (the default on loopback) and with it (the default between hosts), and a
pull whose frame was encoded once and sent again (the PARAMS broadcast: the sender's CRC is paid
once for all workers, so only the receiver's in-cache CRC remains). Target (not asserted):
push+pull >= 0.9x raw.

TLS (a second server process with a certificate from ``tools.tls.make_cert``, the client pinning
it): push, pull and push+pull without the payload CRC, against the plaintext transport and raw
sockets measured in the same rounds. What it shows is the price of encryption on this CPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import tempfile
import time

import numpy as np
import pytest

from benchmarks.conftest import FULL, repeats, report, size

SIZES = [64 << 20, 256 << 20] if FULL else [size(0, 8 << 20)]


# -- the server side, in its own process -----------------------------------------------------------


def _raw_socket_opts(s: socket.socket) -> None:
    from hetero_ps.wire.transport import SOCKET_BUFFER_BYTES

    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if SOCKET_BUFFER_BYTES > 0:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


def _recv_exactly(s: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:])
        if n == 0:
            raise EOFError("raw peer closed")
        got += n


def _raw_peer(conn, nbytes: int) -> None:
    ls = socket.socket()
    _raw_socket_opts(ls)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    conn.send(ls.getsockname()[1])
    s, _ = ls.accept()
    _raw_socket_opts(s)
    inbox = memoryview(bytearray(nbytes))
    params = memoryview(np.random.default_rng(1).standard_normal(nbytes // 4).astype(np.float32)).cast("B")
    cmd = bytearray(1)
    try:
        while s.recv_into(cmd) == 1:
            if cmd == b"P":
                _recv_exactly(s, inbox)
                s.sendall(b"A")
            else:
                s.sendall(params)
    finally:
        s.close()
        ls.close()


def _transport_peer(conn, nbytes: int, cert_dir: str = "") -> None:
    from hetero_ps.wire.protocol import MsgType, encode_frame
    from hetero_ps.wire.tls import server_context
    from hetero_ps.wire.transport import start_server

    tls = server_context(os.path.join(cert_dir, "cert.pem"), os.path.join(cert_dir, "key.pem")) if cert_dir else None

    inbox = bytearray(nbytes)
    params = np.random.default_rng(1).standard_normal(nbytes // 4).astype(np.float32)

    async def main():
        finished = asyncio.Event()
        cached = {}  # PULL with "reuse": the same encoded frame again, as in a broadcast

        async def on_hello(c, hello):
            return {}

        async def on_connection(c):
            c.set_payload_allocator(lambda mt, h, n: memoryview(inbox)[:n] if mt == MsgType.PUSH else None)
            try:
                while True:
                    m = await c.recv()
                    if m.type == MsgType.PUSH:
                        await c.send(MsgType.HEARTBEAT, {"n": len(m.segments[0])})
                    elif m.type == MsgType.PULL:
                        crc = m.header["crc"]
                        frame = cached.get(crc) if m.header["reuse"] else None
                        if frame is None:  # encoding includes the payload CRC
                            frame = encode_frame(MsgType.PARAMS, {"n": params.nbytes}, [params], payload_checksum=crc)
                            cached[crc] = frame
                        await c.send_frame(frame)
                    else:
                        return
            finally:
                finished.set()

        async with await start_server(
            "127.0.0.1", 0, token="bench", on_hello=on_hello, on_connection=on_connection, tls=tls
        ) as srv:
            conn.send(srv.port)
            await finished.wait()

    asyncio.run(main())


class _Peer:
    """A spawned server process; ``port`` once it listens; reaped on close."""

    def __init__(self, target, nbytes: int, *args):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, nbytes, *args), daemon=True)
        self.proc.start()
        ready = mp.connection.wait([parent, self.proc.sentinel], timeout=60)
        if parent not in ready:
            self.close()
            raise RuntimeError(f"benchmark peer did not start (exit code {self.proc.exitcode})")
        self.port = parent.recv()

    def close(self) -> None:
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


# -- the client side, here -------------------------------------------------------------------------


class _RawClient:
    def __init__(self, port: int, nbytes: int):
        self.s = socket.socket()
        _raw_socket_opts(self.s)
        self.s.connect(("127.0.0.1", port))
        self.grad = memoryview(np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)).cast("B")
        self.dest = memoryview(bytearray(nbytes))
        self.ack = memoryview(bytearray(1))

    def push(self) -> None:
        self.s.sendall(b"P")
        self.s.sendall(self.grad)
        _recv_exactly(self.s, self.ack)

    def pull(self) -> None:
        self.s.sendall(b"L")
        _recv_exactly(self.s, self.dest)

    def close(self) -> None:
        self.s.close()


class _TransportClient:
    def __init__(self, port: int, nbytes: int, cert_dir: str = ""):
        from hetero_ps.wire.protocol import MsgType
        from hetero_ps.wire.tls import cert_file_fingerprint, client_tls
        from hetero_ps.wire.transport import connect

        self.MsgType = MsgType
        self.loop = asyncio.new_event_loop()
        tls = client_tls(fingerprint=cert_file_fingerprint(os.path.join(cert_dir, "cert.pem"))) if cert_dir else None
        self.conn, _ = self.loop.run_until_complete(connect("127.0.0.1", port, token="bench", hello={}, tls=tls))
        self.grad = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
        self.dest = bytearray(nbytes)
        self.conn.set_payload_allocator(lambda mt, h, n: memoryview(self.dest)[:n] if mt == MsgType.PARAMS else None)

    async def _push(self, crc: bool) -> None:
        await self.conn.send(self.MsgType.PUSH, {"step": 0}, [self.grad], payload_checksum=crc)
        m = await self.conn.recv(timeout=60)
        assert m.header["n"] == self.grad.nbytes

    async def _pull(self, crc: bool, reuse: bool) -> None:
        await self.conn.send(self.MsgType.PULL, {"crc": crc, "reuse": reuse})
        m = await self.conn.recv(timeout=60)
        assert m.segments[0].obj is self.dest

    def push(self, crc: bool) -> None:
        self.loop.run_until_complete(self._push(crc))

    def pull(self, crc: bool, reuse: bool = False) -> None:
        self.loop.run_until_complete(self._pull(crc, reuse))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.send(self.MsgType.BYE, {}))
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@pytest.mark.parametrize("nbytes", SIZES, ids=[f"{n >> 20}MiB" for n in SIZES])
def bench_transport_push_pull(nbytes):
    from hetero_ps.tools.tls import make_cert
    from hetero_ps.wire.transport import SOCKET_BUFFER_BYTES

    cert_dir = tempfile.mkdtemp(prefix="bench_tls_")
    make_cert(cert_dir, ["127.0.0.1"])
    raw_peer, ours_peer = _Peer(_raw_peer, nbytes), _Peer(_transport_peer, nbytes)
    tls_peer = _Peer(_transport_peer, nbytes, cert_dir)
    raw = ours = tls = None
    try:
        raw = _RawClient(raw_peer.port, nbytes)
        ours = _TransportClient(ours_peer.port, nbytes)
        tls = _TransportClient(tls_peer.port, nbytes, cert_dir)
        variants = {
            "raw_push": raw.push,
            "raw_pull": raw.pull,
            "push_crc": lambda: ours.push(True),
            "pull_crc": lambda: ours.pull(True),
            "push_nocrc": lambda: ours.push(False),
            "pull_nocrc": lambda: ours.pull(False),
            "pull_crc_encoded_once": lambda: ours.pull(True, reuse=True),
            "tls_push_nocrc": lambda: tls.push(False),
            "tls_pull_nocrc": lambda: tls.pull(False),
        }
        best = {k: float("inf") for k in variants}
        for fn in variants.values():  # warm-up: page faults, TCP windows
            fn()
        for _ in range(repeats(full=10, quick=2)):
            for k, fn in variants.items():  # interleaved, so noise hits all variants alike
                best[k] = min(best[k], _timed(fn))
    finally:
        for c in (tls, ours, raw):
            if c is not None:
                c.close()
        tls_peer.close()
        ours_peer.close()
        raw_peer.close()
        for name in os.listdir(cert_dir):
            os.remove(os.path.join(cert_dir, name))
        os.rmdir(cert_dir)

    print(f"\n[bench] socket buffers: {SOCKET_BUFFER_BYTES} bytes requested; {os.cpu_count()} CPUs")
    raw = {"raw sendall/recv_into": best["raw_push"] + best["raw_pull"]}
    raw_push, raw_pull = {"raw sendall/recv_into": best["raw_push"]}, {"raw sendall/recv_into": best["raw_pull"]}
    # the default on loopback: no payload CRC (HETERO_PS_PAYLOAD_CRC=auto, docs/PROTOCOL.md section 7)
    report("transport push", best["push_nocrc"], raw_push, nbytes)
    report("transport pull", best["pull_nocrc"], raw_pull, nbytes)
    report("transport push+pull", best["push_nocrc"] + best["pull_nocrc"], raw, 2 * nbytes)
    # the default between hosts: payload CRC on
    report("transport push (payload crc)", best["push_crc"], raw_push, nbytes)
    report("transport pull (payload crc)", best["pull_crc"], raw_pull, nbytes)
    report("transport push+pull (payload crc)", best["push_crc"] + best["pull_crc"], raw, 2 * nbytes)
    # the broadcast case: the PARAMS frame (and its CRC) is encoded once for every worker
    report("transport pull (payload crc, frame encoded once)", best["pull_crc_encoded_once"], raw_pull, nbytes)
    # TLS (no payload CRC, as on loopback): against the plaintext transport and raw sockets of the same rounds
    plain = "plaintext transport"
    report("transport push (TLS)", best["tls_push_nocrc"], {plain: best["push_nocrc"], **raw_push}, nbytes)
    report("transport pull (TLS)", best["tls_pull_nocrc"], {plain: best["pull_nocrc"], **raw_pull}, nbytes)
    report(
        "transport push+pull (TLS)",
        best["tls_push_nocrc"] + best["tls_pull_nocrc"],
        {plain: best["push_nocrc"] + best["pull_nocrc"], **raw},
        2 * nbytes,
    )
