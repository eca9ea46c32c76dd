"""TLS for the hetero_ps wire: contexts, certificate fingerprints, and TLS over a raw non-blocking socket.

Who proves what: the master proves it is the master with its certificate (a worker verifies it
against ``--tls-ca`` or pins its SHA-256 fingerprint with ``--tls-fingerprint``); workers still
prove they belong to the job with the token's HMAC handshake, which runs inside TLS unchanged.

Why memory BIOs: the transport reads with ``loop.sock_recv_into`` and writes with ``sendmsg`` /
``loop.sock_sendall`` on the raw socket (zero copy, see transport.py), and asyncio refuses those for
an ``SSLSocket``. So, as asyncio's own sslproto does, OpenSSL works on two ``ssl.MemoryBIO``s:
ciphertext read from the socket goes into one and plaintext comes out of the SSL object straight
into the frame decoder's buffer; plaintext to send goes into the SSL object in bounded chunks and
the records it makes are sent from the other. The plaintext path does not change.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from hetero_ps.errors import AuthenticationError, ConfigError, ConnectionClosed

__all__ = [
    "ClientTLS",
    "NotTLS",
    "TLSChannel",
    "cert_file_fingerprint",
    "client_tls",
    "fingerprint",
    "server_context",
    "unverified_client_context",
]

MAKE_CERT = "python -m hetero_ps.tools.tls make-cert"
WRITE_CHUNK = 256 << 10  # plaintext encrypted per step: what waits in the outgoing BIO stays this small
RECV_CHUNK = 256 << 10  # ciphertext read from the socket per call
_COALESCE = 16 << 10  # buffers smaller than one TLS record are joined into one record, not one each
_TLS_HANDSHAKE, _TLS_ALERT = 0x16, 0x15  # the first byte of what a TLS peer sends
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s+.+?\s+-----END CERTIFICATE-----", re.S)


# -- fingerprints -------------------------------------------------------------------------------------


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate: 64 lowercase hex digits, as ``--tls-fingerprint`` takes it."""
    return hashlib.sha256(der).hexdigest()


