"""A test PKI: a CA, good workload certificates and deliberately bad ones.

For tests only: it lives under tests/, so it never ships in the installed package.
Good certificates come from the real CA code path (CSR, sign_csr); bad ones
use the same certificate profile with exactly one defect, so a test that
expects a refusal fails for the reason it names.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, get_args

from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import pem, profile
from certs.ca import CertificateAuthority
from certs.identity import SpiffeId
from certs.issue import issue_workload, new_key, workload_paths
from certs.ssl_context import ALPN_PROTOCOLS, TlsFiles

__all__ = ["BAD_KINDS", "BadKind", "MeshPki", "make_test_pki", "unchecked_context"]

BadKind = Literal[
    "no_uri_san",
    "two_uri_sans",
    "not_spiffe",
    "wrong_trust_domain",
    "expired",
    "not_yet_valid",
    "no_client_auth",
    "no_server_auth",
    "no_eku",
    "other_ca",
    "ca_as_leaf",
]
BAD_KINDS: tuple[BadKind, ...] = get_args(BadKind)


@dataclass(frozen=True)
class MeshPki:
    """Paths of a test mesh's PKI under `root`, and the CA to issue more.

    `services[name]` are TlsFiles (cert, key, bundle) ready for
    TlsContextSource or server_context/client_context.
    """

    root: Path
    ca_dir: Path
    ca: CertificateAuthority
    bundle: Path
    services: Mapping[str, TlsFiles] = field(default_factory=dict)

    def issue(
        self,
        service: str,
        *,
        ttl: timedelta = timedelta(hours=1),
        now: datetime | None = None,
        out_dir: Path | None = None,
    ) -> TlsFiles:
        """A good certificate for service (into out_dir, default root/certs)."""
        files = issue_workload(self.ca, service, out_dir or self.root / "certs", ttl, now=now)
        return TlsFiles(files.cert, files.key, files.bundle)

    def bad(self, kind: BadKind, service: str = "orders") -> TlsFiles:
        """A certificate for service with one defect, in root/bad/<kind>/.

        Its bundle file is this PKI's real bundle, so only the defect
        differs from a good workload.
        """
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad certificate kind {kind!r}")
        out = self.root / "bad" / kind
        out.mkdir(parents=True, exist_ok=True)
        paths = workload_paths(out, service)
        issuer = self.ca
        if kind == "other_ca":
            other = self.root / "other-ca"
            if (other / "ca.pem").exists():
                issuer = CertificateAuthority.load(other)
            else:
                issuer = CertificateAuthority.init(other, self.ca.trust_domain)
        now = datetime.now(UTC)
        good_uri = str(SpiffeId(self.ca.trust_domain, service))
        uris, eku, ca = [good_uri], list(profile.WORKLOAD_EKU), False
        not_before, not_after = now - timedelta(minutes=1), now + timedelta(hours=1)
        if kind == "no_uri_san":
            uris = []
        elif kind == "two_uri_sans":
            uris = [good_uri, str(SpiffeId(self.ca.trust_domain, f"{service}-twin"))]
        elif kind == "not_spiffe":
            uris = [f"https://{service}.{self.ca.trust_domain}/"]
        elif kind == "wrong_trust_domain":
            uris = [str(SpiffeId("elsewhere.test", service))]
        elif kind == "expired":
            not_before, not_after = now - timedelta(days=2), now - timedelta(days=1)
        elif kind == "not_yet_valid":
            not_before, not_after = now + timedelta(days=1), now + timedelta(days=2)
        elif kind == "no_client_auth":
            eku = [ExtendedKeyUsageOID.SERVER_AUTH]
        elif kind == "no_server_auth":
            eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
        elif kind == "no_eku":
            eku = None
        elif kind == "ca_as_leaf":
            ca = True
        key = new_key()
        leaf = profile.leaf_builder(
            common_name=service,
            uris=uris,
            public_key=key.public_key(),
            issuer=issuer.certificate,
            not_before=not_before,
            not_after=not_after,
            eku=eku,
            ca=ca,
        ).sign(issuer.key, hashes.SHA256())
        pem.write_private_key(paths.key, key)
        pem.write_certificates(paths.cert, [leaf, *issuer.chain])
        pem.write_certificates(paths.bundle, self.ca.bundle_pem())
        return TlsFiles(paths.cert, paths.key, paths.bundle)


def make_test_pki(
    tmp_path: Path,
    services: Iterable[str] = ("frontend", "orders"),
    *,
    trust_domain: str = "pake.local",
    intermediate: bool = False,
) -> MeshPki:
    """A root CA (and optionally an intermediate issuing), plus one good
    certificate per service, all under tmp_path. Takes a few milliseconds."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.init(tmp_path / "root-ca", trust_domain)
    ca_dir = tmp_path / "root-ca"
    if intermediate:
        ca_dir = tmp_path / "intermediate-ca"
        ca = CertificateAuthority.init_intermediate(tmp_path / "root-ca", ca_dir)
    pki = MeshPki(root=tmp_path, ca_dir=ca_dir, ca=ca, bundle=ca_dir / "bundle.pem")
    issued = {name: pki.issue(name) for name in services}
    return MeshPki(pki.root, pki.ca_dir, pki.ca, pki.bundle, issued)


def unchecked_context(side: Literal["server", "client"], files: TlsFiles) -> ssl.SSLContext:
    """A context like ours but built without validating the files first.

    Only for tests that must *present* a certificate our loaders refuse
    (expired, not yet valid, no SPIFFE ID) to see the peer refuse it.
    """
    if side == "server":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    ctx.load_verify_locations(cafile=files.bundle)
    ctx.load_cert_chain(files.cert, files.key)
    return ctx
