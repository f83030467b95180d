"""Path-aware reading of YAML config into typed values.

Every problem is recorded with the dotted path of the value and the value itself
(``services.orders.retries.attempts: must be ≥ 0, got -1``) and reading goes on, so one
run reports every mistake at once. Unknown keys are errors, never silently ignored.
Pure: no I/O; ``load.py`` reads the files.
"""

from __future__ import annotations

import builtins
import ipaddress
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..http.headers import HEADER_NAME

__all__ = [
    "ENTRY_NAME",
    "ConfigError",
    "Fields",
    "MISSING",
    "Problems",
    "convert",
    "format_duration",
    "header_name",
    "is_loopback_host",
    "methods_of",
    "parse_address",
    "parse_duration",
    "parse_percent",
    "parse_size",
    "strings_of",
]

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one path-qualified line each."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("; ".join(prefix + p for p in problems))


class Problems:
    """Collects problems while a whole config is read."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)

    def raise_if_any(self, source: str | None = None) -> None:
        if self.items:
            raise ConfigError(list(self.items), source)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (dict, list)):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return repr(value)


# One duration grammar for the config, the CLI and the fault headers: one or more
# <number><unit> parts, units from the largest down, each at most once (``1h30m``, ``1.5s``).
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_ORDER = list(_DURATION_UNITS)
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3}
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_duration(value: Any) -> float:
    """``500ms``, ``2s``, ``1.5s``, ``10m``, ``24h``, ``7d`` or a sum like ``1h30m`` -> seconds.
    Plain numbers are refused: a bare ``10`` is ambiguous (seconds? milliseconds?) and is
    the classic config bug. No spaces, no upper case: one spelling everywhere."""
    if isinstance(value, str) and _DURATION.match(value):
        parts = _DURATION_PART.findall(value)
        ranks = [_DURATION_ORDER.index(unit) for _, unit in parts]
        if all(a < b for a, b in zip(ranks, ranks[1:])):
            return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    raise ValueError(f"must be a duration like 500ms or 1h30m, got {_show(value)}")


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that holds it exactly (``86400`` -> ``1d``, ``5400`` ->
    ``90m``, ``0.5`` -> ``500ms``); ``parse_duration`` reads it back."""
    if seconds == 0:
        return "0s"
    for unit, size in _DURATION_UNITS.items():
        count = round(seconds / size, 6)  # 0.1 / 0.001 is 100.00000000000001
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds * 1000:g}ms"


