"""``python -m examples.certs`` (``make certs``): the CA and certificates of the mTLS quickstart.

Runs ``pakectl ca init`` and ``pakectl certs issue`` (the same ``control.cli.main`` the
``pakectl`` script runs, in this process) into ``examples/mtls/certs/``, which git ignores.
Idempotent: a CA that exists is kept, and a workload certificate is issued again only when
its files are missing or unusable (expired, key does not match...), so re-running it a day
later repairs what expired and touches nothing else. Prints what it made and why.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from certs.pem import PemError
from certs.ssl_context import TlsFiles, load_material
from control.cli import main as pakectl

__all__ = ["DEFAULT_DIR", "SERVICES", "ensure_certs", "main"]

DEFAULT_DIR = Path(__file__).resolve().parent / "mtls" / "certs"
SERVICES = ("frontend", "echo")
TTL = "24h"


def _run(argv: list[str]) -> None:
    print("$ pakectl " + " ".join(argv), flush=True)
    code = pakectl(argv)
    if code != 0:
        raise SystemExit(f"examples.certs: pakectl {argv[0]} {argv[1]} failed (exit {code})")


def _problem(files: TlsFiles) -> str | None:
    """Why these files cannot serve (the sidecar would refuse to start), or None."""
    if not files.cert.exists() or not files.key.exists():
        return "missing"
    try:
        load_material(files)
    except PemError as exc:
        return str(exc)
    return None


def ensure_certs(out: Path = DEFAULT_DIR, services: Sequence[str] = SERVICES) -> list[str]:
    """Make what is missing or unusable under ``out``; return what was made (empty: nothing)."""
    out = Path(out)
    ca_dir = out / "ca"
    made: list[str] = []
    if not (ca_dir / "ca.pem").exists():
        _run(["ca", "init", "--state-dir", str(ca_dir)])
        made.append(f"CA in {ca_dir}")
    for service in services:
        files = TlsFiles.of(out / f"{service}.pem", out / f"{service}-key.pem", out / "bundle.pem")
        problem = _problem(files)
        if problem is None:
            continue
        if problem != "missing":
            print(f"re-issuing {service}: {problem}", flush=True)
        _run(["certs", "issue", "--service", service, "--out", str(out), "--state-dir", str(ca_dir),
              "--ttl", TTL])
        made.append(f"{service} certificate in {files.cert}")
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.certs", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR,
                        help=f"where the CA and certificates go (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    made = ensure_certs(args.out)
    if made:
        print("made: " + "; ".join(made))
    else:
        print(f"certificates in {args.out} are present and valid; nothing to do")


if __name__ == "__main__":
    main()
