"""`pakectl ca` and `pakectl certs` end to end as an operator runs them, then main() in-process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certs.identity import SpiffeId, workload_identity
from certs.pem import load_certificates
from certs.ssl_context import TlsContextSource, TlsFiles
from control.cli import COMMANDS, format_duration, main, parse_duration

PAKECTL = Path(sys.executable).parent / "pakectl"


def pakectl(*args: str | Path, cwd: Path, module: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (or `python -m control`)."""
    if module or not PAKECTL.exists():
        cmd: list[str | Path] = [sys.executable, "-m", "control", *args]
    else:
        cmd = [PAKECTL, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pakectl")
    return lines[0]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    ok(pakectl("ca", "init", "--state-dir", "ca", cwd=tmp_path))
    return tmp_path / "ca"


def test_ca_init_issue_show(tmp_path: Path, ca_dir: Path) -> None:
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600

    out = ok(pakectl("certs", "issue", "--service", "orders", "--out", "certs",
                     "--state-dir", "ca", "--ttl", "90m", cwd=tmp_path))
    assert "spiffe://pake.local/service/orders" in out
    certs = tmp_path / "certs"
    assert (certs / "orders-key.pem").stat().st_mode & 0o777 == 0o600

    shown = json.loads(ok(pakectl("certs", "show", "certs/orders.pem", "--json", cwd=tmp_path)))
    (leaf,) = shown["certificates"]
    assert leaf["spiffe_id"] == "spiffe://pake.local/service/orders"
    assert leaf["subject"] == "CN=orders"
    assert 90 * 60 - 30 < leaf["seconds_to_expiry"] <= 90 * 60
    assert int(leaf["serial"], 16) == load_certificates(certs / "orders.pem")[0].serial_number

    table = ok(pakectl("certs", "show", "certs/orders.pem", cwd=tmp_path))
    for label in ("subject", "SPIFFE ID", "serial", "not_before", "not_after", "seconds left"):
        assert label in table
    assert "spiffe://pake.local/service/orders" in table

    # What the CLI wrote is what the sidecar loads.
    source = TlsContextSource(TlsFiles(certs / "orders.pem", certs / "orders-key.pem",
                                       certs / "bundle.pem"))
    assert source.spiffe_id == SpiffeId("pake.local", "orders")


def test_intermediate_and_custom_trust_domain(tmp_path: Path) -> None:
    ok(pakectl("ca", "init", "--state-dir", "root", "--trust-domain", "mesh.example",
               cwd=tmp_path, module=True))
    ok(pakectl("ca", "init", "--state-dir", "int", "--intermediate-of", "root", cwd=tmp_path))
    ok(pakectl("certs", "issue", "--service", "payments", "--out", "out",
               "--state-dir", "int", cwd=tmp_path))
    chain = load_certificates(tmp_path / "out" / "payments.pem")
    assert len(chain) == 2
    der = chain[0].public_bytes(Encoding.DER)
    assert workload_identity(der, "mesh.example", "server").service == "payments"
    shown = json.loads(ok(pakectl("certs", "show", "out/payments.pem", "--json", cwd=tmp_path)))
    assert [c["is_ca"] for c in shown["certificates"]] == [False, True]


def test_bundle_merges_roots_for_rotation(tmp_path: Path) -> None:
    ok(pakectl("ca", "init", "--state-dir", "old", cwd=tmp_path))
    ok(pakectl("ca", "init", "--state-dir", "new", cwd=tmp_path))
    out = ok(pakectl("certs", "bundle", "--out", "bundle.pem", "old/ca.pem", "new/ca.pem",
                     "old/bundle.pem", cwd=tmp_path))
    assert "2 root(s)" in out
    assert len(load_certificates(tmp_path / "bundle.pem")) == 2


def test_errors_are_one_line(tmp_path: Path, ca_dir: Path) -> None:
    line = one_line_error(pakectl("certs", "show", "missing.pem", cwd=tmp_path), 1)
    assert line == "pakectl: error: missing.pem: file is missing"

    line = one_line_error(pakectl("ca", "init", "--state-dir", "ca", cwd=tmp_path), 1)
    assert "already exists" in line

    line = one_line_error(pakectl("certs", "issue", "--service", "Bad_Name", "--out", "x",
                                  "--state-dir", "ca", cwd=tmp_path), 1)
    assert "service name 'Bad_Name'" in line

    line = one_line_error(pakectl("certs", "issue", "--service", "orders", "--out", "x",
                                  "--state-dir", "nowhere", cwd=tmp_path), 1)
    assert "nowhere: no CA state directory" in line

    line = one_line_error(pakectl("certs", "issue", "--service", "orders", "--out", "x",
                                  "--state-dir", "ca", "--ttl", "1y", cwd=tmp_path), 2)
    assert "--ttl: must be a duration like 500ms or 1h30m, got '1y'" in line

    (tmp_path / "leaf-as-root.pem").write_bytes((ca_dir / "ca-key.pem").read_bytes())
    line = one_line_error(pakectl("certs", "bundle", "--out", "b.pem", "leaf-as-root.pem",
                                  cwd=tmp_path), 1)
    assert "leaf-as-root.pem: not a PEM certificate file" in line

    one_line_error(pakectl("frobnicate", cwd=tmp_path), 2)
    one_line_error(pakectl(cwd=tmp_path), 2)
    one_line_error(pakectl("certs", "issue", cwd=tmp_path), 2)


def test_help_exits_zero(tmp_path: Path) -> None:
    out = ok(pakectl("--help", cwd=tmp_path))
    assert "ca" in out and "certs" in out


# === in-process: the pure parts of control/cli.py ===


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("1h30m", 5400),
     ("1.5h", 5400)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "0s", "1y", "1h ", " 1h", "1H"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(timedelta(hours=24)) == "1d"
    assert format_duration(timedelta(minutes=90)) == "90m"
    assert format_duration(timedelta(seconds=61)) == "61s"


def test_registry_leaves_room_for_more_commands() -> None:
    assert set(COMMANDS) == {"ca", "certs", "serve", "token", "apply", "history", "rollback",
                             "get", "status", "check", "top"}
    with pytest.raises(TypeError):
        COMMANDS["serve"] = lambda sub: None  # type: ignore[index]


def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init", "--state-dir", str(tmp_path / "ca")]) == 0
    assert main(["certs", "issue", "--service", "orders", "--out", str(tmp_path / "o"),
                 "--state-dir", str(tmp_path / "ca"), "--ttl", "1h"]) == 0
    capsys.readouterr()
    assert main(["certs", "show", str(tmp_path / "o" / "orders-key.pem")]) == 1
    key = tmp_path / "o" / "orders-key.pem"
    assert capsys.readouterr().err == (
        f"pakectl: error: {key}: not a PEM certificate file (no BEGIN CERTIFICATE block)\n"
    )
    assert main(["ca", "init", "--state-dir", str(tmp_path / "i"), "--intermediate-of",
                 str(tmp_path / "ca"), "--trust-domain", "other.example"]) == 2
    assert "differs" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()
