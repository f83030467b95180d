"""``python -m examples.mint_token --sub alice --role admin [--ttl 1h]``: a demo JWT.

Signs with ``examples/gateway/demo-signing-key.pem`` (kid ``demo-1``, RS256), a DEMO key
whose private half is in the repository: tokens it signs prove nothing outside this
example. The claims are what ``examples/gateway/mesh.yaml`` expects: ``iss``
``https://issuer.pake.local``, ``aud`` ``pake``, ``sub``, ``roles``, ``iat``, ``exp``.
``--iss``/``--aud``/``--kid``/``--ttl=-5m`` make tokens the gateway must refuse, for trying
the refusals by hand. Prints the token alone on stdout, so ``TOKEN=$(python -m ...)`` works.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jwt

__all__ = ["AUDIENCE", "DEMO_KEY", "DEMO_KID", "ISSUER", "main", "mint"]

DEMO_KEY = Path(__file__).resolve().parent / "gateway" / "demo-signing-key.pem"
DEMO_KID = "demo-1"
ISSUER = "https://issuer.pake.local"
AUDIENCE = "pake"


def _duration(text: str) -> float:
    """``90s``, ``5m``, ``1h``, ``2d``; a leading ``-`` gives an already expired token."""
    from sidecar.config.reader import parse_duration  # the mesh's own duration syntax

    sign = -1.0 if text.startswith("-") else 1.0
    try:
        return sign * parse_duration(text.lstrip("-"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mint(sub: str, roles: list[str], *, ttl: float = 3600.0, issuer: str = ISSUER,
         audience: str = AUDIENCE, kid: str = DEMO_KID, key_path: Path = DEMO_KEY,
         extra: dict[str, Any] | None = None, now: float | None = None) -> str:
    """A token signed with the demo key (or ``key_path``)."""
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": sub, "roles": roles,
                              "iat": int(issued), "exp": int(issued + ttl)}
    claims.update(extra or {})
    return jwt.encode(claims, key_path.read_bytes(), algorithm="RS256",
                      headers={"kid": kid, "typ": "JWT"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.mint_token",
                                     description="Print a JWT signed with the gateway example's "
                                                 "DEMO key (never use it elsewhere).")
    parser.add_argument("--sub", required=True, help="the subject (the principal)")
    parser.add_argument("--role", action="append", default=[], dest="roles",
                        help="a role for the roles claim; repeat for several")
    parser.add_argument("--ttl", type=_duration, default=3600.0,
                        help="lifetime like 90s, 5m, 1h (default 1h); --ttl=-5m: expired 5m ago")
    parser.add_argument("--email", help="an email claim (the example passes it as x-user-email)")
    parser.add_argument("--iss", default=ISSUER, help=f"issuer (default {ISSUER})")
    parser.add_argument("--aud", default=AUDIENCE, help=f"audience (default {AUDIENCE})")
    parser.add_argument("--kid", default=DEMO_KID, help=f"key id header (default {DEMO_KID})")
    parser.add_argument("--key", type=Path, default=DEMO_KEY,
                        help="PEM private key (default: the demo key)")
    args = parser.parse_args(argv)
    extra = {"email": args.email} if args.email else None
    try:
        token = mint(args.sub, args.roles, ttl=args.ttl, issuer=args.iss, audience=args.aud,
                     kid=args.kid, key_path=args.key, extra=extra)
    except OSError as exc:
        print(f"mint_token: cannot read {args.key}: {exc.strerror}", file=sys.stderr)
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
