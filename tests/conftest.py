"""The suite refuses to start on a stale compiled hot path: its extension modules would run,
not the source just edited (``sidecar/compiled.py``)."""

from __future__ import annotations

import pytest

from sidecar import compiled


def pytest_sessionstart(session: pytest.Session) -> None:
    if compiled.pure_requested():
        return
    stale = compiled.stale()
    if stale:
        raise pytest.UsageError(
            f"the hot path's compiled form does not match its source ({stale[0]}, {len(stale)} in all): "
            "`make compile` rebuilds it, `python -m sidecar.compiled clean` removes it")
