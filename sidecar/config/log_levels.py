"""``log_level`` and ``log_format``: how much each component logs, and in which format.

``log_level: info``, or per component ``log_level: {default: info, pake.cluster: debug}``: a
component is a logger name, and names a dotted prefix (``pake.cluster`` covers
``pake.cluster.health``). ``pakectl serve --log-level info,pake.control.push=debug`` is the
same table on one line. Pure: no I/O, no structlog.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .reader import Fields

__all__ = ["LEVELS", "LOG_FORMATS", "LogFormat", "LogLevels", "parse_level_spec", "parse_log_level"]

LEVELS = ("debug", "info", "warning", "error")
LogFormat = Literal["auto", "json", "console"]  # auto: console on a terminal, else json
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
COMPONENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")


@dataclass(frozen=True, slots=True)
class LogLevels:
    """The level of every component: ``default`` unless a prefix in ``components`` names it."""

    default: str = "info"
    components: tuple[tuple[str, str], ...] = ()  # (logger name prefix, level), sorted

    def __str__(self) -> str:
        """The one-line spelling ``--log-level`` takes (and reload lines show)."""
        return ",".join([self.default, *(f"{name}={level}" for name, level in self.components)])


def _level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)}, got {value!r}")
    return value.lower()


def _component(name: str) -> str:
    if not COMPONENT.match(name):
        raise ValueError(f"not a logger name (dotted words, e.g. pake.cluster), got {name!r}")
    return name


def parse_log_level(node: Fields, key: str = "log_level") -> LogLevels:
    """``log_level`` of sidecar.yaml: a level, or a mapping of component -> level."""
    value = node.raw(key, "info")
    if not isinstance(value, dict):
        try:
            return LogLevels(_level(value))
        except ValueError as exc:
            node.error(key, str(exc))
            return LogLevels()
    table = Fields(value, node.at(key), node.problems)
    default = "info"
    components: list[tuple[str, str]] = []
    for name, level in value.items():
        try:
            if name == "default":
                default = _level(level)
            else:
                components.append((_component(str(name)), _level(level)))
        except ValueError as exc:
            table.error(str(name), str(exc))
    return LogLevels(default, tuple(sorted(components)))


def parse_level_spec(text: str) -> LogLevels:
    """``info,pake.control.push=debug``: a default level and ``component=level`` pairs, in any
    order, comma-separated (no default given: info). ValueError names the bad part."""
    default = "info"
    components: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, level = part.partition("=")
        try:
            if not eq:
                default = _level(name)
            else:
                components[_component(name.strip())] = _level(level.strip())
        except ValueError as exc:
            raise ValueError(f"{part!r}: {exc}") from None
    return LogLevels(default, tuple(sorted(components.items())))
