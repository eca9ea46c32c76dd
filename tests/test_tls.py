"""TLS on the hetero_ps wire (docs/PROTOCOL.md, "TLS"): real sockets, and real processes where it matters.

The certificates are made by the helper users run (``python -m hetero_ps.tools.tls make-cert``).
Every transport test runs under an asyncio timeout; the process tests under pytest's, and
LocalCluster ends every process it started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import stat
import struct
import subprocess
import sys

import crc32c
import msgpack
import pytest
from conftest import async_test, wait_until

from hetero_ps.errors import AuthenticationError, ConfigError, ConnectionClosed, RemoteError
from hetero_ps.testing import LocalCluster
from hetero_ps.tools.tls import make_cert
from hetero_ps.wire import tls
from hetero_ps.wire.protocol import FrameDecoder, Limits, MsgType
from hetero_ps.wire.transport import connect, start_server

TOKEN = "s3cret"
FAST = Limits(frame_timeout=1.0, min_frame_rate=1e9, handshake_timeout=3.0)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The master's certificate, another one, and one made out to another host only."""
    root = tmp_path_factory.mktemp("certs")
    out = {}
    for name, hosts in (("master", ["127.0.0.1", "localhost"]), ("other", ["127.0.0.1"]), ("elsewhere", ["x.lan"])):
        cert, key = make_cert(str(root / name), hosts)
        out[name] = {"cert": cert, "key": key, "fp": tls.cert_file_fingerprint(cert)}
    return out


