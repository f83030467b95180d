"""structlog set-up for both programs, the sidecar and ``pakectl serve``: done once by each
``__main__``; one line per event on the ``events`` log channel, JSON or console.

The rendered line goes on a bounded queue (``log_writer``), never to stdout from the loop: a
reader that stops reading must not freeze the process. Lines the output cannot take are
dropped and counted. Levels are per component (the logger's name, ``pake.cluster``): the
first processor looks the name up in a table resolved once per name, so a line costs one
dict hit, and drops what is below; a reload swaps the table and the renderer, each with one
assignment. Python's own ``logging`` (asyncio's "Exception in callback", aiohttp,
websockets) goes through a ``ProcessorFormatter`` on one root handler into the same channel,
at WARNING unless a component names its logger. structlog's config is the process's one
logging state: ``log_control()`` finds the running ``LogControl`` there, no second global.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from ..config.log_levels import LogFormat, LogLevels, parse_level_spec
from .log_writer import LogChannel

__all__ = ["ChannelLogger", "LevelTable", "LogControl", "configure_logging", "log_control"]

COMPONENT = "pake.logging"  # its own lines: got per call (rare), never cached across set-ups

_THRESHOLD = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
# structlog's method names -> their level (``msg`` and ``log``: info)
_METHOD_LEVEL = {"debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO,
                 "log": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
                 "error": logging.ERROR, "err": logging.ERROR, "exception": logging.ERROR,
                 "failure": logging.ERROR, "critical": logging.CRITICAL, "fatal": logging.CRITICAL}

EventDict = MutableMapping[str, Any]
Processor = Callable[[Any, str, EventDict], Any]


class ChannelLogger:
    """structlog's final logger: every level puts the rendered line on one channel. One per
    logger name (the component), which the level filter reads."""

    __slots__ = ("_put", "name")

    def __init__(self, channel: LogChannel, name: str = "") -> None:
        self._put = channel.put
        self.name = name

    def msg(self, message: str) -> None:
        self._put(message + "\n")

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


class LevelTable(dict[str, int]):
    """Logger name -> the lowest level it logs, resolved on first look-up (the longest
    configured prefix wins, else the default) and kept: the names are the code's constants."""

    __slots__ = ("_default", "_prefixes")

    def __init__(self, levels: LogLevels) -> None:
        super().__init__()
        self._default = _THRESHOLD[levels.default]
        self._prefixes = sorted(((name, _THRESHOLD[level]) for name, level in levels.components),
                                key=lambda item: -len(item[0]))

    def __missing__(self, name: str) -> int:
        level = self._default
        for prefix, value in self._prefixes:
            if name.startswith(prefix) and (len(name) == len(prefix) or name[len(prefix)] == "."):
                level = value
                break
        self[name] = level
        return level


class _Renderer:
    """The last processor, JSON or console; ``render`` is swapped by one assignment."""

    __slots__ = ("render",)

    def __init__(self, render: Processor) -> None:
        self.render = render

    def __call__(self, logger: Any, method: str, event_dict: EventDict) -> Any:
        return self.render(logger, method, event_dict)


def _json_renderer() -> Processor:
    exc_info = structlog.processors.format_exc_info
    to_json = structlog.processors.JSONRenderer()

    def render(logger: Any, method: str, event_dict: EventDict) -> Any:
        return to_json(logger, method, exc_info(logger, method, event_dict))

    return render


