"""Config dumps without secrets: ``redact()`` for admin ``/config`` and logs.

Pure; knows nothing of the config's shape beyond dataclass fields marked ``secret``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

__all__ = ["REDACTED", "redact"]

REDACTED = "<redacted>"
_SECRET_NAMES = frozenset({"hash", "key", "api_key", "token", "secret", "password",
                           "authorization", "x-api-key", "proxy-authorization", "cookie",
                           "pem", "private_key"})
# A JWT (three base64url parts, header starting '{"') or a configured key hash.
_TOKENISH = re.compile(
    r"^(eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*|sha256:[0-9a-fA-F]{64})$")
# A PEM private key (the mesh token signing key) wherever it appears, under any name.
_PRIVATE_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def redact(obj: Any, _key: str | None = None) -> Any:
    """A JSON-able copy of ``obj`` (config dataclasses, mappings, lists) with every secret
    replaced by ``"<redacted>"``: dataclass fields marked ``secret``, mapping entries named
    like credentials (hash, key, token, pem, authorization...) and strings that look like a
    JWT, a key hash or a PEM private key. Used for ``/config_dump`` and logs; over-redacting
    is the safe mistake."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out[f.name] = REDACTED if f.metadata.get("secret") else redact(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): (REDACTED if str(k).lower() in _SECRET_NAMES and obj[k] is not None
                         and not isinstance(obj[k], (Mapping, bool)) else redact(obj[k]))
                for k in obj}
    if isinstance(obj, (frozenset, set)):
        return sorted(redact(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, bytes):
        return REDACTED
    if isinstance(obj, str):
        return REDACTED if _TOKENISH.match(obj) or _PRIVATE_PEM.search(obj) else obj
    if isinstance(obj, PurePath):
        return str(obj)
    return obj
