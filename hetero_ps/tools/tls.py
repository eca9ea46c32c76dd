"""``python -m hetero_ps.tools.tls``: a self-signed certificate for the master, and fingerprints.

    python -m hetero_ps.tools.tls make-cert --out certs [--host master.lan --host 192.168.1.10]
    python -m hetero_ps.tools.tls fingerprint certs/cert.pem

``make-cert`` writes ``cert.pem`` and ``key.pem`` (the key readable by you only) and prints the
certificate's SHA-256 fingerprint and the exact master and worker flags. The certificate names this
machine (its host name, its addresses, localhost) unless ``--host`` says which names and addresses
workers will use; ``--tls-ca cert.pem`` checks them, ``--tls-fingerprint`` does not need them.

Python's ``ssl`` cannot make a key or a certificate, and X.509 is not something to write by hand, so
this uses the ``cryptography`` package (an ECDSA P-256 key, as fast as any in a TLS handshake).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import socket
import sys

from hetero_ps.errors import ConfigError
from hetero_ps.wire.tls import cert_file_fingerprint

CERT_FILE, KEY_FILE = "cert.pem", "key.pem"


def default_hosts() -> list[str]:
    """This machine's host name and addresses, and loopback: what workers may type as --master-addr."""
    import psutil

    hosts = [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = a.address.split("%")[0]  # fe80::1%eth0
                if not ipaddress.ip_address(ip).is_link_local:
                    hosts.append(ip)
    return list(dict.fromkeys(hosts))


def make_cert(out: str, hosts: list[str], days: int = 825, force: bool = False) -> tuple[str, str]:
    """Write ``out/cert.pem`` and ``out/key.pem`` (mode 0600) for ``hosts``; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    if not hosts:
        raise ConfigError("the certificate needs at least one --host")
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # clocks of the nodes may differ
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # its own CA, so that it can be given to workers as --tls-ca
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(out, exist_ok=True)
    cert_path, key_path = os.path.join(out, CERT_FILE), os.path.join(out, KEY_FILE)
    if not force:
        taken = [p for p in (cert_path, key_path) if os.path.exists(p)]
        if taken:
            raise ConfigError(f"{' and '.join(taken)} already exist: pass --force to replace them, or another --out")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(key_path, key_pem, 0o600)  # the key first: a certificate without its key is of no use
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _write(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file created with ``mode`` (never readable by others)."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits away from the public certificate
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hetero_ps.tools.tls",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-cert", help="write a self-signed cert.pem and key.pem for the master", allow_abbrev=False)
    m.add_argument("--out", required=True, help="the folder for cert.pem and key.pem")
    m.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a name or address workers use to reach the master (repeatable; default: this machine's)",
    )
    m.add_argument("--days", type=int, default=825, help="how long the certificate is valid (default 825)")
    m.add_argument("--force", action="store_true", help="replace cert.pem and key.pem if they exist")
    f = sub.add_parser("fingerprint", help="print the SHA-256 fingerprint of a PEM certificate", allow_abbrev=False)
    f.add_argument("cert", help="a PEM certificate, e.g. the master's cert.pem")
    a = p.parse_args(argv)
    try:
        if a.command == "fingerprint":
            print(cert_file_fingerprint(a.cert, "certificate"))
            return 0
        hosts = a.host or default_hosts()
        cert, key = make_cert(a.out, hosts, a.days, a.force)
        fp = cert_file_fingerprint(cert)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {cert} and {key} (the key is readable by you only)")
    print(f"valid for {a.days} days for: {', '.join(hosts)}")
    print(f"SHA-256 fingerprint: {fp}")
    print(f"master:  python -m hetero_ps.server --tls-cert {cert} --tls-key {key} ...")
    print(f"workers: python -m hetero_ps.worker --master-addr MASTER --tls-fingerprint {fp} ...")
    print(f"         (or copy {cert} to each worker and pass --tls-ca cert.pem instead)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
