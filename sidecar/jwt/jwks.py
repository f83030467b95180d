"""Key sets: parsing a JWKS into verification keys, and the cache that keeps one fresh.

``parse_jwks`` keeps only keys fit to verify this provider's tokens: public (no private
members), for signatures (``use`` absent or ``sig``; ``key_ops`` absent or with ``verify``),
asymmetric, of an allowed algorithm that matches the key type, RSA of at least 2048 bits.
Other keys are skipped with a reason that never includes key material.

``JwksCache`` holds the current ``KeySet`` (swapped whole, one assignment) and refreshes it
in its own asyncio task: every ``refresh`` interval, and when a token names an unknown
``kid``. The hot path only *asks* (``request_refetch``: an O(1) flag, no I/O); asks are
honoured at most once per ``min_refetch_interval``, so a flood of made-up kids costs at most
one fetch per interval. A failed fetch keeps the last good set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from certs.tasks import stop_task

from ..clock import Clock
from ..config.jwt_providers import JwtProvider
from ..config.reader import ConfigError
from ..strict_json import strict_json
from .fetch import FetchError, https_get

__all__ = [
    "FileJwksSource",
    "JwksCache",
    "JwksError",
    "JwksKey",
    "JwksSource",
    "KeySet",
    "UriJwksSource",
    "build_jwks_cache",
    "build_jwks_caches",
    "parse_jwks",
]

log = structlog.get_logger("pake.jwt")

MAX_KEYS = 64  # a JWKS holds a handful of keys; more is a mistake or an attack
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})


class JwksError(Exception):
    """A key set that cannot be used at all."""


@dataclass(frozen=True, slots=True)
class JwksKey:
    kid: str | None
    kty: str
    # One prepared PyJWK per algorithm this key may verify: PyJWK binds its algorithm.
    by_alg: Mapping[str, PyJWK] = field(repr=False)

    def for_alg(self, alg: str) -> PyJWK | None:
        return self.by_alg.get(alg)


@dataclass(frozen=True, slots=True)
class KeySet:
    by_kid: Mapping[str, JwksKey] = field(default_factory=dict)
    unnamed: tuple[JwksKey, ...] = ()  # keys without a kid
    skipped: tuple[str, ...] = ()  # why keys were left out (no key material)
    fingerprint: str = ""  # changes iff the usable keys change

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.unnamed)

    def lookup(self, kid: str | None, alg: str) -> JwksKey | None:
        """The key for ``kid``; a token without a kid gets the one key fit for ``alg``, if
        exactly one exists (trying several keys would multiply the cost of a bad token)."""
        if kid is not None:
            return self.by_kid.get(kid)
        fits = [k for k in (*self.by_kid.values(), *self.unnamed) if alg in k.by_alg]
        return fits[0] if len(fits) == 1 else None


def _algorithms_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    kty = jwk.get("kty")
    if kty == "RSA":
        return _RSA_ALGS
    if kty == "EC":
        alg = _EC_ALGS.get(jwk.get("crv", ""))
        return frozenset({alg}) if alg else frozenset()
    if kty == "OKP" and jwk.get("crv") in _OKP_CURVES:
        return frozenset({"EdDSA"})
    return frozenset()


def _key(jwk: Any, allowed: frozenset[str]) -> JwksKey | str:
    """A usable key, or why not (a reason safe to log)."""
    if not isinstance(jwk, dict):
        return "not a JSON object"
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "kid is not a string"
    kty = jwk.get("kty")
    if kty == "oct":
        return "symmetric key (kty oct) in a public key set"
    if any(m in jwk for m in _PRIVATE_MEMBERS):
        return "private key material in a public key set"
    use = jwk.get("use")
    if use is not None and use != "sig":
        return f"use is {use!r}, not 'sig'"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not include 'verify'"
    fits = _algorithms_for(jwk)
    if not fits:
        return f"unsupported key type {kty!r}"
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in fits:
            return f"alg {alg!r} does not match the key type"
        if alg not in allowed:
            return f"alg {alg!r} is not allowed for this provider"
        algs = frozenset({alg})
    else:
        algs = fits & allowed
        if not algs:
            return "no allowed algorithm fits this key type"
    by_alg = {}
    for name in sorted(algs):
        try:
            pyjwk = PyJWK(jwk, algorithm=name)
        except PyJWTError as exc:  # its messages may quote the JWK: log the type only
            return f"unusable key ({type(exc).__name__})"
        too_short = pyjwk.Algorithm.check_key_length(pyjwk.key)
        if too_short:
            return "key too short"
        by_alg[name] = pyjwk
    return JwksKey(kid=kid, kty=str(kty), by_alg=by_alg)


def parse_jwks(data: bytes | str | Mapping[str, Any], algorithms: frozenset[str]) -> KeySet:
    """The usable keys of a JWKS document; ``JwksError`` if none is usable."""
    if isinstance(data, (bytes, str)):
        try:
            doc = strict_json(data)
        except ValueError:
            raise JwksError("not a JSON document") from None
    else:
        doc = data
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError("not a JWKS: expected an object with a 'keys' list")
    if len(doc["keys"]) > MAX_KEYS:
        raise JwksError(f"more than {MAX_KEYS} keys")
    by_kid: dict[str, JwksKey] = {}
    unnamed: list[JwksKey] = []
    skipped: list[str] = []
    usable: list[Any] = []
    for i, jwk in enumerate(doc["keys"]):
        key = _key(jwk, algorithms)
        if isinstance(key, str):
            skipped.append(f"keys[{i}]: {key}")
        elif key.kid is None:
            unnamed.append(key)
            usable.append(jwk)
        elif key.kid in by_kid:
            skipped.append(f"keys[{i}]: duplicate kid")
        else:
            by_kid[key.kid] = key
            usable.append(jwk)
    if not usable:
        raise JwksError("no usable key: " + "; ".join(skipped) if skipped else "no keys")
    fingerprint = hashlib.sha256(
        json.dumps(usable, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return KeySet(by_kid=by_kid, unnamed=tuple(unnamed), skipped=tuple(skipped),
                  fingerprint=fingerprint)


# === sources =============================================================================


class JwksSource(Protocol):
    description: str

    async def fetch(self) -> bytes: ...


class FileJwksSource:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.description = str(path)

    def read(self) -> bytes:
        with self.path.open("rb") as f:
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise JwksError(f"larger than {self.max_bytes} bytes")
        return data

    async def fetch(self) -> bytes:
        return await asyncio.to_thread(self.read)  # file I/O off the event loop


class UriJwksSource:
    def __init__(self, uri: str, *, timeout: float, max_bytes: int,
                 ssl_context: Any = None) -> None:
        self.uri = uri
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.ssl_context = ssl_context
        self.description = uri

    async def fetch(self) -> bytes:
        return await https_get(self.uri, timeout=self.timeout, max_bytes=self.max_bytes,
                               ssl_context=self.ssl_context)


# === the cache ===========================================================================


class JwksCache:
    """The current key set of one provider, kept fresh by ``start()``'s background task.

    ``keyset`` and ``version`` are read by the verifier on every token: ``version`` grows
    each time the usable keys change, which ends every cached verification."""

    def __init__(self, provider: JwtProvider, source: JwksSource, *, clock: Clock,
                 keyset: KeySet | None = None) -> None:
        self.provider = provider
        self.source = source
        self.clock = clock
        self.keyset = keyset or KeySet()
        self.version = 1 if keyset else 0
        # Counters (read by metrics and tests).
        self.fetches = 0
        self.failures = 0
        self.refetch_requests = 0  # unknown kids that triggered a refetch
        self.refetch_suppressed = 0  # unknown kids inside the min interval
        self.refreshed = asyncio.Event()  # set after each fetch attempt; tests wait on it
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last_attempt = float("-inf")
        self._consecutive_failures = 0
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (f"<JwksCache {self.provider.name} [{self.source.description}, "
                f"{len(self.keyset)} keys, version {self.version}]>")

    # --- hot path: no I/O, no awaits ---------------------------------------------------
    def lookup(self, kid: str | None, alg: str) -> JwksKey | None:
        return self.keyset.lookup(kid, alg)

    def request_refetch(self) -> bool:
        """A token named a kid we do not hold: ask the task to refetch, at most once per
        ``min_refetch_interval``. Returns whether this call asked."""
        now = self.clock.monotonic()
        if now - self._last_attempt < self.provider.min_refetch_interval:
            self.refetch_suppressed += 1
            return False
        self._last_attempt = now  # reserve the slot now: the rest of a flood is suppressed
        self.refetch_requests += 1
        self._wake.set()
        return True

    # --- background --------------------------------------------------------------------
    async def refresh(self) -> bool:
        """Fetch and parse once; swap the key set in if it changed. False on failure (the
        last good set stays)."""
        async with self._lock:  # at most one fetch in flight
            self._last_attempt = max(self._last_attempt, self.clock.monotonic())
            self.fetches += 1
            try:
                keyset = parse_jwks(await self.source.fetch(), self.provider.algorithms)
            except Exception as exc:  # noqa: BLE001 - background: keep the task and last set
                # FetchError/JwksError/OSError carry safe messages; anything else is a bug,
                # reported by type so the refresh task survives it.
                known = isinstance(exc, (FetchError, JwksError, OSError))
                self.failures += 1
                self._consecutive_failures += 1
                log.warning("jwks_refresh_failed", provider=self.provider.name,
                            source=self.source.description,
                            error=str(exc) if known else type(exc).__name__,
                            keeping=len(self.keyset))
                return False
            finally:
                self.refreshed.set()
            self._consecutive_failures = 0
            if keyset.skipped:
                log.warning("jwks_keys_skipped", provider=self.provider.name,
                            skipped=list(keyset.skipped))
            if keyset.fingerprint != self.keyset.fingerprint:
                self.keyset = keyset  # one assignment: a verifier sees the old or the new set
                self.version += 1
                log.info("jwks_updated", provider=self.provider.name, version=self.version,
                         kids=sorted(keyset.by_kid), unnamed=len(keyset.unnamed))
            return True

    def _next_delay(self) -> float:
        if self._consecutive_failures:
            # Retry sooner after a failure, with bounded backoff.
            backoff = min(2.0 ** self._consecutive_failures, self.provider.refresh_interval)
            return max(self.provider.min_refetch_interval, backoff)
        return self.provider.refresh_interval

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._next_delay()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.refresh()

    async def start(self) -> None:
        """Load the first key set if there is none yet (bounded by the fetch timeout; a
        failure is logged and retried by the task), then start the refresh task."""
        if self._task is not None:
            return
        if not len(self.keyset):
            await self.refresh()
        self._task = asyncio.create_task(self._run(), name=f"jwks:{self.provider.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)


def build_jwks_cache(provider: JwtProvider, *, clock: Clock, base_dir: Path | None = None,
                     ssl_context: Any = None, path: str = "") -> JwksCache:
    """A cache for ``provider``. A ``jwks_file`` is read now (build time, not the hot path)
    so the filter works before ``start()``; a ``jwks_uri`` is first fetched by ``start()``."""
    where = path or f"jwt_providers.{provider.name}"
    if provider.jwks_file is not None:
        file = Path(provider.jwks_file)
        if base_dir is not None and not file.is_absolute():
            file = base_dir / file
        source = FileJwksSource(file, provider.max_jwks_size)
        try:
            keyset = parse_jwks(source.read(), provider.algorithms)
        except FileNotFoundError:
            raise ConfigError([f"{where}.jwks_file: file not found: {file}"]) from None
        except OSError as exc:
            raise ConfigError([f"{where}.jwks_file: cannot read {file}: {exc.strerror}"]) from None
        except JwksError as exc:
            raise ConfigError([f"{where}.jwks_file: {exc}"]) from None
        return JwksCache(provider, source, clock=clock, keyset=keyset)
    if provider.jwks_uri is None:
        raise ConfigError([f"{where}: exactly one of jwks_file, jwks_uri is required"])
    uri_source = UriJwksSource(provider.jwks_uri, timeout=provider.fetch_timeout,
                               max_bytes=provider.max_jwks_size, ssl_context=ssl_context)
    return JwksCache(provider, uri_source, clock=clock)


def build_jwks_caches(providers: Mapping[str, JwtProvider], *, clock: Clock,
                      base_dir: Path | None = None, ssl_context: Any = None,
                      previous: Mapping[str, JwksCache] | None = None) -> dict[str, JwksCache]:
    """One cache per provider. A cache of ``previous`` whose provider is unchanged is kept,
    so a snapshot swap does not refetch keys (the caller stops the ones not kept)."""
    caches = {}
    for name, provider in providers.items():
        old = (previous or {}).get(name)
        if old is not None and old.provider == provider:
            caches[name] = old
        else:
            caches[name] = build_jwks_cache(provider, clock=clock, base_dir=base_dir,
                                            ssl_context=ssl_context)
    return caches
