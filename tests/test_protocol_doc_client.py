"""docs/PROTOCOL.md is enough to talk to the server: a client written from the document alone.

``DocClient`` uses nothing but ``socket``, ``struct``, ``hmac``, ``hashlib``, ``msgpack`` and the
``crc32c`` package (plus ``os.urandom`` for its nonce) and no hetero_ps code; the server it talks to
is the real ``hetero_ps.wire.transport.start_server``, run in a thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import socket
import struct
import threading
from pathlib import Path

import crc32c
import msgpack
import pytest

PREFIX = struct.Struct("<4sHBBIQII")
HELLO, CHALLENGE, AUTH, WELCOME, PUSH, PARAMS, ERROR, BYE = 1, 2, 3, 4, 6, 7, 11, 12
DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


class DocClient:
    """A blocking client following docs/PROTOCOL.md sections 2 and 4."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def encode(mtype: int, header: dict, segments=(), checksum: bool = True) -> bytes:
        header = dict(header)
        payload = b"".join(segments)
        if segments:
            header["seg"] = [len(s) for s in segments]
        hb = msgpack.packb(header, use_bin_type=True)
        flags = 1 if checksum else 0
        pcrc = crc32c.crc32c(payload) if checksum else 0
        first24 = struct.pack("<4sHBBIQI", b"HTPS", 1, mtype, flags, len(hb), len(payload), pcrc)
        hcrc = crc32c.crc32c(first24 + hb)
        return first24 + struct.pack("<I", hcrc) + hb + payload

    def send(self, mtype: int, header: dict, segments=(), checksum: bool = True) -> None:
        self.sock.sendall(self.encode(mtype, header, segments, checksum))

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv(self):
        prefix = self._exactly(28)
        magic, version, mtype, flags, hlen, plen, pcrc, hcrc = PREFIX.unpack(prefix)
        assert magic == b"HTPS" and version == 1 and flags & ~1 == 0
        assert 1 <= hlen <= 64 << 10 and plen <= 1 << 30
        hb = self._exactly(hlen)
        assert crc32c.crc32c(prefix[:24] + hb) == hcrc, "header CRC"
        header = msgpack.unpackb(hb, raw=False, strict_map_key=True, max_ext_len=0)
        payload = self._exactly(plen)
        if flags & 1:
            assert crc32c.crc32c(payload) == pcrc, "payload CRC"
        else:
            assert pcrc == 0
        seg = header.pop("seg", [])
        assert sum(seg) == plen
        segments, off = [], 0
        for n in seg:
            segments.append(payload[off : off + n])
            off += n
        return mtype, header, segments

    def handshake(self, token: str, fields: dict):
        """Section 4. Returns the WELCOME header (server_mac checked and removed) or the ERROR header."""
        key = token.encode("utf-8")
        cn = os.urandom(32)
        self.send(HELLO, {"protocol": 1, "software": "0.1.0", "client_nonce": cn, **fields})
        mtype, h, _ = self.recv()
        if mtype == ERROR:
            return mtype, h
        assert mtype == CHALLENGE
        sn = h["server_nonce"]
        mac = hmac.new(key, b"hetero_ps/v1/client" + sn + cn, hashlib.sha256).digest()
        self.send(AUTH, {"mac": mac})
        mtype, h, _ = self.recv()
        if mtype == ERROR:
            return mtype, h
        assert mtype == WELCOME
        expected = hmac.new(key, b"hetero_ps/v1/server" + cn + sn, hashlib.sha256).digest()
        assert hmac.compare_digest(h.pop("server_mac"), expected), "the server does not know the token"
        return mtype, h


class ThreadedServer:
    """The real hetero_ps server in a background thread (its own event loop)."""

    def __init__(self, token: str):
        self.token = token
        self.hellos: list[dict] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _on_hello(self, conn, hello):
        self.hellos.append(hello)
        return {"worker_id": 7, "job": {"model": "doc"}}

    async def _on_connection(self, conn):
        from hetero_ps.wire.protocol import MsgType

        while True:
            m = await conn.recv(timeout=10)
            if m.type == MsgType.BYE:
                return
            # answer a PUSH with PARAMS holding the same segments, reversed
            await conn.send(MsgType.PARAMS, {"got": m.header}, list(reversed(m.segments)))

    def _run(self):
        from hetero_ps.wire.transport import start_server

        self.loop = asyncio.new_event_loop()

        async def start():
            self.server = await start_server(
                "127.0.0.1", 0, token=self.token, on_hello=self._on_hello, on_connection=self._on_connection
            )
            self.port = self.server.port
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()
        self.loop.close()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive()


def test_doc_client_completes_the_hello_and_moves_tensors():
    with ThreadedServer("tok-123") as srv:
        c = DocClient(srv.port)
        try:
            mtype, welcome = c.handshake("tok-123", {"rank": 5, "host": "doc"})
            assert mtype == WELCOME and welcome == {"worker_id": 7, "job": {"model": "doc"}}
            assert srv.hellos == [{"protocol": 1, "software": "0.1.0", "rank": 5, "host": "doc"}]
            a, b = os.urandom(100_000), b"\x01\x02"
            c.send(PUSH, {"step": 1}, [a, b"", b])
            mtype, h, segs = c.recv()
            assert mtype == PARAMS and h == {"got": {"step": 1}} and segs == [b, b"", a]
            c.send(PUSH, {"step": 2}, [b"abc"], checksum=False)
            assert c.recv()[2] == [b"abc"]
            c.send(BYE, {"reason": "done"})
            assert c.sock.recv(1) == b""  # the server closes after BYE
        finally:
            c.close()


def test_doc_client_gets_a_clear_error_for_a_bad_token():
    with ThreadedServer("right") as srv:
        c = DocClient(srv.port)
        try:
            mtype, err = c.handshake("wrong", {"rank": 0})
            assert mtype == ERROR and err["code"] == "auth_failed"
            assert "wrong token" in err["message"] and "HETERO_PS_TOKEN" in err["message"]
            assert c.sock.recv(1) == b""  # then the server closes
        finally:
            c.close()
        # and it still serves a client with the right token
        c = DocClient(srv.port)
        try:
            assert c.handshake("right", {})[0] == WELCOME
        finally:
            c.close()


def test_the_documented_example_frame_is_exact():
    text = DOC.read_text()
    block = re.search(r"is these 56 bytes:\n\n```\n(.*?)```", text, re.S).group(1).splitlines()
    hexes = " ".join(line for i, line in enumerate(block) if i % 2 == 0).split()
    documented = bytes(int(h, 16) for h in hexes)
    assert documented == DocClient.encode(ERROR, {"code": "auth_failed", "message": "x"})
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the check value the document gives


@pytest.mark.parametrize("bad", ["version", "header_crc"])
def test_doc_client_sees_the_server_reject_bad_frames(bad):
    with ThreadedServer("t") as srv:
        c = DocClient(srv.port)
        try:
            frame = bytearray(DocClient.encode(HELLO, {"protocol": 1, "client_nonce": b"n" * 32}))
            if bad == "version":
                frame[4] = 9
            else:
                frame[-1] ^= 1
            c.sock.sendall(frame)
            mtype, h, _ = c.recv()
            assert mtype == ERROR
            assert h["code"] == {"version": "version_mismatch", "header_crc": "checksum_error"}[bad]
        finally:
            c.close()
