"""Hypothesis settings shared by the property tests: bounded and deterministic for CI.

``derandomize=True`` makes each run try the same examples (a failure reproduces on every
machine, and CI never flakes on a new random draw); ``database=None`` keeps no state between
runs. ``max_examples`` is sized so the whole fuzz suite stays under about 20 s on the 2-core
CI machine; set ``PAKE_FUZZ_EXAMPLES`` to run more locally (e.g. 20000 before a release).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["fuzz_settings"]


def fuzz_settings(examples: int) -> settings:
    """``examples`` in CI; ``PAKE_FUZZ_EXAMPLES`` (a number) overrides it for a longer run."""
    override = os.environ.get("PAKE_FUZZ_EXAMPLES")
    return settings(max_examples=int(override) if override else examples, deadline=None,
                    derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
