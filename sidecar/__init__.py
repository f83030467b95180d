"""PAKE Mesh's sidecar.

``PAKE_PURE_PYTHON=1`` makes its modules load from their source even where the hot path's
compiled form sits beside them (``sidecar/compiled.py``): the tests run against both forms.
"""

import os as _os

# (compiled.PURE_ENV, read without importing compiled: `python -m sidecar.compiled` would
# otherwise find its own module imported before it runs)
if _os.environ.get("PAKE_PURE_PYTHON") == "1":
    import sys as _sys

    from .compiled import SourceOnlyFinder as _SourceOnlyFinder

    _sys.meta_path.insert(0, _SourceOnlyFinder(__name__))
