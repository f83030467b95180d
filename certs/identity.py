"""Workload identity: SPIFFE IDs and the rules a peer certificate must meet.

The TLS handshake proves that a peer holds a key certified by a root of our
trust bundle; this module then decides *who* the peer is. Rules:
exactly one URI SAN, a SPIFFE ID `spiffe://<trust domain>/service/<name>` of
our trust domain, not a CA certificate, and an extended key usage that allows
the role the peer plays. Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.describe import is_ca, uri_sans

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "REASONS",
    "IdentityCache",
    "IdentityError",
    "PeerRole",
    "SpiffeId",
    "check_service",
    "check_trust_domain",
    "workload_identity",
]

DEFAULT_TRUST_DOMAIN = "pake.local"

PeerRole: TypeAlias = Literal["client", "server"]

# Every machine code an IdentityError may carry; logs and metrics use these.
REASONS = (
    "bad_certificate",  # the DER does not parse as an X.509 certificate
    "not_spiffe",  # a URI that is not spiffe://<td>/service/<name>
    "bad_trust_domain",  # a trust domain that is not lowercase DNS-ish
    "bad_service",  # a service name that is not a DNS label
    "no_uri_san",
    "multiple_uri_sans",
    "wrong_trust_domain",
    "ca_as_leaf",
    "no_eku",
    "no_client_auth",
    "no_server_auth",
)

_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_SERVICE_RE = re.compile(_LABEL)
_TRUST_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_SERVICE = 63
_MAX_LABEL = 63
_MAX_TRUST_DOMAIN = 255
_SCHEME = "spiffe://"
_PATH_PREFIX = "/service/"


class IdentityError(Exception):
    """A peer (or a string) is not an acceptable workload identity.

    `reason` is a short machine code from REASONS, for logs, metrics and the
    local reply; the message is for a person.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __repr__(self) -> str:
        return f"IdentityError({self.reason!r}, {str(self)!r})"


def check_trust_domain(trust_domain: str) -> str:
    """Return trust_domain if it is lowercase DNS-ish, else raise IdentityError."""
    if (
        len(trust_domain) > _MAX_TRUST_DOMAIN
        or not _TRUST_DOMAIN_RE.fullmatch(trust_domain)
        or any(len(label) > _MAX_LABEL for label in trust_domain.split("."))
    ):
        raise IdentityError(
            "bad_trust_domain",
            f"trust domain {trust_domain!r} must be lowercase DNS labels "
            "(a-z, 0-9, '-') separated by dots",
        )
    return trust_domain


def check_service(service: str) -> str:
    """Return service if it is a valid service name (a DNS label), else raise IdentityError."""
    if len(service) > _MAX_SERVICE or not _SERVICE_RE.fullmatch(service):
        raise IdentityError(
            "bad_service",
            f"service name {service!r} must be 1-63 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit",
        )
    return service


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """The identity of one service: `spiffe://<trust_domain>/service/<service>`.

    Constructing one validates both parts, so a SpiffeId in hand is always
    well-formed; compare them with ==, use them as dict keys.
    """

    trust_domain: str
    service: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_service(self.service)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse strictly: no port, user, query, fragment, escapes or extra path.

        Being strict here is what keeps `spiffe://pake.local/service/a/../b`
        or `SPIFFE://Pake.Local/...` from ever naming a principal.
        """
        if not uri.startswith(_SCHEME):
            raise IdentityError("not_spiffe", f"{uri!r} is not a spiffe:// URI")
        rest = uri[len(_SCHEME) :]
        trust_domain, slash, path = rest.partition("/")
        if not slash or not path.startswith(_PATH_PREFIX[1:]):
            raise IdentityError(
                "not_spiffe", f"{uri!r}: the path must be /service/<name>"
            )
        # __post_init__ checks both parts: a trust domain with a port, user or
        # upper case, or a service with '/', '?', '#', '%' or '..' is refused there.
        return cls(trust_domain, path[len(_PATH_PREFIX) - 1 :])

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{_PATH_PREFIX}{self.service}"


def _check_eku(cert: x509.Certificate, role: PeerRole) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        # Without an EKU a certificate may be used for anything; a workload
        # certificate must say what it is for, so we refuse rather than guess.
        raise IdentityError(
            "no_eku", "peer certificate has no extended key usage extension"
        ) from None
    if role == "client" and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise IdentityError(
            "no_client_auth", "peer certificate does not allow clientAuth"
        )
    if role == "server" and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise IdentityError(
            "no_server_auth", "peer certificate does not allow serverAuth"
        )


def workload_identity(der: bytes, trust_domain: str, role: PeerRole) -> SpiffeId:
    """Return the SPIFFE ID of a peer's leaf certificate, or raise IdentityError.

    `der` is the peer leaf as `ssl_object.getpeercert(binary_form=True)` gives
    it, after the handshake has verified the chain against the trust bundle.
    `role` is the role the *peer* plays: "client" when we are the server
    checking a downstream, "server" when we are checking an upstream.
    Dates are not checked here: the handshake already did that.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(
            "bad_certificate", f"peer certificate does not parse: {exc}"
        ) from None
    if is_ca(cert):
        raise IdentityError(
            "ca_as_leaf", "peer presented a CA certificate as its own"
        )
    uris = uri_sans(cert)
    if not uris:
        raise IdentityError("no_uri_san", "peer certificate has no URI SAN")
    if len(uris) > 1:
        raise IdentityError(
            "multiple_uri_sans",
            f"peer certificate has {len(uris)} URI SANs, exactly one is allowed",
        )
    spiffe_id = SpiffeId.parse(uris[0])
    if spiffe_id.trust_domain != trust_domain:
        raise IdentityError(
            "wrong_trust_domain",
            f"peer {spiffe_id} is not in trust domain {trust_domain!r}",
        )
    _check_eku(cert, role)
    return spiffe_id


class IdentityCache:
    """A bounded LRU of `workload_identity` results for one trust domain.

    The sidecar asks once per TLS connection, and most connections come from
    a handful of certificates, so parsing each DER once saves the X.509 parse
    on the accept path. Refusals are cached too (the answer is a pure function
    of the DER, the trust domain and the role). Entries are keyed by the DER
    bytes themselves, so a renewed certificate is simply a new entry and old
    ones age out.
    """

    def __init__(self, trust_domain: str, maxsize: int = 1024) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        check_trust_domain(trust_domain)
        self.trust_domain = trust_domain
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[bytes, str], SpiffeId | IdentityError] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, der: bytes, role: PeerRole) -> SpiffeId:
        """Like `workload_identity(der, self.trust_domain, role)`, cached."""
        key = (der, role)
        entry = self._entries.get(key)
        if entry is None:
            try:
                entry = workload_identity(der, self.trust_domain, role)
            except IdentityError as exc:
                entry = exc
            self._entries[key] = entry
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        if isinstance(entry, IdentityError):
            # A fresh exception each time: raising the cached one would keep
            # growing its __traceback__ chain across connections.
            raise IdentityError(entry.reason, str(entry))
        return entry

    def clear(self) -> None:
        """Forget everything. Not needed when the bundle changes: whether a
        peer is *trusted* is the handshake's decision, this cache only says
        who a certificate names."""
        self._entries.clear()
