"""``pake-sidecar wait-ready``: block until the local sidecar can carry its app's traffic.

Run from an app's start command, a systemd ``ExecStartPre`` or a Kubernetes exec probe, so it
uses the standard library only, no event loop and no threads: it starts fast and holds nothing.
It asks the admin ``/readyz`` with a short, growing pause between tries, each try bounded by
what is left of the timeout.

"Ready" here is the sidecar's own part of ``/readyz``: listening, holding a config and a
certificate, not draining. The local app's health check is left out on purpose: the app is
the one waiting, so a sidecar that marks it unhealthy because it has not started yet must
not keep it from starting (a deadlock Istio users know as "the app waits for the proxy,
which waits for the app").
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Readiness", "judge", "probe", "wait_ready"]

_FIRST_PAUSE = 0.05  # seconds between tries, doubling up to _MAX_PAUSE
_MAX_PAUSE = 0.5
_MAX_TRY = 2.0  # a single try never waits longer than this, nor than what is left


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    detail: str  # why not, for the timeout message (or what was seen when ready)


def judge(status: int, body: bytes) -> Readiness:
    """Pure: a ``/readyz`` answer -> whether the sidecar is ready for its app."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Readiness(False, f"/readyz answered {status} without the sidecar's JSON")
    if status == 200 and data.get("ready") is True:
        return Readiness(True, "ready")
    if data.get("draining"):
        return Readiness(False, "draining")
    if not data.get("config"):
        return Readiness(False, "no config yet (waiting for the control plane or the mesh file)")
    if not data.get("certificate"):
        return Readiness(False, "no certificate yet")
    if data.get("app_healthy") is False:
        return Readiness(True, "ready (the local app fails its health check: it may not be started yet)")
    return Readiness(False, f"/readyz answered {status}: {json.dumps(data, sort_keys=True)[:200]}")


def probe(host: str, port: int, timeout: float) -> Readiness:
    """One ``GET /readyz``; a connection that fails is "not ready", with the reason."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/readyz", headers={"connection": "close"})
        response = conn.getresponse()
        body = response.read(64 * 1024)  # the admin's answer is small; never read without a bound
        return judge(response.status, body)
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return Readiness(False, f"cannot reach the admin: {reason}")
    finally:
        conn.close()


def wait_ready(host: str, port: int, timeout: float, *,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> Readiness:
    """Try until ready or ``timeout`` seconds have passed; the last answer either way."""
    deadline = clock() + timeout
    pause = _FIRST_PAUSE
    while True:
        left = deadline - clock()
        seen = probe(host, port, min(max(left, 0.05), _MAX_TRY))
        left = deadline - clock()
        if seen.ready or left <= 0:
            return seen
        sleep(min(pause, left))
        pause = min(pause * 2, _MAX_PAUSE)
