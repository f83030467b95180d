"""A service's ``policy`` section: RBAC rules over the caller's identity and the request.

Frozen dataclasses and their parser; ``sidecar/filters/authz_rbac.py`` compiles them.
Path and source patterns are described in ``policy.py``. Pure: no I/O.

Who the caller is, as a rule sees it: ``from`` is the mTLS peer (a service); ``principals``
and ``roles`` are the end user and their roles, whoever vouched for them: this hop's JWT or
API key, or a mesh token the gateway signed (``mesh_tokens.py``), so a service two hops
behind the gateway can say ``allow: {from: [frontend], principals: [alice]}`` or
``allow: {roles: [admin]}``. ``claims`` sees the verified token's claims (a mesh token's
``iss`` tells it apart from a JWT); ``api_key_roles`` matches API-key callers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .reader import Fields, header_name, methods_of, strings_of

__all__ = ["ClaimMatch", "PathMatch", "RbacMatch", "RbacPolicy", "RbacRule", "parse_rbac_policy"]

@dataclass(frozen=True, slots=True)
class ClaimMatch:
    name: str
    op: Literal["equals", "contains"]
    value: Any  # a JSON scalar


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: Literal["exact", "prefix", "glob"]
    value: str


@dataclass(frozen=True, slots=True)
class RbacMatch:
    """Every non-empty field must match (AND); within a field any item may (OR)."""

    sources: tuple[str, ...] = ()  # service names or SPIFFE IDs, `*` wildcards
    principals: tuple[str, ...] = ()
    claims: tuple[ClaimMatch, ...] = ()
    api_key_roles: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()  # any of the caller's roles (JWT, API key, mesh token)
    methods: frozenset[str] = frozenset()
    paths: tuple[PathMatch, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)


@dataclass(frozen=True, slots=True)
class RbacRule:
    name: str
    action: Literal["allow", "deny"]
    match: RbacMatch
    unless: RbacMatch | None = None  # the rule does not apply when this matches


@dataclass(frozen=True, slots=True)
class RbacPolicy:
    default: Literal["allow", "deny"] = "deny"
    dry_run: bool = False
    rules: tuple[RbacRule, ...] = ()



def _paths(node: Fields, key: str) -> tuple[PathMatch, ...]:
    out = []
    for path, item in node.list(key):
        if isinstance(item, dict):
            sub = Fields(item, path, node.problems)
            prefix = sub.str("prefix")
            sub.done()
            if isinstance(prefix, str):
                if not prefix.startswith("/"):
                    sub.error("prefix", f"must start with /, got {prefix!r}")
                else:
                    out.append(PathMatch("prefix", prefix))
        elif isinstance(item, str) and item.startswith("/"):
            out.append(PathMatch("glob" if "*" in item else "exact", item))
        else:
            node.problems.add(path, f"must be a path starting with / or {{prefix: ...}}, "
                                    f"got {item!r}")
    return tuple(out)


def _claims(node: Fields) -> tuple[ClaimMatch, ...]:
    sub = node.sub("claims")
    out = []
    for name, value in sub.data.items():
        sub.raw(name)
        if isinstance(value, dict):
            spec = Fields(value, sub.at(str(name)), node.problems)
            contains = spec.raw("contains")
            spec.done()
            if _is_scalar(contains):
                out.append(ClaimMatch(str(name), "contains", contains))
            elif contains is not None:
                spec.error("contains", f"must be a string, number or boolean, got {contains!r}")
        elif _is_scalar(value):
            out.append(ClaimMatch(str(name), "equals", value))
        else:
            sub.error(str(name), "must be a value to equal or {contains: value}, "
                                 f"got {value!r}")
    return tuple(out)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and value is not None


def _rbac_match(node: Fields) -> RbacMatch:
    headers = []
    hnode = node.sub("headers")
    for name, value in hnode.data.items():
        hnode.raw(name)
        lname = header_name(hnode, str(name), name)
        if lname is None:
            continue
        if not isinstance(value, str):
            hnode.error(str(name), f"must be a string, got {value!r}")
        else:
            headers.append((lname, value))
    match = RbacMatch(
        sources=strings_of(node, "from"),
        principals=strings_of(node, "principals"),
        claims=_claims(node),
        api_key_roles=frozenset(strings_of(node, "api_key_roles")),
        roles=frozenset(strings_of(node, "roles")),
        methods=methods_of(node, "methods"),
        paths=_paths(node, "paths"),
        headers=tuple(headers),
    )
    node.done()
    return match


def parse_rbac_policy(node: Fields) -> RbacPolicy:
    """``services.<name>.policy``."""
    default = node.str("default", "deny", choices=("deny", "allow"))
    dry_run = node.bool("dry_run", False)
    rules = []
    names: set[str] = set()
    for path, item in node.list("rules"):
        rule = Fields(item, path, node.problems)
        actions: list[Literal["allow", "deny"]] = [a for a in ("allow", "deny") if rule.has(a)]
        name = rule.str("name", str(path).rsplit(".", 1)[-1])
        if len(actions) != 1:
            rule.problems.add(path, "must have exactly one of allow, deny")
            rule.raw("allow", None)
            rule.raw("deny", None)
            rule.done()
            continue
        match = _rbac_match(rule.sub(actions[0]))
        unless = rule.optional("unless", _rbac_match)
        rule.done()
        if name in names:
            rule.error("name", f"{name!r} is used by another rule")
        names.add(name)
        rules.append(RbacRule(name=name, action=actions[0], match=match,
                              unless=unless))
    node.done()
    return RbacPolicy(default=default, dry_run=dry_run, rules=tuple(rules))
