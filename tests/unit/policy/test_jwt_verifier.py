"""Every token the issue says must be refused, and the ones that must pass."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from jwt.algorithms import get_default_algorithms

from sidecar.jwt.authenticator import Authenticator
from sidecar.jwt.jwks import JwksCache, parse_jwks
from sidecar.jwt.verifier import JwtError, Verifier, parse_token

from .conftest import NOW, FakeClock, SigningKey, claims, jwks, mint, provider


class NoSource:
    description = "none"

    async def fetch(self) -> bytes:  # pragma: no cover - never called here
        raise AssertionError("no fetch expected")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(key: SigningKey, header: str, payload: str, alg: str | None = None) -> str:
    """A token from raw JSON texts (to make duplicate members and odd types)."""
    algorithm = get_default_algorithms()[alg or key.alg]
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key.private))
    return f"{signing_input}.{b64(signature)}"


def make(keys: dict[str, SigningKey], *, extra: list[dict[str, Any]] | None = None,
         **overrides: Any) -> tuple[Authenticator, JwksCache]:
    p = provider(**overrides)
    keyset = parse_jwks(jwks(*(keys[n] for n in ("RS256", "ES256", "ES384", "EdDSA")),
                             extra=extra), p.algorithms)
    cache = JwksCache(p, NoSource(), clock=FakeClock(), keyset=keyset)
    return Authenticator({p.name: Verifier(p, cache, wall=lambda: NOW)},
                         cache_size=16, wall=lambda: NOW), cache


def refused(auth: Authenticator, token: str) -> JwtError:
    with pytest.raises(JwtError) as info:
        auth.authenticate(token)
    assert token not in info.value.description
    return info.value


@pytest.mark.parametrize("name", ["RS256", "PS256", "ES256", "ES384", "EdDSA"])
def test_supported_algorithms_verify(keys: dict[str, SigningKey], name: str) -> None:
    key = keys[name]
    # PS256 signs with the RSA key, published a second time under its own kid and alg.
    auth, _ = make(keys, extra=[keys["PS256"].public_jwk] if name == "PS256" else None)
    verified = auth.authenticate(mint(key))
    assert verified.principal == "alice"
    assert verified.roles == frozenset({"reader"})
    assert verified.alg == key.alg


def test_alg_none_refused(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys)
    header = b64(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    assert refused(auth, f"{header}.{payload}.").reason == "no_signature"
    assert refused(auth, f"{header}.{payload}.c2ln").reason == "alg_none"
    header = b64(json.dumps({"alg": "None", "kid": "rsa-1"}).encode())
    assert refused(auth, f"{header}.{payload}.c2ln").reason == "alg_none"


def test_hs256_with_public_key_as_secret_refused(keys: dict[str, SigningKey]) -> None:
    """Algorithm confusion: HMAC "signed" with the issuer's public key."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization

    pem = keys["RS256"].private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = (f"{b64(json.dumps({'alg': 'HS256', 'kid': 'rsa-1'}).encode())}."
                     f"{b64(json.dumps(claims()).encode())}")
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    auth, _ = make(keys)
    assert refused(auth, f"{signing_input}.{b64(sig)}").reason == "alg_symmetric"


def test_algorithm_outside_allow_list_refused(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys, algorithms=frozenset({"ES256"}))
    assert refused(auth, mint(keys["ES384"])).reason == "alg_not_allowed"


def test_unknown_kid_refused_and_refetch_requested(keys: dict[str, SigningKey]) -> None:
    auth, cache = make(keys)
    token = mint(keys["RS256"], headers={"kid": "not-in-set"})
    assert refused(auth, token).reason == "unknown_kid"
    assert cache.refetch_requests == 1


@pytest.mark.parametrize("header", [
    {"jku": "https://evil.example/jwks.json"},
    {"x5u": "https://evil.example/cert.pem"},
    {"jwk": {"kty": "oct", "k": "c2VjcmV0"}},
    {"x5c": ["MIIB"]},
])
def test_key_naming_headers_never_followed(keys: dict[str, SigningKey],
                                           header: dict[str, Any]) -> None:
    auth, _ = make(keys)
    assert refused(auth, mint(keys["RS256"], headers=header)).reason == "key_in_header"


def test_unknown_crit_refused(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys)
    token = mint(keys["RS256"], headers={"crit": ["exp-ext"], "exp-ext": 1})
    assert refused(auth, token).reason == "crit"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"exp": NOW - 31}, "expired"),
    ({"nbf": NOW + 31}, "nbf"),
    ({"iat": NOW + 31}, "iat"),
    ({"exp": None}, "no_exp"),
    ({"iss": "https://other.issuer"}, "iss"),
    ({"iss": None}, "iss"),
    ({"aud": "other"}, "aud"),
    ({"aud": ["x", "y"]}, "aud"),
    ({"aud": None}, "aud"),
    ({"sub": None}, "required_claim"),
    ({"exp": str(int(NOW + 300))}, "time_type"),
    ({"exp": True}, "time_type"),
    ({"nbf": "0"}, "time_type"),
    ({"iat": False}, "time_type"),
    ({"iat": None, "exp": [NOW + 300]}, "time_type"),
])
def test_claim_checks(keys: dict[str, SigningKey], overrides: dict[str, Any],
                      reason: str) -> None:
    auth, _ = make(keys)
    payload = claims(**overrides)
    # PyJWT refuses to *encode* some of these; sign the raw JSON instead.
    token = sign_raw(keys["ES256"], json.dumps({"alg": "ES256", "kid": "ec-256"}),
                     json.dumps(payload))
    assert refused(auth, token).reason == reason


