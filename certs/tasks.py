"""Stopping a background task: the one idiom for the sidecar and certs alike.

It lives in ``certs`` only because ``certs`` imports nothing of ours and everything else may
import ``certs``: it knows nothing of certificates. Pure asyncio, no state.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["stop_task"]


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished (its ``finally`` blocks included).

    What the task ends with, its own ``CancelledError`` or an error, is absorbed: a stop must
    not fail because the thing stopped did. A cancellation of the *caller* is not absorbed:
    ``gather`` re-raises it, so a stop never swallows the ``CancelledError`` of a shutdown.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
