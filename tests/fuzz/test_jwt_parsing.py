"""Property tests of JWT parsing (issue 12): a token has exactly one accepted textual form.

For any text, ``parse_token`` refuses with ``JwtError`` or returns objects whose segments
were canonical base64url (re-encoding each gives the same text); and any edit of a valid,
signed token (a character replaced, inserted or deleted anywhere) is refused, never crashes
and never verifies, so a token cannot be re-spelled by anyone without the issuer's key.
"""

from __future__ import annotations

import base64

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from sidecar.jwt.verifier import JwtError, parse_token
from tests.unit.policy.conftest import NOW, SigningKey, _public_jwk, claims
from tests.unit.policy.test_jwt_verifier import make

from .settings import fuzz_settings

_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_EDIT_CHARS = _B64URL + "=+/. \n\t\x00%~é"
# Keys made once (module scope): hypothesis runs many examples per test function.
_KEY = ec.generate_private_key(ec.SECP256R1())
_SIGNING = SigningKey("ec-256", "ES256", _KEY, _public_jwk("ES256", _KEY, "ec-256"))
_KEYS = {name: _SIGNING for name in ("RS256", "ES256", "ES384", "EdDSA")}
_TOKEN = jwt.encode(claims(), _KEY, algorithm="ES256", headers={"kid": "ec-256"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments() -> st.SearchStrategy[str]:
    return st.text(alphabet=_EDIT_CHARS, max_size=24)


@fuzz_settings(300)
@given(st.one_of(
    st.text(max_size=80),
    st.lists(_segments(), min_size=1, max_size=4).map(".".join),
    st.builds(lambda h, p, s: f"{_b64(h)}.{_b64(p)}.{s}",
              st.sampled_from([b'{"alg":"ES256"}', b'{"alg":"none"}', b"{}", b"[]", b'{"a":1e400}',
                               b'{"enc":"A128GCM","alg":"ES256"}', b'{"cty":"JWT","alg":"ES256"}']),
              st.sampled_from([b"{}", b'{"exp":1}', b'{"exp":1e999}', b'{"sub":"\\ud800"}']),
              _segments())))
def test_parse_token_refuses_or_reads_canonical_segments(text: str) -> None:
    try:
        parsed = parse_token(text, 8192)
    except JwtError:
        return
    head, body, sig = text.split(".")
    for seg in (head, body, sig):
        assert _b64(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))) == seg
    assert sig and isinstance(parsed.header, dict) and isinstance(parsed.payload, dict)
    assert "enc" not in parsed.header


@fuzz_settings(300)
@given(st.data())
def test_any_edit_of_a_signed_token_is_refused(data: st.DataObject) -> None:
    auth, _ = make(_KEYS)
    assert auth.authenticate(_TOKEN).principal == "alice"
    token = _TOKEN
    for _ in range(data.draw(st.integers(1, 2))):
        at = data.draw(st.integers(0, len(token)))
        what = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        char = data.draw(st.sampled_from(_EDIT_CHARS))
        if what == "insert" or at == len(token):
            token = token[:at] + char + token[at:]
        elif what == "delete":
            token = token[:at] + token[at + 1:]
        else:
            token = token[:at] + char + token[at + 1:]
    if token == _TOKEN:
        return
    with pytest.raises(JwtError):
        auth.authenticate(token)


def test_the_fixture_token_is_valid_now() -> None:
    """The property above is vacuous unless the unedited token verifies at the test clock."""
    assert make(_KEYS)[0].authenticate(_TOKEN).exp > NOW
