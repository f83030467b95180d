"""The one logging set-up of both programs: per-component levels, JSON or console, Python's
own ``logging`` in the same stream, live changes; and the config that chooses them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import yaml

from sidecar.config.load import load_bootstrap
from sidecar.config.log_levels import LogLevels, parse_level_spec
from sidecar.config.reader import ConfigError
from sidecar.observability.log_writer import LogChannel, LogWriter
from sidecar.observability.logging import LevelTable, LogControl, configure_logging, log_control


class ListSink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass


@pytest.fixture
def events() -> Iterator[tuple[LogChannel, ListSink]]:
    """An events channel whose lines land in a list; structlog and the stdlib root logger are
    given back as they were afterwards."""
    saved = structlog.get_config()
    sink = ListSink()
    writer = LogWriter(sink, name="stdout")  # not started: lines wait in the channel
    channel = writer.channel("events")
    yield channel, sink
    if (running := log_control()) is not None:
        running.close()
    structlog.configure(**saved)


def written(channel: LogChannel, sink: ListSink) -> list[str]:
    writer = channel._writer
    writer.start()
    assert writer.close()
    return [line.rstrip("\n") for line in sink.lines]


# === config ==============================================================================


def test_level_spec_sets_a_default_and_components_and_refuses_unknown_levels() -> None:
    assert parse_level_spec("info,pake.control.push=debug") == LogLevels(
        "info", (("pake.control.push", "debug"),))
    assert parse_level_spec("pake.cluster=debug,warning") == LogLevels("warning", (("pake.cluster", "debug"),))
    assert str(parse_level_spec("error,b=info,a=debug")) == "error,a=debug,b=info"
    with pytest.raises(ValueError, match=r"'pake.push=verbose': must be one of debug, info, warning, error"):
        parse_level_spec("info,pake.push=verbose")
    with pytest.raises(ValueError, match=r"not a logger name"):
        parse_level_spec("pake..push=debug")


def write_bootstrap(tmp_path: Path, **body: object) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"service": "orders", "listeners": {"outbound": "127.0.0.1:0"},
                                    "mesh": "mesh.yaml", **body}))
    return path


def test_sidecar_yaml_takes_a_level_or_a_table_per_component(tmp_path: Path) -> None:
    boot = load_bootstrap(write_bootstrap(tmp_path))
    assert (boot.log_level, boot.log_format) == (LogLevels("info"), "auto")
    boot = load_bootstrap(write_bootstrap(tmp_path, log_level="warning", log_format="console"))
    assert (boot.log_level, boot.log_format) == (LogLevels("warning"), "console")
    boot = load_bootstrap(write_bootstrap(
        tmp_path, log_level={"default": "error", "pake.discovery": "warning", "pake.cluster": "debug"}))
    assert boot.log_level == LogLevels("error", (("pake.cluster", "debug"), ("pake.discovery", "warning")))


def test_bad_levels_and_formats_are_refused_naming_their_path(tmp_path: Path) -> None:
    path = write_bootstrap(tmp_path, log_level={"default": "loud", "pake.cluster": "verbose", "a b": "info"},
                           log_format="pretty")
    with pytest.raises(ConfigError) as err:
        load_bootstrap(path)
    assert sorted(err.value.problems) == [
        "log_format: must be one of auto, json, console, got 'pretty'",
        "log_level.a b: not a logger name (dotted words, e.g. pake.cluster), got 'a b'",
        "log_level.default: must be one of debug, info, warning, error, got 'loud'",
        "log_level.pake.cluster: must be one of debug, info, warning, error, got 'verbose'",
    ]
    with pytest.raises(ConfigError) as err:
        load_bootstrap(write_bootstrap(tmp_path, log_level=3))
    assert err.value.problems == ["log_level: must be one of debug, info, warning, error, got 3"]


# === levels ==============================================================================


def test_the_longest_configured_prefix_names_a_loggers_level_and_is_kept() -> None:
    table = LevelTable(LogLevels("warning", (("pake", "info"), ("pake.cluster", "debug"))))
    assert table["pake.cluster.health"] == logging.DEBUG
    assert table["pake.cluster"] == logging.DEBUG
    assert table["pake.clusters"] == logging.INFO  # a prefix ends at a dot
    assert table["pake.discovery"] == logging.INFO
    assert table["aiohttp"] == logging.WARNING
    assert dict(table) == {"pake.cluster.health": 10, "pake.cluster": 10, "pake.clusters": 20,
                           "pake.discovery": 20, "aiohttp": 30}  # resolved once per name


def test_per_component_levels_show_one_components_debug_and_hide_anothers(
        events: tuple[LogChannel, ListSink]) -> None:
    channel, sink = events
    configure_logging(channel, "info,pake.cluster=debug", "json", tty=False)
    structlog.get_logger("pake.cluster").debug("breaker_probe", cluster="orders")
    structlog.get_logger("pake.cluster.health").debug("health_probe")
    structlog.get_logger("pake.discovery").debug("control_message")  # hidden
    structlog.get_logger("pake.discovery").info("control_connected")
    lines = [json.loads(line) for line in written(channel, sink)]
    assert [(e["event"], e["logger"], e["level"]) for e in lines] == [
        ("breaker_probe", "pake.cluster", "debug"), ("health_probe", "pake.cluster.health", "debug"),
        ("control_connected", "pake.discovery", "info")]
    assert lines[0]["cluster"] == "orders" and lines[0]["timestamp"].endswith("Z")


def test_console_format_writes_readable_lines_without_colours_off_a_terminal(
        events: tuple[LogChannel, ListSink]) -> None:
    channel, sink = events
    configure_logging(channel, "info", "console", tty=False)
    structlog.get_logger("pake.sidecar").info("ready", ports={"admin": 15000})
    try:
        raise ValueError("bad filter")
    except ValueError:
        structlog.get_logger("pake.pipeline").exception("exchange_failed", request_id="r1", trace_id="t1")
    [ready, failed, *traceback] = written(channel, sink)
    assert "[info     ] ready" in ready and "[pake.sidecar]" in ready and "ports={'admin': 15000}" in ready
    assert "\x1b[" not in ready  # no colour codes in a file or a pipe
    assert "[error    ] exchange_failed" in failed and "request_id=r1" in failed and "trace_id=t1" in failed
    assert "ValueError: bad filter" in failed and not traceback  # one multi-line entry per event


def test_auto_is_console_on_a_terminal_and_json_elsewhere(events: tuple[LogChannel, ListSink]) -> None:
    channel, _ = events
    assert configure_logging(channel, "info", "auto", tty=True).rendered == "console"
    assert configure_logging(channel, "info", "auto", tty=False).rendered == "json"
    assert configure_logging(channel, "info", "json", tty=True).rendered == "json"


def test_stdlib_logging_from_asyncio_lands_in_the_stream_as_json(events: tuple[LogChannel, ListSink]) -> None:
    channel, sink = events
    configure_logging(channel, "info", "json", tty=False)

    async def main() -> None:
        def broken() -> None:
            raise RuntimeError("callback bug")

        asyncio.get_running_loop().call_soon(broken)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    logging.getLogger("aiohttp.access").info("GET / 200")  # stdlib below WARNING: not shown
    logging.getLogger("websockets.client").warning("connection %s closed", "c1")
    structlog.get_logger("pake.sidecar").info("stopped")
    lines = [json.loads(line) for line in written(channel, sink)]
    assert [(e["logger"], e["level"]) for e in lines] == [
        ("asyncio", "error"), ("websockets.client", "warning"), ("pake.sidecar", "info")]
    assert lines[0]["event"].startswith("Exception in callback")
    assert "RuntimeError: callback bug" in lines[0]["exception"]
    assert lines[1]["event"] == "connection c1 closed"


def test_a_component_level_opens_a_stdlib_logger_below_warning(events: tuple[LogChannel, ListSink]) -> None:
    channel, sink = events
    configure_logging(channel, "info,aiohttp.access=info", "json", tty=False)
    logging.getLogger("aiohttp.access").info("GET / 200")
    logging.getLogger("aiohttp.server").info("hidden")
    assert [json.loads(line)["event"] for line in written(channel, sink)] == ["GET / 200"]


def test_apply_changes_levels_and_format_live_and_a_command_line_format_stays(
        events: tuple[LogChannel, ListSink]) -> None:
    channel, sink = events
    control = configure_logging(channel, "info", "json", tty=False)
    assert log_control() is control
    log = structlog.get_logger("pake.admin")
    log.debug("admin_request", path="/a")  # hidden: info
    assert control.apply(parse_level_spec("info,pake.admin=debug"), "console") == [
        "log_level: info -> info,pake.admin=debug", "log_format: json -> console"]
    log.debug("admin_request", path="/b")  # the same (cached) logger, the new level and format
    assert control.apply(parse_level_spec("info,pake.admin=debug"), "console") == []
    lines = written(channel, sink)
    assert len(lines) == 2 and "logging_changed" in lines[0] and "path=/b" in lines[1]

    fixed = LogControl(LogLevels(), "json", tty=False, format_override="json")
    assert fixed.apply(LogLevels(), "console") == [] and fixed.rendered == "json"
    fixed.close()
