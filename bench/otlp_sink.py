"""``python -m bench.otlp_sink``: an OTLP/HTTP collector stand-in for the tracing benchmark.

Answers every POST with 200 and an empty protobuf body (a valid ExportTraceServiceResponse)
and counts what it got, so a traced sidecar's export thread does its real work (encode, post)
against a collector that keeps up. Prints ``PORT <n>``. Stdlib only, threads.
"""

from __future__ import annotations

import argparse
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.otlp_sink")
    p.add_argument("--port", type=int, default=0)
    server = ThreadingHTTPServer(("127.0.0.1", p.parse_args().port), _Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
