"""`pakectl`: the operator's command line. Thin: parse argv, call certs/control, print.

Rules: `main(argv)` returns the exit code and is the only place that turns
errors into one line on stderr (1: the operation failed, 2: bad usage); no
traceback reaches the operator. Each top-level command registers itself in
COMMANDS, so `serve`, `apply`, `status` slot in beside `ca` and `certs`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TextIO

from certs.bundle import TrustBundle
from certs.ca import CAError, CertificateAuthority
from certs.describe import describe_certificate
from certs.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, check_service
from certs.issue import issue_workload
from certs.pem import PemError, load_certificates
from control.admin_client import AdminUnreachable
from control.commands import MESH_COMMANDS, CommandFailed, register_certs_rotate
from sidecar.config.reader import format_duration as format_seconds
from sidecar.config.reader import parse_duration as parse_seconds

__all__ = [
    "COMMANDS",
    "DEFAULT_STATE_DIR",
    "build_parser",
    "format_duration",
    "main",
    "parse_duration",
]

DEFAULT_STATE_DIR = Path(".pake/ca")
Handler = Callable[[argparse.Namespace, TextIO], int]
# argparse's subparsers action has no public type name.
Subparsers = Any


class UsageError(Exception):
    """Bad command line: exit code 2, one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting.

    argparse's default prints the usage block and then the error; we want
    one line, and main() decides the exit code.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


# === durations ===
# The grammar is the mesh's own (sidecar.config.reader): what `pakectl` accepts, a config accepts.


