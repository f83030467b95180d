"""One JSON line per exchange: who asked what, what happened, and why (the flag and reason).

Written with a plain ``write`` of a pre-formatted JSON line rather than through structlog's
processor chain: an access log line is on the hot path and its fields are fixed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from ..exchange import Exchange

__all__ = ["AccessLog"]


class AccessLog:
    def __init__(self, stream: TextIO | None = None, path: str = "stdout") -> None:
        if stream is None:
            stream = sys.stdout if path == "stdout" else open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._stream = stream

    def log(self, ex: Exchange, duration: float) -> None:
        head = ex.request
        record = {
            "event": "access",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "listener": ex.listener,
            "method": head.method,
            "authority": head.authority,
            "path": head.path,
            "status": ex.status,
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "duration_ms": round(duration * 1000, 3),
            "route": ex.route.name if ex.route is not None else "-",
            "cluster": ex.cluster,
            "upstream": ex.upstream,
            "attempts": ex.attempts,
            "flags": ex.flags,
            "request_id": ex.request_id,
            "client": ex.downstream_address,
        }
        if ex.peer_identity:
            record["peer"] = ex.peer_identity
        if ex.principal:
            record["principal"] = ex.principal
        if ex.reason:
            record["reason"] = ex.reason
        if ex.tags:
            record.update(ex.tags)
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._stream not in (sys.stdout, sys.stderr):
            self._stream.close()
