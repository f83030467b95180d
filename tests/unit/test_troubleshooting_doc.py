"""docs/troubleshooting.md explains every response flag and error code the sidecar can send.

The flags and codes are read from the sidecar's source (``ast``, no import of the hot path),
wherever they are set: ``ProxyError`` subclasses (``status, error, flag = ...``), ``LocalReply``
calls, ``flagged("URX")``, assignments to ``flag``/``flags``/``FLAG``, and a literal status
followed by a literal code in any call (``DownstreamProtocolError(..., 414, "uri_too_long")``,
the validation filter's ``_reply(405, "method_not_allowed", ...)``). A flag or code added
without a row in the page fails here, and so does a row for one the code no longer has.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar import errors

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "troubleshooting.md"
_FLAG = re.compile(r"^[A-Z]{2,4}$")
_ERROR = re.compile(r"^[a-z][a-z0-9_]*[a-z]$")
_CODE = re.compile(r"`([^`]+)`")


@dataclass(slots=True)
class Found:
    flags: dict[str, str] = field(default_factory=dict)  # flag -> where
    errors: dict[str, str] = field(default_factory=dict)  # error code -> where
    statuses: dict[str, set[int]] = field(default_factory=dict)  # error code -> literal statuses


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def scan(source: str, where: str, found: Found) -> None:
    """Add the flags and error codes set in one module's ``source``."""
    def flag(value: str, line: int) -> None:
        if _FLAG.match(value):
            found.flags.setdefault(value, f"{where}:{line}")

    def error(value: str, line: int, status: int | None = None) -> None:
        if _ERROR.match(value):
            found.errors.setdefault(value, f"{where}:{line}")
            if status is not None:
                found.statuses.setdefault(value, set()).add(status)

    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        pairs: list[tuple[ast.AST, ast.AST]] = []
        if isinstance(node, ast.Assign):
            for assigned in node.targets:
                if isinstance(assigned, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += zip(assigned.elts, node.value.elts)
                else:
                    pairs.append((assigned, node.value))
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            pairs.append((node.target, node.value))
        for target, value in pairs:
            name = _name(target).lower()
            for text in _strings(value):
                if name in ("flag", "flags"):
                    flag(text, line)
                elif name == "error":
                    error(text, line)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args[len(node.args.args) - len(node.args.defaults):]
            for arg, default in zip(args, node.args.defaults):
                if arg.arg == "error" and isinstance(default, ast.Constant) and isinstance(default.value, str):
                    error(default.value, node.lineno)
        if isinstance(node, ast.Call):
            called = _name(node.func)
            if called == "flagged" and node.args:
                for text in _strings(node.args[0]):
                    flag(text, node.lineno)
            if called == "LocalReply":
                if len(node.args) >= 4:
                    for text in _strings(node.args[3]):
                        flag(text, node.lineno)
                if len(node.args) >= 2:
                    for text in _strings(node.args[1]):
                        error(text, node.lineno)
            for a, b in zip(node.args, node.args[1:]):
                if (isinstance(a, ast.Constant) and type(a.value) is int and 400 <= a.value <= 599
                        and isinstance(b, ast.Constant) and isinstance(b.value, str)):
                    error(b.value, node.lineno, a.value)


@pytest.fixture(scope="module")
def found() -> Found:
    result = Found()
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        scan(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), result)
    return result


def _table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after ``heading``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # past the header and the separator


def _first_code(cell: str) -> str:
    m = _CODE.match(cell)
    assert m is not None, f"troubleshooting.md: the first cell must be a code span: {cell!r}"
    return m.group(1)


FLAGS_HEADING = "## Why a 503 (or a 502, a 504)?"
CODES_HEADING = "## Every error code"


def test_the_scan_finds_what_errors_py_defines(found: Found) -> None:
    """The scan is not vacuous: every ProxyError subclass's flag and code are among its finds."""
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.ProxyError)]
    assert len(classes) > 10
    for cls in classes:
        assert cls.error in found.errors, cls
        assert cls.flag == "-" or cls.flag in found.flags, cls
    assert {"URX", "DC", "FI", "IV"} <= found.flags.keys()  # set outside errors.py


def test_every_flag_is_explained(found: Found) -> None:
    documented = {_first_code(row[0]) for row in _table(FLAGS_HEADING)}
    missing = {f: where for f, where in found.flags.items() if f not in documented}
    assert not missing, f"flags set in the code but not explained in troubleshooting.md: {missing}"


def test_every_explained_flag_exists_or_is_marked_planned(found: Found) -> None:
    stale = [row[0] for row in _table(FLAGS_HEADING)
             if _first_code(row[0]) not in found.flags and "planned" not in row[3]]
    assert stale == []


def test_every_error_code_is_listed(found: Found) -> None:
    documented = {_first_code(row[0]) for row in _table(CODES_HEADING)}
    missing = {e: where for e, where in found.errors.items() if e not in documented}
    assert not missing, f"error codes set in the code but not listed in troubleshooting.md: {missing}"
    stale = documented - found.errors.keys()
    assert not stale, f"error codes listed in troubleshooting.md that the code never sends: {stale}"


def test_each_code_is_listed_with_its_status_and_flag(found: Found) -> None:
    rows = {_first_code(row[0]): row for row in _table(CODES_HEADING)}
    wrong = []
    for cls in vars(errors).values():
        # a class with a status of its own (DownstreamProtocolError's come per call: the scan)
        if isinstance(cls, type) and issubclass(cls, errors.ProxyError) and "status" in vars(cls):
            row = rows[cls.error]
            if str(cls.status) not in row[1] or f"`{cls.flag}`" not in row[2]:
                wrong.append(f"{cls.__name__}: {cls.status} {cls.error} {cls.flag} vs {row}")
    for code, statuses in found.statuses.items():
        for status in statuses:
            if str(status) not in rows[code][1]:
                wrong.append(f"{code} is sent with {status} ({found.errors[code]}), not in {rows[code]}")
    assert wrong == []


def test_a_new_flag_would_be_noticed() -> None:
    """A flag set anywhere in the sidecar is found: a made-up module setting one."""
    result = Found()
    scan('def shed(reply):\n    return reply.flagged("ZZ")\n'
         'class Shed(ProxyError):\n    status, error, flag = 503, "overloaded", "OL"\n',
         "made_up.py", result)
    assert result.flags.keys() == {"ZZ", "OL"} and "overloaded" in result.errors
