"""One sidecar runs next to every service, so what it loads is paid for many times over:
it never imports aiohttp, and a feature that is not configured is not imported."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import httptools
import pytest

from sidecar import compiled
from tests.helpers.pki import make_test_pki
from tests.integration.test_mtls import inbound_sidecar
from tests.helpers.raw_client import RawClient
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

# Loaded by nothing a sidecar needs: a Retry-After date is read without email.utils (email,
# calendar, quopri...), the hot path's form is told without importlib.abc (which brings
# importlib.resources, tempfile, shutil and the compression modules), the command line reads
# the terminal's width without shutil, certificates load without tempfile, and the compiled
# modules' file suffix comes from the import system, not sysconfig's build-time data.
NOT_LOADED = ("email", "calendar", "importlib.resources", "tempfile", "shutil", "bz2", "lzma", "sysconfig",
              "_sysconfigdata__linux_x86_64-linux-gnu")
SIDECAR_IMPORTS = """
import json, sys
import uvloop
from sidecar.__main__ import build_parser
build_parser().parse_args(["run", "-c", "sidecar.yaml"])
from sidecar.config.load import load_bootstrap, load_mesh
from sidecar.observability.log_writer import LogOutputs
from sidecar.observability.logging import configure_logging
from sidecar.app import Sidecar
print(json.dumps(sorted(sys.modules)))
"""

async def test_a_plain_sidecar_loads_neither_aiohttp_nor_tls_nor_jwt_code(tmp_path: Path) -> None:
    async with RecordingUpstream() as app:
        boot = {"service": "orders", "app": app.address,
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}, "admin": "127.0.0.1:0"}}
        mesh = {"services": {"orders": {"endpoints": []}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc:
            assert sc.proc is not None
            maps = Path(f"/proc/{sc.proc.pid}/maps").read_text()
            rollup = Path(f"/proc/{sc.proc.pid}/smaps_rollup").read_text()
    assert "aiohttp" not in maps  # aiohttp's C extensions would be mapped if it were imported
    assert "cryptography" not in maps  # the rust bindings of cryptography (TLS identities, JWT)
    # structlog imports greenlet when it is installed (here, for playwright): 1.1 MB, unused
    assert "greenlet" not in maps and "libstdc++" not in maps
    kb = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]
          if line.endswith(" kB")}
    # What each sidecar alone costs the host: the pages it wrote (objects, heap, buffers),
    # 20.2-20.5 MB measured. Clean pages of files (libpython, uvloop, the compiled hot path's
    # libraries) are the page cache, shared by every sidecar on the host.
    assert kb["Private_Dirty"] < 24 * 1024, f"an idle plain sidecar wrote {kb['Private_Dirty']} kB"
    # All of it: 34.5 MB as Python, 36.2 MB compiled (+2.1 MB of library code mapped, -0.4 MB
    # written: compiled modules hold no bytecode).
    assert kb["Rss"] < 37 * 1024, f"an idle plain sidecar uses {kb['Rss']} kB"


async def test_an_mtls_sidecar_maps_no_compression_module(tmp_path: Path) -> None:
    """Its contexts load our identity from memory (a memfd), not through ``tempfile``, whose
    ``shutil`` brings bz2 and lzma: 0.55 MB of each mTLS sidecar's memory."""
    pki = make_test_pki(tmp_path / "pki", services=["echo"])
    async with RecordingUpstream() as app, \
            inbound_sidecar(tmp_path, pki.services["echo"], app.address) as sc:
        assert sc.proc is not None
        maps = Path(f"/proc/{sc.proc.pid}/maps").read_text()
        modules = {line.rsplit("/", 1)[-1].split(".")[0] for line in maps.splitlines() if ".so" in line}
    assert "_ssl" in modules and "_rust" in modules  # TLS and cryptography are loaded here
    assert not modules & {"_bz2", "_lzma"}, sorted(modules & {"_bz2", "_lzma"})


