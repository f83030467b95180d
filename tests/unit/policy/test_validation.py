"""Input validation: 405, 413, 415, and JSON Schema 400s naming the failing location."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.model import RouteConfig, RouteMatch, WeightedTarget
from sidecar.config.validation import ValidationConfig, parse_validation
from sidecar.config.reader import ConfigError, Fields, Problems
from sidecar.filters.validation import ValidationFilter, build_validation

from .conftest import exchange, request

ROUTE = RouteConfig(name="orders/0", match=RouteMatch(), to=(WeightedTarget("orders"),))
SCHEMA = {
    "type": "object",
    "required": ["id", "items"],
    "properties": {
        "id": {"type": "string"},
        "items": {"type": "array", "items": {
            "type": "object", "required": ["qty"],
            "properties": {"qty": {"type": "integer", "minimum": 1}}}},
    },
}


def config(values: dict[str, Any]) -> tuple[ValidationConfig, list[str]]:
    problems = Problems()
    parsed = parse_validation(Fields(values, "services.orders.routes[0].validation", problems))
    return parsed, problems.items


def build(values: dict[str, Any], base_dir: Path | None = None) -> ValidationFilter:
    parsed, problems = config(values)
    assert problems == []
    return build_validation({"orders/0": parsed}, base_dir=base_dir)


def post(body: bytes, content_type: bytes = b"application/json", *,
         method: str = "POST") -> Any:
    headers = [(b"content-type", content_type)] if content_type else []
    return exchange(request(method, "/orders", headers=headers, content_length=len(body)),
                    route=ROUTE)


def test_method_not_allowed_is_405_with_allow() -> None:
    f = build({"methods": ["GET", "POST"]})
    reply = f.on_request(exchange(request("DELETE"), route=ROUTE))
    assert (reply.status, reply.flag) == (405, "IV")
    assert dict(reply.headers) == {b"allow": b"GET, POST"}
    assert f.on_request(exchange(request("GET"), route=ROUTE)) is None


def test_body_too_large_is_413_and_closes() -> None:
    f = build({"max_body": "1KiB"})
    reply = f.on_request(post(b"x" * 1025))
    assert (reply.status, reply.close) == (413, True)
    assert f.on_request(post(b"x" * 1024)) is None
    chunked = exchange(request("POST", "/orders", chunked=True), route=ROUTE)
    assert f.wants_body(chunked) and f.max_body == 1024
    assert f.on_body(chunked, b"x" * 1025).status == 413


def test_content_type_is_415() -> None:
    f = build({"content_types": ["application/json", "text/*"]})
    assert f.on_request(post(b"{}", b"application/json; charset=utf-8")) is None
    assert f.on_request(post(b"hi", b"text/plain")) is None
    assert f.on_request(post(b"<x/>", b"application/xml")).status == 415
    assert f.on_request(post(b"{}", b"")).status == 415
    assert f.on_request(exchange(request("GET"), route=ROUTE)) is None  # no body: no type


@pytest.mark.parametrize(("body", "detail"), [
    (b'{"id": "o1", "items": [{"qty": 2}]}', None),
    (b'{"id": "o1", "items": [{"qty": 0}]}', "$.items[0].qty: 0 is less than the minimum of 1"),
    (b'{"id": 7, "items": []}', "$.id: 7 is not of type 'string'"),
    (b'{"items": []}', "$: 'id' is a required property"),
    (b'{"id": "a", "id": "b", "items": []}', "duplicate member 'id'"),
    (b'{"id": NaN}', "body is not valid JSON"),
    (b"not json", "body is not valid JSON"),
    (b"\xff\xfe", "body is not valid JSON"),
    (b"[" * 100_000, "body is not valid JSON"),
])
def test_json_schema(body: bytes, detail: str | None) -> None:
    f = build({"json_schema": SCHEMA, "max_body": "1MiB"})
    ex = post(body)
    assert f.on_request(ex) is None and f.wants_body(ex)
    reply = f.on_body(ex, body)
    if detail is None:
        assert reply is None
    else:
        assert (reply.status, reply.error, reply.flag) == (400, "invalid_body", "IV")
        assert reply.detail == detail


def test_schema_route_requires_a_json_body() -> None:
    f = build({"json_schema": SCHEMA})
    assert f.on_request(post(b"", b"", method="POST")).status == 400
    assert f.on_request(exchange(request("GET"), route=ROUTE)) is None
    assert f.max_body == 1024 * 1024  # a default bound on what a schema route buffers


def test_schema_from_file(tmp_path: Path) -> None:
    (tmp_path / "order.json").write_text(json.dumps(SCHEMA))
    f = build({"json_schema": {"file": "order.json"}}, base_dir=tmp_path)
    ex = post(b'{"id": "o1", "items": []}')
    assert f.on_body(ex, b'{"id": "o1", "items": []}') is None
    (tmp_path / "bad.json").write_text('{"type": 12}')
    with pytest.raises(ConfigError, match=r"validation\.json_schema\.file: invalid JSON Schema"):
        build({"json_schema": {"file": "bad.json"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"validation\.json_schema\.file: file not found"):
        build({"json_schema": {"file": "missing.json"}}, base_dir=tmp_path)


def test_bad_validation_config() -> None:
    _, problems = config({"methods": ["get"], "max_body": "lots", "content_types": ["json"],
                          "json_schema": {"type": "no-such-type"}, "colour": 1})
    text = "\n".join(problems)
    for expected in ("validation.methods[0]: must be an upper-case HTTP method",
                     "validation.max_body: must be a size",
                     "validation.content_types[0]: must be a media type",
                     "validation.json_schema: invalid JSON Schema at type",
                     "validation.colour: unknown key"):
        assert expected in text


def test_routes_without_validation_pass() -> None:
    f = build({"methods": ["GET"]})
    assert f.on_request(exchange(request("POST"))) is None  # no route
    assert not f.wants_body(exchange(request("POST")))
    assert f.on_body(exchange(request("POST")), b"") is None


def test_jsonschema_not_imported_without_a_schema() -> None:
    import subprocess
    import sys

    code = ("import sys; from sidecar.filters.validation import build_validation;"
            "from sidecar.config.validation import ValidationConfig;"
            "build_validation({'r': ValidationConfig(methods=frozenset({'GET'}))});"
            "import sidecar.filters.authz_rbac, sidecar.filters.rate_limit;"
            "import sidecar.filters.authn_api_key, sidecar.audit;"
            "print('jsonschema' in sys.modules, 'jwt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[3])
    assert out.stdout.split() == ["False", "False"]
