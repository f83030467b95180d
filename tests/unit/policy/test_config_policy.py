"""The policy config: the documented YAML parses, every error names its path, a plain
API key is refused without being echoed, and dumps are redacted."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from sidecar.config.audit import AuditConfig, parse_audit
from sidecar.config.jwt_providers import TokenHeader
from sidecar.config.policy import MeshPolicy, ServiceAuthn, parse_authn, parse_mesh_policy
from sidecar.config.rate_limit import parse_rate_limit
from sidecar.config.rbac import parse_rbac_policy
from sidecar.config.reader import Fields, Problems
from sidecar.config.redact import REDACTED, redact
from sidecar.config.validation import parse_validation
from sidecar.filters.authn_api_key import hash_api_key

SECRET = "pk_live_do_not_print_me_0123456789"

MESH = f"""
jwt_providers:
  pake-issuer:
    issuer: https://issuer.pake.local
    audiences: [pake]
    algorithms: [RS256, ES256]
    jwks_file: jwks.json
    refresh: 10m
    min_refetch_interval: 30s
    leeway: 1m
    required_claims: [sub, email]
    typ: JWT
    max_token_size: 4KiB
    from_params: [access_token]
    claims_to_headers: {{sub: x-user, email: x-user-email}}
    forward: false
  local:
    issuer: http://127.0.0.1:8000
    audiences: [tests]
    jwks_uri: http://127.0.0.1:8000/jwks.json
api_keys:
  ci-bot:
    hash: "{hash_api_key(SECRET)}"
    roles: [deployer]
services:
  orders:
    authn: {{jwt: [pake-issuer], api_keys: [ci-bot]}}
