"""The PAKE demo's services as small aiohttp apps (filled in with the PAKE mesh)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

__all__ = ["APPS"]

APPS: dict[str, Callable[[], web.Application]] = {}
