"""The pusher's timing: a change after a quiet spell goes out at once (discovery is not held
back by the debounce), and a burst that follows it is still coalesced into one more push."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from control.push import Pusher


class NoEndpoints:
    def endpoints(self) -> dict[str, list[str]]:
        return {}


def pusher(debounce: float, max_delay: float) -> Pusher:
    # No config applied yet and no sessions: a push builds nothing, it is only counted.
    return Pusher(cast(Any, None), cast(Any, NoEndpoints()), cast(Any, None), lambda: {},
                  debounce=debounce, max_delay=max_delay)


async def pushes_reach(p: Pusher, count: int, timeout: float) -> float:
    """Seconds until ``p.pushes`` reaches ``count``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(timeout):
        while p.pushes < count:
            await asyncio.sleep(0.001)
    return loop.time() - start


async def test_a_change_after_quiet_goes_out_at_once_and_a_burst_after_it_is_coalesced() -> None:
    p = pusher(debounce=0.3, max_delay=2.0)
    task = asyncio.create_task(p.run())
    try:
        p.mark_dirty()  # e.g. a new endpoint registered, nothing pushed lately
        assert await pushes_reach(p, 1, timeout=0.2) < 0.1  # well inside the 0.3 s debounce

        for _ in range(5):  # a burst right after: one more push, once it has been quiet
            p.mark_dirty()
            await asyncio.sleep(0.01)
        waited = await pushes_reach(p, 2, timeout=2.0)
        assert waited >= 0.25
        await asyncio.sleep(0.35)
        assert p.pushes == 2

        p.mark_dirty()  # quiet again for longer than the debounce: at once again
        assert await pushes_reach(p, 3, timeout=0.2) < 0.1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
