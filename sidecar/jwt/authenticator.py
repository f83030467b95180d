"""From a token string to a ``VerifiedToken``: pick the provider by issuer, verify, cache.

A service may accept several providers; the token's (unverified) ``iss`` picks the one
whose checks apply, and that provider's verifier then checks everything, ``iss`` included.
Verifications are cached in a bounded LRU keyed by the token string: an entry is used
only while the token is unexpired (with the provider's leeway) and its provider's key set
is the one it was verified under, so a key leaving the set ends its tokens at once.
Synchronous, no I/O: runs on the hot path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from .verifier import JwtError, VerifiedToken, Verifier, parse_token

__all__ = ["Authenticator"]


class Authenticator:
    def __init__(self, verifiers: Mapping[str, Verifier], *, cache_size: int = 1024,
                 wall: Callable[[], float] = time.time) -> None:
        self._by_issuer = {v.provider.issuer: v for v in verifiers.values()}
        self._max_size = max((v.provider.max_token_size for v in verifiers.values()), default=0)
        self._cache: OrderedDict[str, tuple[VerifiedToken, Verifier, int]] = OrderedDict()
        self.cache_size = cache_size
        self.wall = wall
        self.hits = 0
        self.misses = 0

    def authenticate(self, token: str) -> VerifiedToken:
        """The verified token, or ``JwtError``."""
        entry = self._cache.get(token)
        if entry is not None:
            verified, cached_by, version = entry
            if (version == cached_by.jwks.version
                    and self.wall() <= verified.exp + cached_by.provider.leeway):
                self._cache.move_to_end(token)
                self.hits += 1
                return verified
            del self._cache[token]
        self.misses += 1
        parsed = parse_token(token, self._max_size)
        iss = parsed.payload.get("iss")
        verifier: Verifier | None = self._by_issuer.get(iss) if isinstance(iss, str) else None
        if verifier is None:
            raise JwtError("wrong issuer", "iss")
        if len(token) > verifier.provider.max_token_size:
            raise JwtError("token too large", "too_large")
        version = verifier.jwks.version  # read before verifying: a swap mid-way is safe
        verified = verifier.verify(parsed)
        if self.cache_size:
            self._cache[token] = (verified, verifier, version)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return verified

    def __len__(self) -> int:
        return len(self._cache)