def test_a_sidecar_imports_no_module_it_has_no_use_for() -> None:
    # what `pake-sidecar run` imports before its loop starts (sidecar/__main__.py)
    out = subprocess.run([sys.executable, "-c", SIDECAR_IMPORTS], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    loaded = set(json.loads(out))
    assert "sidecar.app" in loaded
    assert not loaded & set(NOT_LOADED), sorted(loaded & set(NOT_LOADED))


async def test_the_ready_line_says_which_form_of_the_hot_path_runs(tmp_path: Path) -> None:
    """Compiled when built (and not opted out with PAKE_PURE_PYTHON=1), and then the compiled
    hot path's library is what the process mapped; Python otherwise. The suite runs both ways."""
    expected = compiled.expected_form()
    async with RecordingUpstream() as app:
        boot = {"service": "orders", "app": app.address,
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh={"services": {"orders": {}}}) as sc:
            assert sc.proc is not None
            maps = Path(f"/proc/{sc.proc.pid}/maps").read_text()
            [ready] = sc.events("ready")
    assert ready["hot_path"] == expected
    # the hot path's library: a module imported by another of its library (the pipeline, by
    # the listener's connection) is set up inside it, without its own extension file
    assert ("/sidecar/_compiled__mypyc." in maps) == (expected == "compiled")
    assert not sc.events("compiled_form_stale")
    assert not sc.events("wire_helpers_unavailable")  # built here, for this CPU


class _BulkUpstream(asyncio.Protocol):
    """Answers a GET with ``body`` and a POST, once its body has come, with ``ok``."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        body = self.body if self.parser.get_method() == b"GET" else b"ok"
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        self.transport.write(body)


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


async def _relay(port: int, method: bytes, body: bytes, times: int) -> int:
    """``times`` requests on one connection; the response bytes read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = 0
    for _ in range(times):
        writer.write(b"%s / HTTP/1.1\r\nhost: orders\r\ncontent-length: %d\r\n\r\n" % (method, len(body)))
        writer.write(body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while length:
            chunk = await reader.read(min(length, 1 << 20))
            assert chunk, "the sidecar closed mid-body"
            length -= len(chunk)
            got += len(chunk)
    writer.close()
    return got


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap's pad is glibc's")
async def test_a_large_body_relayed_does_not_grow_the_heap_at_every_read(tmp_path: Path) -> None:
    """A plain connection's reads arrive as bytes objects of up to 256 KiB, and the parser
    copies a body out of each: without the heap's top pad (sidecar/heap.py) glibc gave the
    memory back after every read and took fresh pages for the next, ~330 page faults and
    three times the CPU a MiB relayed. Both ways: a download (the upstream connection reads)
    and an upload (the downstream one). The pad is set at the first large read: a sidecar
    that has seen only small requests has not loaded ``ctypes`` to set it."""
    mib = 16
    body = b"x" * (mib << 20)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _BulkUpstream(body), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        boot = {"service": "orders", "app": f"127.0.0.1:{port}",
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh={"services": {"orders": {}}}) as sc:
            assert sc.proc is not None
            inbound = sc.ports["inbound"]
            maps = Path(f"/proc/{sc.proc.pid}/maps")
            assert await _relay(inbound, b"POST", b"x" * 1000, 20) == 20 * 2
            assert "_ctypes" not in maps.read_text()
            for method, payload in ((b"GET", b""), (b"POST", body)):
                await _relay(inbound, method, payload, 1)  # the heap grows once, to its working size
                before = _minor_faults(sc.proc.pid)
                got = await _relay(inbound, method, payload, 4)
                faults = _minor_faults(sc.proc.pid) - before
                assert got == (4 * len(body) if method == b"GET" else 8)
                assert faults < 4 * mib * 10, f"{method.decode()}: {faults} page faults for {4 * mib} MiB"
            assert "_ctypes" in maps.read_text()
    finally:
        server.close()
        await server.wait_closed()


# what a module built for SSE4.2 says on a CPU without it (sidecar/http/_wire.c)
_REFUSED = ("sidecar.http._wire was built for SSE4.2 and this CPU has none: rebuild it here "
            "(python -m sidecar.compiled build)")
_REFUSING_WIRE = f"""
import sys

class RefuseWire:
    def find_spec(self, name, path=None, target=None):
        if name == "sidecar.http._wire":
            raise ImportError({_REFUSED!r})
        return None

sys.meta_path.insert(0, RefuseWire())
"""


async def test_a_compiled_sidecar_without_the_wire_helpers_serves_and_warns_why(tmp_path: Path) -> None:
    """A build copied to a CPU it was not built for: the C helpers refuse to load, the
    parsers call Python a header line (correct, ~40% slower on a realistic exchange), and
    the sidecar says so once it is ready, with the module's reason."""
    if compiled.expected_form() != "compiled":
        pytest.skip("the compiled form is not what runs here")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_REFUSING_WIRE)
    root = Path(__file__).resolve().parents[2]
    async with RecordingUpstream() as app:
        boot = {"service": "orders", "app": app.address,
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh={"services": {"orders": {}}},
                                  env={"PYTHONPATH": f"{hooks}{os.pathsep}{root}"}) as sc:
            client = await RawClient.open(sc.ports["inbound"])
            status, _, body = await client.get("/orders/1", b"X-Custom: kept\r\n", host=b"orders")
            await client.close()
            [warning] = sc.events("wire_helpers_unavailable")
            [ready] = sc.events("ready")
    assert (status, body) == (200, b"ok")
    assert warning["reason"] == _REFUSED
    assert ready["hot_path"] == "compiled"
    assert b"\r\nx-custom: kept\r\n" in app.received  # forwarded as by the C parser
