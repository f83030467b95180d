"""The ``authz_rbac`` filter: a service's policy decides who may call what.

Split as Envoy's rbac filter is: ``RbacFilterConfig`` compiles the policy once (service
names to SPIFFE IDs, wildcards and path globs to regexes, prefixes to ``startswith``), and
``RbacFilter.on_request`` evaluates it per exchange. Semantics: a rule matches when every
field it gives matches (any item of a list may); a matching **deny** rule wins over any
allow; otherwise the first matching **allow** rule allows; otherwise the policy's
``default`` (deny unless set to allow). A rule with ``unless`` does not apply to an exchange
its ``unless`` matches. A path that is not in normal form (``//``,
``/./``, ``/../``, encoded ``/``, ``.`` or ``\\``) is denied outright: the app could read it
as a different path than the one the rules saw. Every decision goes to ``exchange.tags``
(``rbac``, ``rbac_rule``) and the audit log; in dry-run a deny is recorded as
``would_deny``, counted, logged (at most once per 10 s, with the count) and passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog

from ..audit import AuditLog, AuditRecorder, request_reason
from ..clock import Clock, MonotonicClock
from ..config.rbac import ClaimMatch, RbacMatch, RbacPolicy
from ..errors import Forbidden, LocalReply
from ..exchange import Exchange

__all__ = ["RbacDecision", "RbacFilter", "RbacFilterConfig", "build_rbac"]

log = structlog.get_logger("pake.filters.rbac")

_NOT_NORMAL: Final = re.compile(r"//|/\.\.?(?:/|$)|%2[eEfF]|%5[cC]|\\")


@dataclass(slots=True)
class RbacDecision:
    """Read-only by convention: made once and shared by every request it decides (a rule's
    two when the rule is compiled, the fixed ones at import). Not frozen: a frozen
    dataclass's ``__init__`` is interpreted Python even compiled, so it is written out.
    The reason is ``request_reason(start, exchange)``, made only where it is shown (a deny's
    reply, the dry-run log): the audit record builds its own text from the same pieces."""

    allowed: bool
    rule: str  # the rule that decided, "default", or "path"
    start: str  # the reason's start: "rule 'reads' allows "
    # the exchange's log facts for it (``Exchange.share_tags``): its verdict, allow or deny,
    # and a dry run's would_deny; never changed
    tags: dict[str, str]
    dry_run_tags: dict[str, str]

    def __init__(self, allowed: bool, rule: str, start: str) -> None:
        self.allowed = allowed
        self.rule = rule
        self.start = start
        self.tags = {"rbac_rule": rule, "rbac": "allow" if allowed else "deny"}
        self.dry_run_tags = self.tags if allowed else {"rbac_rule": rule, "rbac": "would_deny"}


def _glob(pattern: str, star: str) -> str:
    """A fullmatch regex for a pattern where ``**`` is ``.*`` and ``*`` is ``star``."""
    parts = []
    for i, chunk in enumerate(pattern.split("**")):
        if i:
            parts.append(".*")
        parts.append(star.join(re.escape(piece) for piece in chunk.split("*")))
    return "".join(parts)


def _any_of(regexes: list[str]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{r})" for r in regexes)) if regexes else None


def _names(names: list[str], star: str) -> tuple[frozenset[str], re.Pattern[str] | None]:
    """Names without a wildcard, as a set (a lookup, where a regex match cost about 1k
    instructions a request), and the patterns among them as one regex."""
    exact = frozenset(n for n in names if "*" not in n)
    return exact, _any_of([_glob(n, star) if n != "*" else ".+" for n in names if "*" in n])


def _same(a: Any, b: Any) -> bool:
    # YAML `true` must not equal a claim of 1 (Python: True == 1).
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _claim_matches(claims: dict[str, Any] | None, m: ClaimMatch) -> bool:
    if not claims or m.name not in claims:
        return False
    value = claims[m.name]
    if m.op == "equals":
        return _same(value, m.value)
    if isinstance(value, list):
        return any(_same(v, m.value) for v in value)
    if isinstance(value, str) and isinstance(m.value, str):
        return m.value in value.split()  # space-separated, like `scope`
    return False


# Decisions are read-only: the fixed ones are made once, a rule's when it is compiled (a
# decision made per request cost an allocation and its release, ~250 instructions).
_NOT_NORMAL_FORM: Final = RbacDecision(False, "path", "path is not in normal form: ")
_DEFAULT_ALLOWS: Final = RbacDecision(True, "default", "default allows ")
_NO_RULE_ALLOWS: Final = RbacDecision(False, "default", "no rule allows ")


class _CompiledRule:
    __slots__ = ("action", "allowed", "any_api_key_role", "any_method", "any_path", "any_principal", "any_role",
                 "any_source", "api_key_roles", "claims", "denied", "exact_paths", "exact_principals",
                 "exact_sources", "glob_paths", "headers", "methods", "name", "prefixes", "principals", "roles",
                 "sources", "unless")

    def __init__(self, name: str, action: str, match: RbacMatch, trust_domain: str,
                 unless: RbacMatch | None = None) -> None:
        self.name = name
        self.action = action
        # its decisions, made once: read-only, so every request it decides shares them
        self.allowed = RbacDecision(True, name, f"rule {name!r} allows ")
        self.denied = RbacDecision(False, name, f"rule {name!r} denies ")
        self.unless = (_CompiledRule(f"{name}.unless", action, unless, trust_domain)
                       if unless is not None else None)
        sources = []
        for s in match.sources:
            if not s.startswith("spiffe://") and s != "*":
                s = f"spiffe://{trust_domain}/service/{s}"  # a service name
            sources.append(s)
        self.any_source = bool(sources)
        self.exact_sources, self.sources = _names(sources, "[^/]+")
        self.any_principal = bool(match.principals)
        self.exact_principals, self.principals = _names(list(match.principals), ".*")
        self.claims = match.claims
        self.api_key_roles = match.api_key_roles
        self.roles = match.roles
        self.methods = match.methods
        self.exact_paths = frozenset(p.value for p in match.paths if p.kind == "exact")
        self.prefixes = tuple(p.value for p in match.paths if p.kind == "prefix")
        self.glob_paths = _any_of([_glob(p.value, "[^/]+") for p in match.paths
                                   if p.kind == "glob"])
        self.headers = tuple((n.encode("latin-1"), v.encode("latin-1"))
                             for n, v in match.headers)
        # which fields are given, as bools: compiled, a set's or a tuple's truth is a generic
        # call on every request (~35 instructions each, callgrind)
        self.any_method = len(self.methods) > 0
        self.any_path = len(self.exact_paths) > 0 or len(self.prefixes) > 0 or self.glob_paths is not None
        self.any_api_key_role = len(self.api_key_roles) > 0
        self.any_role = len(self.roles) > 0

    def matches(self, ex: Exchange) -> bool:
        # Cheapest checks first; each given field must match.
        request = ex.request
        if self.any_method and request.method not in self.methods:
            return False
        if self.any_path:
            path = request.path
            if not (path in self.exact_paths
                    or (len(self.prefixes) > 0 and path.startswith(self.prefixes))
                    or (self.glob_paths is not None and self.glob_paths.fullmatch(path))):
                return False
        if self.any_source:
            peer = ex.peer_identity
            if peer is None or (peer not in self.exact_sources
                                and (self.sources is None or not self.sources.fullmatch(peer))):
                return False
        if self.any_principal:
            principal = ex.principal
            if principal is None or (principal not in self.exact_principals and (
                    self.principals is None or not self.principals.fullmatch(principal))):
                return False
        if self.any_api_key_role and (ex.tags.get("authn") != "api_key"
                                      or self.api_key_roles.isdisjoint(ex.roles)):
            return False
        if self.any_role and self.roles.isdisjoint(ex.roles):
            return False
        for name, value in self.headers:
            if value not in request.header_values(name):
                return False
        for m in self.claims:  # a loop, not ``all()`` of a generator: a new object a request
            if not _claim_matches(ex.claims, m):
                return False
        return self.unless is None or not self.unless.matches(ex)


class RbacFilterConfig:
    """A policy compiled once per snapshot; ``decide`` is pure."""

    def __init__(self, policy: RbacPolicy, *, service: str, trust_domain: str) -> None:
        self.policy = policy
        self.service = service
        rules = [_CompiledRule(r.name, r.action, r.match, trust_domain, r.unless)
                 for r in policy.rules]
        self._deny = tuple(r for r in rules if r.action == "deny")
        self._allow = tuple(r for r in rules if r.action == "allow")

    def decide(self, ex: Exchange) -> RbacDecision:
        path = ex.request.path
        # the regex runs only on a path holding what it looks for (most hold none of it)
        if not path.startswith("/") or (("//" in path or "/." in path or "%" in path or "\\" in path)
                                        and _NOT_NORMAL.search(path) is not None):
            return _NOT_NORMAL_FORM
        for rule in self._deny:
            if rule.matches(ex):
                return rule.denied
        for rule in self._allow:
            if rule.matches(ex):
                return rule.allowed
        return _DEFAULT_ALLOWS if self.policy.default == "allow" else _NO_RULE_ALLOWS


class RbacFilter:
    name = "authz_rbac"

    def __init__(self, config: RbacFilterConfig, *, audit: AuditRecorder | None = None,
                 clock: Clock | None = None, log_interval: float = 10.0) -> None:
        self.config = config
        self.audit = audit
        # the same, when it is the sidecar's audit log (the tests' is a fake): compiled, its
        # ``record_request`` is then a native call, not one by name (~330 instructions)
        self._audit_log = audit if isinstance(audit, AuditLog) else None
        self.dry_run = config.policy.dry_run
        # Dry-run denies are logged at most once per interval (each one is in the audit log
        # anyway): a policy that would deny everything must not flood the process log.
        self.clock = clock or MonotonicClock()
        self.log_interval = log_interval
        self._last_log = float("-inf")
        self._unlogged = 0
        # Counters, read by metrics.
        self.allowed = 0
        self.denied = 0
        self.would_deny = 0

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        decision = self.config.decide(exchange)
        if decision.allowed:
            self.allowed += 1
            self._record(exchange, "allow", decision, decision.tags)
            return None
        if self.dry_run:
            self.would_deny += 1
            self._record(exchange, "would_deny", decision, decision.dry_run_tags)
            now = self.clock.monotonic()
            if now - self._last_log >= self.log_interval:
                log.warning("rbac_dry_run_deny", service=self.config.service,
                            rule=decision.rule, reason=request_reason(decision.start, exchange),
                            request_id=exchange.request_id, trace_id=exchange.trace_id,
                            not_logged=self._unlogged,
                            would_deny_total=self.would_deny)
                self._last_log, self._unlogged = now, 0
            else:
                self._unlogged += 1
            return None
        self.denied += 1
        self._record(exchange, "deny", decision, decision.tags)
        return Forbidden(request_reason(decision.start, exchange)).reply()

    def _record(self, exchange: Exchange, verdict: Literal["allow", "deny", "would_deny"],
                decision: RbacDecision, tags: dict[str, str]) -> None:
        exchange.share_tags(tags)  # rbac_rule and rbac (the verdict)
        audit_log = self._audit_log
        if audit_log is not None:
            audit_log.record_request(exchange, "authz", verdict, decision.rule, decision.start)
        elif self.audit is not None:
            self.audit.record_request(exchange, "authz", verdict, decision.rule, decision.start)


def build_rbac(policy: RbacPolicy, *, service: str, trust_domain: str,
               audit: AuditRecorder | None = None, clock: Clock | None = None) -> RbacFilter:
    """The filter enforcing ``services.<service>.policy`` on that service's inbound (or, for
    the gateway's own policy, on the gateway listener)."""
    return RbacFilter(RbacFilterConfig(policy, service=service, trust_domain=trust_domain),
                      audit=audit, clock=clock)
