"""certs.tasks.stop_task: the one way the sidecar and certs stop a background task."""

from __future__ import annotations

import asyncio

import pytest

from certs.tasks import stop_task


async def test_stop_waits_for_the_task_to_clean_up() -> None:
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def worker() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.set()

    task = asyncio.create_task(worker())
    await started.wait()
    await stop_task(task)
    assert cleaned.is_set() and task.cancelled()


async def test_stop_absorbs_what_the_task_ended_with() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    await stop_task(task)  # a task that already failed: the stop does not
    await stop_task(None)
    assert isinstance(task.exception(), RuntimeError)


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    release = asyncio.Event()
    in_cleanup = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            in_cleanup.set()
            await release.wait()

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(task))
    await in_cleanup.wait()
    stopper.cancel()  # e.g. a shutdown that gives up waiting
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert task.done()
