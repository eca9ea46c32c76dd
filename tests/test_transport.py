"""The transport on real loopback sockets: handshake, bad peers, faults, broadcast, back-pressure, timeouts.

Every test runs under an overall asyncio timeout and fails on exceptions the event loop could not
deliver to anyone. Nothing sleeps to wait: tests await events, EOFs or the messages themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import tracemalloc

import crc32c
import msgpack
import numpy as np
import pytest
from conftest import async_test

from hetero_ps.errors import (
    AuthenticationError,
    ChecksumError,
    ConfigError,
    ConnectionClosed,
    LocalProtocolError,
    RemoteError,
    TransportTimeout,
    VersionMismatch,
)
from hetero_ps.testing import Fault, FaultProxy
from hetero_ps.wire.protocol import FrameDecoder, Limits, Message, MsgType, encode_frame
from hetero_ps.wire.transport import connect, default_payload_checksum, raise_if_error, server_mac, start_server

TOKEN = "s3cret"
FAST = Limits(frame_timeout=0.3, min_frame_rate=1e9, handshake_timeout=5.0)


async def echo(conn) -> None:
    """Echo every frame back until BYE; PULL is answered with a PARAMS frame of the requested size."""
    while True:
        m = await conn.recv(timeout=10)
        if m.type == MsgType.BYE:
            return
        if m.type == MsgType.PULL:
            n = m.header["nbytes"]
            await conn.send(MsgType.PARAMS, {"n": n}, [bytes(range(256)) * (n // 256)])
            continue
        await conn.send(m.type, m.header, m.segments)


async def welcome_all(conn, hello):
    return {"job": {"model": "m"}, "you": hello.get("rank")}


async def serve(handler=echo, on_hello=welcome_all, limits=FAST, token=TOKEN):
    return await start_server("127.0.0.1", 0, token=token, on_hello=on_hello, on_connection=handler, limits=limits)


async def good_round_trip(port: int, nbytes: int = 4 << 20, rank: int = 0) -> None:
    conn, w = await connect("127.0.0.1", port, token=TOKEN, hello={"rank": rank})
    try:
        data = os.urandom(nbytes)
        await conn.send(MsgType.PUSH, {"rank": rank}, [data[:100], data[100:]])
        m = raise_if_error(await conn.recv(timeout=10))
        assert m.type == MsgType.PUSH and b"".join(bytes(s) for s in m.segments) == data
        await conn.send(MsgType.BYE, {"reason": "done"})
    finally:
        await conn.close()


def frame_bytes(mtype: int, header: dict, payload: bytes = b"", *, version: int = 1, plen: int | None = None) -> bytes:
    """A frame built by hand with the crc32c package (any version / length)."""
    hb = msgpack.packb(header, use_bin_type=True)
    head = struct.pack(
        "<4sHBBIQI", b"HTPS", version, mtype, 1, len(hb), len(payload) if plen is None else plen, crc32c.crc32c(payload)
    )
    return head + struct.pack("<I", crc32c.crc32c(hb, crc32c.crc32c(head))) + hb + payload


async def raw_socket(port: int) -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    return s


async def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as the end too)."""
    loop, out = asyncio.get_running_loop(), bytearray()
    while True:
        try:
            b = await loop.sock_recv(sock, 65536)
        except ConnectionResetError:
            return bytes(out)
        if not b:
            return bytes(out)
        out += b


def messages(data: bytes) -> list[Message]:
    dec, out = FrameDecoder(), []
    dec.feed(data)
    while (m := dec.next_message()) is not None:
        out.append(m)
    return out


# -- handshake ---------------------------------------------------------------------------------------