"""


def parse(text: str) -> tuple[MeshPolicy, list[str], Fields]:
    problems = Problems()
    top = Fields(yaml.safe_load(text), "", problems)
    return parse_mesh_policy(top), problems.items, top


def test_documented_shape_parses() -> None:
    mesh, problems, top = parse(MESH)
    assert problems == []
    p = mesh.jwt_providers["pake-issuer"]
    assert p.algorithms == frozenset({"RS256", "ES256"})
    assert (p.refresh_interval, p.min_refetch_interval, p.leeway) == (600.0, 30.0, 60.0)
    assert p.max_token_size == 4096 and p.typ == "JWT" and p.forward is False
    assert p.from_headers == (TokenHeader("authorization", "Bearer "),)
    assert p.from_params == ("access_token",)
    assert p.claims_to_headers == (("sub", "x-user"), ("email", "x-user-email"))
    assert mesh.jwt_providers["local"].jwks_uri == "http://127.0.0.1:8000/jwks.json"
    key = mesh.api_keys["ci-bot"]
    assert key.principal == "ci-bot" and key.roles == frozenset({"deployer"})
    problems2 = Problems()
    services = Fields(yaml.safe_load(MESH)["services"], "services", problems2)
    orders = services.sub("orders")
    authn = orders.optional("authn", lambda n: parse_authn(n, mesh))
    assert authn == ServiceAuthn(jwt=("pake-issuer",), api_keys=("ci-bot",))
    assert orders.optional("policy", parse_rbac_policy) is None
    orders.done()
    assert problems2.items == []


def test_policy_module_docstring_example_parses() -> None:
    import sidecar.config.policy as module

    doc = module.__doc__ or ""
    block = doc.split("Where it sits in the mesh config (``mesh.yaml``)::")[1].split(
        "Path patterns:")[0]
    data = yaml.safe_load(block.replace("<64 hex>", "0" * 64))
    data["jwt_providers"]["pake-issuer"].pop("jwks_uri", None)
    mesh, problems, _ = parse(yaml.safe_dump({k: data[k] for k in ("jwt_providers",
                                                                   "api_keys")}))
    assert problems == []
    p = Problems()
    orders = Fields(data["services"]["orders"], "services.orders", p)
    parse_authn(orders.sub("authn"), mesh)
    parse_rbac_policy(orders.sub("policy"))
    for path, route in orders.list("routes"):
        r = Fields(route, path, p)
        r.raw("match")
        parse_rate_limit(r.sub("rate_limit"))
        parse_validation(r.sub("validation"))
        r.done()
    assert p.items == []


@pytest.mark.parametrize(("provider", "expected"), [
    ({"audiences": [], "jwks_file": "j"}, "jwt_providers.p.issuer: is required"),
    ({"issuer": "i", "jwks_file": "j"}, "jwt_providers.p.audiences: is required"),
    ({"issuer": "i", "audiences": ["a"]}, "jwt_providers.p: exactly one of jwks_file, jwks_uri"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j", "jwks_uri": "https://x/j"},
     "exactly one of"),
    ({"issuer": "i", "audiences": ["a"], "jwks_uri": "http://issuer.example/jwks"},
     "jwt_providers.p.jwks_uri: must be an https:// URL (http only on loopback)"),
    ({"issuer": "i", "audiences": ["a"], "jwks_uri": "https://u:p@x/j"}, "user info"),
    ({"issuer": "i", "audiences": ["a"], "jwks_uri": "https://x:99999/j"}, "invalid port"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j", "algorithms": ["HS256"]},
     "jwt_providers.p.algorithms[0]: symmetric algorithm 'HS256' is not accepted"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j", "algorithms": ["none"]},
     "algorithms[0]: 'none' is never accepted"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j", "algorithms": []},
     "algorithms: must name at least one"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j",
      "claims_to_headers": {"sub": "authorization"}},
     "jwt_providers.p.claims_to_headers.sub: header 'authorization' is reserved"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j",
      "claims_to_headers": {"sub": "x-pake-principal"}}, "is reserved"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j", "leeway": 30},
     "jwt_providers.p.leeway: must be a duration"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j", "from_headers": []},
     "from_headers and from_params must not both be empty"),
    ({"issuer": "i", "audiences": ["a"], "jwks_file": "j", "jwks_url": "x"},
     "jwt_providers.p.jwks_url: unknown key"),
])
def test_provider_errors_name_their_path(provider: dict[str, Any], expected: str) -> None:
    _, problems, _ = parse(yaml.safe_dump({"jwt_providers": {"p": provider}}))
    assert any(expected in p for p in problems), problems


def test_two_providers_with_one_issuer_are_refused() -> None:
    both = {"issuer": "i", "audiences": ["a"], "jwks_file": "j"}
    _, problems, _ = parse(yaml.safe_dump({"jwt_providers": {"a": both, "b": both}}))
    assert problems == ["jwt_providers.b.issuer: issuer is already used by provider 'a'"]


@pytest.mark.parametrize("entry", [
    {"key": SECRET}, {"api_key": SECRET}, {"hash": SECRET}, {"hash": f"sha256:{SECRET}"},
    {"hash": "sha256:" + "0" * 63}, {"hash": 12345},
])
def test_plain_api_key_is_refused_and_never_echoed(entry: dict[str, Any]) -> None:
    _, problems, _ = parse(yaml.safe_dump({"api_keys": {"ci": entry}}))
    assert problems and all(p.startswith("api_keys.ci.") for p in problems)
    text = "\n".join(problems)
    assert SECRET not in text and "12345" not in text
    assert "sha256:" in text


def test_authn_references_are_checked() -> None:
    mesh, _, _ = parse(MESH)
    problems = Problems()
    parse_authn(Fields({"jwt": ["nope"], "api_keys": ["gone"], "token_cache": -1},
                       "services.orders.authn", problems), mesh)
    assert problems.items == [
        "services.orders.authn.token_cache: must be ≥ 0, got -1",
        "services.orders.authn.jwt[0]: unknown jwt provider 'nope'",
        "services.orders.authn.api_keys[0]: unknown api key 'gone'"]
    problems = Problems()
    parse_authn(Fields({}, "services.orders.authn", problems), mesh)
    assert problems.items == ["services.orders.authn: names no jwt provider and no api key"]


def test_audit_config() -> None:
    problems = Problems()
    assert parse_audit(Fields({"path": "/var/log/audit.log", "max_size": "1MiB", "keep": 3},
                              "audit", problems)) == AuditConfig(
        path="/var/log/audit.log", max_size=1024 * 1024, keep=3)
    parse_audit(Fields({"max_size": "1KiB", "queue": 0}, "audit", problems))
    assert problems.items == ["audit.queue: must be ≥ 1, got 0",
                              "audit.max_size: must be at least 4KiB"]


def test_redact_hides_hashes_tokens_and_credential_fields() -> None:
    mesh, _, _ = parse(MESH)
    dumped = json.dumps(redact(mesh))
    assert hash_api_key(SECRET) not in dumped and hash_api_key(SECRET)[7:] not in dumped
    assert dumped.count(REDACTED) == 1
    assert "https://issuer.pake.local" in dumped  # the rest stays readable
    assert "hash=" not in repr(mesh.api_keys["ci-bot"])  # nor in a repr
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
    raw = yaml.safe_load(MESH)
    raw["debug"] = {"token": "abc", "note": token, "authorization": "Bearer x",
                    "list": [token], "password": None}
    out = redact(raw)
    assert out["api_keys"]["ci-bot"]["hash"] == REDACTED
    assert out["debug"] == {"token": REDACTED, "note": REDACTED, "authorization": REDACTED,
                            "list": [REDACTED], "password": None}
