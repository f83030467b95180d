"""The router never imports the listener at run time (the listener imports the router, and a
stage depends only on what comes after it). It names the listener's ``Stream`` for type
checking only: compiled, a concrete type is read field by field where a protocol is read by
name (``sidecar.routing.routed``)."""

from __future__ import annotations

import ast
from pathlib import Path

import sidecar.routing

ROUTING = Path(sidecar.routing.__file__).parent


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imported(path: Path, *, at_run_time: bool) -> set[str]:
    """Every module ``path`` imports, relative imports resolved; with ``at_run_time`` the
    ``TYPE_CHECKING`` ones left out, else only those."""
    package = "sidecar.routing"
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_only(tree)
    for node in ast.walk(tree):
        if (id(node) in typing_only) == at_run_time:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
            else:
                base = []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def test_no_routing_module_imports_the_listener_at_run_time() -> None:
    modules = sorted(ROUTING.glob("*.py"))
    assert any(p.name == "router.py" for p in modules)
    offending = {p.name: sorted(m for m in _imported(p, at_run_time=True) if m.startswith("sidecar.listener"))
                 for p in modules}
    assert {name: found for name, found in offending.items() if found} == {}


def test_the_router_names_only_the_listeners_stream_and_only_for_type_checking() -> None:
    named = {m for p in ROUTING.glob("*.py") for m in _imported(p, at_run_time=False)
             if m.startswith("sidecar.listener")}
    assert named == {"sidecar.listener.stream", "sidecar.listener.stream.Stream"}


def test_the_router_resolves_relative_imports_as_python_does() -> None:
    # (the checks above are only as good as this resolution)
    imported = _imported(ROUTING / "router.py", at_run_time=True)
    assert "sidecar.routing.routed" in imported
    assert "sidecar.upstream.pool" in imported