def parse_size(value: Any) -> int:
    """``1024``, ``64KiB``, ``10MiB`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size like 64KiB or 10MiB, got {_show(value)}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"must be a size like 64KiB or 10MiB, got {_show(value)}")


def parse_percent(value: Any) -> float:
    """``20%`` -> 0.2."""
    if isinstance(value, str):
        m = _PERCENT.match(value)
        if m and float(m.group(1)) <= 100:
            return float(m.group(1)) / 100.0
    raise ValueError(f"must be a percentage from 0% to 100%, got {_show(value)}")


def parse_address(value: Any) -> tuple[str, int]:
    """``host:port`` or ``[::1]:port``; port 0 means "pick a free port"."""
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and host and port.isdigit() and int(port) <= 65535:
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            return host, int(port)
    raise ValueError(f"must be an address like 127.0.0.1:8080, got {_show(value)}")


def convert(problems: Problems, path: str, value: Any, fn: Callable[[Any], T]) -> T | None:
    """Convert one list item (which has no key of its own), recording a failure at ``path``."""
    try:
        return fn(value)
    except ValueError as exc:
        problems.add(path, str(exc))
        return None


class Fields:
    """A mapping being read. Remembers which keys were read, so ``done()`` can name the
    unknown ones. A missing mapping reads as empty, so defaults apply."""

    def __init__(self, data: Any, path: str, problems: Problems) -> None:
        self.path = path
        self.problems = problems
        self._used: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.add(path, f"must be a mapping, got {_show(data)}")
            data = {}
        self.data: dict[str, Any] = data

    # --- paths and errors -------------------------------------------------------------
    def at(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | int, message: str) -> None:
        self.problems.add(self.at(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self._used.add(key)
        if key not in self.data:
            if default is MISSING:
                self.error(key, "is required")
            return default
        return self.data[key]

    def _convert(self, key: str, default: T, convert: Callable[[Any], T]) -> T:
        value = self.raw(key, default)
        if value is default:
            return default
        try:
            return convert(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    # --- scalars ----------------------------------------------------------------------
    # (After this method, signatures say ``builtins.str``: in the class body, ``str`` is it.)
    def str(self, key: str, default: Any = MISSING, *, choices: tuple[str, ...] = (),
            pattern: re.Pattern[str] | None = None) -> Any:
        value = self.raw(key, default)
        if value is default:
            return default
        if not isinstance(value, str) or not value:
            self.error(key, f"must be a non-empty string, got {_show(value)}")
            return default
        if choices and value not in choices:
            self.error(key, f"must be one of {', '.join(choices)}, got {_show(value)}")
            return default
        if pattern is not None and not pattern.match(value):
            self.error(key, f"must match {pattern.pattern}, got {_show(value)}")
            return default
        return value

    def int(self, key: builtins.str, default: Any = MISSING, *, min: int | None = None,
            max: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"must be a whole number, got {_show(value)}")
            return default
        if min is not None and value < min:
            self.error(key, f"must be ≥ {min}, got {value}")
            return default
        if max is not None and value > max:
            self.error(key, f"must be ≤ {max}, got {value}")
            return default
        return value

    def bool(self, key: builtins.str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return default
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {_show(value)}")
            return default
        return value

    def duration(self, key: builtins.str, default: Any = MISSING, *, min: float = 0.0) -> Any:
        value = self._convert(key, default, parse_duration)
        if value is not default and value < min:
            self.error(key, f"must be ≥ {min}s, got {_show(self.data[key])}")
            return default
        return value

    def size(self, key: builtins.str, default: Any = MISSING) -> Any:
        return self._convert(key, default, parse_size)

    def percent(self, key: builtins.str, default: Any = MISSING) -> Any:
        return self._convert(key, default, parse_percent)

    def address(self, key: builtins.str, default: Any = MISSING) -> Any:
        return self._convert(key, default, parse_address)

    # --- containers -------------------------------------------------------------------
    def sub(self, key: builtins.str) -> Fields:
        """A nested mapping (empty when absent)."""
        return Fields(self.raw(key, None), self.at(key), self.problems)

    def optional(self, key: builtins.str, read: Callable[[Fields], T]) -> T | None:
        """An optional section: ``read`` of it when present, None when absent or null (the
        key counts as read either way). The one way a config asks "is this configured?".
        An empty mapping is present and gets its defaults: ``policy: {}`` is a deny-all
        policy, not no policy, and ``rate_limit: {}`` is an error (no rate), not silence."""
        if self.data.get(key) is None:
            self.raw(key, None)
            return None
        return read(self.sub(key))

    def list(self, key: builtins.str, default: Any = MISSING) -> list[tuple[builtins.str, Any]]:
        """A list as ``(path, item)`` pairs; absent -> ``default`` (or [] when given)."""
        value = self.raw(key, [] if default is MISSING else default)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"must be a list, got {_show(value)}")
            return []
        return [(f"{self.at(key)}[{i}]", item) for i, item in enumerate(value)]

    def items(self, key: builtins.str) -> Iterator[tuple[builtins.str, Fields]]:
        """A mapping of name -> mapping, e.g. ``services``."""
        node = self.sub(key)
        node._used.update(node.data)
        for name, value in node.data.items():
            yield str(name), Fields(value, node.at(str(name)), self.problems)

    def done(self) -> None:
        """Report every key that nothing read: a typo must not be silently ignored."""
        for key in self.data:
            if key not in self._used:
                self.error(str(key), "unknown key")


# === shared readers ======================================================================

# The name of an entry in a top-level map (a JWT provider, an API key).
ENTRY_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
_METHOD = re.compile(r"^[A-Z]{1,20}$")


def strings_of(node: Fields, key: str, *, pattern: re.Pattern[str] | None = None,
            what: str = "a non-empty string", default: Any = ()) -> tuple[str, ...]:
    """A list of strings; each bad item is reported at its own path."""
    out = []
    for path, item in node.list(key, list(default)):
        if not isinstance(item, str) or not item or (pattern and not pattern.match(item)):
            node.problems.add(path, f"must be {what}, got {item!r}")
        else:
            out.append(item)
    return tuple(out)


def methods_of(node: Fields, key: str) -> frozenset[str]:
    return frozenset(strings_of(node, key, pattern=_METHOD, what="an upper-case HTTP method"))


def header_name(node: Fields, key: str, name: Any) -> str | None:
    """``name`` lower-cased, or None (reported at ``key``) when it is not a header name."""
    if not isinstance(name, str) or not HEADER_NAME.match(name.lower()):
        node.error(key, f"must be a header name, got {name!r}")
        return None
    return name.lower()


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
