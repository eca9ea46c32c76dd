"""Framed connections over non-blocking sockets, and the authenticated hello.

Why raw sockets and not asyncio streams or transports: DESIGN.md measured ``StreamReader.readexactly``
at 0.46 GB/s on loopback, and on the sending side Python 3.11's transports copy what the socket does
not take at once (``writelines`` even joins the buffers). Here a frame is received by
``loop.sock_recv_into`` straight into the buffers the ``FrameDecoder`` hands out (the payload into
the caller's preallocated buffer), and sent with ``sendmsg`` of the frame's buffers followed by
``loop.sock_sendall`` of whatever the kernel did not take: no copy of tensor data in user space, and
``send`` returns only when the kernel holds the last byte, which is the back-pressure (a slow reader
makes ``send`` wait, it never makes us buffer).

The handshake's exchange is in ``handshake.py``; here it is bounded in time and wired to the
application's ``on_hello``.

TLS (optional, ``tls.py``): right after connect/accept and before HELLO, a TLS handshake; from then
on every frame goes through the connection's ``TLSChannel`` (memory BIOs on the same raw socket), and
the token handshake runs inside it unchanged. Without TLS nothing of it is on the path.

Timeouts: ``recv(timeout=...)`` bounds the idle wait for a frame's first byte; once it has started,
the rest must arrive within ``Limits.frame_deadline(frame size)`` or the connection is closed (a
stalled or slow-loris peer). The handshake as a whole is bounded by ``Limits.handshake_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable

from hetero_ps.errors import (
    AuthenticationError,
    ChecksumError,
    ConfigError,
    ConnectionClosed,
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
    TransportTimeout,
    UnknownMessage,
    VersionMismatch,
)
from hetero_ps.wire.handshake import (
    NONCE_BYTES,
    ServerSide,
    client_handshake,
    client_mac,
    server_mac,
    token_bytes,
)
from hetero_ps.wire.messages import ControlWelcome, Error, Hello, Welcome
from hetero_ps.wire.protocol import (
    DEFAULT_LIMITS,
    MAGIC,
    Frame,
    FrameDecoder,
    Limits,
    Message,
    MsgType,
    PayloadAllocator,
    encode_frame,
    not_hetero_ps,
    raise_if_error,
)
from hetero_ps.wire.ratelimit import AddressRateLimiter
from hetero_ps.wire.tls import ClientTLS, NotTLS, TLSChannel, fingerprint, unverified_client_context

__all__ = [
    "NONCE_BYTES",
    "SOCKET_BUFFER_BYTES",
    "TLS_REQUIRED",
    "Connection",
    "Server",
    "client_mac",
    "configure_socket",
    "connect",
    "default_payload_checksum",
    "raise_if_error",
    "server_mac",
    "start_server",
]

log = logging.getLogger(__name__)


def _socket_buffer_bytes() -> int:
    """SO_SNDBUF/SO_RCVBUF asked for every connection (Linux doubles it): ``HETERO_PS_SOCKET_BUFFER``,
    default 1 MiB; 0 keeps the kernel's autotuning. bench_transport measured the choice (PROTOCOL.md)."""
    raw = os.environ.get("HETERO_PS_SOCKET_BUFFER", str(1 << 20))
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"HETERO_PS_SOCKET_BUFFER={raw!r}: expected a number of bytes (0 = kernel autotuning)")
    return n


SOCKET_BUFFER_BYTES = _socket_buffer_bytes()
PAYLOAD_CRC_ENV = "HETERO_PS_PAYLOAD_CRC"  # auto (default: on unless the peer is loopback) | on | off
_IOV_MAX = 1024  # buffers per sendmsg call (Linux's IOV_MAX)
_CLOSE_WAIT = 2.0  # s a close waits for in-flight socket calls to notice the shutdown
_ERROR_SEND_TIMEOUT = 2.0  # s we try to deliver an ERROR frame before closing anyway
_LINGER = 0.5  # s after an ERROR we read and discard, so the peer gets it before a reset
_REFUSED_LOG_EVERY = 10.0  # s between two "refusing connections from ADDR" lines for one address
_PROBE_TIMEOUT = 2.0  # s to learn a rejected certificate's fingerprint, for the error message

