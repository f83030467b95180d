"""The wire protocol: every message round-trips; malformed frames are refused with their path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certs.pem import certificates_to_pem
from tests.helpers.pki import make_test_pki
from sidecar.discovery.protocol import (
    MAX_MESSAGE_BYTES,
    Ack,
    Certificate,
    Csr,
    ErrorMessage,
    Heartbeat,
    Hello,
    JoinToken,
    Nack,
    ProtocolError,
    Renew,
    Snapshot,
    bundle_fingerprints,
    decode,
    encode,
    fingerprint_der,
)


@pytest.mark.parametrize("message", [
    Hello(node="n1", service="orders", address="127.0.0.1:15006", version="3.abc"),
    Hello(node="n1", service="orders", address=None),
    Snapshot(version="1.ab", mesh={"services": {"a": {}}}, bundle="PEM"),
    Ack(version="1.ab"),
    Ack(version="cert-1", kind="certificate"),
    Nack(version="1.ab", error="services.a.routes[0]: bad"),
    Heartbeat(app_healthy=False),
    Heartbeat(interval=5.0),
    Renew(),
    Csr(csr="PEM"),
    Certificate(version="c1", cert="PEM", bundle="PEM"),
    ErrorMessage(code="identity_mismatch", detail="x"),
])
def test_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(("frame", "error"), [
    ("not json", "message is not JSON"),
    ("[1]", "must be a JSON object"),
    ('{"type": "bogus"}', "type: unknown message type 'bogus'"),
    ('{"node": "n"}', "type: unknown message type None"),
    ('{"type": "hello", "service": "a", "address": null}', "hello.node: is required"),
    ('{"type": "hello", "node": 1, "service": "a", "address": null}', "hello.node: must be str, got 1"),
    ('{"type": "hello", "node": "n", "service": "a", "address": "nope"}', "hello.address: must be host:port"),
    ('{"type": "hello", "node": "n/../x", "service": "a", "address": null}', "hello.node: must be a simple name"),
    ('{"type": "hello", "node": "n", "service": "a", "address": null, "protocol": true}', "hello.protocol: wrong type"),
    ('{"type": "ack", "version": "1", "kind": "other"}', "ack.kind: must be one of"),
    ('{"type": "snapshot", "version": "1", "mesh": []}', "snapshot.mesh: must be dict"),
    ('{"type": "heartbeat", "interval": -1}', "heartbeat.interval: out of range"),
])
def test_malformed_frames_are_refused_with_their_path(frame: str, error: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert error in str(info.value)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode('{"type": "ack", "version": "1", "extra": 1}') == Ack(version="1")


def test_size_is_bounded_before_parsing() -> None:
    frame = json.dumps({"type": "csr", "csr": "x" * MAX_MESSAGE_BYTES})
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frame)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Csr(csr="x" * MAX_MESSAGE_BYTES))


def test_join_token_round_trips_and_checks_the_ca(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, services=())
    bundle = certificates_to_pem(pki.ca.roots).decode()
    fp = fingerprint_der(pki.ca.roots[0].public_bytes(Encoding.DER))
    assert bundle_fingerprints(bundle) == [fp]
    token = JoinToken("0123456789abcdef", "s" * 32, fp)
    parsed = JoinToken.parse(str(token) + "\n")
    assert parsed == token and parsed.trusts(bundle)
    assert not JoinToken("0123456789abcdef", "s" * 32, "0" * 64).trusts(bundle)
    assert "s" * 32 not in repr(token)
    with pytest.raises(ProtocolError, match="not a PAKE join token"):
        JoinToken.parse("pake1.xyz")
