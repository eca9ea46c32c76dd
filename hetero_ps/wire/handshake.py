"""The authenticated hello: HELLO -> CHALLENGE -> AUTH -> WELCOME, both sides (docs/PROTOCOL.md, section 4).

::

    client                                   server
    HELLO{protocol, software, client_nonce, ...}  ->
                                             <-  CHALLENGE{server_nonce}
    AUTH{mac = HMAC(token, "hetero_ps/v1/client" | server_nonce | client_nonce)}  ->
                                             <-  WELCOME{server_mac = HMAC(token, "hetero_ps/v1/server"
                                                          | client_nonce | server_nonce), ...}
                                                 or ERROR{code, message} and close

Only the exchange lives here; the transport bounds it in time and runs the application's
``on_hello`` between AUTH and WELCOME.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from typing import Any, Protocol

from hetero_ps.errors import AuthenticationError, RemoteProtocolError
from hetero_ps.wire.messages import NONCE_BYTES, Auth, Challenge, Hello
from hetero_ps.wire.protocol import PROTOCOL_VERSION, Message, MsgType, raise_if_error


class Connection(Protocol):
    """What the handshake needs of a connection (``transport.Connection`` is one)."""

    peer: str

    async def send(self, msg_type: MsgType, header: dict[str, Any]) -> None: ...
    async def recv(self) -> Message: ...
    async def send_error(self, code: str, message: str) -> None: ...


__all__ = [
    "CLIENT_LABEL",
    "NONCE_BYTES",
    "SERVER_LABEL",
    "ServerSide",
    "client_handshake",
    "client_mac",
    "server_mac",
    "token_bytes",
]

log = logging.getLogger(__name__)

CLIENT_LABEL = b"hetero_ps/v1/client"
SERVER_LABEL = b"hetero_ps/v1/server"
SERVER_MAC_KEY = "server_mac"  # added to WELCOME by the transport, never seen by the application


def token_bytes(token: str | bytes) -> bytes:
    if isinstance(token, str):
        return token.encode("utf-8")
    if isinstance(token, (bytes, bytearray)):
        return bytes(token)
    raise TypeError(f"token must be a str or bytes, got {type(token).__name__}")


def client_mac(token: str | bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256(token, b"hetero_ps/v1/client" + server_nonce + client_nonce): the AUTH proof."""
    return hmac.new(token_bytes(token), CLIENT_LABEL + server_nonce + client_nonce, hashlib.sha256).digest()


def server_mac(token: str | bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256(token, b"hetero_ps/v1/server" + client_nonce + server_nonce): the WELCOME proof."""
    return hmac.new(token_bytes(token), SERVER_LABEL + client_nonce + server_nonce, hashlib.sha256).digest()


def _expect(msg: Message, mtype: MsgType, peer: str) -> Message:
    raise_if_error(msg)
    if msg.type != mtype:
        raise RemoteProtocolError(f"{peer} sent {msg.type.name} during the handshake where {mtype.name} was due")
    return msg


async def client_handshake(conn: Connection, token: str | bytes, caller: dict[str, Any]) -> dict[str, Any]:
    """Run the client side on a fresh connection; returns WELCOME's header without ``server_mac``.

    ``caller`` are the application's HELLO fields (``Hello.caller_fields()``); the transport's own
    (protocol, software, client_nonce) follow them.

    Raises ``RemoteError`` if the server refuses, ``AuthenticationError`` if it cannot prove it knows
    the token, ``RemoteProtocolError`` if it sends something malformed.
    """
    cn = os.urandom(NONCE_BYTES)
    await conn.send(MsgType.HELLO, {**caller, **Hello(client_nonce=cn).to_header()})
    sn = Challenge.from_header(_expect(await conn.recv(), MsgType.CHALLENGE, conn.peer).header).server_nonce
    await conn.send(MsgType.AUTH, Auth(client_mac(token, sn, cn)).to_header())
    header = dict(_expect(await conn.recv(), MsgType.WELCOME, conn.peer).header)
    proof = header.pop(SERVER_MAC_KEY, None)
    if not isinstance(proof, bytes) or not hmac.compare_digest(proof, server_mac(token, cn, sn)):
        raise AuthenticationError(
            f"the server at {conn.peer} accepted us but could not prove it knows the token: it is not "
            "the hetero_ps master you meant, or it was started with a different token"
        )
    return header


class ServerSide:
    """The server's half for one connection: ``await exchange()`` up to a verified AUTH, then
    ``welcome_header(fields)`` for the WELCOME that answers it."""

    def __init__(self, conn: Connection, token: bytes):
        self.conn = conn
        self.token = token
        self.hello_fields: dict[str, Any] = {}  # HELLO without client_nonce: what on_hello is given
        self._cn = b""
        self._sn = b""

    async def exchange(self) -> bool:
        """HELLO -> CHALLENGE -> AUTH. False if the peer was refused (it has been told why and closed)."""
        conn = self.conn
        first = await conn.recv()
        if first.type != MsgType.HELLO:
            await conn.send_error("protocol_error", f"expected HELLO, got {first.type.name}")
            return False
        h = first.header
        if h.get("protocol") != PROTOCOL_VERSION:  # before any other check: a newer peer's HELLO may differ
            await conn.send_error(
                "version_mismatch",
                f"the peer announces protocol version "
                f"{h.get('protocol')!r}, this server speaks version {PROTOCOL_VERSION}",
            )
            return False
        try:
            hello = Hello.from_header(h)
        except RemoteProtocolError as exc:
            await conn.send_error("protocol_error", str(exc))
            return False
        self._cn, self._sn = hello.client_nonce, os.urandom(NONCE_BYTES)
        await conn.send(MsgType.CHALLENGE, Challenge(self._sn).to_header())
        auth = await conn.recv()
        if auth.type != MsgType.AUTH:
            await conn.send_error("protocol_error", f"expected AUTH, got {auth.type.name}")
            return False
        mac = auth.header.get("mac")
        if not isinstance(mac, bytes) or not hmac.compare_digest(mac, client_mac(self.token, self._sn, self._cn)):
            log.warning("rejected %s (host %r): wrong token", conn.peer, h.get("host"))
            await conn.send_error(
                "auth_failed",
                "wrong token: the master rejected this node's HMAC proof; "
                "set HETERO_PS_TOKEN (or --token) to the master's token",
            )
            return False
        self.hello_fields = {k: v for k, v in h.items() if k != "client_nonce"}
        return True

    def welcome_header(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The WELCOME header: the application's fields plus the server's proof."""
        return {**fields, SERVER_MAC_KEY: server_mac(self.token, self._cn, self._sn)}
