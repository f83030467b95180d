"""Join tokens: one service, a lifetime, a number of uses; only a hash of the secret is kept.

A token is redeemed by ``/v1/join``: every refusal has a code and a reason an operator can
act on. Using a token is a store write with ``expect``, so two sidecars racing for the last
use cannot both get it.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from certs.identity import check_service
from control.store import Conflict, Store
from sidecar.discovery.protocol import CONTROL_SERVICE, JoinToken, ProtocolError, hash_secret

__all__ = ["JoinRefused", "TokenRecord", "TokenService"]

_PREFIX = "tokens/"
_RETRIES = 8


class JoinRefused(Exception):
    """A join that is refused; ``code`` for machines, the message for the operator."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    service: str
    secret_sha256: str
    created_at: str
    expires_at: str
    uses: int
    used: int = 0
    revoked: bool = False
    created_by: str = ""

    def public(self, now: datetime) -> dict[str, Any]:
        """What `token list` shows: never the secret's hash."""
        return {
            "id": self.id, "service": self.service, "created_at": self.created_at,
            "expires_at": self.expires_at, "uses": self.uses, "used": self.used,
            "revoked": self.revoked, "created_by": self.created_by, "state": self.state(now),
        }

    def state(self, now: datetime) -> str:
        if self.revoked:
            return "revoked"
        if now >= datetime.fromisoformat(self.expires_at):
            return "expired"
        if self.used >= self.uses:
            return "used up"
        return "valid"


class TokenService:
    def __init__(self, store: Store, ca_fingerprint: Callable[[], str]) -> None:
        self.store = store
        # Asked per token: after a CA rotation new tokens carry the new root's fingerprint.
        self._ca_fingerprint = ca_fingerprint

    @property
    def ca_fingerprint(self) -> str:
        return self._ca_fingerprint()

    async def create(self, service: str, ttl: timedelta, uses: int, by: str,
                     now: datetime | None = None) -> tuple[JoinToken, TokenRecord]:
        check_service(service)
        if service == CONTROL_SERVICE:
            raise ValueError(f"{CONTROL_SERVICE!r} is the control plane's own name")
        if uses < 1 or ttl <= timedelta(0):
            raise ValueError("a token needs a positive ttl and at least one use")
        now = now or datetime.now(UTC)
        token = JoinToken(secrets.token_hex(8), secrets.token_urlsafe(32), self.ca_fingerprint)
        record = TokenRecord(
            id=token.token_id, service=service, secret_sha256=token.secret_hash(),
            created_at=now.isoformat(), expires_at=(now + ttl).isoformat(), uses=uses,
            created_by=by,
        )
        await self.store.put(_PREFIX + record.id, _dump(record), expect=0)
        return token, record

    async def list(self) -> list[TokenRecord]:
        return [_load(e.value) for e in await self.store.list(_PREFIX)]

    async def revoke(self, token_id: str) -> TokenRecord | None:
        for _ in range(_RETRIES):
            entry = await self.store.get(_PREFIX + token_id) if _is_id(token_id) else None
            if entry is None:
                return None
            record = _replace(_load(entry.value), revoked=True)
            try:
                await self.store.put(entry.key, _dump(record), expect=entry.revision)
                return record
            except Conflict:
                continue
        raise JoinRefused("busy", "the token is being changed concurrently; try again")

    async def check(self, text: str, service: str, now: datetime | None = None) -> TokenRecord:
        """The token's record if it may join ``service`` now; JoinRefused otherwise."""
        now = now or datetime.now(UTC)
        try:
            token = JoinToken.parse(text)
        except ProtocolError as exc:
            raise JoinRefused("bad_token", str(exc)) from None
        entry = await self.store.get(_PREFIX + token.token_id)
        record = None if entry is None else _load(entry.value)
        if record is None or not hmac.compare_digest(record.secret_sha256, token.secret_hash()):
            # One answer for "no such id" and "wrong secret": no oracle for guessing ids.
            raise JoinRefused("unknown_token", "the join token is not known to this control plane")
        if record.revoked:
            raise JoinRefused("token_revoked", f"join token {record.id} was revoked")
        if now >= datetime.fromisoformat(record.expires_at):
            raise JoinRefused("token_expired", f"join token {record.id} expired at {record.expires_at}")
        if record.used >= record.uses:
            raise JoinRefused("token_used_up",
                              f"join token {record.id} was already used {record.used} time(s) of {record.uses}")
        if record.service != service:
            raise JoinRefused("token_wrong_service",
                              f"join token {record.id} is for service {record.service!r}, not {service!r}")
        return record

    async def consume(self, text: str, service: str, now: datetime | None = None) -> TokenRecord:
        """Check the token and take one use, atomically against concurrent joins."""
        for _ in range(_RETRIES):
            record = await self.check(text, service, now)
            entry = await self.store.get(_PREFIX + record.id)
            if entry is None or _load(entry.value) != record:
                continue  # changed between check and read: check again
            updated = _replace(record, used=record.used + 1)
            try:
                await self.store.put(entry.key, _dump(updated), expect=entry.revision)
                return updated
            except Conflict:
                continue
        raise JoinRefused("busy", "the token is being used concurrently; try again")


def _is_id(text: str) -> bool:
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def _dump(record: TokenRecord) -> bytes:
    return json.dumps(asdict(record), sort_keys=True).encode()


def _load(data: bytes) -> TokenRecord:
    return TokenRecord(**json.loads(data))


def _replace(record: TokenRecord, **changes: Any) -> TokenRecord:
    return TokenRecord(**{**asdict(record), **changes})
