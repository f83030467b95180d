"""Coverage-guided fuzz target: JWT compact serialization parsing.

The input (latin-1, as the extractor decodes a header) goes to ``parse_token``: only
JwtError may escape, and an accepted token's three segments are canonical base64url.
Run: ``python fuzz/jwt_token.py [-max_total_time=60]``.
"""

from __future__ import annotations

import base64

import _harness  # noqa: F401 - puts the repository on sys.path

from sidecar.jwt.verifier import JwtError, parse_token


def one_input(data: bytes) -> None:
    text = data.decode("latin-1")
    try:
        parse_token(text, 8192)
    except JwtError:
        return
    for seg in text.split("."):
        decoded = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
        assert base64.urlsafe_b64encode(decoded).rstrip(b"=").decode() == seg, seg


if __name__ == "__main__":
    _harness.run(one_input, "jwt")
