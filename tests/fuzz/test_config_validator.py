"""Property tests of the mesh config validator, ``parse_mesh`` (issue 12).

Generated configs mix the schema's own keys with wrong types, unknown keys and edge values.
Either ``ConfigError``, every problem of which names its path (starting at a key the config
has), or a ``MeshConfig`` that round-trips: written as YAML and read back the way an
operator's file is (``load_mesh``), it gives an equal config with the same version; and
parsing neither changes its input nor depends on anything but it (twice gives the same).
Nothing else may escape: a crash here is a control plane that dies on a push.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config.load import ConfigError, load_mesh, parse_mesh

from .settings import fuzz_settings

# The schema's own vocabulary, so generated configs get deep into the validator.
_KEYS = ["endpoints", "routes", "match", "to", "service", "weight", "path_prefix", "path",
         "headers", "hosts", "timeouts", "route", "connect", "idle", "retries", "attempts", "on",
         "per_try_timeout", "budget", "breaker", "consecutive_failures", "open_for",
         "half_open_requests", "max_requests", "health_check", "interval", "jitter", "timeout",
         "healthy_threshold", "unhealthy_threshold", "outlier", "load_balancer", "pool",
         "max_idle", "policy", "default", "rules", "allow", "from", "methods", "paths",
         "tls", "max_request_body", "rate_limit", "fault", "percent", "status", "name",
         "validation", "authn", "x-unknown", ""]
_SCALARS = st.one_of(
    st.sampled_from(["500ms", "1s", "10s", "0s", "-1s", "1h", "20%", "101%", "60KiB", "1x",
                     "127.0.0.1:8080", "[::1]:80", "orders", "frontend", "/v2/", "GET", "deny",
                     "allow", "round_robin", "connect-failure", "503", "", "spiffe://x"]),
    st.integers(-2, 2**40), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=6))
_SERVICE_NAMES = st.sampled_from(["orders", "orders", "frontend", "frontend", "orders-v2", "x",
                                  "Bad_Name", "a" * 64])


def _values(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return _SCALARS
    inner = _values(depth - 1)
    return st.one_of(_SCALARS, st.lists(inner, max_size=3),
                     st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4))


def _service() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"endpoints": st.lists(st.sampled_from(["127.0.0.1:8080", "10.0.0.5:15006", "[::1]:1",
                                                "nohost", "127.0.0.1:0", "1.2.3.4:99999"]),
                               max_size=3)},
        optional={key: _values(2) for key in _KEYS if key != "endpoints"})


# Valid fragments, so that accepted configs are not only empty ones.
_GOOD: dict[str, list[Any]] = {
    "timeouts": [{"route": "15s", "connect": "1s"}, {"idle": "60s"}],
    "retries": [{"attempts": 2, "on": ["connect-failure", "reset", "503"],
                 "per_try_timeout": "500ms", "budget": "20%"}, {"attempts": 0}],
    "breaker": [{"consecutive_failures": 5, "open_for": "10s", "half_open_requests": 1,
                 "max_requests": 1024}],
    "health_check": [{"path": "/healthz", "interval": "1s", "timeout": "200ms",
                      "healthy_threshold": 1, "unhealthy_threshold": 2}],
    "routes": [[{"match": {"path_prefix": "/v2/", "headers": {"x-canary": "1"}},
                 "to": [{"service": "orders", "weight": 100}]}, {"to": [{"service": "orders"}]}],
               [{"match": {"path_prefix": "/"}}]],
    "hosts": [["orders.example"], []],
    "tls": [True, False],
    "max_request_body": ["1MiB", "0B"],
    "policy": [{"default": "deny", "rules": [{"allow": {"from": ["frontend"], "methods": ["GET"],
                                                         "paths": ["/orders/*"]}}]}],
}


def _good_service() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"endpoints": st.lists(st.sampled_from(["127.0.0.1:8080", "10.0.0.5:15006"]), max_size=2)},
        optional={key: st.sampled_from(values) for key, values in _GOOD.items()})


def _mesh() -> st.SearchStrategy[dict[str, Any]]:
    service = st.one_of(_good_service(), _service())
    return st.fixed_dictionaries(
        {"services": st.dictionaries(_SERVICE_NAMES, service, max_size=3)},
        optional={"trust_domain": st.sampled_from(["pake.local", "pake.local", "example.org",
                                                   "Pake.Local", "", "a..b"])})


def _check_error(error: ConfigError, data: dict[str, Any]) -> None:
    assert error.problems
    for problem in error.problems:
        path, sep, message = problem.partition(": ")
        assert sep and path and message, problem
        top = path.split(".", 1)[0].split("[", 1)[0]
        assert top in data, (problem, list(data))


@fuzz_settings(150)
@given(_mesh())
def test_parse_mesh_names_every_problem_or_round_trips(tmp_path_factory: Any,
                                                       data: dict[str, Any]) -> None:
    original = copy.deepcopy(data)
    try:
        mesh = parse_mesh(data)
    except ConfigError as error:
        _check_error(error, data)
        assert data == original
        return
    assert data == original  # the validator does not change what it was given
    assert parse_mesh(copy.deepcopy(data)) == mesh
    path = Path(tmp_path_factory.mktemp("mesh")) / "mesh.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    again = load_mesh(path)
    assert again == mesh and again.version == mesh.version