@async_test()
async def test_handshake_then_round_trip():
    seen = []

    async def on_hello(conn, hello):
        seen.append(hello)
        return {"job": {"model": "m", "lr": 0.1}, "worker_id": 3}

    async with await serve(on_hello=on_hello) as srv:
        conn, welcome = await connect("127.0.0.1", srv.port, token=TOKEN, hello={"rank": 2, "host": "h"})
        assert welcome.type == MsgType.WELCOME
        assert welcome.header == {"job": {"model": "m", "lr": 0.1}, "worker_id": 3}  # server_mac removed
        assert seen == [{"rank": 2, "host": "h", "protocol": 1, "software": __import__("hetero_ps").__version__}]
        assert conn.authenticated and not conn.closed and conn.peer == f"127.0.0.1:{srv.port}"
        arr = np.arange(300_000, dtype=np.float32)
        await conn.send(MsgType.PUSH, {"step": 1}, [arr, b"", b"tail"])
        m = await conn.recv(timeout=5)
        assert m.header == {"step": 1}
        np.testing.assert_array_equal(np.frombuffer(m.segments[0], np.float32), arr)
        assert [bytes(s) for s in m.segments[1:]] == [b"", b"tail"]
        assert conn.frames_sent == 2 + 1 and conn.frames_received == 2 + 1
        await conn.send(MsgType.BYE, {})
        await conn.close()
        assert conn.closed


@async_test()
async def test_wrong_token_is_refused_clearly_and_the_server_keeps_serving(caplog):
    async with await serve() as srv:
        with caplog.at_level(logging.WARNING, logger="hetero_ps.wire.transport"):
            with pytest.raises(RemoteError) as ei:
                await connect("127.0.0.1", srv.port, token="wrong", hello={"rank": 1})
        assert ei.value.code == "auth_failed"
        assert "wrong token" in str(ei.value) and "HETERO_PS_TOKEN" in str(ei.value)
        assert "wrong token" in caplog.text
        await good_round_trip(srv.port)


@async_test()
async def test_empty_token_is_still_a_shared_secret():
    async with await serve(token="") as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token="", hello={})
        await conn.close()
        with pytest.raises(RemoteError, match="auth_failed"):
            await connect("127.0.0.1", srv.port, token="x", hello={})


async def fake_server(script):
    """A listening socket whose single connection is handled by ``script(sock, decoder)``."""
    loop = asyncio.get_running_loop()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.setblocking(False)

    async def run():
        s, _ = await loop.sock_accept(ls)
        try:
            await script(s, FrameDecoder())
        finally:
            s.close()
            ls.close()

    return ls.getsockname()[1], loop.create_task(run())


async def next_frame(sock, dec) -> Message:
    loop = asyncio.get_running_loop()
    while (m := dec.next_message()) is None:
        b = await loop.sock_recv(sock, 65536)
        assert b, "peer closed"
        dec.feed(b)
    return m


@async_test()
async def test_client_rejects_a_server_that_cannot_prove_the_token():
    async def impostor(s, dec):
        loop = asyncio.get_running_loop()
        hello = await next_frame(s, dec)
        await loop.sock_sendall(s, frame_bytes(MsgType.CHALLENGE, {"server_nonce": b"n" * 32}))
        await next_frame(s, dec)  # AUTH: accepted without checking, as an impostor would
        mac = server_mac("not the token", hello.header["client_nonce"], b"n" * 32)
        await loop.sock_sendall(s, frame_bytes(MsgType.WELCOME, {"server_mac": mac}))
        await read_to_eof(s)

    port, task = await fake_server(impostor)
    with pytest.raises(AuthenticationError, match="could not prove it knows the token"):
        await connect("127.0.0.1", port, token=TOKEN, hello={})
    await task


@async_test()
async def test_server_answers_another_protocol_version_in_its_own_version():
    async with await serve() as srv:
        s = await raw_socket(srv.port)
        await asyncio.get_running_loop().sock_sendall(
            s, frame_bytes(MsgType.HELLO, {"protocol": 2, "client_nonce": b"x" * 32}, version=2)
        )
        (err,) = messages(await read_to_eof(s))  # decodable by a version-1 decoder
        s.close()
        assert err.type == MsgType.ERROR and err.header["code"] == "version_mismatch"
        assert "version 2" in err.header["message"] and "version 1" in err.header["message"]
        # a HELLO that announces another version in its header gets the same answer
        s = await raw_socket(srv.port)
        await asyncio.get_running_loop().sock_sendall(
            s, frame_bytes(MsgType.HELLO, {"protocol": 3, "client_nonce": b"x" * 32})
        )
        (err,) = messages(await read_to_eof(s))
        s.close()
        assert err.header["code"] == "version_mismatch" and "3" in err.header["message"]
        await good_round_trip(srv.port)


