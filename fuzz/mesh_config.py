"""Coverage-guided fuzz target: the mesh config validator (``parse_mesh``) on YAML input.

Input that is not a YAML mapping is skipped; otherwise either ConfigError whose every
problem names a path, or a config equal to itself parsed again (see
tests/fuzz/test_config_validator.py for the full round-trip through a file).
Run: ``python fuzz/mesh_config.py [-max_total_time=60]``.
"""

from __future__ import annotations

import copy

import _harness  # noqa: F401 - puts the repository on sys.path
import yaml

from sidecar.config.load import ConfigError, parse_mesh


def one_input(data: bytes) -> None:
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return
    if not isinstance(doc, dict):
        return
    try:
        mesh = parse_mesh(doc)
    except ConfigError as error:
        for problem in error.problems:
            path, sep, message = problem.partition(": ")
            assert sep and path and message, problem
        return
    assert parse_mesh(copy.deepcopy(doc)) == mesh


if __name__ == "__main__":
    _harness.run(one_input, "mesh")
