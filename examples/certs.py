"""``python -m examples.certs`` (``make certs``): the CA and certificates of the mTLS quickstart
and of the gateway example.

Runs ``pakectl ca init`` and ``pakectl certs issue`` (the same ``control.cli.main`` the
``pakectl`` script runs, in this process) into ``examples/mtls/certs/``, which git ignores:
workload certificates for ``frontend``, ``echo`` and ``gateway`` (the gateway calls mesh
services over mTLS with it). Beside them, a **demo-only** self-signed server certificate for
the gateway's outside listener (``demo-gateway-server.pem``, SAN ``localhost`` and
``127.0.0.1``): not from the mesh CA, trusted by nothing unless a client is told to
(``curl --cacert``); never use it for anything but this example on your own machine.

Idempotent: a CA that exists is kept, and a certificate is made again only when its files are
missing or unusable (expired, key does not match...), so re-running it a day later repairs
what expired and touches nothing else. Prints what it made and why.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import pem
from certs.issue import new_key
from certs.pem import PemError
from certs.ssl_context import TlsFiles, load_material
from control.cli import main as pakectl

__all__ = ["DEFAULT_DIR", "DEMO_SERVER_CERT", "DEMO_SERVER_KEY", "SERVICES", "ensure_certs", "main"]

DEFAULT_DIR = Path(__file__).resolve().parent / "mtls" / "certs"
SERVICES = ("frontend", "echo", "gateway")
TTL = "24h"
# The gateway's outside listener: file names in the certificate folder, and lifetime.
DEMO_SERVER_CERT = "demo-gateway-server.pem"
DEMO_SERVER_KEY = "demo-gateway-server-key.pem"
DEMO_SERVER_TTL = timedelta(days=30)


def _run(argv: list[str]) -> None:
    print("$ pakectl " + " ".join(argv), flush=True)
    code = pakectl(argv)
    if code != 0:
        raise SystemExit(f"examples.certs: pakectl {argv[0]} {argv[1]} failed (exit {code})")


def _problem(files: TlsFiles) -> str | None:
    """Why these files cannot serve (the sidecar would refuse to start), or None."""
    if not files.cert.exists() or not files.key.exists():
        return "missing"
    try:
        load_material(files)
    except PemError as exc:
        return str(exc)
    return None


def _server_problem(cert: Path, key: Path) -> str | None:
    """Why the gateway would refuse this server certificate at start-up, or None. Asks the
    gateway's own loader, so "valid here" means "the gateway starts with it"."""
    from sidecar.config.model import ServerTlsFiles
    from sidecar.tls import ServerTls

    if not cert.exists() or not key.exists():
        return "missing"
    try:
        ServerTls(ServerTlsFiles(cert, key))
    except PemError as exc:
        return str(exc)
    return None


def _make_demo_server_certificate(cert: Path, key: Path) -> None:
    """A self-signed server certificate for localhost and 127.0.0.1, named as a demo."""
    private = new_key()
    now = datetime.now(UTC)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PAKE Mesh example (DEMO ONLY)"),
        x509.NameAttribute(NameOID.COMMON_NAME, "DEMO gateway server, never trust elsewhere")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + DEMO_SERVER_TTL)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256()))
    key.parent.mkdir(parents=True, exist_ok=True)
    pem.write_private_key(key, private)  # 0600, like every key here
    pem.write_certificates(cert, [certificate])


def ensure_certs(out: Path = DEFAULT_DIR, services: Sequence[str] = SERVICES) -> list[str]:
    """Make what is missing or unusable under ``out``; return what was made (empty: nothing)."""
    out = Path(out)
    ca_dir = out / "ca"
    made: list[str] = []
    if not (ca_dir / "ca.pem").exists():
        _run(["ca", "init", "--state-dir", str(ca_dir)])
        made.append(f"CA in {ca_dir}")
    for service in services:
        files = TlsFiles.of(out / f"{service}.pem", out / f"{service}-key.pem", out / "bundle.pem")
        problem = _problem(files)
        if problem is None:
            continue
        if problem != "missing":
            print(f"re-issuing {service}: {problem}", flush=True)
        _run(["certs", "issue", "--service", service, "--out", str(out), "--state-dir", str(ca_dir),
              "--ttl", TTL])
        made.append(f"{service} certificate in {files.cert}")
    cert, key = out / DEMO_SERVER_CERT, out / DEMO_SERVER_KEY
    problem = _server_problem(cert, key)
    if problem is not None:
        if problem != "missing":
            print(f"re-making the demo gateway server certificate: {problem}", flush=True)
        print(f"$ (demo only) self-signed server certificate for localhost, 127.0.0.1 -> {cert}",
              flush=True)
        _make_demo_server_certificate(cert, key)
        made.append(f"DEMO gateway server certificate in {cert} (self-signed; clients trust it "
                    f"only with --cacert {cert})")
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.certs", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR,
                        help=f"where the CA and certificates go (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    made = ensure_certs(args.out)
    if made:
        print("made: " + "; ".join(made))
    else:
        print(f"certificates in {args.out} are present and valid; nothing to do")


if __name__ == "__main__":
    main()