def test_leeway_accepts_small_skew(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys)
    assert auth.authenticate(mint(keys["ES256"], claims(exp=NOW - 29, nbf=NOW + 29)))


def test_audience_list_and_required_claims(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys, required_claims=("email",))
    assert refused(auth, mint(keys["ES256"])).reason == "required_claim"
    ok = auth.authenticate(mint(keys["ES256"], claims(aud=["x", "pake"], email="a@b")))
    assert ok.claims["email"] == "a@b"


@pytest.mark.parametrize("where", ["header", "payload"])
def test_duplicate_members_refused(keys: dict[str, SigningKey], where: str) -> None:
    auth, _ = make(keys)
    header = '{"alg":"ES256","kid":"ec-256"}'
    payload = json.dumps(claims())
    if where == "header":
        header = '{"alg":"ES256","kid":"ec-256","alg":"none"}'
    else:
        payload = payload[:-1] + ',"sub":"admin"}'
    assert refused(auth, sign_raw(keys["ES256"], header, payload)).reason == "duplicate"


@pytest.mark.parametrize("where", ["header", "payload"])
def test_deeply_nested_segment_is_refused_not_a_crash(keys: dict[str, SigningKey],
                                                      where: str) -> None:
    """Within the 8 KiB token limit, ``[[[[...`` nests past the parser's recursion limit; that
    must be a malformed token (401), not a RecursionError out of the filter."""
    auth, _ = make(keys)
    header = '{"alg":"ES256","kid":"ec-256"}'
    payload = json.dumps(claims())
    nested = '{"x":' + "[" * 2000 + "]" * 2000 + "}"
    if where == "header":
        header = nested
    else:
        payload = nested
    assert refused(auth, sign_raw(keys["ES256"], header, payload)).reason == "malformed"


def test_jwks_key_for_encryption_or_other_alg_is_not_used(keys: dict[str, SigningKey]) -> None:
    enc = {**keys["RS256-b"].public_jwk, "use": "enc", "kid": "enc-key"}
    other = {**keys["RS256-b"].public_jwk, "alg": "RS384", "kid": "rs384-key"}
    auth, cache = make(keys, extra=[enc, other])
    assert "enc-key" not in cache.keyset.by_kid
    assert "rs384-key" not in cache.keyset.by_kid
    for kid in ("enc-key", "rs384-key"):
        token = mint(keys["RS256-b"], headers={"kid": kid})
        assert refused(auth, token).reason == "unknown_kid"


def test_token_alg_must_match_key_alg(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys)  # rsa-1 is published with alg RS256
    token = mint(keys["RS256"], alg="PS256")
    assert refused(auth, token).reason == "key_alg"


def test_stripped_or_altered_signature_refused(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys)
    token = mint(keys["RS256"])
    head, body, sig = token.split(".")
    assert refused(auth, f"{head}.{body}.").reason == "no_signature"
    assert refused(auth, f"{head}.{body}").reason == "malformed"
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert refused(auth, f"{head}.{body}.{flipped}").reason == "signature"
    forged = b64(json.dumps(claims(sub="admin")).encode())
    assert refused(auth, f"{head}.{forged}.{sig}").reason == "signature"


def test_oversize_token_refused(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys, max_token_size=1024)
    token = mint(keys["ES256"], claims(pad="x" * 2000))
    assert refused(auth, token).reason == "too_large"


def test_required_typ(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys, typ="at+jwt")
    assert refused(auth, mint(keys["ES256"], headers={"typ": "JWT"})).reason == "typ"
    assert auth.authenticate(mint(keys["ES256"], headers={"typ": "application/AT+JWT"}))


def test_malformed_segments_refused(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys)
    for token in ("abc", "a.b.c.d.e", "!!.b.c", "eyJhbGciOiJ.e30=.c2ln", b64(b"[1]") + ".e30.c2ln"):
        with pytest.raises(JwtError):
            auth.authenticate(token)
    with pytest.raises(JwtError):
        parse_token(b64(b'{"alg":NaN}') + ".e30.c2ln", 8192)


def test_cache_hit_until_exp_and_key_set_change(keys: dict[str, SigningKey]) -> None:
    now = [NOW]
    p = provider()
    keyset = parse_jwks(jwks(keys["ES256"]), p.algorithms)
    cache = JwksCache(p, NoSource(), clock=FakeClock(), keyset=keyset)
    auth = Authenticator({p.name: Verifier(p, cache, wall=lambda: now[0])}, cache_size=2,
                         wall=lambda: now[0])
    token = mint(keys["ES256"], claims(exp=NOW + 60))
    auth.authenticate(token)
    auth.authenticate(token)
    assert (auth.hits, auth.misses) == (1, 1)
    cache.version += 1  # a key-set swap ends every cached verification
    auth.authenticate(token)
    assert auth.misses == 2
    now[0] = NOW + 91  # past exp + leeway: the cache does not extend a token's life
    with pytest.raises(JwtError, match="expired"):
        auth.authenticate(token)
    for i in range(5):  # bounded
        auth.authenticate(mint(keys["ES256"], claims(jti=str(i), exp=NOW + 600)))
    assert len(auth) == 2


def test_pyjwt_decode_used_with_explicit_algorithm(keys: dict[str, SigningKey],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    original = jwt.decode

    def spy(token: str, key: Any, algorithms: list[str], options: dict[str, Any]) -> Any:
        seen.append(algorithms)
        return original(token, key, algorithms=algorithms, options=options)

    monkeypatch.setattr(jwt, "decode", spy)
    auth, _ = make(keys)
    auth.authenticate(mint(keys["EdDSA"]))
    assert seen == [["EdDSA"]]