class LogControl:
    """The running logging choices. Called as the first processor: drops an event below its
    component's level and names the component (``logger``). ``apply`` changes the levels
    and the format live (a SIGHUP reload); a format given on the command line stays."""

    def __init__(self, levels: LogLevels, fmt: LogFormat, *, tty: bool,
                 format_override: LogFormat | None = None) -> None:
        self.tty = tty  # stdout is a terminal: what "auto" means, and colours
        self.format_override = format_override
        self.levels = levels
        self.table = LevelTable(levels)
        self.format: LogFormat = format_override or fmt
        self.renderer = _Renderer(self._renderer(self.format))
        self._stdlib_named: tuple[str, ...] = ()  # stdlib loggers given a level by a component
        self._root_level = logging.getLogger().level  # restored by close()
        self._handler: logging.Handler | None = None  # the root handler, set by configure_logging
        self._set_stdlib_levels(levels)

    @property
    def rendered(self) -> str:
        """What ``format`` means here: json or console."""
        return "console" if self.format == "console" or (self.format == "auto" and self.tty) else "json"

    def __call__(self, logger: Any, method: str, event_dict: EventDict) -> EventDict:
        name = logger.name
        if _METHOD_LEVEL.get(method, logging.INFO) < self.table[name]:
            raise structlog.DropEvent
        event_dict["logger"] = name
        return event_dict

    def apply(self, levels: LogLevels, fmt: LogFormat) -> list[str]:
        """Make ``levels`` and ``fmt`` the running ones; the changes, one line each."""
        changes: list[str] = []
        if levels != self.levels:
            changes.append(f"log_level: {self.levels} -> {levels}")
            self.levels = levels
            self.table = LevelTable(levels)
            self._set_stdlib_levels(levels)
        fmt = self.format_override or fmt
        if fmt != self.format:
            changes.append(f"log_format: {self.format} -> {fmt}")
            self.format = fmt
            self.renderer.render = self._renderer(fmt)
        if changes:
            structlog.get_logger(COMPONENT).info("logging_changed", changes=changes, format=self.rendered)
        return changes

    def close(self) -> None:
        """Take the stdlib part back (the root handler, the levels set): for a test that
        configured logging in its own process. structlog's config is the caller's to restore."""
        root = logging.getLogger()
        if self._handler is not None:
            root.removeHandler(self._handler)
            self._handler = None
        for name in self._stdlib_named:
            logging.getLogger(name).setLevel(logging.NOTSET)
        self._stdlib_named = ()
        root.setLevel(self._root_level)

    def _renderer(self, fmt: LogFormat) -> Processor:
        if fmt == "console" or (fmt == "auto" and self.tty):
            return structlog.dev.ConsoleRenderer(colors=self.tty, pad_event_to=24)
        return _json_renderer()

    def _set_stdlib_levels(self, levels: LogLevels) -> None:
        """Python's loggers: WARNING (or the default, when higher) unless a component names
        them; the stdlib checks its levels before any record is made."""
        for name in self._stdlib_named:
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger().setLevel(max(logging.WARNING, _THRESHOLD[levels.default]))
        for name, level in levels.components:
            logging.getLogger(name).setLevel(_THRESHOLD[level])
        self._stdlib_named = tuple(name for name, _ in levels.components)


class _ChannelHandler(logging.Handler):
    """The root handler: stdlib records, formatted by structlog, on the events channel."""

    def __init__(self, channel: LogChannel, formatter: logging.Formatter) -> None:
        super().__init__()
        self._put = channel.put
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._put(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own rule: a bad record never raises
            self.handleError(record)


def configure_logging(channel: LogChannel, levels: LogLevels | str = LogLevels(),
                      fmt: LogFormat = "auto", *, format_override: LogFormat | None = None,
                      tty: bool | None = None) -> LogControl:
    """structlog and the stdlib root logger, both onto ``channel``. ``levels`` may be spelt
    as ``--log-level`` takes it; ``tty`` defaults to whether stdout is a terminal."""
    if isinstance(levels, str):
        levels = parse_level_spec(levels)
    control = LogControl(levels, fmt, tty=os.isatty(1) if tty is None else tty,
                         format_override=format_override)
    loggers: dict[str, ChannelLogger] = {}

    def factory(*args: Any) -> ChannelLogger:
        name = str(args[0]) if args else ""
        logger = loggers.get(name)
        if logger is None:
            logger = loggers[name] = ChannelLogger(channel, name)
        return logger

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            control,  # first: a dropped event costs one dict hit
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            control.renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, control.renderer],
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ChannelHandler)]:
        root.removeHandler(handler)  # configured again (tests): one handler, the new channel
    control._handler = _ChannelHandler(channel, formatter)
    root.addHandler(control._handler)
    structlog.get_logger(COMPONENT).debug("logging_configured", levels=str(levels), format=control.rendered)
    return control


def log_control() -> LogControl | None:
    """The ``LogControl`` that ``configure_logging`` installed (None: not configured so)."""
    for processor in structlog.get_config()["processors"]:
        if isinstance(processor, LogControl):
            return processor
    return None