def _pem_certificate(path: str, flag: str) -> bytes:
    """The first certificate of a PEM file, as DER."""
    data = _read(path, flag, "certificate")
    m = _PEM_CERT.search(data)
    if m is None:
        raise ConfigError(f"{flag} {path} holds no PEM certificate (BEGIN CERTIFICATE); make one with {MAKE_CERT}")
    try:
        return ssl.PEM_cert_to_DER_cert(m.group(0).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{flag} {path}: its PEM certificate is damaged; make a new one with {MAKE_CERT}") from None


def cert_file_fingerprint(path: str, flag: str = "--tls-cert") -> str:
    """The SHA-256 fingerprint of the (first) certificate in a PEM file."""
    return fingerprint(_pem_certificate(path, flag))


def parse_fingerprint(text: str) -> bytes:
    """``--tls-fingerprint``: 64 hex digits, with colons or not (``openssl x509 -fingerprint`` prints AB:CD:...)."""
    digits = re.sub(r"^sha256( fingerprint)?[=:]", "", text.strip().lower()).replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise ConfigError(
            f"--tls-fingerprint expects the 64 hex digits of a SHA-256 fingerprint (the master prints it), got {text!r}"
        )
    return bytes.fromhex(digits)


def _read(path: str, flag: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS {what} {flag} {path}: {exc.strerror or exc}") from None


# -- contexts -----------------------------------------------------------------------------------------


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # OpenSSL prefers 1.3 when both sides have it
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2: forward secrecy and AEAD only


def _encrypted_key() -> str:
    # OpenSSL would otherwise ask for a passphrase on the terminal: a master must never hang there
    raise ConfigError(
        "--tls-key is encrypted with a passphrase, which a master cannot type; "
        f"give it an unencrypted key readable by its user only (mode 0600), as {MAKE_CERT} writes"
    )


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The master's context from ``--tls-cert`` and ``--tls-key``; ``ConfigError`` says what is wrong."""
    if not cert:
        raise ConfigError(f"--tls-key needs --tls-cert, the certificate that goes with it (make a pair: {MAKE_CERT})")
    if not key:
        raise ConfigError(f"--tls-cert needs --tls-key, the private key that goes with it (make a pair: {MAKE_CERT})")
    _pem_certificate(cert, "--tls-cert")
    _read(key, "--tls-key", "key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    try:
        ctx.load_cert_chain(cert, key, password=_encrypted_key)
    except ssl.SSLError as exc:
        why = (
            "the key does not belong to the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else f"it holds no usable private key ({exc.reason or exc})"
        )
        raise ConfigError(
            f"cannot use --tls-key {key} with --tls-cert {cert}: {why}; make a pair with {MAKE_CERT}"
        ) from None
    return ctx


@dataclass(frozen=True)
class ClientTLS:
    """How a worker or control client checks the master: against a CA file, or by a pinned fingerprint."""

    context: ssl.SSLContext
    pin: bytes = b""  # SHA-256 of the master's DER certificate; empty: the context verifies against ca_file
    ca_file: str = ""

    def check_pin(self, der: bytes, peer: str) -> None:
        """After the handshake: the pinned fingerprint, if one was given, must be the certificate's."""
        if self.pin and not hmac.compare_digest(hashlib.sha256(der).digest(), self.pin):
            raise AuthenticationError(
                f"the master at {peer} presented a certificate whose SHA-256 fingerprint {fingerprint(der)} does "
                f"not match --tls-fingerprint {self.pin.hex()}: it is not the master you meant, or its certificate "
                "was remade; compare with the fingerprint the master printed at start"
            )

    def verification_failed(
        self, exc: ssl.SSLCertVerificationError, host: str, port: int, seen: str | None
    ) -> AuthenticationError:
        """The error for a certificate the CA file does not vouch for, naming the fingerprint seen if known."""
        cert = f"a certificate (SHA-256 fingerprint {seen})" if seen else "a certificate"
        why = exc.verify_message or exc.reason or str(exc)
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return AuthenticationError(
                f"the master at {host}:{port} presented {cert} that does not match the address {host} ({why}): "
                f"remake it with `{MAKE_CERT} --host {host}`, connect by a name it lists, or pin it with "
                "--tls-fingerprint instead of --tls-ca"
            )
        return AuthenticationError(
            f"the master at {host}:{port} presented {cert} that does not match --tls-ca {self.ca_file} ({why}): "
            "give the worker the master's own cert.pem (or the CA that signed it) as --tls-ca, or pin the "
            "fingerprint the master printed with --tls-fingerprint"
        )


def client_tls(ca: str = "", fingerprint: str = "") -> ClientTLS | None:
    """The client side from ``--tls-ca`` / ``--tls-fingerprint`` (None: plaintext)."""
    if ca and fingerprint:
        raise ConfigError("give --tls-ca or --tls-fingerprint, not both (the fingerprint alone pins the certificate)")
    if not ca and not fingerprint:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    if fingerprint:
        pin = parse_fingerprint(fingerprint)
        # The handshake still proves the master holds the certificate's key; the pin checks which certificate.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ClientTLS(ctx, pin=pin)
    _pem_certificate(ca, "--tls-ca")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-ca {ca} holds no usable certificate ({exc.reason or exc})") from None
    return ClientTLS(ctx, ca_file=ca)


def unverified_client_context() -> ssl.SSLContext:
    """Only to learn which certificate a server presents, for an error message; never to talk."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- TLS over a raw socket ----------------------------------------------------------------------------


class NotTLS(ConnectionClosed):
    """The peer's first bytes are not TLS (``first``: what it sent, e.g. a plaintext ``HTPS`` frame)."""

    def __init__(self, peer: str, first: bytes):
        super().__init__(f"{peer} does not speak TLS: it sent {first!r}")
        self.first = first


class TLSChannel:
    """One TLS session on a non-blocking socket, driven through memory BIOs.

    ``write`` is called by one sender at a time (the connection's send lock); ``recv_into`` by one
    receiver. They may run concurrently: OpenSSL is only ever called between awaits, and every write
    to the socket takes ``_wlock`` and sends what the outgoing BIO holds, in order.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        peer: str = "",
    ):
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._raw = bytearray(RECV_CHUNK)
        self._wlock = asyncio.Lock()
        self._eof = False
        self.peer = peer

    @property
    def version(self) -> str:
        """``TLSv1.3`` and the cipher, for logs."""
        cipher = self._obj.cipher()
        return f"{self._obj.version()} {cipher[0]}" if cipher else str(self._obj.version())

    def peer_certificate(self) -> bytes:
        """The DER certificate the peer presented (verified or not, depending on the context)."""
        der = self._obj.getpeercert(binary_form=True)
        if not der:
            raise AuthenticationError(f"{self.peer} presented no certificate")
        return der

    async def handshake(self) -> None:
        """Raises ``NotTLS`` if the peer's first bytes are no TLS record, ``ssl.SSLError`` if the
        handshake fails (after sending our alert), ``ConnectionClosed`` if the peer leaves."""
        first = True
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                try:  # our alert tells the peer why (an unknown CA, a bad certificate)
                    await self._flush()
                except OSError:
                    pass
                raise
            await self._flush()
            n = await self._recv_raw()
            if n == 0:
                raise ConnectionClosed(f"{self.peer} closed the connection during the TLS handshake")
            if first and self._raw[0] not in (_TLS_HANDSHAKE, _TLS_ALERT):
                raise NotTLS(self.peer, bytes(self._raw[: min(n, 16)]))
            first = False
        await self._flush()  # our last flight (a server's session tickets)

    # -- sending ----------------------------------------------------------------------------------
    async def write(self, views: Iterable[memoryview]) -> None:
        """Encrypt and send byte views; returns when the kernel holds the last record."""
        small = bytearray()
        for v in views:
            if v.nbytes < _COALESCE:
                small += v
                continue
            if small:
                self._obj.write(small)
                small.clear()
            for i in range(0, v.nbytes, WRITE_CHUNK):
                self._obj.write(v[i : i + WRITE_CHUNK])
                await self._flush()
        if small:
            self._obj.write(small)
        await self._flush()

    async def _flush(self) -> None:
        async with self._wlock:  # read the BIO under the lock, or two flushes could reorder records
            data = self._out.read()
            if data:
                await self._loop.sock_sendall(self._sock, data)

    def close_notify(self) -> None:
        """Say goodbye (a close_notify alert) without waiting; the caller makes sure no frame is half sent."""
        if self._wlock.locked():
            return
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass  # it would wait for the peer's close_notify: we do not
        data = self._out.read()
        if data:
            try:
                self._sock.send(data)
            except OSError:
                pass

    # -- receiving --------------------------------------------------------------------------------
    async def recv_into(self, view: memoryview) -> int:
        """Decrypt into ``view`` what has arrived, waiting on the socket only when nothing has; 0 at the end."""
        while True:
            n = self._read_plain(view)
            if self._out.pending and not self._wlock.locked():
                await self._flush()  # a post-handshake reply OpenSSL made while reading (rare: key updates)
            if n or self._eof:
                return n
            if not await self._recv_raw():
                return 0

    def _read_plain(self, view: memoryview) -> int:
        got, size = 0, view.nbytes
        try:
            while got < size:
                k = cast(int, self._obj.read(size - got, view[got:]))  # with a buffer: a count
                if k == 0:  # the peer's close_notify
                    self._eof = True
                    break
                got += k
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True
        return got

    async def _recv_raw(self) -> int:
        n = await self._loop.sock_recv_into(self._sock, self._raw)
        if n:
            self._in.write(memoryview(self._raw)[:n])
        return n
