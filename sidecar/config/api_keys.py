"""The ``api_keys`` section of the mesh config: named keys, stored as a SHA-256 hash only.

A plain key is refused *without echoing it*, and no error about a hash shows the hash.
Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .reader import ENTRY_NAME, Fields, strings_of

__all__ = ["ApiKey", "parse_api_key", "parse_api_keys"]

_HASH = re.compile(r"^sha256:[0-9a-fA-F]{64}$")


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    # The SHA-256 digest of the key. Not a secret (the key cannot be derived from it), but
    # it is still never shown: it identifies a credential and eases offline guessing.
    hash: bytes = field(repr=False, metadata={"secret": True})
    principal: str = ""
    roles: frozenset[str] = frozenset()



def parse_api_key(name: str, node: Fields) -> ApiKey:
    # Never node.str(...) on a credential: its errors echo the value.
    digest = b""
    if node.has("key") or node.has("api_key"):
        which = "key" if node.has("key") else "api_key"
        node.raw(which)
        node.error(which, "plain API keys are not accepted in config; store "
                          "hash: sha256:<hex of the SHA-256 of the key> instead")
    value = node.raw("hash", None)
    if value is None:
        if not (node.has("key") or node.has("api_key")):
            node.error("hash", "is required (sha256:<64 hex digits>)")
    elif not isinstance(value, str) or not _HASH.match(value):
        length = len(value) if isinstance(value, str) else 0
        node.error("hash", "must be sha256: followed by 64 hex digits, the hash of the key "
                           f"and never the key itself (got {type(value).__name__} of "
                           f"{length} characters; value not shown)")
    else:
        digest = bytes.fromhex(value[len("sha256:"):])
    principal = node.str("principal", name)
    roles = frozenset(strings_of(node, "roles"))
    node.done()
    return ApiKey(name=name, hash=digest, principal=principal or name, roles=roles)


def parse_api_keys(top: Fields) -> dict[str, ApiKey]:
    """The top-level ``api_keys`` map."""
    keys = {}
    seen: dict[bytes, str] = {}
    for name, node in top.items("api_keys"):
        if not ENTRY_NAME.match(name):
            node.problems.add(node.path, f"api key name must match {ENTRY_NAME.pattern}")
            continue
        key = parse_api_key(name, node)
        if key.hash and seen.setdefault(key.hash, name) != name:
            node.error("hash", f"is the same key as {seen[key.hash]!r}")
        keys[name] = key
    return keys
