"""What the real processes write: the sidecar and ``pakectl serve`` log through one structlog
set-up, JSON by default (stdout is a pipe here), console when asked, levels per component
(and, for the sidecar, changed live by SIGHUP); request-related lines carry the request id
and the trace id."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.control_process import ControlProcess, run_pakectl
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

_ROOT = Path(__file__).resolve().parents[2]
MESH = {"services": {"echo": {"endpoints": ["127.0.0.1:9"]}}}
BOOT: dict[str, Any] = {"service": "echo"}


async def lines_until(argv: list[str], marker: str, *, cwd: Path, timeout: float = 20.0) -> list[str]:
    """Run ``python -m <argv>`` until a stdout line holds ``marker`` (a console line: the
    JSON-waiting helpers cannot see it), then SIGTERM it; every stdout line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *argv, cwd=str(cwd), env={**os.environ, "PYTHONPATH": str(_ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while not lines or marker not in lines[-1]:
                line = await proc.stdout.readline()
                assert line, f"exited without {marker!r}: {(await proc.stderr.read()).decode()[-500:]}"
                lines.append(line.decode().rstrip("\n"))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout):
            rest, _ = await proc.communicate()
    return lines + rest.decode().splitlines()


async def admin_get(sc: SidecarProcess, path: str = "/healthz") -> None:
    async with aiohttp.ClientSession() as http, http.get(sc.admin + path) as resp:
        assert resp.status == 200


# === the sidecar =========================================================================


async def test_sidecar_writes_json_by_default_with_each_lines_component(tmp_path: Path) -> None:
    async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=MESH) as sc:
        [ready] = sc.events("ready")
    assert (ready["logger"], ready["level"]) == ("pake.sidecar", "info")
    assert ready["timestamp"].endswith("Z")
    assert all(isinstance(line, dict) for line in sc.lines)  # nothing but JSON lines
    assert sc.events("stopped")[-1]["logger"] == "pake.sidecar"


async def test_sidecar_writes_console_lines_from_sidecar_yaml_or_the_command_line(tmp_path: Path) -> None:
    sc = SidecarProcess(tmp_path, bootstrap={**BOOT, "log_format": "console"}, mesh=MESH, name="yaml")
    sc.write_config()
    lines = await lines_until(["sidecar", "run", "-c", str(sc.config_path)], " ready ", cwd=sc.dir)
    ready = next(line for line in lines if " ready " in line)
    assert "[info     ] ready" in ready and "[pake.sidecar]" in ready and "ports={" in ready
    assert not any(line.startswith("{") for line in lines)  # no JSON lines among them
    assert any("[info     ] stopped" in line for line in lines)

    # --log-format wins over sidecar.yaml's log_format
    sc = SidecarProcess(tmp_path, bootstrap={**BOOT, "log_format": "json"}, mesh=MESH, name="flag")
    sc.write_config()
    lines = await lines_until(["sidecar", "run", "-c", str(sc.config_path), "--log-format", "console"],
                              " ready ", cwd=sc.dir)
    assert any("[info     ] ready" in line for line in lines)


async def test_sidecar_levels_per_component_show_one_debug_and_hide_another(tmp_path: Path) -> None:
    boot = {**BOOT, "log_level": {"default": "info", "pake.admin": "debug"}}
    async with SidecarProcess(tmp_path, bootstrap=boot, mesh=MESH) as sc:
        # pake.logging's debug line comes before "ready" (one queue, in order): hidden
        assert not sc.events("logging_configured")
        await admin_get(sc)
        [shown] = await sc.wait_for_event("admin_request")
    assert (shown["logger"], shown["level"], shown["path"], shown["status"]) == (
        "pake.admin", "debug", "/healthz", 200)

    async with SidecarProcess(tmp_path, bootstrap={**BOOT, "log_level": "debug"}, mesh=MESH,
                              name="all-debug") as sc:
        [configured] = sc.events("logging_configured")  # the same line, shown at debug
    assert configured["levels"] == "debug" and configured["format"] == "json"


async def test_sighup_changes_the_log_level_live(tmp_path: Path) -> None:
    async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=MESH) as sc:
        await admin_get(sc)  # at info: no admin_request line
        sc.write_config(bootstrap={**sc.bootstrap, "log_level": {"default": "info", "pake.admin": "debug"}})
        sc.send_signal(signal.SIGHUP)
        [changed] = await sc.wait_for_event("logging_changed")
        [reloaded] = sc.events("reloaded")
        assert not sc.events("admin_request")  # before the reload's lines: never logged
        assert changed["changes"] == ["log_level: info -> info,pake.admin=debug"]
        assert reloaded["restart_required"] == 0 and not sc.events("restart_required")
        await admin_get(sc, "/readyz")
        [shown] = await sc.wait_for_event("admin_request")
        assert shown["path"] == "/readyz"


async def test_a_request_related_line_carries_the_request_and_trace_ids(tmp_path: Path) -> None:
    """rbac_dry_run_deny is about one exchange: its ids match the access-log line's."""
    async with RecordingUpstream() as app:
        boot = {"service": "echo", "app": app.address,
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}, "admin": "127.0.0.1:0"},
                "tracing": {"endpoint": "http://127.0.0.1:9", "sample": "100%", "interval": "20ms",
                            "timeout": "200ms"}}  # nobody there
        mesh = {"services": {"echo": {"endpoints": [app.address],
                                      "policy": {"default": "deny", "dry_run": True, "rules": []}}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc, aiohttp.ClientSession() as http:
            async with http.get(sc.url("inbound") + "/orders/1", headers={"host": "echo"}) as resp:
                assert resp.status == 200  # dry run: recorded, not enforced
                request_id = resp.headers["x-request-id"]
            [line] = await sc.wait_for_event("rbac_dry_run_deny")
    access = next(a for a in sc.lines if isinstance(a, dict) and "flags" in a and a.get("request_id") == request_id)
    assert line["request_id"] == request_id and line["logger"] == "pake.filters.rbac"
    assert line["trace_id"] is not None and line["trace_id"] == access["trace_id"]


# === the control plane ===================================================================


async def test_pakectl_serve_writes_structlog_json_lines(tmp_path: Path) -> None:
    async with ControlProcess(tmp_path / "state", "--log-level", "info,pake.control=debug") as cp:
        [serving] = cp.events("serving")
    assert (serving["logger"], serving["level"]) == ("pake.control.server", "info")
    assert serving["timestamp"].endswith("Z")
    assert all(isinstance(line, dict) for line in cp.lines)
    assert cp.events("stopped")[-1]["logger"] == "pake.control.server"


async def test_pakectl_serve_writes_console_lines_when_asked(tmp_path: Path) -> None:
    argv = ["control", "serve", "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--log-format", "console", "--log-level",
            "warning,pake.control.server=info"]
    lines = await lines_until(argv, " serving ", cwd=_ROOT)
    serving = next(line for line in lines if " serving " in line)
    assert "[info     ] serving" in serving and "[pake.control.server]" in serving
    assert not any(line.startswith("{") for line in lines)
    # warning elsewhere: other components' info lines are not shown
    assert all("[pake.control.server]" in line for line in lines if "[info     ]" in line)


async def test_pakectl_serve_refuses_an_unknown_level(tmp_path: Path) -> None:
    result = await run_pakectl("serve", "--state-dir", str(tmp_path), "--log-level", "info,pake.control=loud")
    assert result.code == 2
    assert "--log-level: 'pake.control=loud': must be one of debug, info, warning, error" in result.stderr
