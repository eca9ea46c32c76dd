"""A master reachable from the network is never open by default: it makes a token if it has none.

Bound to anything but loopback without ``--token``/``HETERO_PS_TOKEN``, the master generates a
random token (as Jupyter does), prints the exact worker command carrying it, and writes it to the
experiment's folder as ``token`` (mode 0600, readable by its owner only). ``--insecure-no-token``
is the explicit way to let anyone who reaches the port join.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket

TOKEN_FILE = "token"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def needs_generated_token(token: str, host: str, insecure: bool) -> bool:
    return not token and not insecure and not is_loopback(host)


def generate() -> str:
    return secrets.token_hex(16)


def write_token_file(folder: str, token: str) -> str:
    """``folder/token`` with the token, created readable by its owner only."""
    path = os.path.join(folder, TOKEN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def read_token_file(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, TOKEN_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def worker_command(host: str, port: int, token: str, tls_fingerprint: str = "") -> str:
    """The line a worker machine runs to join (the address is this machine's name when bound to all)."""
    addr = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    tls = f" --tls-fingerprint {tls_fingerprint}" if tls_fingerprint else ""
    return f"HETERO_PS_TOKEN={token} python -m hetero_ps.worker --master-addr {addr} --master-port {port}{tls} --rank N"
