"""A route's ``validation`` section: methods, body size, content types and a JSON Schema.

Pure: no I/O; jsonschema is imported only when a schema is configured inline (checked
here) and a schema file is read when the filter is built (``sidecar/filters/validation.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .reader import Fields, methods_of

__all__ = ["ValidationConfig", "check_json_schema", "parse_validation"]

_MEDIA_TYPE = re.compile(r"^[a-z0-9!#$&^_.+-]+/([a-z0-9!#$&^_.+-]+|\*)$")


@dataclass(frozen=True, slots=True)
class ValidationConfig:
    methods: frozenset[str] = frozenset()  # empty: any -> else 405
    max_body: int | None = None  # -> 413
    content_types: tuple[str, ...] = ()  # "type/subtype" or "type/*" -> else 415
    json_schema: Mapping[str, Any] | bool | None = None  # inline, already checked (true/false: a schema too)
    json_schema_file: str | None = None  # read and checked when the filter is built
    json_schema_path: str = ""  # config path of the schema, for build-time errors



def _content_types(node: Fields) -> tuple[str, ...]:
    out = []
    for path, item in node.list("content_types"):
        if isinstance(item, str) and _MEDIA_TYPE.match(item.lower()):
            out.append(item.lower())
        else:
            node.problems.add(path, f"must be a media type like application/json, got {item!r}")
    return tuple(out)


def parse_validation(node: Fields) -> ValidationConfig:
    """A route's ``validation``. An inline schema is checked now (jsonschema is imported only
    then); a schema ``{file: ...}`` is read and checked when the filter is built."""
    methods = methods_of(node, "methods")
    max_body = node.size("max_body", None)
    content_types = _content_types(node)
    schema: Mapping[str, Any] | bool | None = None
    schema_file: str | None = None
    schema_path = node.at("json_schema")
    raw = node.raw("json_schema", None)
    if isinstance(raw, dict) and set(raw) == {"file"}:
        sub = Fields(raw, schema_path, node.problems)
        schema_file = sub.str("file")
        sub.done()
    elif isinstance(raw, (dict, bool)):
        for problem in check_json_schema(raw):
            node.problems.add(schema_path, problem)
        schema = raw
    elif raw is not None:
        node.error("json_schema", "must be a JSON Schema mapping or {file: path}")
    if (schema is not None or schema_file) and content_types and not any(
            _is_json_type(t) for t in content_types):
        node.error("content_types", "a json_schema needs a JSON content type")
    node.done()
    return ValidationConfig(methods=methods, max_body=max_body, content_types=content_types,
                            json_schema=schema, json_schema_file=schema_file,
                            json_schema_path=schema_path)


def _is_json_type(media_type: str) -> bool:
    return media_type in ("application/json", "application/*") or media_type.endswith("+json")


def check_json_schema(schema: Any) -> list[str]:
    """Problems with a JSON Schema (empty: usable). Imports jsonschema: called only when a
    schema is configured, so a sidecar without one never loads it."""
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:
        return ["needs the jsonschema package (pip install jsonschema)"]
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return [f"invalid JSON Schema at {where}: {exc.message}"]
    return []
