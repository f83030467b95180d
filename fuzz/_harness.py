"""Shared start-up of the atheris targets: the repository on sys.path; when a target runs as
a script, coverage instrumentation of the project's modules as they are imported (only
``sidecar``/``tests.fuzz``: ``instrument_all`` took ~2 minutes over every loaded library);
and ``run(one_input, corpus)``, which hands over to libFuzzer. atheris is imported only when
a target runs as a script: the CI corpus tests import the targets without it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS = Path(__file__).resolve().parent / "corpus"
_main = getattr(sys.modules.get("__main__"), "__file__", None)
_HOOK = None
if _main is not None and Path(_main).resolve().parent == CORPUS.parent:
    import atheris  # opt-in: pip install atheris

    _HOOK = atheris.instrument_imports(include=["sidecar", "tests.fuzz"])
    _HOOK.__enter__()  # left in run(), once the target's imports are done


def run(one_input: Callable[[bytes], None], corpus: str) -> None:
    """Fuzz ``one_input``. With no directory on the command line the seed corpus is used
    (libFuzzer then also writes what it finds there: pass a scratch directory first to keep
    the checked-in seeds as they are, e.g. ``python fuzz/request_head.py /tmp/c fuzz/corpus/request_head``)."""
    import atheris

    if _HOOK is not None:
        _HOOK.__exit__(None, None, None)
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(str(CORPUS / corpus))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