TLS_REQUIRED = (
    "this master requires TLS: start the worker (or control client) with --tls-fingerprint SHA256, the "
    "fingerprint the master printed at start, or with --tls-ca and the master's cert.pem"
)

_ERROR_CODES = (
    (LimitExceeded, "limit_exceeded"),
    (ChecksumError, "checksum_error"),
    (VersionMismatch, "version_mismatch"),
    (UnknownMessage, "unknown_message"),
    (RemoteProtocolError, "protocol_error"),
)


def configure_socket(sock: socket.socket, buffer_bytes: int | None = None) -> None:
    """Non-blocking, TCP_NODELAY (frames are whole messages), keepalive, and fixed socket buffers.

    Buffers must be set before ``connect``/``listen`` for the window scale to match them.
    """
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    n = SOCKET_BUFFER_BYTES if buffer_bytes is None else buffer_bytes
    if n > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, n)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, n)


def default_payload_checksum(sock: socket.socket) -> bool:
    """Whether frames sent on ``sock`` carry a payload CRC by default (``HETERO_PS_PAYLOAD_CRC``).

    ``auto``: yes, unless the peer is a loopback address. Between hosts the CRC catches what TCP's
    16-bit checksum lets through (NIC, offload and RAM faults on the way); on loopback the bytes
    never leave this host's memory, so it would cost time (measurable: the sender's CPU is the
    link there) and protect nothing. See docs/PROTOCOL.md, section 7.
    """
    mode = os.environ.get(PAYLOAD_CRC_ENV, "auto").strip().lower()
    if mode in ("on", "1", "true", "yes"):
        return True
    if mode in ("off", "0", "false", "no"):
        return False
    if mode != "auto":
        raise ConfigError(f"{PAYLOAD_CRC_ENV}={mode!r}: expected auto, on or off")
    try:
        ip = ipaddress.ip_address(sock.getpeername()[0])
    except (OSError, ValueError, IndexError, TypeError):
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_loopback


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _fmt_addr(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = f"[{addr[0]}]" if ":" in str(addr[0]) else str(addr[0])
        return f"{host}:{addr[1]}"
    return str(addr)


class Connection:
    """One framed, full-duplex connection. Create it with ``connect`` or get it from ``start_server``.

    One task may ``recv`` at a time; any number may ``send`` (a lock keeps frames whole). Extra
    attributes may be set on it by the application (the server stores its worker handle there).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str,
        limits: Limits = DEFAULT_LIMITS,
        authenticated: bool = False,
        payload_checksum: bool | None = None,
    ):
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self.peer = peer
        self.limits = limits
        # default for send(); a received frame's CRC is checked whenever the sender set its flag
        self.payload_checksum = default_payload_checksum(sock) if payload_checksum is None else payload_checksum
        self._dec = FrameDecoder(limits, authenticated=authenticated)
        self._tls: TLSChannel | None = None
        self._send_lock = asyncio.Lock()
        self._receiving = False
        self._closed = False
        self._fd_closed = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_received = 0

    def __repr__(self) -> str:
        return f"<Connection {self.peer}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def local_address(self) -> str:
        """This end's IP address: the interface that reaches the peer (a collective plane binds there)."""
        try:
            return str(self._sock.getsockname()[0])
        except OSError:
            return ""

    @property
    def authenticated(self) -> bool:
        return self._dec.authenticated

    @property
    def tls_version(self) -> str | None:
        """``TLSv1.3 TLS_AES_256_GCM_SHA384`` once TLS is on; None on a plaintext connection."""
        return self._tls.version if self._tls is not None else None

    def peer_certificate(self) -> bytes:
        """The DER certificate the peer presented in the TLS handshake."""
        if self._tls is None:
            raise LocalProtocolError(f"the connection to {self.peer} does not use TLS")
        return self._tls.peer_certificate()

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        """The TLS handshake, right after connect/accept and before the first frame; every frame
        after it is encrypted. The caller bounds it in time (the handshake timeout).

        Raises ``NotTLS`` when the peer's first bytes are not TLS (a plaintext hetero_ps peer sends
        ``HTPS``; the connection stays usable in plaintext to tell it so), ``ssl.SSLError`` when
        the handshake fails (``ssl.SSLCertVerificationError``: the server's certificate is not
        trusted), ``ConnectionClosed`` when the peer leaves.
        """
        if self._tls is not None or self.frames_sent or self.frames_received or self._dec.mid_frame:
            raise LocalProtocolError(f"TLS starts before the first frame on the connection to {self.peer}")
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        chan = TLSChannel(self._sock, context, server_side=server_side, server_hostname=server_hostname, peer=self.peer)
        self._io_enter()
        try:
            await chan.handshake()
        except (NotTLS, ssl.SSLError):
            raise
        except OSError as exc:
            self._abort()
            raise ConnectionClosed(f"connection to {self.peer} broke during the TLS handshake: {exc}") from None
        finally:
            self._io_exit()
        self._tls = chan

    def mark_authenticated(self) -> None:
        """The handshake succeeded: from now on the full (authenticated) limits apply."""
        self._dec.authenticated = True

    def set_payload_allocator(self, fn: PayloadAllocator | None) -> None:
        """Where payloads land: ``fn(msg_type, header, nbytes) -> writable memoryview | None``.

        Called for a frame only after the previous message was returned by ``recv``, so one buffer
        may be reused for every frame if the handler is done with a message before the next ``recv``.
        """
        self._dec.set_payload_allocator(fn)

    # -- sending -------------------------------------------------------------------------------
    async def send(
        self,
        msg_type: int,
        header: dict,
        segments: Iterable = (),
        *,
        payload_checksum: bool | None = None,
        timeout: float | None = None,
    ) -> None:
        """Encode and send one frame; returns when the kernel holds all of it (see ``send_frame``).

        ``payload_checksum`` None uses the connection's ``payload_checksum`` attribute.
        """
        crc = self.payload_checksum if payload_checksum is None else payload_checksum
        frame = encode_frame(msg_type, header, segments, payload_checksum=crc, limits=self.limits)
        await self.send_frame(frame, timeout=timeout)

    async def send_frame(self, frame: Frame, *, timeout: float | None = None) -> None:
        """Write an encoded frame (the same Frame may go to many connections).

        Waits while the peer is not reading (back-pressure); ``timeout`` covers waiting for other
        senders too. A send that times out or is cancelled part-way closes the connection, since
        the peer would otherwise see half a frame.
        """
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        writing = False
        try:
            async with asyncio.timeout(timeout) as cm:  # covers waiting for the lock too
                async with self._send_lock:
                    if self._closed:
                        raise ConnectionClosed(f"connection to {self.peer} is closed")
                    writing = True
                    self._io_enter()
                    try:
                        await self._write(frame.buffers)
                    finally:
                        self._io_exit()
                    writing = False
        except TimeoutError:
            if not cm.expired():  # ETIMEDOUT from the socket itself
                self._abort()
                raise ConnectionClosed(f"connection to {self.peer} timed out while sending") from None
            if writing:
                self._abort()
            raise TransportTimeout(
                f"sending {frame.type.name} ({frame.nbytes} bytes) to {self.peer} took longer "
                f"than {timeout} s" + ("; the connection is closed" if writing else "")
            ) from None
        except asyncio.CancelledError:
            if writing:  # half a frame may be out: the stream is unusable
                self._abort()
            raise
        except OSError as exc:
            self._abort()
            raise ConnectionClosed(f"connection to {self.peer} broke while sending {frame.type.name}: {exc}") from None
        self.bytes_sent += frame.nbytes
        self.frames_sent += 1

    async def _write(self, buffers: tuple) -> None:
        # One sendmsg (scatter) takes a small frame whole, or the head of a big one; what the
        # kernel does not take goes through sock_sendall, which waits for room without copying.
        views = [b if isinstance(b, memoryview) else memoryview(b) for b in buffers]
        if self._tls is not None:  # encrypted in bounded chunks instead (a copy TLS cannot avoid)
            await self._tls.write(views)
            return
        i = 0
        while i < len(views):
            batch = views[i : i + _IOV_MAX]
            try:
                n = self._sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                n = 0
            for v in batch:
                if n >= v.nbytes:
                    n -= v.nbytes
                    i += 1
                    continue
                await self._loop.sock_sendall(self._sock, v[n:])
                i += 1
                break

    async def send_error(self, code: str, message: str) -> None:
        """Send ERROR{code, message} (best effort, bounded in time) and close the connection."""
        if not self._closed:
            try:
                await self.send(MsgType.ERROR, Error(str(code), str(message)).to_header(), timeout=_ERROR_SEND_TIMEOUT)
                await self._linger()
            except (TransportError, ProtocolError) as exc:
                log.debug("could not deliver ERROR %s to %s: %s", code, self.peer, exc)
        await self.close()

    async def _linger(self) -> None:
        """Half-close and discard what the peer still sends, so that it reads our ERROR before a reset."""
        if self._receiving or self._closed:
            return
        self._close_notify()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        scratch = bytearray(64 << 10)
        self._io_enter()
        try:
            async with asyncio.timeout(_LINGER):
                for _ in range(16):
                    if not await self._loop.sock_recv_into(self._sock, scratch):
                        break
        except (TimeoutError, OSError):
            pass
        finally:
            self._io_exit()

    # -- receiving -----------------------------------------------------------------------------
    async def recv(self, *, timeout: float | None = None) -> Message:
        """Read exactly one frame. ``timeout`` is the idle wait for its first byte (None: forever).

        An ERROR frame is returned like any other (``raise_if_error`` turns it into ``RemoteError``).
        If the peer sends something invalid, it is told why in an ERROR frame, the connection is
        closed and the ``RemoteProtocolError`` is raised. An idle timeout leaves the connection
        usable; a frame that stalls past its deadline closes it.
        """
        if self._receiving:
            raise LocalProtocolError(f"recv() is already waiting on the connection to {self.peer} in another task")
        self._receiving = True
        try:
            msg = await self._recv(timeout)
        except RemoteProtocolError as exc:
            self._receiving = False
            code = next(c for cls, c in _ERROR_CODES if isinstance(exc, cls))
            log.warning("closing connection to %s: %s", self.peer, exc)
            await self.send_error(code, str(exc))
            raise
        finally:
            self._receiving = False
        self.frames_received += 1
        return msg

    async def _recv(self, timeout: float | None) -> Message:
        dec = self._dec
        msg = dec.next_message()
        if msg is not None:
            return msg
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        if not dec.mid_frame:
            try:
                async with asyncio.timeout(timeout) as cm:
                    await self._read_some()
            except TimeoutError:
                if cm.expired():
                    raise TransportTimeout(f"no message from {self.peer} within {timeout} s") from None
                raise
            msg = dec.next_message()
            if msg is not None:
                return msg
        start = self._loop.time()
        sized = False
        try:
            async with asyncio.timeout(self.limits.frame_timeout) as cm:
                while True:
                    if not sized and dec.frame_nbytes is not None:
                        cm.reschedule(start + self.limits.frame_deadline(dec.frame_nbytes))
                        sized = True
                    await self._read_some()
                    msg = dec.next_message()
                    if msg is not None:
                        return msg
        except TimeoutError:
            if not cm.expired():
                raise
            self._abort()
            raise TransportTimeout(
                f"{self.peer} sent only part of a frame in {self._loop.time() - start:.1f} s "
                f"(frame_timeout {self.limits.frame_timeout} s); the connection is closed"
            ) from None

    async def _read_some(self) -> None:
        view = self._dec.get_buffer()
        self._io_enter()
        try:
            if self._tls is None:
                n = await self._loop.sock_recv_into(self._sock, view)
            else:
                n = await self._tls.recv_into(view)
        except OSError as exc:  # ssl.SSLError too: a record that fails its authentication tag
            self._abort()
            raise ConnectionClosed(f"connection to {self.peer} broke: {exc}") from None
        finally:
            self._io_exit()
            del view
        if n == 0:
            was_closed = self._closed
            self._abort()
            if was_closed:
                raise ConnectionClosed(f"connection to {self.peer} was closed")
            where = " in the middle of a frame" if self._dec.mid_frame else ""
            raise ConnectionClosed(f"{self.peer} closed the connection{where}")
        self.bytes_received += n
        self._dec.buffer_updated(n)

    # -- closing -------------------------------------------------------------------------------
    def _io_enter(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _io_exit(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
            if self._closed:
                self._close_fd()

    def _close_notify(self) -> None:
        """TLS: tell the peer we are done (best effort), unless a frame is half sent."""
        if self._tls is not None and not self._closed and not self._send_lock.locked():
            self._tls.close_notify()

    def _close_fd(self) -> None:
        if not self._fd_closed:
            self._fd_closed = True
            self._sock.close()

    def _abort(self) -> None:
        """Close now, without waiting. Socket calls in flight wake up (shutdown) and fail; the file
        descriptor is closed when the last of them has left the event loop's selector."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._inflight == 0:
            self._close_fd()

    async def close(self) -> None:
        """Close the connection; other tasks waiting in ``recv``/``send`` get ``ConnectionClosed``."""
        self._close_notify()
        self._abort()
        if self._fd_closed:
            return
        try:
            async with asyncio.timeout(_CLOSE_WAIT):
                await self._idle.wait()
        except TimeoutError:
            # a socket call did not notice the shutdown: unregister it ourselves
            fd = self._sock.fileno()
            if fd >= 0:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
        self._close_fd()


# -- client ----------------------------------------------------------------------------------------


async def _open_socket(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionClosed(f"cannot resolve {host!r}: {exc}") from None
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            configure_socket(sock)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise ConnectionClosed(f"cannot connect to {host}:{port}: {last}")


async def connect(
    host: str,
    port: int,
    *,
    token: str | bytes,
    hello: Hello | dict,
    limits: Limits = DEFAULT_LIMITS,
    timeout: float = 10.0,
    tls: ClientTLS | None = None,
) -> tuple[Connection, Message]:
    """Connect, authenticate both ways and return ``(connection, WELCOME message)``.

    ``hello`` adds the caller's fields to HELLO: a ``messages.Hello`` (its ``caller_fields()``), or a
    dict of them (rank, host, profile...; keys it does not declare travel too). ``tls`` (``tls.client_tls``)
    runs a TLS handshake first, checking the server's certificate. Raises ``RemoteError`` if
    the server refuses (``code`` ``auth_failed`` for a wrong token, ``version_mismatch``, ``tls_required``,
    or what its ``on_hello`` raised), ``AuthenticationError`` if the server cannot prove it knows the token
    or its certificate does not match, ``ConfigError`` if it does not speak TLS while we do,
    ``TransportTimeout`` after ``timeout`` seconds, ``ConnectionClosed`` if it cannot connect.
    """
    caller = hello.caller_fields() if isinstance(hello, Hello) else dict(hello)
    reserved = {"protocol", "software", "client_nonce"} & set(caller)
    if reserved:
        raise LocalProtocolError(f"HELLO fields {sorted(reserved)} are set by the transport")
    conn: Connection | None = None
    ok = False
    try:
        async with asyncio.timeout(timeout) as cm:
            sock = await _open_socket(host, port)
            conn = Connection(sock, peer=f"{host}:{port}", limits=limits, authenticated=False)
            if tls is not None:
                await _client_tls(conn, tls, host, port)
            welcome = await client_handshake(conn, token, caller)
            conn.mark_authenticated()
            ok = True
            return conn, Message(MsgType.WELCOME, welcome)
    except TimeoutError:
        if not cm.expired():
            raise
        raise TransportTimeout(
            f"no complete handshake with {host}:{port} within {timeout} s (is it a hetero_ps master, and reachable?)"
        ) from None
    finally:
        if conn is not None and not ok:
            await conn.close()


async def _client_tls(conn: Connection, tls: ClientTLS, host: str, port: int) -> None:
    """The client's TLS handshake, its certificate check, and what to say when they fail."""
    try:
        await conn.start_tls(tls.context, server_side=False, server_hostname=host or None)
    except NotTLS as exc:
        if exc.first[: len(MAGIC)] == MAGIC[: len(exc.first)]:  # a hetero_ps frame: the master has no TLS
            raise ConfigError(
                f"the master at {host}:{port} does not use TLS (it answered in plaintext): start it with "
                "--tls-cert and --tls-key, or drop this node's --tls-ca / --tls-fingerprint"
            ) from None
        raise not_hetero_ps(exc.first) from None
    except ssl.SSLCertVerificationError as exc:
        raise tls.verification_failed(exc, host, port, await _probe_fingerprint(host, port)) from None
    except ssl.SSLError as exc:
        conn._abort()
        raise ConnectionClosed(f"TLS handshake with {host}:{port} failed: {exc.reason or exc}") from None
    tls.check_pin(conn.peer_certificate(), f"{host}:{port}")


async def _probe_fingerprint(host: str, port: int) -> str | None:
    """The fingerprint of the certificate a server presents, unverified: for an error message only."""
    sock = None
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            sock = await _open_socket(host, port)
            chan = TLSChannel(sock, unverified_client_context(), server_side=False, peer=f"{host}:{port}")
            await chan.handshake()
            return fingerprint(chan.peer_certificate())
    except (TimeoutError, OSError, TransportError, AuthenticationError):
        return None
    finally:
        if sock is not None:
            sock.close()


# -- server ----------------------------------------------------------------------------------------

OnHello = Callable[[Connection, dict], Awaitable["dict | Welcome | ControlWelcome"]]
OnConnection = Callable[[Connection], Awaitable[None]]


class Server:
    """A listening socket; every authenticated connection runs ``on_connection`` in its own task."""

    def __init__(
        self,
        lsock: socket.socket,
        *,
        token: str | bytes,
        on_hello: OnHello,
        on_connection: OnConnection,
        limits: Limits,
        tls: ssl.SSLContext | None = None,
    ):
        self._lsock = lsock
        self._token = token_bytes(token)
        self.tls = tls
        self._on_hello = on_hello
        self._on_connection = on_connection
        self.limits = limits
        self._loop = asyncio.get_running_loop()
        self._conns: set[Connection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._in_handshake: collections.Counter[str] = collections.Counter()  # peer address -> count
        self._rate = (
            AddressRateLimiter(limits.connect_rate_per_address, limits.connect_burst_per_address)
            if limits.connect_rate_per_address
            else None
        )
        self._refused_logged: dict[str, float] = {}  # address -> when we last said so (pruned: bounded)
        self.address = lsock.getsockname()[:2]
        self._accept_task = self._loop.create_task(self._accept_loop(), name=f"hetero_ps accept {self.address}")

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def connections(self) -> frozenset:
        """Live connections (authenticated or still in their handshake)."""
        return frozenset(self._conns)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening, close every live connection and wait for their tasks (bounded)."""
        if self._closing:
            return
        self._closing = True
        self._accept_task.cancel()
        try:
            await self._accept_task
        except asyncio.CancelledError:
            pass
        self._lsock.close()
        for conn in list(self._conns):
            conn._abort()
        tasks = list(self._tasks)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=_CLOSE_WAIT)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_CLOSE_WAIT)
        for conn in list(self._conns):
            await conn.close()

    async def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = await self._loop.sock_accept(self._lsock)
            except OSError as exc:
                if self._closing:
                    return
                # e.g. EMFILE: give the handlers a moment to release descriptors, then keep serving
                log.warning("accept() on %s failed: %s", _fmt_addr(self.address), exc)
                await asyncio.sleep(0.1)
                continue
            host = str(addr[0])
            if not self._may_start_handshake(host):
                sock.close()
                continue
            try:
                configure_socket(sock, 0)  # buffers are inherited from the listening socket
            except OSError:
                sock.close()
                continue
            conn = Connection(sock, peer=_fmt_addr(addr), limits=self.limits, authenticated=False)
            self._conns.add(conn)
            self._in_handshake[host] += 1
            task = self._loop.create_task(self._serve(conn, host), name=f"hetero_ps connection {conn.peer}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _may_start_handshake(self, host: str) -> bool:
        """Whether another unauthenticated connection may start (a flood of them is cut off at once)."""
        lim = self.limits
        total, mine = sum(self._in_handshake.values()), self._in_handshake[host]
        if total >= lim.max_handshakes or mine >= lim.max_handshakes_per_address:
            self._say_refused(
                host,
                f"{mine} handshakes in flight from it, {total} in all "
                f"(limits {lim.max_handshakes_per_address} and {lim.max_handshakes})",
            )
            return False
        # Checked last, so that a connection refused above takes no token: a client that retries
        # with backoff always finds the bucket refilled in the end.
        rate = self._rate if lim.rate_limit_loopback or not _is_loopback(host) else None
        if rate is not None and not rate.allow(host):
            self._say_refused(
                host,
                f"more than {lim.connect_burst_per_address} new connections at once, then "
                f"{lim.connect_rate_per_address:g} a second, from it (Limits.connect_*_per_address)",
            )
            return False
        return True

    def _say_refused(self, host: str, why: str) -> None:
        now = time.monotonic()
        if now - self._refused_logged.get(host, -_REFUSED_LOG_EVERY) < _REFUSED_LOG_EVERY:
            return  # said so already: never flood the log
        if len(self._refused_logged) >= 1024:  # a flood from many addresses: keep only the recent ones
            self._refused_logged = {h: t for h, t in self._refused_logged.items() if now - t < _REFUSED_LOG_EVERY}
        self._refused_logged[host] = now
        log.warning("refusing connections from %s: %s", host, why)

    async def _serve(self, conn: Connection, host: str) -> None:
        try:
            try:
                admitted = await self._handshake(conn)
            finally:
                self._in_handshake[host] -= 1
                if not self._in_handshake[host]:
                    del self._in_handshake[host]
            if admitted:
                await self._on_connection(conn)
        except RemoteError as exc:
            log.warning("refusing %s: %s", conn.peer, exc)
            await conn.send_error(exc.code, exc.message)
        except (TransportError, ProtocolError) as exc:
            log.info("connection %s ended: %s: %s", conn.peer, type(exc).__name__, exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("the handler for %s failed; closing that connection only", conn.peer)
            await conn.send_error("internal_error", "the server failed while serving this connection; see its log")
        finally:
            self._conns.discard(conn)
            await conn.close()

    async def _handshake(self, conn: Connection) -> bool:
        """[TLS ->] HELLO -> CHALLENGE -> AUTH -> on_hello -> WELCOME. False if the peer was refused."""
        lim = self.limits
        try:
            async with asyncio.timeout(lim.handshake_timeout):
                if self.tls is not None and not await self._start_tls(conn):
                    return False
                side = ServerSide(conn, self._token)
                if not await side.exchange():
                    return False
        except TimeoutError:
            log.warning("no complete handshake from %s within %s s; closing", conn.peer, lim.handshake_timeout)
            if self.tls is None or conn.tls_version is not None:  # else it could not read our ERROR
                await conn.send_error("handshake_timeout", f"no complete handshake within {lim.handshake_timeout} s")
            return False
        conn.mark_authenticated()
        welcome = await self._on_hello(conn, side.hello_fields)
        welcome = {} if welcome is None else welcome
        if isinstance(welcome, (Welcome, ControlWelcome)):
            welcome = welcome.to_header()
        if not isinstance(welcome, dict) or "server_mac" in welcome:
            raise LocalProtocolError("on_hello must return a dict without the key 'server_mac'")
        try:
            await conn.send(MsgType.WELCOME, side.welcome_header(welcome), timeout=lim.handshake_timeout)
        except TransportError as exc:
            # on_hello has admitted the peer: on_connection still runs, finds the connection closed
            # and does its clean-up
            log.info("could not send WELCOME to %s: %s", conn.peer, exc)
            conn._abort()
        return True

    async def _start_tls(self, conn: Connection) -> bool:
        """The TLS handshake; False if the peer was refused (told why if it can read it) and closed."""
        assert self.tls is not None
        try:
            await conn.start_tls(self.tls, server_side=True)
        except NotTLS as exc:
            if exc.first[: len(MAGIC)] == MAGIC[: len(exc.first)]:  # a plaintext hetero_ps peer: say why, in plaintext
                log.warning("refusing %s: it does not use TLS, which this master requires", conn.peer)
                await conn.send_error("tls_required", TLS_REQUIRED)
            else:
                log.info("closing %s: %s", conn.peer, exc)
            return False
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            hint = ""
            if "ALERT" in reason.upper():  # the peer rejected us: most likely our certificate
                hint = " (the peer refused this master's certificate: check its --tls-ca or --tls-fingerprint)"
            log.warning("TLS handshake with %s failed: %s%s", conn.peer, reason, hint)
            return False
        log.debug("TLS with %s: %s", conn.peer, conn.tls_version)
        return True


async def start_server(
    host: str,
    port: int,
    *,
    token: str | bytes,
    on_hello: OnHello,
    on_connection: OnConnection,
    limits: Limits = DEFAULT_LIMITS,
    backlog: int = 128,
    tls: ssl.SSLContext | None = None,
) -> Server:
    """Listen on ``host:port`` (port 0 picks a free one: see ``Server.port``).

    For each client: the handshake (bounded by ``limits.handshake_timeout``), then
    ``await on_hello(conn, hello_fields)`` returns the WELCOME fields: a dict, a ``messages.Welcome``
    or a ``messages.ControlWelcome``. ``hello_fields`` is HELLO without its nonce (``Hello.from_fields``
    reads it). Raise ``RemoteError`` to refuse with an ERROR frame. The client reads WELCOME before
    authenticating it, so it must fit in ``limits.max_unauth_header_bytes``. Then ``on_connection(conn)``
    runs in that connection's task.
    Once ``on_hello`` has returned, ``on_connection`` always runs, even if the WELCOME could not be
    delivered (it then finds the connection closed), so clean-up in it is reliable. An exception in
    it is logged and closes that connection only.

    ``tls`` (``tls.server_context``) makes every connection start
    with a TLS handshake, within the handshake timeout; a plaintext hetero_ps client is answered with
    a plaintext ``tls_required`` ERROR.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    lsock = socket.socket(family, type_, proto)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        configure_socket(lsock)
        lsock.bind(addr)
        lsock.listen(backlog)
    except OSError as exc:
        lsock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {host or '*'}:{port}: {exc.strerror} "
            "(is another master running there? pick another --port)",
        ) from None
    return Server(lsock, token=token, on_hello=on_hello, on_connection=on_connection, limits=limits, tls=tls)
