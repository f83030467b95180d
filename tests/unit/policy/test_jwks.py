"""Key sets: what is kept, rotation through a real fetch, the unknown-kid flood bound,
and the fetch client's refusals."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

from sidecar.config.reader import ConfigError
from sidecar.jwt.authenticator import Authenticator
from sidecar.jwt.fetch import FetchError, https_get
from sidecar.jwt.jwks import JwksCache, JwksError, build_jwks_cache, parse_jwks
from sidecar.jwt.verifier import JwtError, Verifier

from .conftest import NOW, FakeClock, SigningKey, jwks, mint, provider
from .jwks_server import JwksServer, self_signed

ALL = frozenset({"RS256", "PS256", "ES256", "ES384", "EdDSA"})


# === parse_jwks ==========================================================================


def test_parse_keeps_only_fit_keys(keys: dict[str, SigningKey]) -> None:
    rsa_pub = keys["RS256-b"].public_jwk
    doc = jwks(keys["RS256"], keys["ES256"], extra=[
        {**rsa_pub, "kid": "enc", "use": "enc"},
        {**rsa_pub, "kid": "ops", "key_ops": ["encrypt"]},
        {**rsa_pub, "kid": "hs", "alg": "HS256"},
        {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
        {**rsa_pub, "kid": "priv", "d": "AAAA"},
        {**keys["ES256"].public_jwk, "kid": "wrong-type", "alg": "RS256"},
        {**keys["ES256"].public_jwk},  # duplicate kid
        "not an object",
    ])
    keyset = parse_jwks(json.dumps(doc), ALL)
    assert sorted(keyset.by_kid) == ["ec-256", "rsa-1"]
    reasons = " ".join(keyset.skipped)
    for why in ("use is 'enc'", "key_ops", "HS256", "symmetric", "private key material",
                "does not match the key type", "duplicate kid", "not a JSON object"):
        assert why in reasons
    assert "AAAA" not in reasons and "c2VjcmV0" not in reasons  # never key material


def test_parse_refuses_a_document_with_duplicate_members(keys: dict[str, SigningKey]) -> None:
    """The same strict JSON as tokens and bodies: a key whose ``kty`` is named twice could be
    read as either key type, so the document is refused whole."""
    key = json.dumps(keys["ES256"].public_jwk)
    twice = key[:-1] + ', "kty": "RSA"}'
    with pytest.raises(JwksError, match="not a JSON document"):
        parse_jwks('{"keys": [' + twice + "]}", ALL)
    with pytest.raises(JwksError, match="not a JSON document"):
        parse_jwks('{"keys": [' + "[" * 2000 + "]" * 2000 + "]}", ALL)


def test_parse_rsa_without_alg_serves_every_allowed_rsa_alg(keys: dict[str, SigningKey]) -> None:
    jwk = {k: v for k, v in keys["RS256"].public_jwk.items() if k != "alg"}
    keyset = parse_jwks({"keys": [jwk]}, frozenset({"RS256", "PS256", "ES256"}))
    assert sorted(keyset.by_kid["rsa-1"].by_alg) == ["PS256", "RS256"]


def test_parse_refuses_short_rsa_and_useless_documents() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    small = json.loads(RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()))
    with pytest.raises(JwksError, match="key too short"):
        parse_jwks({"keys": [small]}, ALL)
    for bad in (b"not json", b"[]", b'{"keys": {}}', b'{"keys": []}'):
        with pytest.raises(JwksError):
            parse_jwks(bad, ALL)
    with pytest.raises(JwksError, match="more than"):
        parse_jwks({"keys": [{}] * 65}, ALL)


def test_file_source_read_at_build(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys["ES256"])))
    p = provider(jwks_uri=None, jwks_file="jwks.json")
    cache = build_jwks_cache(p, clock=FakeClock(), base_dir=tmp_path)
    assert sorted(cache.keyset.by_kid) == ["ec-256"] and cache.version == 1
    with pytest.raises(ConfigError, match=r"jwt_providers\.pake\.jwks_file: file not found"):
        build_jwks_cache(provider(jwks_uri=None, jwks_file="nope.json"), clock=FakeClock(),
                         base_dir=tmp_path)


# === the cache against a real server =====================================================


def _auth(cache: JwksCache) -> Authenticator:
    p = cache.provider
    return Authenticator({p.name: Verifier(p, cache, wall=lambda: NOW)}, wall=lambda: NOW)


async def _wait_refresh(cache: JwksCache) -> None:
    await asyncio.wait_for(cache.refreshed.wait(), 5)
    cache.refreshed.clear()


async def test_rotation_new_key_served_old_tokens_valid_until_removed(
        keys: dict[str, SigningKey]) -> None:
    old, new = keys["RS256"], keys["ES256"]
    clock = FakeClock()
    async with JwksServer() as server:
        server.serve(jwks(old))
        cache = build_jwks_cache(provider(jwks_uri=server.url, refresh_interval=3600),
                                 clock=clock)
        await cache.start()
        try:
            auth = _auth(cache)
            old_token, new_token = mint(old), mint(new)
            assert auth.authenticate(old_token).kid == "rsa-1"

            server.serve(jwks(old, new))  # the issuer publishes the new key first
            clock.advance(cache.provider.min_refetch_interval)
            cache.refreshed.clear()
            with pytest.raises(JwtError, match="unknown signing key"):
                auth.authenticate(new_token)  # refused now; the refetch is scheduled
            await _wait_refresh(cache)
            assert auth.authenticate(new_token).kid == "ec-256"
            assert auth.authenticate(old_token).kid == "rsa-1"  # both keys in the set

            server.serve(jwks(new))  # the old key leaves the set
            assert await cache.refresh()
            with pytest.raises(JwtError, match="unknown signing key"):
                auth.authenticate(old_token)  # even though it was cached
            assert auth.authenticate(new_token).kid == "ec-256"
            assert server.requests == 3
        finally:
            await cache.stop()


async def test_unknown_kid_flood_fetches_at_most_once_per_interval(
        keys: dict[str, SigningKey]) -> None:
    clock = FakeClock()
    async with JwksServer() as server:
        server.serve(jwks(keys["ES256"]))
        cache = build_jwks_cache(provider(jwks_uri=server.url, refresh_interval=3600,
                                          min_refetch_interval=30), clock=clock)
        await cache.start()
        try:
            assert server.requests == 1
            auth = _auth(cache)

            async def flood(n: int) -> None:
                for _ in range(n):
                    token = mint(keys["ES256"], headers={"kid": secrets.token_hex(8)})
                    with pytest.raises(JwtError):
                        auth.authenticate(token)

            await flood(200)  # inside the interval after the initial fetch: no refetch
            for _ in range(5):
                await asyncio.sleep(0)
            assert server.requests == 1

            clock.advance(30)
            cache.refreshed.clear()
            await flood(500)
            await _wait_refresh(cache)
            assert server.requests == 2
            assert cache.refetch_requests == 1
            assert cache.refetch_suppressed == 699

            clock.advance(29)
            await flood(200)
            for _ in range(5):
                await asyncio.sleep(0)
            assert server.requests == 2
            clock.advance(1)
            await flood(1)
            await _wait_refresh(cache)
            assert server.requests == 3
        finally:
            await cache.stop()


async def test_failed_refresh_keeps_last_good_set(keys: dict[str, SigningKey]) -> None:
    async with JwksServer() as server:
        server.serve(jwks(keys["ES256"]))
        cache = build_jwks_cache(provider(jwks_uri=server.url), clock=FakeClock())
        assert await cache.refresh()
        server.status = b"500 Internal Server Error"
        assert not await cache.refresh()
        server.status = b"200 OK"
        server.body = b'{"keys": [{"kty": "oct", "k": "AAAA"}]}'
        assert not await cache.refresh()
        assert sorted(cache.keyset.by_kid) == ["ec-256"] and cache.version == 1
        assert cache.failures == 2


async def test_start_without_server_does_not_raise(keys: dict[str, SigningKey]) -> None:
    cache = build_jwks_cache(provider(jwks_uri="http://127.0.0.1:9/jwks.json",
                                      fetch_timeout=1.0), clock=FakeClock())
    await cache.start()
    assert len(cache.keyset) == 0 and cache.failures == 1
    await cache.stop()
    await cache.stop()


# === fetch ===============================================================================


async def test_fetch_over_https(tmp_path: Path) -> None:
    server_ctx, client_ctx = self_signed(tmp_path)
    async with JwksServer(server_ctx) as server:
        server.serve({"keys": []})
        body = await https_get(server.url, timeout=5, max_bytes=1024, ssl_context=client_ctx)
        assert json.loads(body) == {"keys": []}
        with pytest.raises(FetchError):  # the system trust store does not know this cert
            await https_get(server.url, timeout=5, max_bytes=1024)


@pytest.mark.parametrize("url", ["http://203.0.113.9/jwks.json", "ftp://127.0.0.1/x",
                                 "https:///nohost"])
async def test_fetch_refuses_clear_text_off_loopback(url: str) -> None:
    with pytest.raises(FetchError):
        await https_get(url, timeout=1, max_bytes=1024)


async def test_fetch_never_follows_redirects() -> None:
    async with JwksServer() as server:
        server.status = b"302 Found"
        server.extra_headers = [b"Location: http://127.0.0.1:1/evil"]
        with pytest.raises(FetchError, match="redirects are not followed"):
            await https_get(server.url, timeout=5, max_bytes=1024)
        assert server.requests == 1


async def test_fetch_bounds_size_and_time() -> None:
    async with JwksServer() as server:
        server.body = b"x" * 5000
        with pytest.raises(FetchError, match="larger than"):
            await https_get(server.url, timeout=5, max_bytes=4096)
        server.raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"1000\r\n" + b"y" * 4096 + b"\r\n" + b"1000\r\n" + b"y" * 4096
                      + b"\r\n0\r\n\r\n")
        with pytest.raises(FetchError, match="larger than"):
            await https_get(server.url, timeout=5, max_bytes=6000)
        server.raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        assert await https_get(server.url, timeout=5, max_bytes=6000) == b"abc"
        server.raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
        with pytest.raises(FetchError, match="truncated"):
            await https_get(server.url, timeout=5, max_bytes=6000)
        server.raw = None
        server.hang = True
        with pytest.raises(FetchError, match="timed out"):
            await https_get(server.url, timeout=0.2, max_bytes=4096)


