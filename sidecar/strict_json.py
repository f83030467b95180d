"""Strict JSON for what comes from outside: token segments, request bodies, JWKS documents and
schema files. One decoder, so every reader refuses the same things.

Refused, as ``ValueError``: duplicate object members (``DuplicateMember``: a duplicate ``alg``
or ``id`` could be read one way by us and another by the app), ``NaN``/``Infinity`` (not
JSON), text that is not UTF-8, and nesting too deep for the parser (``RecursionError`` is
turned into a ``ValueError``, so a hostile ``[[[[...`` is a bad input, not a crash). Pure.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DuplicateMember", "strict_json"]


class DuplicateMember(ValueError):
    """An object names the same member twice."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateMember(f"duplicate member {key[:40]!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constants)


def strict_json(data: bytes | str) -> Any:
    """The document in ``data``; ``ValueError`` (or its ``DuplicateMember``) if it is not
    strict JSON."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
