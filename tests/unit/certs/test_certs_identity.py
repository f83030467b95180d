"""SpiffeId parsing and the rules workload_identity enforces on a peer leaf."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certs.identity import (
    REASONS,
    IdentityCache,
    IdentityError,
    PeerRole,
    SpiffeId,
    check_service,
    check_trust_domain,
    workload_identity,
)
from certs.pem import load_certificate
from certs.ssl_context import TlsFiles
from tests.helpers.pki import BadKind, MeshPki


def der_of(files: TlsFiles) -> bytes:
    return load_certificate(files.cert).public_bytes(Encoding.DER)


# === SpiffeId ===


def test_parse_and_str_round_trip() -> None:
    sid = SpiffeId.parse("spiffe://pake.local/service/orders")
    assert sid == SpiffeId("pake.local", "orders")
    assert str(sid) == "spiffe://pake.local/service/orders"
    assert {sid: 1}[SpiffeId("pake.local", "orders")] == 1


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://pake.local/service/a",
        "spiffe://pake.local/service/0",
        "spiffe://pake.local/service/orders-v2",
        "spiffe://a.b-c.d/service/x1",
        "spiffe://pake.local/service/" + "a" * 63,
    ],
)
def test_parse_accepts(uri: str) -> None:
    assert str(SpiffeId.parse(uri)) == uri


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://pake.local/service/orders", "not_spiffe"),
        ("SPIFFE://pake.local/service/orders", "not_spiffe"),
        ("spiffe:/pake.local/service/orders", "not_spiffe"),
        ("spiffe://pake.local", "not_spiffe"),
        ("spiffe://pake.local/", "not_spiffe"),
        ("spiffe://pake.local/services/orders", "not_spiffe"),
        ("spiffe://pake.local/orders", "not_spiffe"),
        ("spiffe://pake.local//service/orders", "not_spiffe"),
        ("spiffe:///service/orders", "bad_trust_domain"),
        ("spiffe://Pake.local/service/orders", "bad_trust_domain"),
        ("spiffe://pake.local:8443/service/orders", "bad_trust_domain"),
        ("spiffe://user@pake.local/service/orders", "bad_trust_domain"),
        ("spiffe://pake..local/service/orders", "bad_trust_domain"),
        ("spiffe://-pake.local/service/orders", "bad_trust_domain"),
        ("spiffe://pake_local/service/orders", "bad_trust_domain"),
        ("spiffe://" + "a" * 64 + ".local/service/orders", "bad_trust_domain"),
        ("spiffe://pake.local/service/", "bad_service"),
        ("spiffe://pake.local/service/Orders", "bad_service"),
        ("spiffe://pake.local/service/orders/", "bad_service"),
        ("spiffe://pake.local/service/orders/v2", "bad_service"),
        ("spiffe://pake.local/service/../admin", "bad_service"),
        ("spiffe://pake.local/service/-orders", "bad_service"),
        ("spiffe://pake.local/service/orders-", "bad_service"),
        ("spiffe://pake.local/service/or_ders", "bad_service"),
        ("spiffe://pake.local/service/or%64ers", "bad_service"),
        ("spiffe://pake.local/service/orders?x=1", "bad_service"),
        ("spiffe://pake.local/service/orders#frag", "bad_service"),
        ("spiffe://pake.local/service/orders\n", "bad_service"),
        ("spiffe://pake.local/service/" + "a" * 64, "bad_service"),
    ],
)
def test_parse_refuses(uri: str, reason: str) -> None:
    with pytest.raises(IdentityError) as info:
        SpiffeId.parse(uri)
    assert info.value.reason == reason
    assert reason in REASONS


def test_constructor_validates() -> None:
    with pytest.raises(IdentityError, match="service name"):
        SpiffeId("pake.local", "Bad Name")
    with pytest.raises(IdentityError) as info:
        SpiffeId("PAKE", "orders")
    assert info.value.reason == "bad_trust_domain"


def test_check_service() -> None:
    assert check_service("orders-v2") == "orders-v2"
    with pytest.raises(IdentityError) as info:
        check_service("orders.v2")
    assert info.value.reason == "bad_service"


def test_check_trust_domain() -> None:
    assert check_trust_domain("pake.local") == "pake.local"
    with pytest.raises(IdentityError):
        check_trust_domain("pake.local.")


def test_identity_error_carries_reason_and_message() -> None:
    err = IdentityError("no_uri_san", "peer certificate has no URI SAN")
    assert err.reason == "no_uri_san"
    assert str(err) == "peer certificate has no URI SAN"
    assert "no_uri_san" in repr(err)


# === workload_identity ===


@pytest.mark.parametrize("role", ["client", "server"])
def test_good_leaf_gives_its_spiffe_id(pki: MeshPki, role: PeerRole) -> None:
    der = der_of(pki.services["orders"])
    assert workload_identity(der, "pake.local", role) == SpiffeId("pake.local", "orders")


@pytest.mark.parametrize(
    ("kind", "role", "reason"),
    [
        ("no_uri_san", "client", "no_uri_san"),
        ("two_uri_sans", "client", "multiple_uri_sans"),
        ("not_spiffe", "client", "not_spiffe"),
        ("wrong_trust_domain", "client", "wrong_trust_domain"),
        ("ca_as_leaf", "client", "ca_as_leaf"),
        ("no_client_auth", "client", "no_client_auth"),
        ("no_server_auth", "server", "no_server_auth"),
        ("no_eku", "client", "no_eku"),
        ("no_eku", "server", "no_eku"),
    ],
)
def test_refusals(pki: MeshPki, kind: BadKind, role: PeerRole, reason: str) -> None:
    with pytest.raises(IdentityError) as info:
        workload_identity(der_of(pki.bad(kind)), "pake.local", role)
    assert info.value.reason == reason


def test_eku_is_checked_for_the_peer_role_only(pki: MeshPki) -> None:
    # A server-only certificate is a fine upstream, just not a client.
    der = der_of(pki.bad("no_client_auth"))
    assert workload_identity(der, "pake.local", "server").service == "orders"
    der = der_of(pki.bad("no_server_auth"))
    assert workload_identity(der, "pake.local", "client").service == "orders"


def test_root_certificate_is_refused_as_a_leaf(pki: MeshPki) -> None:
    der = pki.ca.certificate.public_bytes(Encoding.DER)
    with pytest.raises(IdentityError) as info:
        workload_identity(der, "pake.local", "client")
    assert info.value.reason == "ca_as_leaf"


def test_trust_domain_must_be_ours(pki: MeshPki) -> None:
    der = der_of(pki.services["orders"])
    with pytest.raises(IdentityError) as info:
        workload_identity(der, "other.local", "client")
    assert info.value.reason == "wrong_trust_domain"


def test_garbage_der_is_refused() -> None:
    with pytest.raises(IdentityError) as info:
        workload_identity(b"\x30\x03garbage", "pake.local", "client")
    assert info.value.reason == "bad_certificate"


def test_dates_are_the_handshakes_job(pki: MeshPki) -> None:
    # The handshake verifies validity; identity is a pure function of the DER.
    assert workload_identity(der_of(pki.bad("expired")), "pake.local", "client").service == "orders"


# === IdentityCache ===


def test_cache_returns_identity_and_caches(pki: MeshPki) -> None:
    cache = IdentityCache("pake.local")
    der = der_of(pki.services["orders"])
    first = cache.identify(der, "client")
    assert cache.identify(bytes(der), "client") is first  # equal bytes, new object: a hit
    assert len(cache) == 1


def test_cache_caches_refusals_and_raises_each_time(pki: MeshPki) -> None:
    cache = IdentityCache("pake.local")
    der = der_of(pki.bad("no_uri_san"))
    errors = []
    for _ in range(2):
        with pytest.raises(IdentityError) as info:
            cache.identify(der, "client")
        errors.append(info.value)
    assert [e.reason for e in errors] == ["no_uri_san", "no_uri_san"]
    assert errors[0] is not errors[1]
    assert len(cache) == 1


def test_cache_keys_on_role(pki: MeshPki) -> None:
    cache = IdentityCache("pake.local")
    der = der_of(pki.bad("no_client_auth"))
    assert cache.identify(der, "server").service == "orders"
    with pytest.raises(IdentityError):
        cache.identify(der, "client")


def test_cache_is_bounded_lru(pki: MeshPki) -> None:
    cache = IdentityCache("pake.local", maxsize=2)
    a, b = der_of(pki.services["orders"]), der_of(pki.services["frontend"])
    c = der_of(pki.issue("payments"))
    cache.identify(a, "client")
    cache.identify(b, "client")
    cache.identify(a, "client")  # a is now the most recent
    cache.identify(c, "client")  # evicts b
    assert len(cache) == 2
    assert cache.identify(a, "client").service == "orders"
    cache.clear()
    assert len(cache) == 0


def test_cache_validates_arguments() -> None:
    with pytest.raises(ValueError):
        IdentityCache("pake.local", maxsize=0)
    with pytest.raises(IdentityError):
        IdentityCache("Not A Domain")



def test_reason_codes_are_documented() -> None:
    for code in ("no_uri_san", "multiple_uri_sans", "not_spiffe", "wrong_trust_domain",
                 "ca_as_leaf", "no_client_auth", "no_server_auth", "no_eku"):
        assert code in REASONS
