"""The JWS compact serialization, rule by rule (RFC 7515 §2 and §7.1, RFC 7519 §7.2).

Each token that breaks a rule is *signed by the issuer's key*, so a refusal here comes from
the parser and not from a signature that no longer matches. A token must have one textual
form: the tests marked "two forms" build a second text that decodes to the same bytes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from collections.abc import Callable

import pytest
from jwt.algorithms import get_default_algorithms

from sidecar.jwt.extractor import extract_token, header_specs
from sidecar.config.jwt_providers import TokenHeader
from sidecar.jwt.verifier import JwtError, parse_token

from .conftest import SigningKey, claims, mint, request
from .test_jwt_verifier import b64, make, refused

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
HEADER = '{"alg":"ES256","kid":"ec-256"}'
WHERE = ("header", "payload", "signature")


def signed(key: SigningKey, head: str, body: str) -> str:
    """A token over the *texts* head and body, whatever they are: the issuer signed them."""
    algorithm = get_default_algorithms()[key.alg]
    signing_input = f"{head}.{body}"
    signature = algorithm.sign(signing_input.encode("latin-1"), algorithm.prepare_key(key.private))
    return f"{signing_input}.{b64(signature)}"


def with_length(text: str, rem: int) -> str:
    """JSON text padded with spaces before its last '}' so its length is rem modulo 3 (its
    base64url then ends with a partial quantum: rem 1 -> 2 chars, rem 2 -> 3 chars)."""
    while len(text.encode()) % 3 != rem:
        text = text[:-1] + " }"
    return text


def resigned(key: SigningKey, where: str, change: Callable[[str], str], rem: int = 1,
             body: str | None = None) -> str:
    """A token whose ``where`` segment went through ``change``; for header and payload the
    issuer signs the changed text (the signature segment is the one part nobody signs)."""
    head = b64(with_length(HEADER, rem).encode())
    body = b64(with_length(body or json.dumps(claims()), rem).encode())
    if where == "header":
        head = change(head)
    elif where == "payload":
        body = change(body)
    token = signed(key, head, body)
    if where == "signature":
        h, b, sig = token.split(".")
        token = f"{h}.{b}.{change(sig)}"
    return token


def noncanonical(seg: str) -> str:
    """The same bytes, spelled differently: set an unused low bit of the last character."""
    assert len(seg) % 4 in (2, 3)
    return seg[:-1] + ALPHABET[ALPHABET.index(seg[-1]) | 1]


def decode(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def test_a_well_formed_token_is_accepted(keys: dict[str, SigningKey]) -> None:
    auth, _ = make(keys)
    assert auth.authenticate(resigned(keys["ES256"], "header", lambda s: s)).principal == "alice"


# --- RFC 7515 §7.1 / RFC 7519 §7.2 step 1: three segments, two dots ----------------------
# (already enforced before this change)


def test_exactly_three_segments(keys: dict[str, SigningKey]) -> None:
    """(Already enforced.)"""
    token = mint(keys["ES256"])
    head, body, sig = token.split(".")
    auth, _ = make(keys)
    for text in ("", ".", "..", "...", head, f"{head}.{body}", f"{head}..{sig}", f".{body}.{sig}",
                 f"{token}.", f"{token}.{sig}", f"{head}.{body}.{sig}.{sig}.{sig}",
                 f"{head}.{body}..{sig}"):
        with pytest.raises(JwtError) as info:
            auth.authenticate(text)
        assert info.value.reason in {"malformed", "no_signature"}, text


def test_an_empty_signature_is_an_unsigned_token(keys: dict[str, SigningKey]) -> None:
    head, body, _ = mint(keys["ES256"]).split(".")
    assert refused(make(keys)[0], f"{head}.{body}.").reason == "no_signature"


# --- RFC 7515 §2: base64url, no padding, no other characters, canonical ------------------


@pytest.mark.parametrize("where", WHERE)
def test_no_padding_in_any_segment(keys: dict[str, SigningKey], where: str) -> None:
    """Two forms: ``xx`` and ``xx==`` decode alike. (Signature: accepted before this change.)"""
    token = resigned(keys["ES256"], where, lambda s: s + "=" * (-len(s) % 4))
    assert refused(make(keys)[0], token).reason == "malformed"


@pytest.mark.parametrize("where", WHERE)
def test_no_standard_base64_alphabet(keys: dict[str, SigningKey], where: str) -> None:
    """Two forms: ``-``/``_`` and ``+``/``/`` decode alike. (Signature: accepted before.)"""
    key, index = keys["ES256"], WHERE.index(where)
    # "???" encodes as "Pz8_" at one of three alignments; a signature holds '-' or '_' within
    # a few tries (each of its 86 characters is one of them with probability 1/32).
    for attempt in range(64):
        pad = " " * (attempt % 3)
        head = b64(f'{{"alg":"ES256","kid":"ec-256","q":"???"{pad}}}'.encode())
        body = b64((json.dumps(claims(jti=str(attempt)))[:-1] + f', "q": "???"{pad}}}').encode())
        parts = signed(key, head, body).split(".")
        if "-" in parts[index] or "_" in parts[index]:
            break
    else:
        raise AssertionError("no '-' or '_' in 64 tries")
    std = parts[index].translate(str.maketrans("-_", "+/"))
    assert decode(parts[index]) == base64.b64decode(std + "=" * (-len(std) % 4))
    parts[index] = std
    token = ".".join(parts) if where == "signature" else signed(key, parts[0], parts[1])
    assert refused(make(keys)[0], token).reason == "malformed"


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("junk", [" ", "\n", "\r\n", "\t", "\x00", "~", "%", "!", "é", "\x85", "\xa0"])
def test_no_whitespace_line_breaks_or_other_characters(keys: dict[str, SigningKey], where: str,
                                                       junk: str) -> None:
    """In the middle and at the end of each segment (``$`` in a regex matches before a final
    newline). (Signature with whitespace: accepted before this change.)"""
    auth, _ = make(keys)
    for place in ("middle", "end"):
        def change(s: str) -> str:
            return s[:8] + junk + s[8:] if place == "middle" else s + junk
        token = resigned(keys["ES256"], where, change)
        with pytest.raises(JwtError) as info:
            auth.authenticate(token)
        assert info.value.reason == "malformed", (place, info.value.description)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_a_length_of_one_modulo_four_is_refused(keys: dict[str, SigningKey], where: str) -> None:
    """No base64 text has 4k+1 characters. (Already enforced.)"""
    token = resigned(keys["ES256"], where, lambda s: s + "A")
    assert refused(make(keys)[0], token).reason == "malformed"


@pytest.mark.parametrize(("where", "rem"), [("header", 1), ("header", 2), ("payload", 1),
                                           ("payload", 2), ("signature", 1)])
def test_non_canonical_last_character_is_refused(keys: dict[str, SigningKey], where: str,
                                                 rem: int) -> None:
    """Two forms: with 4 (or 2) unused bits in the last character, 16 (or 4) texts decode to
    the same bytes; only the one with zero bits is base64url. A third party can re-spell the
    signature of any token without the key (an ES256 signature, 64 bytes, always ends with 4
    unused bits). (All three accepted before this change.)"""
    original = resigned(keys["ES256"], where, lambda s: s, rem)
    index = WHERE.index(where)
    parts = original.split(".")
    parts[index] = noncanonical(parts[index])
    token = ".".join(parts) if where == "signature" else signed(keys["ES256"], parts[0], parts[1])
    assert decode(token.split(".")[index]) == decode(original.split(".")[index])
    assert token != original
    auth, _ = make(keys)
    assert auth.authenticate(original)
    error = refused(auth, token)
    assert (error.reason, error.description) == ("malformed", f"non-canonical base64url in token {where}")


# --- RFC 7519 §7.2 steps 3-5 and 10: UTF-8 JSON objects, unique members ------------------


@pytest.mark.parametrize("where", ["header", "payload"])
@pytest.mark.parametrize("data", [b'{"alg":"ES256","kid":"\xff"}', b"\xef\xbb\xbf{}",
                                  b'{"alg":"ES256","kid":"\xed\xa0\x80"}'])
def test_segments_are_utf8(keys: dict[str, SigningKey], where: str, data: bytes) -> None:
    """Invalid UTF-8, a byte-order mark, a CESU-encoded surrogate. (Already enforced.)"""
    text = b64(data)
    head, body = (text, b64(json.dumps(claims()).encode())) if where == "header" \
        else (b64(HEADER.encode()), text)
    assert refused(make(keys)[0], signed(keys["ES256"], head, body)).reason == "malformed"


@pytest.mark.parametrize("where", ["header", "payload"])
@pytest.mark.parametrize("text", ["[1]", '"x"', "1", "null", "", "{} {}", '{"a":NaN}',
                                  '{"a":Infinity}'])
def test_segments_are_json_objects(keys: dict[str, SigningKey], where: str, text: str) -> None:
    """(Already enforced.)"""
    head, body = (b64(text.encode()), b64(json.dumps(claims()).encode())) if where == "header" \
        else (b64(HEADER.encode()), b64(text.encode()))
    assert refused(make(keys)[0], signed(keys["ES256"], head, body)).reason == "malformed"


@pytest.mark.parametrize("where", ["header", "payload"])
def test_duplicate_member_names_even_when_spelled_differently(keys: dict[str, SigningKey],
                                                              where: str) -> None:
    """RFC 7515 §4 / RFC 7519 §4: ``"alg"`` and ``"\\u0061lg"`` are the same name. (Already
    enforced: the strict decoder compares decoded names.)"""
    head = '{"alg":"ES256","kid":"ec-256","\\u0061lg":"none"}' if where == "header" else HEADER
    body = json.dumps(claims())
    if where == "payload":
        body = body[:-1] + ', "\\u0073ub": "admin"}'
    token = signed(keys["ES256"], b64(head.encode()), b64(body.encode()))
    assert refused(make(keys)[0], token).reason == "duplicate"


@pytest.mark.parametrize("where", ["header", "payload"])
def test_strings_are_unicode_no_unpaired_surrogates(keys: dict[str, SigningKey],
                                                    where: str) -> None:
    """``"\\ud800"`` is valid JSON grammar but not text (RFC 8259 §8.2); readers turn it into
    different strings. (Accepted before this change.)"""
    head = '{"alg":"ES256","kid":"ec-256","x":"\\ud800"}' if where == "header" else HEADER
    body = json.dumps(claims(name="\ud800x"))  # json.dumps escapes it as "\ud800"
    if where == "header":
        body = json.dumps(claims())
    token = signed(keys["ES256"], b64(head.encode()), b64(body.encode()))
    error = refused(make(keys)[0], token)
    assert (error.reason, error.description) == ("malformed", f"token {where} is not valid Unicode")


# --- RFC 7515 §4.1: header parameters ------------------------------------------------------


def test_unsecured_alg_none_is_refused(keys: dict[str, SigningKey]) -> None:
    """RFC 7519 §6. (Already enforced.)"""
    body = b64(json.dumps(claims()).encode())
    for alg in ("none", "NONE", "nOnE"):
        head = b64(json.dumps({"alg": alg}).encode())
        assert refused(make(keys)[0], f"{head}.{body}.c2ln").reason == "alg_none"


def test_missing_or_non_string_alg_is_refused(keys: dict[str, SigningKey]) -> None:
    """RFC 7515 §4.1.1: alg is REQUIRED, a case-sensitive string. (Already enforced.)"""
    for head in ('{"kid":"ec-256"}', '{"alg":["ES256"],"kid":"ec-256"}', '{"alg":"es256","kid":"ec-256"}'):
        token = signed(keys["ES256"], b64(head.encode()), b64(json.dumps(claims()).encode()))
        assert refused(make(keys)[0], token).reason in {"malformed", "alg_not_allowed"}


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "b64", None])
def test_any_crit_is_refused(keys: dict[str, SigningKey], crit: Any) -> None:
    """RFC 7515 §4.1.11: we understand no extension, so every ``crit`` (even RFC 7797's
    ``b64``, even malformed) is refused. (Already enforced.)"""
    head = json.dumps({"alg": "ES256", "kid": "ec-256", "crit": crit, "b64": True, "exp": 1})
    token = signed(keys["ES256"], b64(head.encode()), b64(json.dumps(claims()).encode()))
    assert refused(make(keys)[0], token).reason == "crit"


@pytest.mark.parametrize("typ", [1, None, ["JWT"], {"t": "JWT"}, True])
def test_typ_when_present_is_a_string(keys: dict[str, SigningKey], typ: Any) -> None:
    """RFC 7515 §4.1.9: a media type string, even when the provider requires none.
    (Accepted before this change.)"""
    head = json.dumps({"alg": "ES256", "kid": "ec-256", "typ": typ})
    token = signed(keys["ES256"], b64(head.encode()), b64(json.dumps(claims()).encode()))
    assert refused(make(keys)[0], token).reason == "malformed"
    assert make(keys)[0].authenticate(mint(keys["ES256"], headers={"typ": "JWT"}))


@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/JWT"])
def test_a_nested_jwt_is_refused(keys: dict[str, SigningKey], cty: str) -> None:
    """RFC 7519 §7.2 step 8: ``cty: JWT`` means the payload is another token; we do not unwrap
    nested tokens. (Accepted before this change when the payload was JSON.)"""
    token = mint(keys["ES256"], headers={"cty": cty})
    assert refused(make(keys)[0], token).reason == "nested"
    head = json.dumps({"alg": "ES256", "kid": "ec-256", "cty": 5})
    token = signed(keys["ES256"], b64(head.encode()), b64(json.dumps(claims()).encode()))
    assert refused(make(keys)[0], token).reason == "malformed"


def test_a_jwe_is_refused(keys: dict[str, SigningKey]) -> None:
    """RFC 7519 §7.2 step 6: a header with ``enc`` is a JWE; five segments too.
    (Three segments with ``enc``: accepted before this change.)"""
    token = mint(keys["ES256"], headers={"enc": "A256GCM"})
    assert refused(make(keys)[0], token).reason == "encrypted"
    jwe = ".".join(b64(x) for x in (b'{"alg":"RSA-OAEP","enc":"A256GCM"}', b"k", b"iv", b"ct", b"tag"))
    assert refused(make(keys)[0], jwe).reason == "malformed"


def test_the_json_serialization_is_not_accepted(keys: dict[str, SigningKey]) -> None:
    """RFC 7515 §7.2: only the compact form is a bearer token. (Already enforced.)"""
    head, body, sig = mint(keys["ES256"]).split(".")
    general = json.dumps({"payload": body, "signatures": [{"protected": head, "signature": sig}]})
    flattened = json.dumps({"payload": body, "protected": head, "signature": sig})
    dotted = '{"protected":"%s","payload":"%s","signature":"%s"}' % (head, body, sig)
    for text in (general, flattened, dotted, f"{head}.{body}.{sig}".replace(".", ". ")):
        assert refused(make(keys)[0], text).reason == "malformed"


# --- RFC 7519 §2: NumericDate --------------------------------------------------------------


@pytest.mark.parametrize("exp", ["1e400", "-1e400", "1" + "0" * 400])
def test_time_claims_are_finite_numbers(keys: dict[str, SigningKey], exp: str) -> None:
    """``1e400`` parses as infinity, a token that never expires; a 401-digit integer made
    ``float()`` raise OverflowError out of the verifier. (Both got past the checks before.)"""
    body = json.dumps(claims())[:-1] + f', "nbf": {exp}}}'
    body2 = json.dumps(claims(exp=None))[:-1] + f', "exp": {exp}}}'
    for text in (body, body2):
        token = signed(keys["ES256"], b64(HEADER.encode()), b64(text.encode()))
        assert refused(make(keys)[0], token).reason == "time_type"


def test_exp_of_1e400_does_not_make_a_token_immortal(keys: dict[str, SigningKey]) -> None:
    body = json.dumps(claims(exp=None))[:-1] + ', "exp": 1e400}'
    token = signed(keys["ES256"], b64(HEADER.encode()), b64(body.encode()))
    assert parse_token(token, 8192).payload["exp"] == float("inf")  # what the JSON says
    assert refused(make(keys)[0], token).reason == "time_type"


# --- where the token is read (RFC 6750 §2) ------------------------------------------------


@pytest.mark.parametrize("wrap", [b"\x0b", b"\x0c"])
def test_header_token_loses_only_optional_whitespace(keys: dict[str, SigningKey],
                                                     wrap: bytes) -> None:
    """SP and HTAB around the token are HTTP's; VT and FF are not whitespace there.
    (Stripped before this change, so the wrapped text was accepted.)"""
    token = mint(keys["ES256"])
    specs = header_specs([TokenHeader("authorization", "Bearer ")])
    ok = extract_token(request(headers=[(b"authorization", b"Bearer \t" + token.encode() + b" ")]), specs)
    assert ok is not None and ok.token == token
    found = extract_token(request(headers=[(b"authorization", b"Bearer " + wrap + token.encode() + wrap)]), specs)
    assert found is not None and found.token != token
    assert refused(make(keys)[0], found.token).reason == "malformed"


@pytest.mark.parametrize("wrap", ["%0A", "%20", "%C2%A0", "%1C", "+"])
def test_query_token_is_taken_as_sent(keys: dict[str, SigningKey], wrap: str) -> None:
    """A percent-encoded line break, space or NBSP around ``access_token`` is part of what
    was sent. (Stripped before this change.)"""
    token = mint(keys["ES256"])
    target = f"/orders?access_token={wrap}{token}{wrap}".encode()
    found = extract_token(request(target=target), (), ("access_token",))
    assert found is not None and found.token != token
    assert refused(make(keys)[0], found.token).reason == "malformed"
