"""`pakectl` commands of a running mesh: serve, token, apply, history, rollback, get, status,
check and certs rotate. Each talks to the admin API (default 127.0.0.1:15014), except
``serve``, which is the control plane. Errors are ``CommandFailed`` (one line, exit 1);
``cli.main`` prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
from datetime import datetime, timedelta
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

import yaml

from control.admin_client import DEFAULT_ADMIN, AdminClient
from sidecar.config.load import parse_mesh, read_yaml
from sidecar.config.log_levels import LOG_FORMATS, LogLevels, parse_level_spec
from sidecar.config.reader import ConfigError, parse_address, parse_duration

__all__ = ["MESH_COMMANDS", "CommandFailed", "register_certs_rotate"]

Subparsers = Any


class CommandFailed(Exception):
    """The operation failed; the message is the one line the operator sees."""


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None  # names the value and the grammar


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _log_levels(text: str) -> LogLevels:
    try:
        return parse_level_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _admin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                        help=f"the control plane's admin API (default {DEFAULT_ADMIN})")
    parser.add_argument("--admin-token-file", type=Path, metavar="FILE",
                        help="the admin token (needed when admin is not on loopback; "
                             "or set PAKECTL_ADMIN_TOKEN)")


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient.from_args(args.admin, args.admin_token_file)


def _fail(status: int, body: Any) -> CommandFailed:
    if isinstance(body, dict):
        return CommandFailed(f"{body.get('error', 'error')}: {body.get('detail', body)}")
    return CommandFailed(f"HTTP {status}: {body}")


def _register_history(sub: Subparsers) -> None:
    p = sub.add_parser("history", help="applied versions: who and when")
    _admin_args(p)
    p.set_defaults(handler=_history)


def _register_rollback(sub: Subparsers) -> None:
    p = sub.add_parser("rollback", help="re-apply an earlier version (default: the previous)")
    p.add_argument("version", type=int, nargs="?", metavar="VERSION")
    _admin_args(p)
    p.set_defaults(handler=_rollback)


def _register_get(sub: Subparsers) -> None:
    p = sub.add_parser("get", help="show the running config's services, routes or policies (YAML)")
    p.add_argument("what", choices=("services", "routes", "policies"))
    _admin_args(p)
    p.set_defaults(handler=_get)


def _register_status(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="a table of sidecars")
    p.add_argument("--json", action="store_true", help="print JSON")
    _admin_args(p)
    p.set_defaults(handler=_status)


def _register_check(sub: Subparsers) -> None:
    p = sub.add_parser("check", help="preflight: one line per check, exit 1 if any fails")
    _admin_args(p)
    p.set_defaults(handler=_check)


# === serve ===


def _register_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="run the control plane")
    p.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                   help="CA, store, tokens (created if missing)")
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 15010), metavar="HOST:PORT",
                   help="sidecar join + streams, TLS (default 127.0.0.1:15010; port 0: any)")
    p.add_argument("--admin", type=_address, default=("127.0.0.1", 15014), metavar="HOST:PORT",
                   help="admin API (default 127.0.0.1:15014; not loopback: a token is required)")
    p.add_argument("--workload-ttl", type=_duration, default=86400.0, metavar="DURATION",
                   help="lifetime of workload certificates (default 24h)")
    p.add_argument("--heartbeat-interval", type=_duration, default=5.0, metavar="DURATION")
    p.add_argument("--endpoint-grace", type=_duration, default=15.0, metavar="DURATION",
                   help="an endpoint whose heartbeats stop for this long is removed (default 15s)")
    p.add_argument("--max-streams", type=int, default=10_000)
    p.add_argument("--send-timeout", type=_duration, default=10.0, metavar="DURATION",
                   help="a stream whose send takes longer is closed (default 10s)")
    p.add_argument("--store", default=None, metavar="etcd://HOST:PORT[,HOST:PORT...]",
                   help="keep the state in etcd, shared by several replicas (default: the "
                        "directory store under --state-dir)")
    p.add_argument("--store-prefix", default="/pake/", metavar="PREFIX",
                   help="the etcd key prefix of this mesh (default /pake/)")
    p.add_argument("--lease-ttl", type=_duration, default=10.0, metavar="DURATION",
                   help="etcd: a dead replica's registrations expire after this (default 10s)")
    p.add_argument("--store-key-file", type=Path, metavar="FILE",
                   help="the key that seals the CA key in the store; the same file on every "
                        "replica (default STATE_DIR/store.key, created if missing)")
    p.add_argument("--otlp", type=_address, default=None, metavar="HOST:PORT",
                   help="also accept OTLP/HTTP traces here, e.g. 127.0.0.1:4318 (default: off); "
                        "the dashboard and /api/traces show the most recent ones")
    p.add_argument("--stats-window", type=_duration, default=60.0, metavar="DURATION",
                   help="the sliding window of pakectl top and the dashboard (default 60s)")
    p.add_argument("--log-level", type=_log_levels, default=LogLevels(), metavar="LEVELS",
                   help="a level (debug, info, warning, error), then component=level pairs, "
                        "comma-separated: info,pake.control.push=debug (default info)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                   help="json, console, or auto: console when stdout is a terminal (default)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    from control.ca_state import CAStateError
    from control.replica import StoreUrlError, parse_store_url
    from control.store import StoreError
    from control.server import ServeOptions, serve
    from sidecar.observability.log_writer import LogOutputs
    from sidecar.observability.logging import configure_logging

    if args.heartbeat_interval >= args.endpoint_grace:
        raise CommandFailed("--endpoint-grace must be longer than --heartbeat-interval")
    etcd: tuple[str, ...] = ()
    if args.store is not None:
        try:
            etcd = parse_store_url(args.store)
        except StoreUrlError as exc:
            raise CommandFailed(str(exc)) from None
    if args.lease_ttl < 2 or args.lease_ttl != int(args.lease_ttl):
        raise CommandFailed(f"--lease-ttl: a whole number of seconds, at least 2s, got {args.lease_ttl:g}s")
    if not args.store_prefix.startswith("/") or not args.store_prefix.endswith("/"):
        raise CommandFailed(f"--store-prefix: must start and end with '/', got {args.store_prefix!r}")
    options = ServeOptions(
        state_dir=args.state_dir, listen=args.listen, admin=args.admin,
        workload_ttl=timedelta(seconds=args.workload_ttl),
        heartbeat_interval=args.heartbeat_interval, endpoint_grace=args.endpoint_grace,
        max_streams=args.max_streams, send_timeout=args.send_timeout,
        etcd=etcd, store_prefix=args.store_prefix, lease_ttl=int(args.lease_ttl),
        store_key_file=args.store_key_file,
        otlp=args.otlp, stats_window=args.stats_window,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency
        run = asyncio.run
    else:
        run = uvloop.run
    logs = LogOutputs()  # the sidecar's way: lines leave the loop through a bounded queue
    configure_logging(logs.channel("events"), args.log_level, args.log_format)
    try:
        return run(serve(options))
    except (StoreError, CAStateError) as exc:  # etcd unreachable, a CA sealed with another key
        raise CommandFailed(str(exc)) from None
    finally:
        logs.close(2.0)  # the loop has stopped: write what is queued ("stopped" included)


# === tokens ===


def _register_token(sub: Subparsers) -> None:
    token = sub.add_parser("token", help="join tokens")
    token_sub = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="make a join token for a service; prints it")
    create.add_argument("--service", required=True)
    create.add_argument("--ttl", type=_duration, default=3600.0, metavar="DURATION",
                        help="how long it can be used (default 1h)")
    create.add_argument("--uses", type=int, default=1, help="how many sidecars may join with it")
    _admin_args(create)
    create.set_defaults(handler=_token_create)
    listing = token_sub.add_parser("list", help="tokens and their state (never the secrets)")
    _admin_args(listing)
    listing.set_defaults(handler=_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id")
    _admin_args(revoke)
    revoke.set_defaults(handler=_token_revoke)


def _token_create(args: argparse.Namespace, out: TextIO) -> int:
    status, body = _client(args).post("/v1/tokens", {"service": args.service, "ttl": args.ttl,
                                                      "uses": args.uses, "by": _who()})
    if status != 200:
        raise _fail(status, body)
    print(body["token"], file=out)
    print(f"token {body['id']} for service {body['service']}: {body['uses']} use(s), "
          f"expires {body['expires_at']}", file=sys.stderr)
    return 0


def _token_list(args: argparse.Namespace, out: TextIO) -> int:
    status, body = _client(args).get("/v1/tokens")
    if status != 200:
        raise _fail(status, body)
    rows = [("ID", "SERVICE", "STATE", "USED", "EXPIRES", "CREATED BY")]
    rows += [(t["id"], t["service"], t["state"], f"{t['used']}/{t['uses']}", t["expires_at"],
              t["created_by"]) for t in body["tokens"]]
    _table(rows, out)
    return 0


def _token_revoke(args: argparse.Namespace, out: TextIO) -> int:
    status, body = _client(args).post(f"/v1/tokens/{args.id}/revoke")
    if status != 200:
        raise _fail(status, body)
    print(f"revoked token {body['id']} (service {body['service']})", file=out)
    return 0


# === config ===


def _register_apply(sub: Subparsers) -> None:
    p = sub.add_parser("apply", help="validate and apply a mesh.yaml")
    p.add_argument("-f", "--file", type=Path, required=True, metavar="MESH.yaml")
    p.add_argument("--dry-run", action="store_true", help="validate and print the diff only")
    p.add_argument("--expect-version", type=int, metavar="N",
                   help="refuse if the running version is not N (no lost update)")
    _admin_args(p)
    p.set_defaults(handler=_apply)


def _print_errors(source: str, problems: list[str]) -> CommandFailed:
    for problem in problems:
        print(f"{source}: {problem}", file=sys.stderr)
    return CommandFailed(f"{source}: {len(problems)} error(s); nothing applied")


def _apply(args: argparse.Namespace, out: TextIO) -> int:
    source = str(args.file)
    try:
        data = read_yaml(args.file)
        parse_mesh(data, source=source)
    except ConfigError as exc:
        raise _print_errors(exc.source or source, exc.problems) from None
    client = _client(args)
    body: dict[str, Any] = {"mesh": data, "by": _who(), "dry_run": args.dry_run}
    if args.expect_version is not None:
        body["expect_version"] = args.expect_version
    status, reply = client.post("/v1/config", body)
    if status == 422 or (args.dry_run and status == 200 and not reply["valid"]):
        raise _print_errors(source, reply["errors"])
    if status != 200:
        raise _fail(status, reply)
    if args.dry_run:
        out.write(reply["diff"] or f"no changes against version {reply['running_version']}\n")
        return 0
    print(f"applied version {reply['version']} ({len(reply['services'])} services)", file=out)
    return 0


def _history(args: argparse.Namespace, out: TextIO) -> int:
    status, body = _client(args).get("/v1/config/history")
    if status != 200:
        raise _fail(status, body)
    rows = [("VERSION", "APPLIED AT", "BY", "NOTE")]
    for v in body["versions"]:
        note = f"rollback to {v['rollback_of']}" if v["rollback_of"] else ""
        rows.append((str(v["version"]), v["at"], v["by"], note))
    _table(rows, out)
    return 0


def _rollback(args: argparse.Namespace, out: TextIO) -> int:
    status, body = _client(args).post("/v1/config/rollback", {"version": args.version, "by": _who()})
    if status == 422:
        raise _print_errors(f"version {args.version}", body["errors"])
    if status != 200:
        raise _fail(status, body)
    print(f"rolled back to version {body['rollback_of']}: applied as version {body['version']}",
          file=out)
    return 0


def _get(args: argparse.Namespace, out: TextIO) -> int:
    status, body = _client(args).get("/v1/config")
    if status != 200:
        raise _fail(status, body)
    services = body["mesh"].get("services") or {}
    if args.what == "services":
        shown: Any = services
    else:
        key = "routes" if args.what == "routes" else "policy"
        shown = {name: s[key] for name, s in services.items() if isinstance(s, dict) and key in s}
    out.write(f"# version {body['version']}\n")
    out.write(yaml.safe_dump(shown, sort_keys=True, default_flow_style=False))
    return 0


# === status and check ===


def _status(args: argparse.Namespace, out: TextIO) -> int:
    status, body = _client(args).get("/v1/status")
    if status != 200:
        raise _fail(status, body)
    if args.json:
        json.dump(body, out, indent=2)
        out.write("\n")
        return 0
    print(f"config version {body['config_version']}; CA {body['ca']['trust_domain']} "
          f"valid {int(body['ca']['days_left'])} more days", file=out)
    rows = [("SERVICE", "NODE", "ADDRESS", "VERSION", "STATE", "APP", "CERT EXPIRY", "CONNECTED SINCE")]
    notes = []
    for s in body["sidecars"]:
        rows.append((s["service"], s["node"], s["address"] or "-", s["held_version"] or "-",
                     s["state"], "healthy" if s["app_healthy"] else "UNHEALTHY",
                     s["cert_expiry"] or "-", s["connected_since"] or "-"))
        if s["last_nack"] and s["state"] != "acked":
            notes.append(f"  {s['service']}/{s['node']}: NACK of {s['last_nack']['version']}: "
                         f"{s['last_nack']['error']}")
    _table(rows, out)
    for note in notes:
        print(note, file=out)
    return 0


def _check(args: argparse.Namespace, out: TextIO) -> int:
    results: list[tuple[bool, str]] = []
    try:
        status, body = _client(args).get("/v1/status")
    except Exception as exc:  # AdminUnreachable: that is the check's answer
        print(f"✘ control plane reachable: {exc}", file=out)
        return 1
    if status != 200:
        print(f"✘ control plane reachable: HTTP {status}: {body}", file=out)
        return 1
    results.append((True, f"control plane reachable at {args.admin} (config version "
                          f"{body['config_version']})"))
    if body["config_version"] is None:
        results.append((False, "no config applied: run pakectl apply -f mesh.yaml"))
    days = body["ca"]["days_left"]
    results.append((days >= 60, f"CA valid for {int(days)} more days" + (
        "" if days >= 60 else ": rotate it now with pakectl certs rotate --ca")))
    sidecars = body["sidecars"]
    away = [s for s in sidecars if not s["connected"]]
    results.append((not away, f"all {len(sidecars)} sidecar(s) connected" if not away else
                    f"{len(away)} sidecar(s) not connected: " + ", ".join(
                        f"{s['service']}/{s['node']}" for s in away)))
    behind = [s for s in sidecars if s["connected"] and s["state"] in ("pending", "no config")]
    stale = [s for s in sidecars if s["connected"] and s["state"] == "stale"]
    results.append((not behind, "every sidecar on the latest version" if not behind else
                    "not on the latest version yet: " + ", ".join(
                        f"{s['service']}/{s['node']} ({s['held_version']})" for s in behind)))
    results.append((not stale, "no stale sidecar" if not stale else
                    "stale (NACKed the latest version): " + "; ".join(
                        f"{s['service']}/{s['node']}: {s['last_nack']['error']}" for s in stale)
                    + ": fix the config and apply again"))
    now = datetime.fromisoformat(body["now"])
    expiring = []
    for s in sidecars:
        if s["connected"] and s.get("cert_expiry"):
            start, end = (datetime.fromisoformat(s["cert_issued_at"]),
                          datetime.fromisoformat(s["cert_expiry"]))
            if end - now < (end - start) / 3:
                expiring.append(f"{s['service']}/{s['node']} ({end.isoformat()})")
    results.append((not expiring, "no workload certificate within 1/3 of its life of expiry"
                    if not expiring else "certificates near expiry: " + ", ".join(expiring)
                    + ": run pakectl certs rotate"))
    for ok, text in results:
        print(f"{'✔' if ok else '✘'} {text}", file=out)
    return 0 if all(ok for ok, _ in results) else 1


# === top ===


def _register_top(sub: Subparsers) -> None:
    p = sub.add_parser("top", help="live traffic per service and route: req/s, success, "
                                   "p50/p95/p99, breakers, SLOs")
    p.add_argument("--json", action="store_true", help="print one sample as JSON and exit")
    p.add_argument("--interval", type=_duration, default=2.0, metavar="DURATION",
                   help="time between refreshes (default 2s)")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="stop after N refreshes (default: until Ctrl-C)")
    _admin_args(p)
    p.set_defaults(handler=_top)


def _top(args: argparse.Namespace, out: TextIO) -> int:
    from control.top import run_top

    client = _client(args)

    def fetch() -> dict[str, Any]:
        status, body = client.get("/api/stats")
        if status != 200:
            raise _fail(status, body)
        return dict(body)

    return run_top(fetch, out, as_json=args.json, interval=args.interval, count=args.count)


# === certs rotate ===


def register_certs_rotate(certs_sub: Subparsers) -> None:
    rotate = certs_sub.add_parser("rotate", help="renew every workload certificate now "
                                                 "(--ca: rotate the CA itself)")
    rotate.add_argument("--timeout", type=_duration, default=60.0, metavar="DURATION",
                        help="how long to wait for the sidecars' acks (default 60s; "
                             "with --ca: per phase)")
    rotate.add_argument("--ca", action="store_true",
                        help="rotate the CA with an overlap: new root into every bundle, new "
                             "certificates from it, old root out; re-run to continue")
    rotate.add_argument("--json", action="store_true", help="print the result as JSON (--ca)")
    _admin_args(rotate)
    rotate.set_defaults(handler=_certs_rotate)


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total == 0 else width * done // total
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _certs_rotate_ca(args: argparse.Namespace, out: TextIO) -> int:
    """One line per phase (and per change of its count); the last line is the result."""
    client = _client(args)
    final: dict[str, Any] = {}
    lines = sys.stderr if args.json else out
    for item in client.stream("/v1/certs/rotate-ca", {"timeout": args.timeout, "by": _who()},
                              args.timeout * 3 + 30):
        event = item["event"]
        if event == "start":
            how = f"continuing at phase {item['phase']}" if item["resumed"] else "starting"
            print(f"CA rotation {how}: new root {item['new_fingerprint'][:16]}...", file=lines)
        elif event == "phase":
            print(f"phase {item['step']}/{item['of']} {item['phase']}: {_PHASE_TEXT[item['phase']]}: "
                  f"{item['done']}/{item['total']} sidecars", file=lines)
        elif event == "timeout":
            print(f"phase {item['phase']}: still waiting for {', '.join(item['waiting'])}", file=lines)
        elif event == "done":
            final = item
        lines.flush()
    if not final:
        raise CommandFailed("the control plane ended the CA rotation without a result; run it again")
    if args.json:
        json.dump({k: v for k, v in final.items() if k != "event"}, out, indent=2)
        out.write("\n")
    elif final.get("ok"):
        print(f"CA rotated: every sidecar trusts only root {final['new_fingerprint'][:16]}...",
              file=out)
    else:
        reason = final.get("error") or f"stopped in phase {final.get('phase')}"
        print(f"CA rotation not finished: {reason}; run `pakectl certs rotate --ca` again to "
              "continue", file=out)
    return 0 if final.get("ok") else 1


_PHASE_TEXT = {
    "bundle": "new root in every bundle",
    "reissue": "certificates from the new root",
    "trim": "old root out of every bundle",
}


def _certs_rotate(args: argparse.Namespace, out: TextIO) -> int:
    if args.ca:
        return _certs_rotate_ca(args, out)
    client = _client(args)
    final: dict[str, Any] = {}
    for item in client.stream("/v1/certs/rotate", {"timeout": args.timeout}, args.timeout + 10):
        if item["event"] == "start":
            print(f"renewing {item['total']} workload certificate(s)", file=out)
            print(_bar(0, item["total"]), file=out)
        elif item["event"] == "renewed":
            print(f"{_bar(item['done'], item['total'])} {item['service']}/{item['node']} "
                  f"until {item['not_after']}", file=out)
        elif item["event"] == "done":
            final = item
        out.flush()
    if not final:
        raise CommandFailed("the control plane ended the rotation without a result")
    print(f"renewed {final['renewed']} of {final['total']}", file=out)
    for f in final["failed"]:
        print(f"  not renewed: {f['service']}/{f['node']}: {f['reason']}", file=out)
    return 0 if not final["failed"] else 1


def _table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)



# The top-level commands this module adds, for cli.COMMANDS.
MESH_COMMANDS: Mapping[str, Callable[[Subparsers], None]] = MappingProxyType({
    "serve": _register_serve,
    "token": _register_token,
    "apply": _register_apply,
    "history": _register_history,
    "rollback": _register_rollback,
    "get": _register_get,
    "status": _register_status,
    "check": _register_check,
    "top": _register_top,
})
