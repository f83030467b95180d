"""The router never imports the listener (DESIGN): it drives the listener's streams through
the protocols of ``sidecar.routing.routed``, which the listener's ``Stream`` satisfies."""

from __future__ import annotations

import ast
from pathlib import Path

import sidecar.routing

ROUTING = Path(sidecar.routing.__file__).parent


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved (TYPE_CHECKING ones too)."""
    package = "sidecar.routing"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


def test_no_routing_module_imports_the_listener() -> None:
    modules = sorted(ROUTING.glob("*.py"))
    assert any(p.name == "router.py" for p in modules)
    offending = {p.name: sorted(m for m in _imported(p) if m.startswith("sidecar.listener"))
                 for p in modules}
    assert {name: found for name, found in offending.items() if found} == {}


def test_the_router_resolves_relative_imports_as_python_does() -> None:
    # (the check above is only as good as this resolution)
    imported = _imported(ROUTING / "router.py")
    assert "sidecar.routing.routed" in imported
    assert "sidecar.upstream.pool" in imported
