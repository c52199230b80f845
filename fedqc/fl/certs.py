"""A consortium CA, the SuperLink's certificate and site keys, with the ``cryptography`` package.

For tests and for the coordinator's how-to (``python -m fedqc.fl.certs OUT_DIR --host server.example.org``).
The server certificate's SAN always holds ``IP:127.0.0.1`` and ``DNS:localhost`` plus the given
hosts; site keys are OpenSSH ECDSA P-384 (what SuperNode authentication accepts; PEM EC keys are
refused by Flower). Private keys are written 0600 and never printed.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedqc.fl.settings import TlsFiles


def _write(path: Path, data: bytes, private: bool) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in ["127.0.0.1", "localhost", *hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return x509.SubjectAlternativeName(names)


def make_tls_files(out_dir: Path, hosts: Sequence[str] = (), days: int = 365) -> TlsFiles:
    """Write ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` (ECDSA P-256) into ``out_dir``.

    Args:
        out_dir: folder for the four PEM files.
        hosts: extra host names / IP addresses of the SuperLink for the certificate's SAN.
        days: validity.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedqc consortium CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedqc SuperLink")]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(_san(hosts), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    out_dir = Path(out_dir)
    _write(out_dir / "ca.key", _key_pem(ca_key), private=True)
    _write(out_dir / "server.key", _key_pem(server_key), private=True)
    ca = _write(out_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    server = _write(out_dir / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return TlsFiles(ca_cert=ca, server_cert=server, server_key=out_dir / "server.key")


def make_site_key(out_dir: Path, site_id: str) -> tuple[Path, Path]:
    """Write an OpenSSH ECDSA P-384 key pair ``<site_id>`` / ``<site_id>.pub``; returns (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write(Path(out_dir) / site_id, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    public = _write(Path(out_dir) / f"{site_id}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {site_id}\n".encode(), private=False)
    return private, public


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedqc.fl.certs OUT [--host H ...] [--site NAME ...]``."""
    parser = argparse.ArgumentParser(description="Create a CA, a SuperLink certificate and site keys.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--host", action="append", default=[], help="SuperLink host name or IP (repeatable)")
    parser.add_argument("--site", action="append", default=[], help="site name to create a key for (repeatable)")
    args = parser.parse_args(argv)
    tls = make_tls_files(args.out, args.host)
    print(f"CA certificate (give to every site): {tls.ca_cert}")
    print(f"SuperLink certificate and key: {tls.server_cert}, {tls.server_key}")
    for site in args.site:
        private, public = make_site_key(args.out / "keys", site)
        print(f"site {site}: private key {private} (stays at the site), public key {public} (to the coordinator)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
