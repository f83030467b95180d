"""The fuzz seed corpus (fuzz/corpus/<target>/) as ordinary tests: every file goes through its
atheris target's ``one_input`` (fuzz/<target>.py), which holds the same checks as the
property tests. Runs in CI without atheris, in well under a second."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TARGETS = {"request_head": "request_head", "response": "response", "jwt": "jwt_token",
           "mesh": "mesh_config"}


@functools.cache
def _target(module: str) -> Callable[[bytes], None]:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))  # the targets import their _harness
    spec = importlib.util.spec_from_file_location(f"fuzz_{module}", FUZZ / f"{module}.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded.one_input  # type: ignore[no-any-return]


CASES = sorted((corpus, path) for corpus in TARGETS for path in (FUZZ / "corpus" / corpus).iterdir())


def test_every_target_has_seeds() -> None:
    assert {corpus for corpus, _ in CASES} == set(TARGETS)


@pytest.mark.parametrize(("corpus", "path"), CASES, ids=[f"{c}/{p.name}" for c, p in CASES])
def test_seed(corpus: str, path: Path) -> None:
    _target(TARGETS[corpus])(path.read_bytes())
