"""The ``validation`` filter: per route, refuse what the app should never have to parse.

From the head (``on_request``): a method not allowed → 405 with ``Allow``; a declared
``Content-Length`` over ``max_body`` → 413 (and the connection closes: the body is not
read); a body whose ``Content-Type`` is not listed → 415. From the body (``on_body``, for
routes with a JSON Schema, or chunked bodies on routes with ``max_body``): the size again,
then strict JSON (no duplicate members, no NaN) and the schema → 400 whose detail names
the failing location (``$.items[0].qty: -1 is less than the minimum of 1``). The body is
buffered only for those routes (``wants_body``) and never beyond ``max_body``.
jsonschema is imported only when a route has a schema. Flag ``IV`` (invalid request).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..config.validation import ValidationConfig, check_json_schema
from ..config.reader import ConfigError
from ..errors import LocalReply
from ..exchange import Exchange
from ..strict_json import DuplicateMember, strict_json

__all__ = ["FLAG", "SCHEMA_BODY_LIMIT", "ValidationFilter", "build_validation"]

FLAG: Final = "IV"
SCHEMA_BODY_LIMIT: Final = 1024 * 1024  # a schema route without max_body buffers at most this
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_MAX_DETAIL: Final = 300


class _Route:
    __slots__ = ("allow", "config", "max_body", "validator")

    def __init__(self, config: ValidationConfig, validator: Any) -> None:
        self.config = config
        self.validator = validator  # a jsonschema validator, or None
        self.max_body = config.max_body if config.max_body is not None else (
            SCHEMA_BODY_LIMIT if validator is not None else None)
        self.allow = ", ".join(sorted(config.methods)).encode("ascii")


def _media_type(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def _type_allowed(media: str, allowed: tuple[str, ...]) -> bool:
    for a in allowed:
        if a == media or (a.endswith("/*") and media.startswith(a[:-1])):
            return True
    return False


def _reply(status: int, error: str, detail: str, *, close: bool = False,
           headers: tuple[tuple[bytes, bytes], ...] = ()) -> LocalReply:
    return LocalReply(status, error, detail[:_MAX_DETAIL], FLAG, headers=headers, close=close)


class ValidationFilter:
    name = "validation"

    def __init__(self, routes: Mapping[str, _Route]) -> None:
        self.routes = dict(routes)
        limits = [r.max_body for r in self.routes.values() if r.max_body is not None]
        # BodyFilter: the largest body any route here needs buffered.
        self.max_body = max(limits, default=0)
        self.refused = 0

    def _route(self, exchange: Exchange) -> _Route | None:
        route = exchange.route
        return self.routes.get(route.name) if route is not None else None

    def wants_body(self, exchange: Exchange) -> bool:
        """Whether ``on_body`` must see this exchange's body (buffered up to ``max_body``)."""
        r = self._route(exchange)
        if r is None or not exchange.request.has_body:
            return False
        return r.validator is not None or (r.max_body is not None and exchange.request.chunked)

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        r = self._route(exchange)
        if r is None:
            return None
        request = exchange.request
        c = r.config
        if c.methods and request.method not in c.methods:
            self.refused += 1
            return _reply(405, "method_not_allowed",
                          f"{request.method} is not allowed here",
                          headers=((b"allow", r.allow),))
        if r.max_body is not None and (request.content_length or 0) > r.max_body:
            self.refused += 1
            return _reply(413, "payload_too_large",
                          f"body of {request.content_length} bytes exceeds {r.max_body}",
                          close=True)
        if c.content_types and request.has_body:
            media = _media_type(request.header(b"content-type"))
            if media is None or not _type_allowed(media, c.content_types):
                self.refused += 1
                return _reply(415, "unsupported_media_type",
                              f"content type must be one of {', '.join(c.content_types)}")
        if r.validator is not None and not request.has_body and request.method in _BODY_METHODS:
            self.refused += 1
            return _reply(400, "invalid_body", "a JSON body is required")
        return None

    def on_body(self, exchange: Exchange, body: bytes) -> LocalReply | None:
        r = self._route(exchange)
        if r is None:
            return None
        if r.max_body is not None and len(body) > r.max_body:
            self.refused += 1
            return _reply(413, "payload_too_large", f"body exceeds {r.max_body} bytes",
                          close=True)
        if r.validator is None:
            return None
        try:
            document = strict_json(body)
        except ValueError as exc:
            self.refused += 1
            why = str(exc) if isinstance(exc, DuplicateMember) else "body is not valid JSON"
            return _reply(400, "invalid_body", why)
        from jsonschema.exceptions import best_match  # loaded already: a schema exists

        error = best_match(r.validator.iter_errors(document))
        if error is None:
            return None
        self.refused += 1
        return _reply(400, "invalid_body", f"{error.json_path}: {error.message}")


def _validator(config: ValidationConfig, base_dir: Path | None) -> Any:
    schema: Any = config.json_schema
    if config.json_schema_file is not None:
        where = f"{config.json_schema_path}.file"
        path = Path(config.json_schema_file)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            schema = strict_json(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError([f"{where}: file not found: {path}"]) from None
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{where}: cannot read {path}: {exc}"]) from None
        problems = check_json_schema(schema)
        if problems:
            raise ConfigError([f"{where}: {p}" for p in problems])
    if schema is None:
        return None
    from jsonschema.validators import validator_for  # only when a schema is configured

    return validator_for(schema)(schema)


def build_validation(routes: Mapping[str, ValidationConfig], *,
                     base_dir: Path | None = None) -> ValidationFilter:
    """One filter for every route with ``validation`` (route name -> config). Schema files
    are read here; a bad one raises ``ConfigError`` naming its config path."""
    return ValidationFilter({name: _Route(c, _validator(c, base_dir))
                             for name, c in routes.items()})
