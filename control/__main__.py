"""`python -m control`: the same as the `pakectl` console script."""

from __future__ import annotations

import sys

from control.cli import main

if __name__ == "__main__":
    sys.exit(main())