def parse_duration(text: str) -> timedelta:
    """An argparse type: a positive duration such as `90s`, `24h`, `7d` or `1h30m`."""
    try:
        seconds = parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The inverse of parse_duration, in the largest exact unit: 86400s -> 1d."""
    return format_seconds(value.total_seconds())


# === pakectl ca ===


def _register_ca(sub: Subparsers) -> None:
    ca = sub.add_parser("ca", help="the mesh certificate authority")
    ca_sub = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = ca_sub.add_parser("init", help="create a root CA, or an intermediate under one")
    init.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR,
        help=f"where the CA lives (default {DEFAULT_STATE_DIR})",
    )
    init.add_argument(
        "--trust-domain", default=None,
        help=f"trust domain of a new root (default {DEFAULT_TRUST_DOMAIN})",
    )
    init.add_argument(
        "--intermediate-of", type=Path, metavar="ROOT_DIR",
        help="create an intermediate signed by the CA in ROOT_DIR",
    )
    init.add_argument("--validity", type=parse_duration, help="lifetime, e.g. 3650d")
    init.set_defaults(handler=_ca_init)


def _ca_init(args: argparse.Namespace, out: TextIO) -> int:
    extra = {} if args.validity is None else {"validity": args.validity}
    if args.intermediate_of is not None:
        if args.trust_domain is not None:
            root_domain = CertificateAuthority.load(args.intermediate_of).trust_domain
            if args.trust_domain != root_domain:
                raise UsageError(
                    f"pakectl ca init: --trust-domain {args.trust_domain} differs from "
                    f"{root_domain}, the trust domain of {args.intermediate_of}"
                )
        ca = CertificateAuthority.init_intermediate(args.intermediate_of, args.state_dir, **extra)
        kind = f"intermediate CA under {args.intermediate_of}"
    else:
        ca = CertificateAuthority.init(
            args.state_dir, args.trust_domain or DEFAULT_TRUST_DOMAIN, **extra
        )
        kind = "root CA"
    print(
        f"created {kind} for trust domain {ca.trust_domain} in {args.state_dir}\n"
        f"  certificate  {args.state_dir / 'ca.pem'}\n"
        f"  key          {args.state_dir / 'ca-key.pem'} (0600)\n"
        f"  bundle       {args.state_dir / 'bundle.pem'}\n"
        f"  not_after    {ca.certificate.not_valid_after_utc.isoformat()}",
        file=out,
    )
    return 0


# === pakectl certs ===


def _register_certs(sub: Subparsers) -> None:
    certs = sub.add_parser("certs", help="workload certificates and trust bundles")
    certs_sub = certs.add_subparsers(dest="action", required=True, metavar="ACTION")

    issue = certs_sub.add_parser("issue", help="issue a workload certificate and key")
    issue.add_argument("--service", required=True, help="service name, e.g. orders")
    issue.add_argument("--out", type=Path, required=True, metavar="DIR")
    issue.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR,
        help=f"the CA to sign with (default {DEFAULT_STATE_DIR})",
    )
    issue.add_argument(
        "--ttl", type=parse_duration, default=timedelta(hours=24),
        help="lifetime: 90s, 30m, 24h, 7d (default 24h)",
    )
    issue.set_defaults(handler=_certs_issue)

    show = certs_sub.add_parser("show", help="show the certificates in a PEM file")
    show.add_argument("file", type=Path, metavar="FILE")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_certs_show)

    bundle = certs_sub.add_parser("bundle", help="merge roots into a trust bundle (CA rotation)")
    bundle.add_argument("--out", type=Path, required=True, metavar="FILE")
    bundle.add_argument("roots", type=Path, nargs="+", metavar="ROOT.pem")
    bundle.set_defaults(handler=_certs_bundle)

    register_certs_rotate(certs_sub)


def _certs_issue(args: argparse.Namespace, out: TextIO) -> int:
    check_service(args.service)  # a bad name fails before the CA is even loaded
    ca = CertificateAuthority.load(args.state_dir)
    files = issue_workload(ca, args.service, args.out, args.ttl)
    print(
        f"issued {SpiffeId(ca.trust_domain, args.service)} (ttl {format_duration(args.ttl)})\n"
        f"  certificate  {files.cert}\n"
        f"  key          {files.key} (0600)\n"
        f"  bundle       {files.bundle}",
        file=out,
    )
    return 0


_SHOW_ROWS = (
    ("subject", "subject"),
    ("SPIFFE ID", "spiffe_id"),
    ("issuer", "issuer"),
    ("serial", "serial"),
    ("not_before", "not_before"),
    ("not_after", "not_after"),
    ("seconds left", "seconds_to_expiry"),
)


def _certs_show(args: argparse.Namespace, out: TextIO) -> int:
    now = datetime.now(UTC)
    described = [describe_certificate(c, now) for c in load_certificates(args.file)]
    if args.json:
        json.dump({"file": str(args.file), "certificates": described}, out, indent=2)
        out.write("\n")
        return 0
    width = max(len(label) for label, _ in _SHOW_ROWS)
    for i, info in enumerate(described):
        kind = "CA" if info["is_ca"] else "leaf"
        print(f"{args.file} [{i + 1}/{len(described)}] {kind}", file=out)
        for label, key in _SHOW_ROWS:
            value = info[key]
            if key == "spiffe_id" and value is None:
                value = f"(none; URI SANs: {', '.join(info['uri_sans']) or 'none'})"
            elif key == "seconds_to_expiry" and value <= 0:
                value = f"{value} (EXPIRED)"
            print(f"  {label:<{width}}  {value}", file=out)
    return 0


def _certs_bundle(args: argparse.Namespace, out: TextIO) -> int:
    bundle = TrustBundle.merge_files(args.roots)
    bundle.write(args.out)
    print(f"wrote {args.out} with {len(bundle.roots)} root(s):", file=out)
    for entry in bundle.entries():
        print(
            f"  {entry.fingerprint[:23]}...  {entry.subject}  "
            f"not_after {entry.not_after.isoformat()}",
            file=out,
        )
    return 0


# === entry point ===

COMMANDS: Mapping[str, Callable[[Subparsers], None]] = MappingProxyType(
    {"ca": _register_ca, "certs": _register_certs, **MESH_COMMANDS}
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pakectl", description="PAKE Mesh operator CLI")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS.values():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run pakectl; return 0 on success, 1 if the operation failed, 2 on bad usage."""
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        return handler(args, sys.stdout)
    except UsageError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    except (PemError, CAError, IdentityError, CommandFailed, AdminUnreachable) as exc:
        print(f"pakectl: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pakectl: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help exits through argparse
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug; still one line, never a traceback
        print(f"pakectl: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
