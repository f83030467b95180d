"""Micro-benchmark: µs per exchange for the policy filters (``make bench`` runs it).

Measures, on pre-built exchanges so only filter work is timed: the JWT filter with a
cold and a warm verified-token cache (RS256, ES256, EdDSA), RBAC alone, the rate limit
alone, and the whole gateway chain sanitize → authn_jwt → authz_rbac → rate_limit, cold
and warm. Plain Python, no event loop; prints a table (``--json`` for machines).

    .venv/bin/python bench/policy_bench.py [-n 3000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm  # noqa: E402

from sidecar.config.model import RouteConfig, RouteMatch, WeightedTarget  # noqa: E402
from sidecar.config.jwt_providers import JwtProvider  # noqa: E402
from sidecar.config.policy import ServiceAuthn  # noqa: E402
from sidecar.config.rate_limit import RateLimitConfig  # noqa: E402
from sidecar.config.rbac import RbacMatch, RbacPolicy, RbacRule  # noqa: E402
from sidecar.exchange import Exchange  # noqa: E402
from sidecar.filters.authn_jwt import build_jwt_authn  # noqa: E402
from sidecar.filters.authz_rbac import build_rbac  # noqa: E402
from sidecar.filters.claims_headers import build_header_sanitizer  # noqa: E402
from sidecar.filters.rate_limit import build_rate_limit  # noqa: E402
from sidecar.http.message import RequestHead  # noqa: E402
from sidecar.jwt.jwks import JwksCache, parse_jwks  # noqa: E402

ISSUER = "https://issuer.pake.local"
ROUTE = RouteConfig(name="gateway/0", match=RouteMatch(), to=(WeightedTarget("orders"),))


class Clock:
    def monotonic(self) -> float:
        return time.monotonic()


class NoSource:
    description = "bench"

    async def fetch(self) -> bytes:
        raise RuntimeError("not used")


def _keys() -> dict[str, tuple[Any, dict[str, Any]]]:
    made: dict[str, Any] = {"RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES256": ec.generate_private_key(ec.SECP256R1()),
            "EdDSA": ed25519.Ed25519PrivateKey.generate()}
    out = {}
    for alg, private in made.items():
        codec: Any = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
        jwk = json.loads(codec.to_jwk(private.public_key()))
        jwk.update(kid=alg.lower(), use="sig", alg=alg)
        out[alg] = (private, jwk)
    return out


def _token(private: Any, alg: str, sub: str) -> str:
    now = time.time()
    return jwt.encode({"iss": ISSUER, "aud": "pake", "sub": sub, "exp": now + 3600,
                       "iat": now, "roles": ["reader", "admin"], "email": f"{sub}@pake.local"},
                      private, algorithm=alg, headers={"kid": alg.lower()})


def _exchange(token: str, i: int) -> Exchange:
    head = RequestHead(method="GET", target=b"/echo/orders/1", path="/echo/orders/1",
                       authority="gateway", host="gateway", version="1.1",
                       headers=[(b"host", b"gateway"), (b"accept", b"*/*"),
                                (b"authorization", b"Bearer " + token.encode()),
                                (b"x-user", b"forged")])
    ex = Exchange(request=head, listener="gateway", downstream_address=f"198.51.100.{i % 200}",
                  request_id=str(i), start=0.0)
    ex.route = ROUTE
    return ex


def _time(run: Callable[[Exchange], object], exchanges: list[Exchange]) -> float:
    start = time.perf_counter()
    for ex in exchanges:
        run(ex)
    return (time.perf_counter() - start) / len(exchanges) * 1e6


def bench(n: int) -> dict[str, float]:
    keys = _keys()
    jwks = parse_jwks({"keys": [jwk for _, jwk in keys.values()]},
                      frozenset({"RS256", "ES256", "EdDSA"}))
    provider = JwtProvider(name="pake", issuer=ISSUER, audiences=("pake",),
                           algorithms=frozenset({"RS256", "ES256", "EdDSA"}),
                           jwks_uri="https://issuer.pake.local/jwks.json",
                           claims_to_headers=(("email", "x-user"),))
    cache = JwksCache(provider, NoSource(), clock=Clock(), keyset=jwks)
    policy = RbacPolicy(rules=(
        RbacRule("no-admin", "deny", RbacMatch(paths=(), methods=frozenset({"DELETE"}))),
        RbacRule("internal", "allow", RbacMatch(sources=("frontend", "batch-*"))),
        RbacRule("readers", "allow", RbacMatch(methods=frozenset({"GET", "HEAD"}),
                                               paths=(), principals=("*",))),
    ))
    rbac = build_rbac(policy, service="gateway", trust_domain="pake.local")
    results: dict[str, float] = {}

    def jwt_filter(cached: bool) -> Any:
        authn = ServiceAuthn(jwt=("pake",), token_cache=4096 if cached else 0)
        return build_jwt_authn(authn, {"pake": provider}, {"pake": cache})

    for alg in ("RS256", "ES256", "EdDSA"):
        private, _ = keys[alg]
        tokens = [_token(private, alg, f"user{i}") for i in range(n)]
        cold = jwt_filter(cached=False)
        results[f"authn_jwt {alg} uncached"] = _time(
            cold.on_request, [_exchange(t, i) for i, t in enumerate(tokens)])
        warm = jwt_filter(cached=True)
        for i, t in enumerate(tokens[:64]):
            warm.on_request(_exchange(t, i))
        results[f"authn_jwt {alg} cached"] = _time(
            warm.on_request, [_exchange(tokens[i % 64], i) for i in range(n)])

    private, _ = keys["RS256"]
    tokens = [_token(private, "RS256", f"user{i}") for i in range(64)]
    authed = [_exchange(tokens[i % 64], i) for i in range(n)]
    warm = jwt_filter(cached=True)
    for ex in authed:
        warm.on_request(ex)
    results["authz_rbac"] = _time(rbac.on_request, authed)
    limiter = build_rate_limit({"gateway/0": RateLimitConfig(rate=1e9, spec="1e9/s",
                                                             burst=10**9, key="subject")},
                               clock=Clock())
    results["rate_limit"] = _time(limiter.on_request, authed)

    sanitizer = build_header_sanitizer([provider])
    for label, cached in (("chain RS256 uncached", False), ("chain RS256 cached", True)):
        authn = jwt_filter(cached)
        chain = (sanitizer, authn, rbac, limiter)
        all_tokens = ([_token(private, "RS256", f"u{i}") for i in range(n)] if not cached
                      else [tokens[i % 64] for i in range(n)])
        if cached:
            for i, t in enumerate(tokens):
                authn.on_request(_exchange(t, i))

        def run(ex: Exchange, chain: tuple[Any, ...] = chain) -> None:
            for f in chain:
                if f.on_request(ex) is not None:
                    raise RuntimeError(f"{f.name} refused")

        results[label] = _time(run, [_exchange(t, i) for i, t in enumerate(all_tokens)])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="exchanges per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is shown")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [bench(args.n) for _ in range(args.repeat)]
    results = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    if args.json:
        print(json.dumps({k: round(v, 2) for k, v in results.items()}))
        return
    print(f"policy filters, µs per exchange (median of {args.repeat} runs of {args.n}); "
          f"Python {sys.version.split()[0]}")
    for name, value in results.items():
        print(f"  {name:<28} {value:8.1f}")


if __name__ == "__main__":
    main()