@async_test()
async def test_client_reports_a_server_of_another_version():
    async def future_server(s, dec):
        await next_frame(s, dec)
        await asyncio.get_running_loop().sock_sendall(s, frame_bytes(MsgType.CHALLENGE, {"x": 1}, version=2))
        await read_to_eof(s)

    port, task = await fake_server(future_server)
    with pytest.raises(VersionMismatch, match="version 2.*version 1"):
        await connect("127.0.0.1", port, token=TOKEN, hello={})
    await task


@async_test()
async def test_on_hello_may_refuse_with_an_error_frame():
    async def on_hello(conn, hello):
        raise RemoteError("rank_taken", f"rank {hello['rank']} is in use")

    async with await serve(on_hello=on_hello) as srv:
        with pytest.raises(RemoteError) as ei:
            await connect("127.0.0.1", srv.port, token=TOKEN, hello={"rank": 4})
        assert ei.value.code == "rank_taken" and "rank 4" in ei.value.message


@async_test()
async def test_a_failing_handler_closes_only_its_connection(caplog):
    async def handler(conn):
        m = await conn.recv(timeout=5)
        if m.header.get("boom"):
            raise ValueError("handler bug")
        await conn.send(m.type, m.header, m.segments)
        await echo(conn)

    async with await serve(handler=handler) as srv:
        bad, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        await bad.send(MsgType.HEARTBEAT, {"boom": True})
        with caplog.at_level(logging.ERROR, logger="hetero_ps.wire.transport"):
            err = await bad.recv(timeout=5)
            with pytest.raises(RemoteError, match="internal_error"):
                raise_if_error(err)
            with pytest.raises(ConnectionClosed):
                await bad.recv(timeout=5)
        assert "handler bug" in caplog.text
        await bad.close()
        await good_round_trip(srv.port)


@async_test()
async def test_connect_errors_are_clear():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionClosed, match=f"cannot connect to 127.0.0.1:{port}"):
        await connect("127.0.0.1", port, token=TOKEN, hello={})
    with pytest.raises(LocalProtocolError, match="client_nonce"):
        await connect("127.0.0.1", port, token=TOKEN, hello={"client_nonce": b""})


@async_test()
async def test_handshake_timeout_closes_a_silent_peer():
    async with await serve(limits=Limits(handshake_timeout=0.3)) as srv:
        s = await raw_socket(srv.port)
        (err,) = messages(await read_to_eof(s))
        s.close()
        assert err.header["code"] == "handshake_timeout"


@async_test()
async def test_client_handshake_timeout():
    async def mute(s, dec):
        await next_frame(s, dec)
        await read_to_eof(s)

    port, task = await fake_server(mute)
    with pytest.raises(TransportTimeout, match="no complete handshake"):
        await connect("127.0.0.1", port, token=TOKEN, hello={}, timeout=0.3)
    await task


# -- bad peers: each is cut off while a good client completes ------------------------------------------

