"""The overload rule (sidecar.overload.overloaded) and the config keys that feed it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.config.load import load_bootstrap
from sidecar.config.model import OverloadConfig
from sidecar.config.reader import ConfigError
from sidecar.overload import overloaded, read_rss


def test_memory_then_loop_lag_then_nothing() -> None:
    config = OverloadConfig(max_memory=1000, max_loop_lag=0.5)
    assert overloaded(config, 1000, 0.9) == "memory"
    assert overloaded(config, 999, 0.5) == "loop_lag"
    assert overloaded(config, 999, 0.49) is None
    assert overloaded(OverloadConfig(max_memory=None, max_loop_lag=None), 10**12, 100.0) is None


def test_rss_is_read_from_statm() -> None:
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        assert 1 << 20 < read_rss(fd) < 1 << 34
    finally:
        os.close(fd)


def _bootstrap(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text("service: app\nmesh: mesh.yaml\nlisteners: {outbound: 127.0.0.1:0}\n" + extra)
    return path


def test_overload_and_caps_keys(tmp_path: Path) -> None:
    b = load_bootstrap(_bootstrap(tmp_path, "overload: {max_memory: 512MiB, max_loop_lag: off, interval: 100ms}\n"
                                            "limits: {max_total_connections: 30, max_tls_handshakes: 7}\n"))
    assert b.overload == OverloadConfig(max_memory=512 << 20, max_loop_lag=None, interval=0.1)
    assert (b.limits.max_total_connections, b.limits.max_tls_handshakes) == (30, 7)
    assert load_bootstrap(_bootstrap(tmp_path, "overload: {max_memory: off}\n")).overload.max_memory is None


def test_a_bad_overload_value_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_bootstrap(_bootstrap(tmp_path, "overload: {max_memory: lots, interval: 1ms}\nlimits: {max_tls_handshakes: 0}\n"))
    text = str(err.value)
    assert "overload.max_memory" in text and "overload.interval" in text and "limits.max_tls_handshakes" in text
