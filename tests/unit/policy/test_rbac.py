"""RBAC: a matrix of sources × methods × paths → decision, the other match fields,
dry-run, and what lands in tags and the audit log."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from sidecar.config.rbac import RbacPolicy, parse_rbac_policy
from sidecar.config.reader import Fields, Problems
from sidecar.filters.authz_rbac import build_rbac

from .conftest import FakeAudit, FakeClock, exchange, request

POLICY = """
default: deny
rules:
  - name: frontend-reads
    allow: {from: [frontend], methods: [GET, HEAD], paths: ["/orders", "/orders/*"]}
  - name: batch-orders
    allow: {from: ["spiffe://pake.local/service/batch-*"], paths: [{prefix: /orders/}]}
  - name: no-batch-admin
    deny: {from: ["spiffe://pake.local/service/batch-*"], paths: ["/orders/admin/**"]}
  - name: echo-admin-only-admins
    deny: {paths: ["/echo/admin/**"]}
    unless: {claims: {roles: {contains: admin}}}
  - name: gateway
    allow: {from: [gateway], paths: ["/echo/**"]}
"""

FRONTEND = "spiffe://pake.local/service/frontend"
BATCH = "spiffe://pake.local/service/batch-nightly"
GATEWAY = "spiffe://pake.local/service/gateway"
OTHER = "spiffe://pake.local/service/billing"
FOREIGN = "spiffe://other.domain/service/frontend"


def policy(text: str = POLICY) -> RbacPolicy:
    problems = Problems()
    parsed = parse_rbac_policy(Fields(yaml.safe_load(text), "services.orders.policy", problems))
    assert problems.items == []
    return parsed


def decide(source: str | None, method: str, path: str, **kw: Any) -> tuple[str | None, str]:
    f = build_rbac(policy(), service="orders", trust_domain="pake.local")
    ex = exchange(request(method, path), peer=source, **kw)
    reply = f.on_request(ex)
    return (None if reply is None else reply.status), ex.tags["rbac_rule"]


MATRIX = [
    # source, method, path -> status (None: allowed), deciding rule
    (FRONTEND, "GET", "/orders", None, "frontend-reads"),
    (FRONTEND, "GET", "/orders/1", None, "frontend-reads"),
    (FRONTEND, "HEAD", "/orders/1", None, "frontend-reads"),
    (FRONTEND, "GET", "/orders/1/items", 403, "default"),  # * is one segment
    (FRONTEND, "GET", "/orders/", 403, "default"),  # * is not empty
    (FRONTEND, "POST", "/orders/1", 403, "default"),
    (FRONTEND, "DELETE", "/orders", 403, "default"),
    (FRONTEND, "GET", "/ordersx", 403, "default"),
    (BATCH, "POST", "/orders/1/items", None, "batch-orders"),
    (BATCH, "DELETE", "/orders/", None, "batch-orders"),
    (BATCH, "GET", "/orders", 403, "default"),  # the prefix is /orders/
    (BATCH, "GET", "/orders/admin/reindex", 403, "no-batch-admin"),  # deny wins
    ("spiffe://pake.local/service/batch-x/y", "GET", "/orders/1", 403, "default"),
    (OTHER, "GET", "/orders/1", 403, "default"),
    (FOREIGN, "GET", "/orders/1", 403, "default"),  # another trust domain
    (None, "GET", "/orders/1", 403, "default"),  # no mTLS peer
    (GATEWAY, "GET", "/echo/hello", None, "gateway"),
    (GATEWAY, "POST", "/echo/a/b/c", None, "gateway"),
    (GATEWAY, "GET", "/echo/admin/stats", 403, "echo-admin-only-admins"),
    (GATEWAY, "GET", "/orders/1", 403, "default"),
    (FRONTEND, "GET", "/echo/hello", 403, "default"),
    (FRONTEND, "GET", "/orders//1", 403, "path"),  # not normal: refused outright
    (BATCH, "GET", "/orders/x/../admin/reindex", 403, "path"),
    (BATCH, "GET", "/orders/%2e%2e/admin", 403, "path"),
    (BATCH, "GET", "/orders/a%2Fb", 403, "path"),
    (FRONTEND, "OPTIONS", "*", 403, "path"),
    (BATCH, "GET", "/orders/a\\b", 403, "path"),
    (BATCH, "GET", "/orders/.", 403, "path"),
    (BATCH, "GET", "/orders/.hidden", None, "batch-orders"),  # a dot starting a name is normal
    (BATCH, "GET", "/orders/a%20b", None, "batch-orders"),  # so is an encoded space
    (BATCH, "GET", "/orders/%5c", 403, "path"),
]


@pytest.mark.parametrize(("source", "method", "path", "status", "rule"), MATRIX)
def test_matrix(source: str | None, method: str, path: str, status: int | None,
                rule: str) -> None:
    assert decide(source, method, path) == (status, rule)


def test_admin_role_lifts_the_unless(audit: FakeAudit) -> None:
    f = build_rbac(policy(), service="echo", trust_domain="pake.local", audit=audit)
    admin = exchange(request("GET", "/echo/admin/stats"), peer=GATEWAY,
                     claims={"roles": ["reader", "admin"]})
    assert f.on_request(admin) is None and admin.tags["rbac_rule"] == "gateway"
    scoped = exchange(request("GET", "/echo/admin/stats"), peer=GATEWAY,
                      claims={"roles": "reader admin"})  # space-separated, like scope
    assert f.on_request(scoped) is None
    reader = exchange(request("GET", "/echo/admin/stats"), peer=GATEWAY,
                      claims={"roles": ["reader"]}, principal="bob")
    reply = f.on_request(reader)
    assert reply.status == 403 and reply.flag == "RBAC" and reply.error == "forbidden"
    assert reply.detail == ("rule 'echo-admin-only-admins' denies GET /echo/admin/stats "
                            f"from {GATEWAY} as bob")


def test_default_deny_detail_and_tags(audit: FakeAudit) -> None:
    f = build_rbac(policy(), service="orders", trust_domain="pake.local", audit=audit)
    ex = exchange(request("POST", "/orders/1"), peer=FRONTEND)
    reply = f.on_request(ex)
    assert reply.detail == f"no rule allows POST /orders/1 from {FRONTEND}"
    assert ex.tags["rbac"] == "deny" and ex.tags["rbac_rule"] == "default"
    assert audit.records == [("req-1", "authz", "deny", "default", reply.detail)]
    assert (f.allowed, f.denied) == (0, 1)


def test_dry_run_lets_through_and_records_would_deny(audit: FakeAudit) -> None:
    clock = FakeClock()
    f = build_rbac(policy(POLICY.replace("default: deny", "default: deny\ndry_run: true")),
                   service="orders", trust_domain="pake.local", audit=audit, clock=clock)
    denied = exchange(request("POST", "/orders/1"), peer=FRONTEND)
    with capture_logs() as logs:
        assert f.on_request(denied) is None
        for _ in range(3):
            f.on_request(exchange(request("POST", "/orders/1"), request_id="flood"))
        clock.advance(10)
        f.on_request(exchange(request("POST", "/orders/1"), request_id="flood"))
    assert [(e["event"], e["not_logged"]) for e in logs] == [("rbac_dry_run_deny", 0),
                                                            ("rbac_dry_run_deny", 3)]
    audit.records = [r for r in audit.records if r[0] != "flood"]
    assert denied.tags["rbac"] == "would_deny"
    allowed = exchange(request("GET", "/orders/1"), peer=FRONTEND, request_id="req-2")
    assert f.on_request(allowed) is None and allowed.tags["rbac"] == "allow"
    assert [r[:4] for r in audit.records] == [("req-1", "authz", "would_deny", "default"),
                                               ("req-2", "authz", "allow", "frontend-reads")]
    assert (f.would_deny, f.denied, f.allowed) == (5, 0, 1)


def test_default_allow_is_a_blocklist() -> None:
    f = build_rbac(policy("default: allow\nrules: [{deny: {methods: [DELETE]}}]"),
                   service="orders", trust_domain="pake.local")
    assert f.on_request(exchange(request("GET", "/x"))) is None
    reply = f.on_request(exchange(request("DELETE", "/x")))
    assert reply.status == 403 and "rule 'rules[0]' denies" in reply.detail


@pytest.mark.parametrize(("match", "ex_kw", "allowed"), [
    ({"principals": ["alice", "svc-*"]}, {"principal": "svc-billing"}, True),
    ({"principals": ["alice"]}, {"principal": "alicex"}, False),
    ({"principals": ["alice"]}, {}, False),
    ({"claims": {"iss": "https://issuer.pake.local"}},
     {"claims": {"iss": "https://issuer.pake.local"}}, True),
    ({"claims": {"email_verified": True}}, {"claims": {"email_verified": 1}}, False),
    ({"claims": {"level": 1}}, {"claims": {"level": True}}, False),
    ({"claims": {"level": 1}}, {"claims": {"level": 1}}, True),
    ({"claims": {"roles": {"contains": "admin"}}}, {"claims": {"roles": "admin"}}, True),
    ({"claims": {"roles": {"contains": "admin"}}}, {"claims": None}, False),
    ({"api_key_roles": ["deployer"]},
     {"roles": frozenset({"deployer"}), "tags": {"authn": "api_key"}}, True),
    ({"api_key_roles": ["deployer"]},  # the same role from a JWT does not count
     {"roles": frozenset({"deployer"}), "tags": {"authn": "jwt"}}, False),
    ({"headers": {"X-Tenant": "acme"}}, {"headers": [(b"x-tenant", b"acme")]}, True),
    ({"headers": {"x-tenant": "acme"}}, {"headers": [(b"x-tenant", b"other")]}, False),
    ({"principals": ["alice", "svc-*"]}, {"principal": "alice"}, True),  # exact names and patterns mixed
    ({"from": ["frontend", "batch-*"]}, {"peer": FRONTEND}, True),
    ({"from": ["frontend", "batch-*"]}, {"peer": BATCH}, True),
    ({"from": ["frontend", "batch-*"]}, {"peer": OTHER}, False),
    ({"from": ["frontend"]}, {"peer": FOREIGN}, False),  # a name is the mesh's own trust domain
    ({"from": ["*"]}, {"peer": OTHER}, True),
    ({"from": ["*"]}, {}, False),
    ({"methods": ["GET"], "paths": ["/a"]}, {}, False),  # AND across fields
])
def test_match_fields(match: dict[str, Any], ex_kw: dict[str, Any], allowed: bool) -> None:
    f = build_rbac(policy(yaml.safe_dump({"rules": [{"allow": match}]})),
                   service="orders", trust_domain="pake.local")
    headers = ex_kw.pop("headers", [])
    peer = ex_kw.pop("peer", None)
    tags = ex_kw.pop("tags", {})
    ex = exchange(request("POST", "/b", headers=headers), peer=peer, **ex_kw)
    ex.tags.update(tags)
    assert (f.on_request(ex) is None) is allowed


def test_bad_policy_errors_name_their_path() -> None:
    problems = Problems()
    parse_rbac_policy(Fields(yaml.safe_load("""
default: maybe
rules:
  - allow: {paths: [orders], methods: [get], claims: {roles: [a, b]}, color: red}
  - {allow: {}, deny: {}}
"""), "services.orders.policy", problems))
    text = "\n".join(problems.items)
    for expected in ("services.orders.policy.default: must be one of deny, allow",
                     "services.orders.policy.rules[0].allow.paths[0]: must be a path",
                     "services.orders.policy.rules[0].allow.methods[0]",
                     "services.orders.policy.rules[0].allow.claims.roles",
                     "services.orders.policy.rules[0].allow.color: unknown key",
                     "services.orders.policy.rules[1]: must have exactly one of allow, deny"):
        assert expected in text
