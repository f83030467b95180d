"""The shared readers of ``sidecar.config.reader``: optional sections and header names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config.load import load_mesh, parse_mesh, parse_yaml
from sidecar.config.reader import ConfigError, Fields, Problems


def _read(node: Fields) -> dict[str, Any]:
    value = node.int("n", 1)
    node.done()
    return {"n": value}


@pytest.mark.parametrize(("data", "expected"), [
    ({}, None),                    # absent
    ({"s": None}, None),           # null: the same as absent
    ({"s": {}}, {"n": 1}),         # empty: present, with its defaults
    ({"s": {"n": 2}}, {"n": 2}),
])
def test_optional_section(data: dict[str, Any], expected: Any) -> None:
    problems = Problems()
    top = Fields(data, "", problems)
    assert top.optional("s", _read) == expected
    top.done()  # the key counts as read whether or not it was there
    assert problems.items == []


def test_optional_section_that_is_not_a_mapping_names_its_path() -> None:
    problems = Problems()
    Fields({"s": [1]}, "services.orders", problems).optional("s", _read)
    assert problems.items == ["services.orders.s: must be a mapping, got [1]"]


MESH = """
services:
  orders:
    endpoints: ["127.0.0.1:8080"]
    retries: {attempts: 4}
    routes:
      - match: {path_prefix: /a/}
        retries: null
        to: [{service: orders}]
      - match: {path_prefix: /b/}
        retries: {}
        to: [{service: orders}]
"""


def test_a_null_route_section_is_absent_and_an_empty_one_takes_defaults() -> None:
    import yaml

    mesh = parse_mesh(yaml.safe_load(MESH))
    a, b = mesh.services["orders"].routes
    assert a.retries is None  # null: the service's retries (4 attempts) apply
    assert b.retries is not None and b.retries.attempts != 4


def test_an_empty_policy_denies_rather_than_disappears() -> None:
    import yaml

    data = yaml.safe_load(MESH)
    data["services"]["orders"]["policy"] = {}
    policy = parse_mesh(data).services["orders"].policy
    assert policy is not None and policy.default == "deny" and policy.rules == ()


@pytest.mark.parametrize("where", ["match", "rbac", "claims_to_headers"])
def test_one_header_name_rule_everywhere(where: str) -> None:
    """A name with a space is refused, with its path, by every reader of header names."""
    import yaml

    data = yaml.safe_load(MESH)
    bad = "x tenant"
    if where == "match":
        data["services"]["orders"]["routes"][0]["match"]["headers"] = {bad: "1"}
    elif where == "rbac":
        data["services"]["orders"]["policy"] = {"rules": [{"allow": {"headers": {bad: "1"}}}]}
    else:
        data["jwt_providers"] = {"p": {"issuer": "https://i", "audiences": ["a"],
                                       "jwks_file": "j.json",
                                       "claims_to_headers": {"sub": bad}}}
    with pytest.raises(ConfigError) as caught:
        parse_mesh(data)
    assert any(bad in p for p in caught.value.problems), caught.value.problems


def test_mesh_yaml_reads_on_off_yes_no_as_strings_as_yaml_1_2_does(tmp_path: Path) -> None:
    """``retries: {on: [reset]}`` as the retries docs write it: PyYAML's YAML 1.1 rules made
    the key the boolean True (``services.x.retries.True: unknown key``)."""
    path = tmp_path / "mesh.yaml"
    path.write_text("services:\n  x:\n    endpoints: ['127.0.0.1:1']\n"
                    "    retries: {attempts: 1, on: [reset]}\n    tls: false\n")
    mesh = load_mesh(path)
    assert mesh.services["x"].resilience.retries.on == frozenset({"reset"})
    assert mesh.services["x"].tls is False
    assert parse_yaml("a: yes\nb: on\nc: true\n") == {"a": "yes", "b": "on", "c": True}
