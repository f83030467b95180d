"""Reading config files into the model. The only place that touches YAML.

``load_bootstrap`` and ``load_mesh`` raise ``ConfigError`` with every problem found, each
naming its path and value; the caller (``__main__``, SIGHUP reload, the control-plane
client) decides what a failure means: exit at start-up, keep the last good snapshot later.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..http.headers import HEADER_NAME
from .model import (
    AccessLogConfig,
    Bootstrap,
    ControlConfig,
    DownstreamTimeouts,
    Limits,
    ListenerConfig,
    MeshConfig,
    OverloadConfig,
    PoolConfig,
    RouteConfig,
    RouteMatch,
    ServiceConfig,
    ServerTlsFiles,
    ServiceTimeouts,
    TlsFiles,
    WeightedTarget,
)
from .audit import parse_audit
from .log_levels import LOG_FORMATS, parse_log_level
from .mesh_tokens import parse_mesh_tokens
from .policy import MeshPolicy, parse_authn, parse_mesh_policy
from .rate_limit import parse_rate_limit
from .rbac import parse_rbac_policy
from .slo import parse_slo
from .tracing import parse_tracing
from .reader import MISSING, ConfigError, Fields, Problems, convert, is_loopback_host, parse_address
from .validation import parse_validation
from .resilience import parse_fault, parse_retries, parse_service_resilience

__all__ = ["ConfigError", "load_bootstrap", "load_mesh", "parse_mesh", "parse_yaml", "read_yaml",
           "reloaded_bootstrap"]

SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false. Under PyYAML's YAML 1.1 rules an unquoted ``on``
    (``retries: {on: [reset]}``), ``off``, ``yes`` or ``no`` silently became a boolean, so a
    documented key turned into ``True: unknown key``."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    """One YAML document with YAML 1.2 booleans (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> Any:
    """One YAML document; errors name the file (and the line, where YAML knows it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["not UTF-8 text"], str(path)) from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{where}invalid YAML: {problem}"], str(path)) from None


# === bootstrap ===========================================================================


def load_bootstrap(path: Path | str) -> Bootstrap:
    path = Path(path)
    problems = Problems()
    top = Fields(read_yaml(path), "", problems)
    service = top.str("service", pattern=SERVICE_NAME)
    mode = top.str("mode", "sidecar", choices=("sidecar", "gateway"))
    app = top.address("app", None)
    listeners = _listeners(top.sub("listeners"), mode, path.parent)
    # Two exclusive forms: `mesh:` + `tls:` files (static), or `control:` (joined).
    controlled = top.has("control")
    for key in ("mesh", "tls"):
        if controlled and top.has(key):
            top.error(key, "cannot be combined with control: the control plane gives the mesh config "
                           "and the certificates (remove one of them)")
    mesh = top.str("mesh", None if controlled else MISSING)
    control = top.optional("control", lambda n: _control(n, path.parent, service))
    mesh_path = ((path.parent / mesh) if isinstance(mesh, str)
                 else control.state_dir / "snapshot.json" if control is not None else path.parent)
    limits = _limits(top.sub("limits"))
    overload = _overload(top.sub("overload"))
    timeouts = _downstream_timeouts(top.sub("timeouts"))
    access_log = _access_log(top.sub("access_log"))
    tls = top.optional("tls", lambda n: _tls(n, path.parent))
    log_level = parse_log_level(top)
    log_format = top.str("log_format", "auto", choices=LOG_FORMATS)
    audit = parse_audit(top.sub("audit"))
    tracing = top.optional("tracing", parse_tracing)
    top.done()
    if mode == "sidecar" and app is None and any(l.name == "inbound" for l in listeners):
        problems.add("app", "is required when an inbound listener is configured")
    if any(l.tls for l in listeners) and tls is None and not controlled:
        problems.add("tls", "is required when a listener uses TLS (or control:, which gives the certificates)")
    problems.raise_if_any(str(path))
    return Bootstrap(
        source=path, service=service, mode=mode, app=app, listeners=tuple(listeners),
        mesh_path=mesh_path, limits=limits, overload=overload, timeouts=timeouts, access_log=access_log,
        tls=tls, log_level=log_level, log_format=log_format, audit=audit, tracing=tracing, control=control,
    )


def reloaded_bootstrap(running: Bootstrap, new: Bootstrap) -> tuple[Bootstrap, list[str]]:
    """What a reload of ``sidecar.yaml`` can apply to a process started with ``running``:
    the bootstrap to run with, and one line per change that waits for a restart.

    Applied live: limits and downstream timeouts (listeners read them per connection and
    per deadline), ``app`` (the local-app cluster), ``mesh`` (the file read on reload), the
    access log, ``log_level`` and ``log_format`` (the reload hands them to the running
    ``LogControl``). Bound at start-up, kept from ``running``: the identity (``service``,
    ``mode``), the listeners (a bound socket, its TLS), the mesh TLS files, the audit sink and
    the tracer.
    """
    pending: list[str] = []

    def differs(path: str, old: object, value: object) -> None:
        if old != value:
            pending.append(f"{path}: {_show(old)} -> {_show(value)}")

    differs("service", running.service, new.service)
    differs("mode", running.mode, new.mode)
    old_listeners = {l.name: l for l in running.listeners}
    new_listeners = {l.name: l for l in new.listeners}
    for name in sorted(old_listeners.keys() | new_listeners.keys()):
        old_l, new_l = old_listeners.get(name), new_listeners.get(name)
        if old_l is None or new_l is None:
            differs(f"listeners.{name}", old_l and _address(old_l.address), new_l and _address(new_l.address))
            continue
        differs(f"listeners.{name}", _address(old_l.address), _address(new_l.address))
        differs(f"listeners.{name}.tls", old_l.tls, new_l.tls)
        differs(f"listeners.{name}.tls", old_l.server_tls, new_l.server_tls)
    if (running.tls is None) != (new.tls is None):
        differs("tls", "configured" if running.tls else None, "configured" if new.tls else None)
    elif running.tls is not None and new.tls is not None:
        for key in ("cert", "key", "bundle", "resume_upstream_sessions"):
            differs(f"tls.{key}", getattr(running.tls, key), getattr(new.tls, key))
    if running.control != new.control:
        pending.append("control: changed")
    if running.audit != new.audit:
        pending.append("audit: changed")
    if running.tracing != new.tracing:
        pending.append("tracing: changed")
    kept = replace(new, service=running.service, mode=running.mode, listeners=running.listeners,
                   tls=running.tls, audit=running.audit,
                   tracing=running.tracing, control=running.control,
                   mesh_path=running.mesh_path if running.control else new.mesh_path)
    return kept, pending


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _show(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ServerTlsFiles):
        return f"{{cert: {value.cert}, key: {value.key}}}"
    return str(value)


def _listeners(node: Fields, mode: str, base: Path) -> list[ListenerConfig]:
    out: list[ListenerConfig] = []
    names = ("outbound", "inbound", "admin", "gateway")
    for name in names:
        if not node.has(name):
            continue
        value = node.data[name]
        server_tls = None
        tls = False
        if isinstance(value, dict):
            sub = node.sub(name)
            address = sub.address("address")
            if name == "gateway":
                server_tls = sub.optional("tls", lambda n: _server_tls(n, base))
            else:
                tls = sub.bool("tls", name == "inbound")
            sub.done()
        else:
            address = node.address(name)
        if address is None:
            continue
        if name == "admin" and not is_loopback_host(address[0]):
            node.error(name, f"must be a loopback address (admin is never public), got {address[0]!r}")
        out.append(ListenerConfig(name=name, address=address, tls=tls,  # type: ignore[arg-type]
                                  server_tls=server_tls))
    node.done()
    if mode == "gateway" and not any(l.name == "gateway" for l in out):
        node.error("gateway", "is required in gateway mode")
    if not any(l.name in ("outbound", "inbound", "gateway") for l in out):
        node.problems.add(node.path, "at least one of outbound, inbound, gateway is required")
    return out


def _server_tls(node: Fields, base: Path) -> ServerTlsFiles | None:
    """The gateway's ``tls: {cert, key}``: a server certificate for outside clients."""
    cert, key = node.str("cert"), node.str("key")
    node.done()
    if not isinstance(cert, str) or not isinstance(key, str):
        return None
    return ServerTlsFiles(cert=base / cert, key=base / key)


def _limits(node: Fields) -> Limits:
    d = Limits()
    limits = Limits(
        max_connections=node.int("max_connections", d.max_connections, min=1),
        max_total_connections=node.int("max_total_connections", d.max_total_connections, min=1),
        max_tls_handshakes=node.int("max_tls_handshakes", d.max_tls_handshakes, min=1),
        max_request_line=node.size("max_request_line", d.max_request_line),
        max_headers_size=node.size("max_headers_size", d.max_headers_size),
        max_header_count=node.int("max_header_count", d.max_header_count, min=1),
        max_request_body=node.size("max_request_body", d.max_request_body),
        max_pipelined=node.int("max_pipelined", d.max_pipelined, min=1, max=1024),
        allow_underscores_in_headers=node.bool(
            "allow_underscores_in_headers", d.allow_underscores_in_headers),
    )
    node.done()
    return limits


def _overload(node: Fields) -> OverloadConfig:
    """``overload: {max_memory: 1GiB, max_loop_lag: 500ms, interval: 250ms}``; ``off`` (YAML
    reads it as false) turns a threshold off."""
    d = OverloadConfig()
    off = {key for key in ("max_memory", "max_loop_lag") if node.has(key) and node.data[key] in (False, "off")}
    config = OverloadConfig(
        max_memory=None if "max_memory" in off else node.size("max_memory", d.max_memory),
        max_loop_lag=None if "max_loop_lag" in off else node.duration("max_loop_lag", d.max_loop_lag, min=0.001),
        interval=node.duration("interval", d.interval, min=0.01))
    node.raw("max_memory", None), node.raw("max_loop_lag", None)  # (read, when off)
    node.done()
    return config


def _downstream_timeouts(node: Fields) -> DownstreamTimeouts:
    d = DownstreamTimeouts()
    timeouts = DownstreamTimeouts(
        request_headers=node.duration("request_headers", d.request_headers, min=0.001),
        idle=node.duration("idle", d.idle, min=0.001),
        drain=node.duration("drain", d.drain),
        tls_handshake=node.duration("tls_handshake", d.tls_handshake, min=0.001),
        tunnel_idle=node.duration("tunnel_idle", d.tunnel_idle, min=0.001),
    )
    node.done()
    return timeouts


def _access_log(node: Fields) -> AccessLogConfig:
    d = AccessLogConfig()
    config = AccessLogConfig(enabled=node.bool("enabled", d.enabled), path=node.str("path", d.path))
    node.done()
    return config


NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # what the stream's hello accepts


def _control(node: Fields, base: Path, service: object) -> ControlConfig | None:
    """``control: {addresses: [...], token_file, state_dir, node, ...}``; relative paths are
    relative to the bootstrap file. The state dir defaults to ``.pake/sidecar-<service>``."""
    addresses = []
    items = node.list("addresses")
    if not node.has("addresses") or (isinstance(node.data["addresses"], list) and not items):
        node.error("addresses", "must name at least one control-plane address (host:port)")
    for item_path, item in items:
        address = convert(node.problems, item_path, item, parse_address)
        if address is not None:
            addresses.append(address)
    token_file = node.str("token_file", None)
    default_state = f".pake/sidecar-{service}" if isinstance(service, str) else ".pake/sidecar"
    state_dir = node.str("state_dir", default_state)
    name = node.str("node", None, pattern=NODE_NAME)
    d = ControlConfig((), Path())
    connect_timeout = node.duration("connect_timeout", d.connect_timeout, min=0.001)
    hello_timeout = node.duration("hello_timeout", d.hello_timeout, min=0.001)
    reconnect_max = node.duration("reconnect_max", d.reconnect_max, min=0.01)
    node.done()
    if not addresses or not isinstance(state_dir, str):
        return None
    return ControlConfig(
        addresses=tuple(addresses), state_dir=base / state_dir,
        token_file=base / token_file if isinstance(token_file, str) else None,
        node=name, connect_timeout=connect_timeout, hello_timeout=hello_timeout,
        reconnect_max=reconnect_max)


def _tls(node: Fields, base: Path) -> TlsFiles | None:
    paths = [node.str(k) for k in ("cert", "key", "bundle")]
    resume = node.bool("resume_upstream_sessions", False)
    node.done()
    if any(p is None or not isinstance(p, str) for p in paths):
        return None
    cert, key, bundle = (base / p for p in paths)
    return TlsFiles(cert=cert, key=key, bundle=bundle, resume_upstream_sessions=resume)


# === mesh ================================================================================


def load_mesh(path: Path | str) -> MeshConfig:
    path = Path(path)
    return parse_mesh(read_yaml(path), source=str(path))


def parse_mesh(data: Any, *, source: str | None = None, version: str | None = None) -> MeshConfig:
    """The one validator of the mesh schema, for files and pushed snapshots alike."""
    problems = Problems()
    top = Fields(data, "", problems)
    trust_domain = top.str("trust_domain", "pake.local", pattern=TRUST_DOMAIN)
    policy = parse_mesh_policy(top)
    mesh_tokens = parse_mesh_tokens(top, trust_domain)
    services: dict[str, ServiceConfig] = {}
    for name, node in top.items("services"):
        if not SERVICE_NAME.match(name):
            problems.add(node.path, f"service name must match {SERVICE_NAME.pattern}, got {name!r}")
            continue
        services[name] = _service(name, node, trust_domain, policy)
    top.done()
    _check_references(services, problems)
    _check_hosts(services, problems)
    problems.raise_if_any(source)
    if version is None:
        canonical = json.dumps(data, sort_keys=True, default=str).encode()
        version = hashlib.sha256(canonical).hexdigest()[:12]
    return MeshConfig(trust_domain=trust_domain, services=services, policy=policy, version=version,
                      mesh_tokens=mesh_tokens)


def _service(name: str, node: Fields, trust_domain: str, policy: MeshPolicy) -> ServiceConfig:
    endpoints = []
    for path, item in node.list("endpoints"):
        address = convert(node.problems, path, item, parse_address)
        if address is not None:
            endpoints.append(address)
    hosts_default = [name, f"{name}.{trust_domain}"]
    hosts = []
    for path, item in node.list("hosts", hosts_default):
        if not isinstance(item, str) or not item or ":" in item or item != item.lower():
            node.problems.add(path, f"must be a lower-case host name without port, got {item!r}")
        else:
            hosts.append(item)
    endpoints_t = tuple(endpoints)
    resilience = parse_service_resilience(node, endpoints_t)
    routes = tuple(_route(path, item, name, node) for path, item in node.list("routes"))
    if not routes:
        routes = (RouteConfig(name=f"{name}/default", match=RouteMatch(),
                              to=(WeightedTarget(service=name),)),)
    service = ServiceConfig(
        name=name,
        endpoints=endpoints_t,
        hosts=tuple(hosts),
        routes=routes,
        timeouts=_service_timeouts(node.sub("timeouts")),
        pool=_pool(node.sub("pool")),
        max_request_body=node.size("max_request_body", None),
        resilience=resilience,
        authn=node.optional("authn", lambda n: parse_authn(n, policy)),
        policy=node.optional("policy", parse_rbac_policy),
        tls=node.bool("tls", True),
    )
    node.optional("slo", parse_slo)  # validated here; the control plane reads it (control/slo.py)
    node.done()
    return service


def _route(path: str, data: Any, service: str, parent: Fields) -> RouteConfig:
    node = Fields(data, path, parent.problems)
    name = node.str("name", f"{service}/{path.rsplit('[', 1)[-1].rstrip(']')}")
    match = _match(node.sub("match"))
    targets = []
    for tpath, item in node.list("to", [{"service": service}]):
        t = Fields(item, tpath, parent.problems)
        targets.append(WeightedTarget(
            service=t.str("service", pattern=SERVICE_NAME),
            weight=t.int("weight", 100, min=0, max=10_000)))
        t.done()
    if targets and sum(t.weight for t in targets) == 0:
        node.error("to", "weights must not all be 0")
    timeout = node.duration("timeout", None, min=0.001)
    retries = node.optional("retries", parse_retries)
    fault = node.optional("fault", parse_fault)
    rate_limit = node.optional("rate_limit", parse_rate_limit)
    validation = node.optional("validation", parse_validation)
    node.done()
    return RouteConfig(name=name, match=match, to=tuple(targets), timeout=timeout,
                       retries=retries, fault=fault, rate_limit=rate_limit, validation=validation)


def _match(node: Fields) -> RouteMatch:
    prefix = node.str("path_prefix", "/")
    exact = node.str("path", None)
    for key, value in (("path_prefix", prefix), ("path", exact)):
        if isinstance(value, str) and not value.startswith("/"):
            node.error(key, f"must start with /, got {value!r}")
    methods = []
    for mpath, m in node.list("methods"):
        if not isinstance(m, str) or not m.isupper() or not m.isalpha():
            node.problems.add(mpath, f"must be an upper-case HTTP method, got {m!r}")
        else:
            methods.append(m)
    headers = []
    hnode = node.sub("headers")
    for hname, hvalue in hnode.data.items():
        hnode.raw(hname)
        if not isinstance(hname, str) or not HEADER_NAME.match(hname.lower()):
            hnode.error(str(hname), "is not a valid header name")
        elif not isinstance(hvalue, str):
            hnode.error(hname, f"must be a string, got {hvalue!r}")
        else:
            headers.append((hname.lower(), hvalue))
    node.done()
    return RouteMatch(path_prefix=prefix, path_exact=exact, methods=frozenset(methods),
                      headers=tuple(headers))


def _service_timeouts(node: Fields) -> ServiceTimeouts:
    d = ServiceTimeouts()
    timeouts = ServiceTimeouts(
        route=node.duration("route", d.route, min=0.001),
        connect=node.duration("connect", d.connect, min=0.001),
    )
    node.done()
    return timeouts


def _pool(node: Fields) -> PoolConfig:
    d = PoolConfig()
    pool = PoolConfig(
        max_connections=node.int("max_connections", d.max_connections, min=1),
        max_idle=node.int("max_idle", d.max_idle, min=0),
        idle_timeout=node.duration("idle_timeout", d.idle_timeout, min=0.001),
        max_pending=node.int("max_pending", d.max_pending, min=0),
    )
    node.done()
    return pool


def _check_references(services: dict[str, ServiceConfig], problems: Problems) -> None:
    for service in services.values():
        for i, route in enumerate(service.routes):
            for j, target in enumerate(route.to):
                if target.service and target.service not in services:
                    problems.add(f"services.{service.name}.routes[{i}].to[{j}].service",
                                 f"unknown service {target.service!r}")


def _check_hosts(services: dict[str, ServiceConfig], problems: Problems) -> None:
    seen: dict[str, str] = {}
    for service in services.values():
        for host in service.hosts:
            if host in seen and seen[host] != service.name:
                problems.add(f"services.{service.name}.hosts",
                             f"host {host!r} is already routed to {seen[host]!r}")
            seen.setdefault(host, service.name)
