"""The CLI's side of the admin API: blocking stdlib HTTP (a CLI has nothing else to do meanwhile).

``AdminClient(address, token)`` -> ``.get(path)``, ``.post(path, body)`` return
(status, JSON); ``.stream(path, body)`` yields NDJSON lines as they arrive (certs rotate's
progress). An unreachable control plane is an ``AdminUnreachable`` with the address in it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["AdminClient", "AdminUnreachable", "DEFAULT_ADMIN"]

DEFAULT_ADMIN = "127.0.0.1:15014"
TIMEOUT = 30.0


class AdminUnreachable(Exception):
    pass


class AdminClient:
    def __init__(self, address: str = DEFAULT_ADMIN, token: str | None = None,
                 timeout: float = TIMEOUT) -> None:
        self.base = address if address.startswith("http") else f"http://{address}"
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_args(cls, address: str, token_file: Path | None) -> AdminClient:
        token = os.environ.get("PAKECTL_ADMIN_TOKEN")
        if token_file is not None:
            token = token_file.read_text().strip()
        return cls(address, token)

    def _request(self, method: str, path: str, body: Any = None) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return urllib.request.Request(self.base + path, data=data, method=method, headers=headers)

    def _open(self, request: urllib.request.Request, timeout: float) -> Any:
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            return exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminUnreachable(
                f"cannot reach the control plane's admin API at {self.base}: {reason}") from None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        with self._open(self._request(method, path, body), self.timeout) as response:
            raw = response.read()
            status = response.status if hasattr(response, "status") else response.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, {"error": "bad_response", "detail": raw[:200].decode(errors="replace")}

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        return self.call("POST", path, {} if body is None else body)

    def stream(self, path: str, body: Any, timeout: float) -> Iterator[dict[str, Any]]:
        with self._open(self._request("POST", path, body), timeout) as response:
            status = response.status if hasattr(response, "status") else response.code
            if status != 200:
                raise AdminUnreachable(f"{path}: HTTP {status}: {response.read()[:200]!r}")
            for line in response:
                if line.strip():
                    yield json.loads(line)
