"""structlog set-up, done once by ``__main__``: JSON lines on the ``events`` log channel.

The rendered line goes on a bounded queue (``log_writer``), never to stdout from the loop: a
reader that stops reading must not freeze the sidecar (``ready``, ``refused`` and reload
events included). Lines the output cannot take are dropped and counted.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

from .log_writer import LogChannel

__all__ = ["ChannelLogger", "configure_logging"]


class ChannelLogger:
    """structlog's final logger: every level puts the rendered line on one channel."""

    __slots__ = ("_put",)

    def __init__(self, channel: LogChannel) -> None:
        self._put = channel.put

    def msg(self, message: str) -> None:
        self._put(message + "\n")

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


def configure_logging(channel: LogChannel, level: str = "info") -> None:
    logger = ChannelLogger(channel)

    def factory(*_args: Any) -> ChannelLogger:
        return logger

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