async def echo(conn) -> None:
    """Echo every frame back until BYE; PULL is answered with a PARAMS frame of the requested size."""
    while True:
        m = await conn.recv(timeout=20)
        if m.type == MsgType.BYE:
            return
        if m.type == MsgType.PULL:
            n = m.header["nbytes"]
            await conn.send(MsgType.PARAMS, {"n": n}, [bytes(range(256)) * (n // 256)])
            continue
        await conn.send(m.type, m.header, m.segments)


async def welcome(conn, hello):
    return {"job": {"model": "m"}}


async def serve(cert=None, limits=FAST, handler=echo):
    ctx = tls.server_context(cert["cert"], cert["key"]) if cert else None
    return await start_server(
        "127.0.0.1", 0, token=TOKEN, on_hello=welcome, on_connection=handler, limits=limits, tls=ctx
    )


async def round_trip(port: int, client_tls, nbytes: int = 6 << 20) -> None:
    conn, _ = await connect("127.0.0.1", port, token=TOKEN, hello={}, tls=client_tls)
    try:
        assert conn.tls_version is not None and conn.tls_version.startswith("TLSv1.3"), conn.tls_version
        data = os.urandom(nbytes)
        # one big segment and small ones around it: the header, a 100-byte piece, the bulk
        await conn.send(MsgType.PUSH, {"i": 1}, [data[:100], data[100:]], payload_checksum=True)
        m = await conn.recv(timeout=20)
        assert m.type == MsgType.PUSH and b"".join(bytes(s) for s in m.segments) == data
        await conn.send(MsgType.PULL, {"nbytes": nbytes})
        m = await conn.recv(timeout=20)
        assert m.type == MsgType.PARAMS and bytes(m.segments[0]) == bytes(range(256)) * (nbytes // 256)
        await conn.send(MsgType.BYE, {})
    finally:
        await conn.close()


def frame_bytes(mtype: int, header: dict, payload: bytes = b"", *, plen: int | None = None) -> bytes:
    hb = msgpack.packb(header, use_bin_type=True)
    head = struct.pack(
        "<4sHBBIQI", b"HTPS", 1, mtype, 1, len(hb), len(payload) if plen is None else plen, crc32c.crc32c(payload)
    )
    return head + struct.pack("<I", crc32c.crc32c(hb, crc32c.crc32c(head))) + hb + payload


def decode_all(data: bytes) -> list:
    dec, out = FrameDecoder(), []
    dec.feed(data)
    while (m := dec.next_message()) is not None:
        out.append(m)
    return out


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    try:
        while chunk := await reader.read(65536):
            out += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return bytes(out)


def pinned_stream_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the transport over TLS ---------------------------------------------------------------------------


@async_test(30.0)
async def test_big_frames_both_ways_with_a_pinned_fingerprint_and_with_a_ca(certs):
    async with await serve(certs["master"]) as srv:
        await round_trip(srv.port, tls.client_tls(fingerprint=certs["master"]["fp"]))
        await round_trip(srv.port, tls.client_tls(ca=certs["master"]["cert"]))
        # both at once, on two connections: each has its own session
        await asyncio.gather(
            round_trip(srv.port, tls.client_tls(fingerprint=certs["master"]["fp"]), 3 << 20),
            round_trip(srv.port, tls.client_tls(ca=certs["master"]["cert"]), 5 << 20),
        )


@async_test(30.0)
async def test_a_wrong_fingerprint_is_refused_naming_the_one_seen(certs):
    async with await serve(certs["master"]) as srv:
        with pytest.raises(AuthenticationError, match="does not match --tls-fingerprint") as e:
            await connect("127.0.0.1", srv.port, token=TOKEN, hello={}, tls=tls.client_tls(fingerprint="ab" * 32))
        assert certs["master"]["fp"] in str(e.value)
        await round_trip(srv.port, tls.client_tls(fingerprint=certs["master"]["fp"]))


@async_test(30.0)
async def test_a_wrong_ca_is_refused_naming_the_fingerprint_seen(certs, caplog):
    async with await serve(certs["master"]) as srv:
        with caplog.at_level(logging.WARNING, logger="hetero_ps.wire.transport"):
            with pytest.raises(AuthenticationError, match="does not match --tls-ca") as e:
                await connect(
                    "127.0.0.1", srv.port, token=TOKEN, hello={}, tls=tls.client_tls(ca=certs["other"]["cert"])
                )
            assert certs["master"]["fp"] in str(e.value)
            # the master learns why from the worker's alert
            for _ in range(200):
                if "TLS handshake with" in caplog.text:
                    break
                await asyncio.sleep(0.01)
        assert "refused this master's certificate" in caplog.text, caplog.text


@async_test(30.0)
async def test_a_certificate_for_another_host_is_refused_with_a_ca_but_a_pin_still_works(certs):
    async with await serve(certs["elsewhere"]) as srv:
        with pytest.raises(AuthenticationError, match="does not match the address 127.0.0.1") as e:
            await connect(
                "127.0.0.1", srv.port, token=TOKEN, hello={}, tls=tls.client_tls(ca=certs["elsewhere"]["cert"])
            )
        assert "--host 127.0.0.1" in str(e.value)
        await round_trip(srv.port, tls.client_tls(fingerprint=certs["elsewhere"]["fp"]))


@async_test(30.0)
async def test_a_plaintext_client_is_told_the_master_requires_tls(certs, caplog):
    async with await serve(certs["master"]) as srv:
        with caplog.at_level(logging.WARNING, logger="hetero_ps.wire.transport"):
            with pytest.raises(RemoteError) as e:
                await connect("127.0.0.1", srv.port, token=TOKEN, hello={})
        assert e.value.code == "tls_required"
        assert "--tls-fingerprint" in e.value.message and "--tls-ca" in e.value.message
        assert "it does not use TLS, which this master requires" in caplog.text
        await round_trip(srv.port, tls.client_tls(fingerprint=certs["master"]["fp"]))


@async_test(30.0)
async def test_a_tls_client_is_told_the_master_does_not_use_tls(certs, caplog):
    async with await serve(None) as srv:
        with caplog.at_level(logging.WARNING, logger="hetero_ps.wire.transport"):
            with pytest.raises(ConfigError, match="does not use TLS") as e:
                await connect(
                    "127.0.0.1", srv.port, token=TOKEN, hello={}, tls=tls.client_tls(ca=certs["master"]["cert"])
                )
        assert "--tls-cert" in str(e.value)
        assert "the peer speaks TLS" in caplog.text  # and the plaintext master says why in its log


@async_test(30.0)
async def test_a_silent_peer_is_dropped_after_the_handshake_timeout_without_plaintext(certs):
    limits = Limits(handshake_timeout=0.5)
    async with await serve(certs["master"], limits=limits) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)  # no TLS, no byte
        assert await asyncio.wait_for(read_to_eof(reader), 10) == b""
        writer.close()
        # half a ClientHello, then nothing: the TLS handshake is bounded by the same timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert await asyncio.wait_for(read_to_eof(reader), 10) == b""
        writer.close()
        assert not srv.connections or all(c.closed for c in srv.connections)


HELLO = frame_bytes(MsgType.HELLO, {"protocol": 1, "client_nonce": b"c" * 32})
BAD_FRAMES = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol_error"),
    "oversized_length": (frame_bytes(MsgType.HELLO, {}, plen=2**40)[:28], "limit_exceeded"),
    "payload_before_auth": (frame_bytes(MsgType.HELLO, {"seg": [3]}, b"abc"), "limit_exceeded"),
    "first_frame_not_hello": (frame_bytes(MsgType.HEARTBEAT, {}), "protocol_error"),
    "bad_header_crc": (HELLO[:24] + bytes([HELLO[24] ^ 1]) + HELLO[25:], "checksum_error"),
}


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
@async_test(30.0)
async def test_malformed_frames_inside_tls_get_the_same_error_frame(certs, kind):
    data, code = BAD_FRAMES[kind]
    async with await serve(certs["master"]) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=pinned_stream_context())
        writer.write(data)
        await writer.drain()
        got = decode_all(await asyncio.wait_for(read_to_eof(reader), 10))
        writer.close()
        assert [m.header["code"] for m in got] == [code], got
        await round_trip(srv.port, tls.client_tls(fingerprint=certs["master"]["fp"]), 1 << 20)


@async_test(30.0)
async def test_a_tampered_record_breaks_the_connection(certs):
    """A byte flipped on the wire fails TLS's authentication tag: the connection ends, nothing is delivered."""
    from hetero_ps.testing import Fault, FaultProxy

    ended: asyncio.Queue = asyncio.Queue()

    async def handler(conn):
        try:
            while True:
                await conn.recv(timeout=10)
        except Exception as exc:
            await ended.put(exc)

    async with await serve(certs["master"], handler=handler) as srv:
        async with FaultProxy("127.0.0.1", srv.port, upstream=Fault(corrupt_at=200_000)) as proxy:
            conn, _ = await connect(
                "127.0.0.1", proxy.port, token=TOKEN, hello={}, tls=tls.client_tls(fingerprint=certs["master"]["fp"])
            )
            try:
                await conn.send(MsgType.PUSH, {}, [os.urandom(1 << 20)], timeout=10)
            except ConnectionClosed:
                pass
            exc = await asyncio.wait_for(ended.get(), 10)
            assert isinstance(exc, ConnectionClosed) and "broke" in str(exc), exc
            await conn.close()


# -- contexts and files -------------------------------------------------------------------------------


def test_server_context_errors_say_what_is_wrong(certs, tmp_path):
    m, o = certs["master"], certs["other"]
    with pytest.raises(ConfigError, match="--tls-key needs --tls-cert"):
        tls.server_context("", m["key"])
    with pytest.raises(ConfigError, match="--tls-cert needs --tls-key"):
        tls.server_context(m["cert"], "")
    with pytest.raises(ConfigError, match="cannot read the TLS certificate --tls-cert .*nosuch.pem"):
        tls.server_context(str(tmp_path / "nosuch.pem"), m["key"])
    with pytest.raises(ConfigError, match="cannot read the TLS key --tls-key"):
        tls.server_context(m["cert"], str(tmp_path / "nosuch.pem"))
    with pytest.raises(ConfigError, match="the key does not belong to the certificate"):
        tls.server_context(m["cert"], o["key"])
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        tls.server_context(m["key"], m["key"])
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(open(m["key"], "rb").read(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted with a passphrase"):  # and no prompt on the terminal
        tls.server_context(m["cert"], str(encrypted))


def test_client_flags(certs):
    fp = certs["master"]["fp"]
    assert tls.client_tls() is None
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    for spelling in (fp, fp.upper(), colons, f"sha256 Fingerprint={colons}"):
        assert tls.client_tls(fingerprint=spelling).pin.hex() == fp
    with pytest.raises(ConfigError, match="expects the 64 hex digits"):
        tls.client_tls(fingerprint="abc")
    with pytest.raises(ConfigError, match="not both"):
        tls.client_tls(ca=certs["master"]["cert"], fingerprint=fp)
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        tls.client_tls(ca=certs["master"]["key"])
    ctx = tls.client_tls(ca=certs["master"]["cert"]).context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED


def test_make_cert_command(tmp_path):
    out = tmp_path / "certs"
    cmd = [sys.executable, "-m", "hetero_ps.tools.tls", "make-cert", "--out", str(out), "--host", "127.0.0.1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    fp = tls.cert_file_fingerprint(str(out / "cert.pem"))
    assert f"SHA-256 fingerprint: {fp}" in r.stdout
    assert f"--tls-cert {out / 'cert.pem'} --tls-key {out / 'key.pem'}" in r.stdout
    assert f"--tls-fingerprint {fp}" in r.stdout
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # never overwrites a key by accident
    assert again.returncode == 1 and "already exist: pass --force" in again.stderr
    assert tls.cert_file_fingerprint(str(out / "cert.pem")) == fp
    r = subprocess.run(
        [sys.executable, "-m", "hetero_ps.tools.tls", "fingerprint", str(out / "cert.pem")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == fp


# -- real processes -----------------------------------------------------------------------------------

JOB = ["--no-dashboard", "--global-batch-size", "32", "--max-steps", "4"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_trains_end_to_end_over_tls_and_plaintext_or_wrong_workers_are_told_why(tmp_path):
    out = tmp_path / "certs"
    r = subprocess.run(
        [sys.executable, "-m", "hetero_ps.tools.tls", "make-cert", "--out", str(out), "--host", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    fp = re.search(r"SHA-256 fingerprint: ([0-9a-f]{64})", r.stdout).group(1)
    # The master trains too (its own worker pins its certificate); rank 1 checks it against cert.pem,
    # rank 2 pins the fingerprint.
    with LocalCluster(tmp_path, [*JOB, "--world-size", "3", "--experiment", "tls"], tls=str(out)) as c:
        plain = c.add_worker(["--tls-ca", "", "--connect-timeout", "20"])  # no TLS at all
        wrong = c.add_worker(["--tls-fingerprint", "00" * 32, "--connect-timeout", "20"])
        assert plain.wait(timeout=120) == 1 and wrong.wait(timeout=120) == 1
        assert "tls_required" in c.output("worker0") and "--tls-fingerprint" in c.output("worker0")
        assert f"SHA-256 fingerprint {fp} does not match" in c.output("worker1")
        c.add_worker(["--rank", "1"])
        c.add_worker(["--rank", "2", "--tls-fingerprint", fp])
        assert c.wait(timeout=240) == 0, c.output("server")
        said = c.output("server")
        assert f"--tls-fingerprint {fp}" in said and "TLS on every connection" in said
        for name in ("worker2", "worker3", "server"):  # the master's own worker writes into its output
            assert "over TLSv1.3" in c.output(name), c.output(name)
        assert c.summary()["steps"] == 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tls_worker_is_told_a_plaintext_master_does_not_use_tls(tmp_path, certs):
    with LocalCluster(tmp_path, [*JOB, "--world-size", "2", "--no-local-worker", "--max-steps", "2"]) as c:
        w = c.add_worker(["--tls-fingerprint", certs["master"]["fp"], "--connect-timeout", "20"])
        wait_until(lambda: w.poll() is not None, timeout=120, what="the TLS worker to give up")
        assert w.returncode == 1
        assert "does not use TLS (it answered in plaintext)" in c.output("worker0"), c.output("worker0")
        wait_until(lambda: "the peer speaks TLS" in c.output("server"), timeout=30, what="the master's log line")
        c.add_worker(["--rank", "1"])
        assert c.wait(timeout=240) == 0, c.output("server")