HELLO = frame_bytes(MsgType.HELLO, {"protocol": 1, "client_nonce": b"c" * 32})
BAD_PEERS = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True, "protocol_error"),
    "random_bytes": (os.urandom(300), True, "protocol_error"),
    "truncated_then_gone": (HELLO[: len(HELLO) // 2], False, None),
    "oversized_length": (frame_bytes(MsgType.HELLO, {}, plen=2**40)[:28], True, "limit_exceeded"),
    "oversized_header": (struct.pack("<4sHBBIQII", b"HTPS", 1, 1, 1, 1 << 30, 0, 0, 0), True, "limit_exceeded"),
    "payload_before_auth": (frame_bytes(MsgType.HELLO, {"seg": [3]}, b"abc"), True, "limit_exceeded"),
    "first_frame_not_hello": (frame_bytes(MsgType.HEARTBEAT, {}), True, "protocol_error"),
    "slow_loris": (HELLO[:14], True, None),
}


@pytest.mark.parametrize("kind", list(BAD_PEERS))
@async_test()
async def test_bad_peer_is_cut_off_and_others_are_unaffected(kind, caplog):
    data, keep_open, code = BAD_PEERS[kind]
    with caplog.at_level(logging.INFO, logger="hetero_ps.wire.transport"):
        await _bad_peer_is_cut_off(data, keep_open, code)
    if code is None and keep_open:
        # slow loris: cut off by the frame timeout (the handshake timeout would have sent an ERROR)
        assert "sent only part of a frame" in caplog.text, caplog.text


async def _bad_peer_is_cut_off(data: bytes, keep_open: bool, code: str | None) -> None:
    async with await serve() as srv:
        s = await raw_socket(srv.port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(s, data)
        if not keep_open:
            s.close()  # the peer vanishes in the middle of a frame
        # a good client does a whole handshake and a 4 MiB round trip meanwhile
        good = asyncio.create_task(good_round_trip(srv.port))
        if keep_open:
            reply = await read_to_eof(s)
            s.close()
            got = messages(reply)
            if code is None:  # slow loris: closed without a word once its frame ran past frame_timeout
                assert got == []
            else:
                assert [m.header["code"] for m in got] == [code], got
                assert got[0].header["message"]
        await good
        # the server is left with no trace of the bad peer
        for _ in range(100):
            if not srv.connections:
                break
            await asyncio.sleep(0)  # let the closed connection's task finish (no wall-clock wait)
        assert not srv.connections


class Recorder:
    """An on_connection handler that records how each connection ended."""

    def __init__(self):
        self.ended: asyncio.Queue = asyncio.Queue()

    async def __call__(self, conn):
        try:
            while True:
                m = await conn.recv(timeout=10)
                if m.type == MsgType.BYE:
                    await self.ended.put("bye")
                    return
                await conn.send(m.type, m.header, m.segments)
        except Exception as exc:
            await self.ended.put(exc)
            raise


@async_test()
async def test_authenticated_slow_loris_is_cut_off_by_the_frame_timeout():
    rec = Recorder()
    async with await serve(handler=rec) as srv:
        async with FaultProxy("127.0.0.1", srv.port, upstream=Fault(stall_after=100_000)) as proxy:
            conn, _ = await connect("127.0.0.1", proxy.port, token=TOKEN, hello={})
            send = asyncio.create_task(conn.send(MsgType.PUSH, {}, [os.urandom(1 << 20)]))
            await proxy.fault_hit.wait()
            exc = await rec.ended.get()
            assert isinstance(exc, TransportTimeout) and "part of a frame" in str(exc)
            with pytest.raises(ConnectionClosed):
                await conn.recv(timeout=5)
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
            await conn.close()
        await good_round_trip(srv.port)


@async_test()
async def test_peer_vanishing_mid_frame():
    rec = Recorder()
    async with await serve(handler=rec) as srv:
        async with FaultProxy("127.0.0.1", srv.port, upstream=Fault(drop_after=50_000)) as proxy:
            conn, _ = await connect("127.0.0.1", proxy.port, token=TOKEN, hello={})
            try:
                await conn.send(MsgType.PUSH, {}, [os.urandom(1 << 20)], timeout=5)
            except ConnectionClosed:
                pass  # the proxy may cut us before the kernel took everything
            exc = await rec.ended.get()
            assert isinstance(exc, ConnectionClosed) and "in the middle of a frame" in str(exc)
            with pytest.raises(ConnectionClosed):
                await conn.recv(timeout=5)
            await conn.close()


@async_test()
async def test_corrupted_byte_is_detected_and_reported_to_the_sender():
    rec = Recorder()
    async with await serve(handler=rec) as srv:
        async with FaultProxy("127.0.0.1", srv.port, upstream=Fault(corrupt_at=200_000)) as proxy:
            conn, _ = await connect("127.0.0.1", proxy.port, token=TOKEN, hello={})
            assert conn.payload_checksum is False  # loopback: off by default (HETERO_PS_PAYLOAD_CRC=auto)
            await conn.send(MsgType.PUSH, {"step": 1}, [os.urandom(1 << 20)], payload_checksum=True)
            err = await conn.recv(timeout=5)
            assert err.type == MsgType.ERROR and err.header["code"] == "checksum_error"
            assert "payload checksum" in err.header["message"]
            await conn.close()
            exc = await rec.ended.get()
            assert isinstance(exc, ChecksumError)
            assert proxy.faults == ["upstream: corrupted byte 200000"]


@async_test()
async def test_throttled_link_delivers_everything_in_order():
    async with await serve() as srv:
        fault = Fault(throttle_bps=40e6)
        async with FaultProxy("127.0.0.1", srv.port, upstream=fault, downstream=fault) as proxy:
            conn, _ = await connect("127.0.0.1", proxy.port, token=TOKEN, hello={})
            blobs = [os.urandom(200_000) for _ in range(3)]
            for i, b in enumerate(blobs):
                await conn.send(MsgType.PUSH, {"i": i}, [b])
            for i, b in enumerate(blobs):
                m = await conn.recv(timeout=5)
                assert m.header == {"i": i} and bytes(m.segments[0]) == b
            assert proxy.forwarded["upstream"] > 600_000
            await conn.send(MsgType.BYE, {})
            await conn.close()


# -- broadcast, back-pressure, timeouts -----------------------------------------------------------------


@async_test()
async def test_one_encoded_frame_broadcast_to_three_clients():
    joined: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()

    async def handler(conn):
        await joined.put(conn)
        await done.wait()

    params = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    async with await serve(handler=handler) as srv:
        clients, dests = [], []
        for i in range(3):
            conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={"rank": i})
            dest = np.zeros(1 << 20, np.float32)
            dests.append(dest)
            conn.set_payload_allocator(
                lambda mt, h, n, d=dest: memoryview(d).cast("B") if mt == MsgType.PARAMS else None
            )
            clients.append(conn)
        server_side = [await joined.get() for _ in range(3)]
        frame = encode_frame(MsgType.PARAMS, {"version": 9}, [params])  # encoded (and checksummed) once
        assert frame.buffers[1].obj is params
        # 4 MiB does not fit in the socket buffers: the sends complete only as the clients read
        sends = asyncio.gather(*(c.send_frame(frame) for c in server_side))
        for conn, dest in zip(clients, dests):
            m = await conn.recv(timeout=10)
            assert m.header == {"version": 9}
            assert m.segments[0].obj is dest
            np.testing.assert_array_equal(dest, params)  # it landed in the preallocated buffer
        await sends
        for conn in clients:
            await conn.close()
        done.set()


@async_test(timeout=30)
async def test_back_pressure_a_slow_reader_blocks_the_sender_without_buffering():
    release = asyncio.Event()
    received: asyncio.Queue = asyncio.Queue()

    async def slow_reader(conn):
        await release.wait()
        for _ in range(4):
            m = await conn.recv(timeout=10)
            await received.put((m.header["i"], bytes(m.segments[0][:8]), len(m.segments[0])))

    chunk = 16 << 20  # 64 MiB in all, far more than both socket buffers
    blobs = [np.full(chunk // 4, i, np.float32) for i in range(4)]
    async with await serve(handler=slow_reader, limits=Limits()) as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        tracing = tracemalloc.is_tracing()
        if not tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            sender = asyncio.create_task(_send_all(conn, blobs))
            done, _ = await asyncio.wait({sender}, timeout=0.5)
            assert not done, "4 x 16 MiB cannot fit in the socket buffers: send() must wait for the reader"
            assert conn.frames_sent < 4
            grown = tracemalloc.get_traced_memory()[1] - base
        finally:
            if not tracing:
                tracemalloc.stop()
        assert grown < 2 << 20, f"the sender buffered {grown} bytes in Python"
        release.set()
        await sender
        got = [await received.get() for _ in range(4)]
        assert [g[0] for g in got] == [0, 1, 2, 3]
        assert all(g[1] == np.full(2, i, np.float32).tobytes() and g[2] == chunk for i, g in enumerate(got))
        await conn.close()


async def _send_all(conn, blobs):
    for i, b in enumerate(blobs):
        await conn.send(MsgType.PUSH, {"i": i}, [b])


@async_test()
async def test_recv_idle_timeout_keeps_the_connection_usable():
    async with await serve() as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        with pytest.raises(TransportTimeout, match="no message"):
            await conn.recv(timeout=0.05)
        assert not conn.closed
        await conn.send(MsgType.PULL, {"nbytes": 1 << 16})
        m = await conn.recv(timeout=5)
        assert m.type == MsgType.PARAMS and len(m.segments[0]) == 1 << 16
        await conn.close()


@async_test()
async def test_send_timeout_closes_the_connection():
    gate = asyncio.Event()

    async def never_reads(conn):
        await gate.wait()

    async with await serve(handler=never_reads) as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        with pytest.raises(TransportTimeout, match="longer than 0.2 s"):
            await conn.send(MsgType.PUSH, {}, [bytes(64 << 20)], timeout=0.2)
        assert conn.closed
        with pytest.raises(ConnectionClosed):
            await conn.send(MsgType.BYE, {})
        gate.set()


@async_test()
async def test_server_close_closes_live_connections():
    srv = await serve()
    conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
    assert len(srv.connections) == 1
    await srv.close()
    with pytest.raises(ConnectionClosed):
        await conn.recv(timeout=5)
    await conn.close()
    with pytest.raises(ConnectionClosed, match="cannot connect"):
        await connect("127.0.0.1", srv.port, token=TOKEN, hello={})


@async_test()
async def test_local_close_wakes_a_waiting_recv_and_concurrent_recv_is_refused():
    async with await serve() as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        waiting = asyncio.create_task(conn.recv())
        await asyncio.sleep(0)  # let it start waiting (one loop turn, not a timed wait)
        with pytest.raises(LocalProtocolError, match="already waiting"):
            await conn.recv()
        await conn.close()
        with pytest.raises(ConnectionClosed):
            await waiting


@async_test()
async def test_pull_lands_in_the_allocators_buffer_and_declined_allocations_get_fresh_ones():
    async with await serve() as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        dest = bytearray(1 << 20)
        conn.set_payload_allocator(lambda mt, h, n: memoryview(dest) if h.get("n") == len(dest) else None)
        await conn.send(MsgType.PULL, {"nbytes": 1 << 20})
        m = await conn.recv(timeout=5)
        assert m.segments[0].obj is dest and dest[:256] == bytes(range(256))
        await conn.send(MsgType.PULL, {"nbytes": 512})
        m = await conn.recv(timeout=5)
        assert m.segments[0].obj is not dest and bytes(m.segments[0][:256]) == bytes(range(256))
        await conn.close()


@async_test(timeout=30)
async def test_concurrent_senders_never_interleave_frames():
    got: asyncio.Queue = asyncio.Queue()

    async def reader(conn):
        for _ in range(12):
            m = await conn.recv(timeout=10)
            await got.put((m.header["who"], set(bytes(m.segments[0]))))

    async with await serve(handler=reader) as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})

        async def sender(who):
            for _ in range(4):
                await conn.send(MsgType.PUSH, {"who": who}, [bytes([who]) * (3 << 20)])

        await asyncio.gather(*(sender(w) for w in (1, 2, 3)))
        results = [await got.get() for _ in range(12)]
        assert all(payload == {who} for who, payload in results)
        assert sorted(who for who, _ in results) == [1] * 4 + [2] * 4 + [3] * 4
        await conn.close()


@async_test()
async def test_timeout_waiting_behind_another_sender_keeps_the_connection():
    release = asyncio.Event()
    got: asyncio.Queue = asyncio.Queue()

    async def slow_reader(conn):
        await release.wait()
        while True:
            m = await conn.recv(timeout=10)
            await got.put(m.header["i"])

    async with await serve(handler=slow_reader) as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        big = asyncio.create_task(conn.send(MsgType.PUSH, {"i": 0}, [bytes(32 << 20)]))
        await asyncio.sleep(0)  # one loop turn: the big send now holds the lock
        with pytest.raises(TransportTimeout, match="longer than 0.1 s$"):
            await conn.send(MsgType.HEARTBEAT, {"i": 1}, timeout=0.1)
        assert not conn.closed  # nothing of it was written, the stream is intact
        release.set()
        await big
        await conn.send(MsgType.HEARTBEAT, {"i": 2})
        assert [await got.get(), await got.get()] == [0, 2]
        await conn.close()


@async_test()
async def test_on_connection_runs_once_admitted_even_if_the_welcome_is_lost():
    ended: asyncio.Queue = asyncio.Queue()

    async def on_hello(conn, hello):
        await conn.close()  # the peer is admitted, but its connection is gone before WELCOME
        return {}

    async def handler(conn):
        try:
            await conn.recv(timeout=5)
        except ConnectionClosed as exc:
            await ended.put(exc)

    async with await serve(on_hello=on_hello, handler=handler) as srv:
        with pytest.raises(ConnectionClosed):
            await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        assert isinstance(await ended.get(), ConnectionClosed)


class FakeSock:
    def __init__(self, host):
        self.host = host

    def getpeername(self):
        return (self.host, 1234)


@pytest.mark.parametrize("env,expected", [(None, False), ("auto", False), ("on", True), ("OFF", False), ("bad", None)])
def test_payload_checksum_policy(env, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("HETERO_PS_PAYLOAD_CRC", raising=False)
    else:
        monkeypatch.setenv("HETERO_PS_PAYLOAD_CRC", env)
    if expected is None:
        with pytest.raises(ConfigError, match="HETERO_PS_PAYLOAD_CRC"):
            default_payload_checksum(FakeSock("127.0.0.1"))
    else:
        assert default_payload_checksum(FakeSock("127.0.0.1")) is expected


def test_payload_checksum_is_on_for_remote_peers(monkeypatch):
    monkeypatch.delenv("HETERO_PS_PAYLOAD_CRC", raising=False)
    for host, expected in [
        ("10.0.0.2", True),
        ("2001:db8::1", True),
        ("127.0.0.1", False),
        ("127.9.9.9", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", True),
    ]:
        assert default_payload_checksum(FakeSock(host)) is expected, host


@async_test()
async def test_forced_payload_checksum_on_real_connections(monkeypatch):
    monkeypatch.setenv("HETERO_PS_PAYLOAD_CRC", "on")
    async with await serve() as srv:
        conn, _ = await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        assert conn.payload_checksum is True
        await conn.send(MsgType.PUSH, {}, [b"abc"])  # echoed by a server connection with the CRC on too
        assert bytes((await conn.recv(timeout=5)).segments[0]) == b"abc"
        await conn.close()
        # a plain send() now carries the CRC: a corrupted payload byte is caught
        async with FaultProxy("127.0.0.1", srv.port, upstream=Fault(corrupt_at=5000)) as proxy:
            conn, _ = await connect("127.0.0.1", proxy.port, token=TOKEN, hello={})
            await conn.send(MsgType.PUSH, {}, [bytes(100_000)])
            assert (await conn.recv(timeout=5)).header["code"] == "checksum_error"
            await conn.close()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll ``predicate`` without blocking the event loop the server runs on."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


@async_test()
async def test_a_flood_of_unfinished_handshakes_is_cut_off_and_honest_clients_still_get_in(caplog):
    async with await serve(limits=Limits(max_handshakes_per_address=2, handshake_timeout=30)) as srv:
        silent = [await raw_socket(srv.port) for _ in range(2)]  # connected, never say HELLO
        await wait_for(lambda: sum(not c.authenticated for c in srv.connections) == 2)
        refused = await raw_socket(srv.port)
        assert await asyncio.wait_for(read_to_eof(refused), 10) == b""  # closed at once, no handshake
        refused.close()
        assert "refusing connections from 127.0.0.1: 2 handshakes in flight" in caplog.text
        silent.pop().close()  # one slot frees up when its peer leaves
        await wait_for(lambda: sum(not c.authenticated for c in srv.connections) == 1)
        await good_round_trip(srv.port)
        for s in silent:
            s.close()
