"""A consortium CA, the SuperLink's certificate and site keys, with the ``cryptography`` package.

For tests and for the coordinator's how-to (``python -m fedqc.fl.certs OUT_DIR --host server.example.org``,
see ``server/README.md``). It writes ``ca.crt`` (public: every site gets a copy), ``ca.key`` (signs
certificates: keep it offline with the consortium's administrator, never on a site and not needed by
the SuperLink), ``server.crt`` and ``server.key`` (the SuperLink's). The server certificate's SAN
always holds ``IP:127.0.0.1`` and ``DNS:localhost`` plus the given hosts; site keys (``--site``,
``OUT/keys/<name>`` and ``.pub``) are OpenSSH ECDSA P-384 (what SuperNode authentication accepts;
PEM EC keys are refused by Flower). Private keys are written 0600 and never printed. The command
refuses to replace an existing CA or key unless ``--force``: a new CA makes every site's copy of
``ca.crt`` stop matching.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
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


TLS_NAMES = ("ca.crt", "ca.key", "server.crt", "server.key")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedqc.fl.certs OUT [--host H ...] [--site NAME ...] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedqc.fl.certs",
        description="Create a consortium CA (ca.crt, ca.key), the SuperLink's certificate (server.crt, "
                    "server.key) and, with --site, test site keys (OUT/keys/NAME, OUT/keys/NAME.pub).")
    parser.add_argument("out", type=Path, help="folder for the files (created)")
    parser.add_argument("--host", action="append", default=[],
                        help="SuperLink host name or IP the sites use (repeatable; 127.0.0.1 and localhost always)")
    parser.add_argument("--site", action="append", default=[],
                        help="also make an OpenSSH ECDSA key pair for this site (repeatable; for tests and "
                             "demos: a hospital makes its own with ssh-keygen)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing CA, server certificate or site key (every site then needs the "
                             "new ca.crt)")
    args = parser.parse_args(argv)
    existing = [args.out / name for name in TLS_NAMES if (args.out / name).exists()]
    existing += [args.out / "keys" / name for site in args.site for name in (site, f"{site}.pub")
                 if (args.out / "keys" / name).exists()]
    if existing and not args.force:
        print(f"error: {', '.join(map(str, existing))} already exist(s); replacing the CA makes every site's copy of "
              "ca.crt stop matching (and a site's key its registration): nothing was written; pass --force to "
              "replace them", file=sys.stderr)
        return 2
    tls = make_tls_files(args.out, args.host)
    print(f"CA certificate (public; give a copy to every site): {tls.ca_cert}")
    print(f"CA private key: {args.out / 'ca.key'} (signs certificates: keep it offline with the consortium's "
          "administrator; never copy it to a site; the SuperLink does not need it)")
    print(f"SuperLink certificate and key (server.yaml tls:): {tls.server_cert}, {tls.server_key}")
    for site in args.site:
        private, public = make_site_key(args.out / "keys", site)
        print(f"site {site}: private key {private} (stays at the site), public key {public} (to the coordinator)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
