"""Deadline: one armed timer handle, cheap to push later, exact when it matters."""

from __future__ import annotations

import asyncio

from sidecar.deadline import Deadline


async def test_pushing_a_deadline_later_fires_once_at_the_new_time() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    done = asyncio.Event()
    deadline = Deadline(loop, lambda: (fired.append(loop.time()), done.set()))
    start = loop.time()
    deadline.set_in(0.05)
    deadline.set_in(0.15)  # later: recorded, the armed handle re-arms itself when it fires
    await asyncio.wait_for(done.wait(), 2)
    assert len(fired) == 1
    assert fired[0] - start >= 0.14


async def test_an_earlier_deadline_rearms_at_once() -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    deadline = Deadline(loop, done.set)
    start = loop.time()
    deadline.set_in(10)
    deadline.set_in(0.05)
    await asyncio.wait_for(done.wait(), 2)
    assert loop.time() - start < 5


async def test_a_cleared_deadline_never_fires() -> None:
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    deadline = Deadline(loop, lambda: fired.append(1))
    deadline.set_in(0.02)
    deadline.clear()
    other = asyncio.Event()
    Deadline(loop, other.set).set_in(0.1)  # a later one, to know the first had its chance
    await asyncio.wait_for(other.wait(), 2)
    assert fired == []
