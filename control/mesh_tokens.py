"""The mesh token signing keys: made here, rotated here, sent with the snapshots.

The operator opts in with a ``mesh_tokens:`` section in the applied mesh (issuer, ttl,
header, and ``gateways``: the services whose gateways mint). Every sidecar's snapshot then
gets that section with ``keys`` (the public JWKs of every key still verifying) filled in;
only the snapshots of the services named in ``gateways`` also get ``signing_key`` (the
current private key). Whatever ``keys``/``signing_key`` the operator wrote is replaced.

Why ``gateways`` in the config and not the ``mode`` a sidecar announces in its hello: a
hello is the sidecar's own claim, while the service is proven by its certificate; a
compromised sidecar of any service could say "gateway" and walk away with the key that
vouches for every user of the mesh. So the operator names who may mint.

Rotation (``rotate``: on a schedule, every ``rotate_every``): the new key is published in
``keys`` at once but signs only ``publish_delay`` later, once every sidecar has had the push
that carries it; the old key stays in ``keys`` until every token it signed has expired
(its last token's life: ttl + leeway, plus the publish delay for a gateway still on the old
snapshot), then it is dropped. The ring lives in the store (``mesh_tokens/keys``, written
with a revision check so two replicas never make two rings); the pusher reads the in-memory
copy, so building a snapshot stays synchronous and does no I/O.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control.store import Conflict, Store
from sidecar.config.reader import parse_duration

__all__ = ["KeyRing", "MeshTokenKeys", "RingKey", "new_key"]

log = structlog.get_logger("pake.control.mesh_tokens")

STORE_KEY = "mesh_tokens/keys"
DEFAULT_TTL = 60.0
DEFAULT_LEEWAY = 5.0


@dataclass(frozen=True, slots=True)
class RingKey:
    kid: str
    pem: str = field(repr=False)  # PKCS#8, the secret: never logged, only in gateway snapshots
    jwk: Mapping[str, str]  # the public half
    signs_from: float  # wall time from which the gateways sign with it
    drop_at: float | None = None  # wall time after which no token it signed is valid

    def to_json(self) -> dict[str, Any]:
        return {"kid": self.kid, "pem": self.pem, "jwk": dict(self.jwk),
                "signs_from": self.signs_from, "drop_at": self.drop_at}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RingKey:
        return cls(kid=raw["kid"], pem=raw["pem"], jwk=raw["jwk"],
                   signs_from=float(raw["signs_from"]),
                   drop_at=None if raw.get("drop_at") is None else float(raw["drop_at"]))


def _b64(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()


def new_key(signs_from: float) -> RingKey:
    """A fresh EC P-256 key (ES256) with a random kid."""
    private = ec.generate_private_key(ec.SECP256R1())
    numbers = private.public_key().public_numbers()
    kid = f"mt-{secrets.token_hex(6)}"
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    jwk = {"kty": "EC", "crv": "P-256", "kid": kid, "x": _b64(numbers.x), "y": _b64(numbers.y)}
    return RingKey(kid=kid, pem=pem, jwk=jwk, signs_from=signs_from)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys at one moment. Pure: every question takes ``now``."""

    keys: tuple[RingKey, ...] = ()

    def signer(self, now: float) -> RingKey | None:
        """The newest key already allowed to sign."""
        ready = [k for k in self.keys if k.signs_from <= now and (k.drop_at is None or now < k.drop_at)]
        return max(ready, key=lambda k: k.signs_from, default=None)

    def published(self, now: float) -> tuple[RingKey, ...]:
        return tuple(k for k in self.keys if k.drop_at is None or now < k.drop_at)

    def rotated(self, now: float, *, publish_delay: float, token_life: float) -> KeyRing:
        """A new key that signs from ``now + publish_delay``; the keys signing until then are
        dropped once their last token has expired."""
        new = new_key(now + publish_delay)
        retire = new.signs_from + token_life
        kept = tuple(k if k.drop_at is not None else replace(k, drop_at=retire)
                     for k in self.published(now))
        return KeyRing((*kept, new))

    def next_change(self, now: float) -> float | None:
        """When the snapshot content changes next on its own (a key starts signing or goes)."""
        times = [t for k in self.keys for t in (k.signs_from, k.drop_at)
                 if t is not None and t > now]
        return min(times, default=None)

    def section(self, applied: Mapping[str, Any], service: str, now: float) -> dict[str, Any]:
        """The ``mesh_tokens`` section of ``service``'s snapshot."""
        out = {k: v for k, v in applied.items() if k not in ("keys", "signing_key")}
        out["keys"] = [dict(k.jwk) for k in self.published(now)]
        signer = self.signer(now)
        gateways = applied.get("gateways") or ()
        if signer is not None and isinstance(gateways, list) and service in gateways:
            out["signing_key"] = {"kid": signer.kid, "pem": signer.pem}
        return out

    def to_json(self) -> bytes:
        return json.dumps({"keys": [k.to_json() for k in self.keys]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> KeyRing:
        return cls(tuple(RingKey.from_json(k) for k in json.loads(data)["keys"]))


def token_life(section: Mapping[str, Any] | None) -> float:
    """How long a token may be honoured: its ttl plus the verifiers' leeway."""
    section = section or {}
    try:
        ttl = parse_duration(section.get("ttl", DEFAULT_TTL))
        leeway = parse_duration(section.get("leeway", DEFAULT_LEEWAY))
    except ValueError:  # validated at apply; a default keeps the old key longer, never shorter
        return 3600.0
    return ttl + leeway


class MeshTokenKeys:
    """The ring in the store, a copy in memory for the pusher, and the rotation schedule."""

    def __init__(self, store: Store, *, on_change: Callable[[], None],
                 applied: Callable[[], Mapping[str, Any] | None] = lambda: None,
                 wall: Callable[[], float] = time.time, publish_delay: float = 10.0,
                 rotate_every: float = 24 * 3600.0) -> None:
        self.store = store
        self.on_change = on_change  # marks the pusher dirty
        self.applied = applied  # the applied mesh's mesh_tokens section, if any
        self.wall = wall
        self.publish_delay = publish_delay
        self.rotate_every = rotate_every
        self.ring = KeyRing()
        self._revision = 0

    async def load(self) -> KeyRing:
        """Read the ring; make the first key when there is none (it signs at once: no token
        exists yet that a verifier might lack the key for)."""
        entry = await self.store.get(STORE_KEY)
        if entry is None:
            first = KeyRing((new_key(self.wall()),))
            try:
                self._revision = await self.store.put(STORE_KEY, first.to_json(), expect=0)
                self.ring = first
                log.info("mesh_token_key_created", kid=first.keys[0].kid)
                return self.ring
            except Conflict:  # another replica made it first: use theirs
                entry = await self.store.get(STORE_KEY)
                assert entry is not None
        self.ring, self._revision = KeyRing.from_json(entry.value), entry.revision
        return self.ring

    async def rotate(self) -> KeyRing:
        """A new key now (see the module doc for when it signs and when the old one goes)."""
        while True:
            await self.load()
            now = self.wall()
            ring = self.ring.rotated(now, publish_delay=self.publish_delay,
                                     token_life=token_life(self.applied()) + self.publish_delay)
            ring = KeyRing(ring.published(now))
            try:
                self._revision = await self.store.put(STORE_KEY, ring.to_json(),
                                                      expect=self._revision)
            except Conflict:
                continue  # another replica rotated meanwhile: rotate on top of theirs
            self.ring = ring
            log.info("mesh_token_key_rotated", kid=ring.keys[-1].kid,
                     signs_from=ring.keys[-1].signs_from)
            self.on_change()
            return ring

    def inject(self, subset: dict[str, Any], service: str) -> dict[str, Any]:
        """``subset`` (one sidecar's mesh) with its ``mesh_tokens`` keys filled in."""
        section = subset.get("mesh_tokens")
        if isinstance(section, Mapping):
            subset["mesh_tokens"] = self.ring.section(section, service, self.wall())
        return subset

    async def run(self) -> None:
        """Rotate on schedule, and push when a key starts signing or is dropped."""
        while True:
            now = self.wall()
            signer = self.ring.signer(now)
            rotate_at = (signer.signs_from if signer else now) + self.rotate_every
            change = self.ring.next_change(now)
            wake = min(rotate_at, change) if change is not None else rotate_at
            await asyncio.sleep(max(0.05, wake - now))
            if self.wall() >= rotate_at:
                await self.rotate()
            else:
                await self.load()  # another replica may have rotated
                self.on_change()
