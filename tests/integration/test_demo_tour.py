"""``make demo-tour`` (``python -m examples.pake.tour``) end to end: the whole PAKE mesh comes
up under its control plane, every step of the narrative shows what it says, the tour exits
0, and no process of it is left behind. ``--any-ports`` and a temporary ``--state-dir``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tests.integration.test_demo_control import DemoProcess, alive, descendants


async def test_the_tour_walks_the_mesh_and_exits_0_leaving_nothing_behind(tmp_path: Path) -> None:
    tour = await DemoProcess("examples.pake.tour", tmp_path / "state").start()
    try:
        await tour.until(r"\[demo\] up in", 90)
        assert tour.proc is not None
        children = descendants(tour.proc.pid)  # the control plane, the apps, 10 sidecars
        assert len(tour.pids) == 12 and tour.pids <= children
        code = await tour.finish(timeout=120)
        text = "\n".join(tour.lines)
        assert code == 0, text[-3000:]
        assert "✘" not in text
        for expected in (
                "-> 200 in",                                             # a valid JWT
                "-> 401 unauthenticated",                                 # none
                "rule 'models-only-for-knowledge' denies GET /answer "
                "from spiffe://pake.local/service/cache",                 # forbidden, rule named
                "a 429 says Retry-After",                                  # rate limit
                "flags UO",                                               # the breaker opened
                "✔ the breakers closed again",                            # and recovered
                "v2 got",                                                 # the canary measured
                "renewed 10 of 10 certificates",                          # rotation under traffic
                "0 failed",
                "/dashboard -> Traces ->",
                "authz deny rule models-only-for-knowledge",              # audit received it
                "[demo] tour complete"):
            assert expected in text, expected
        # the trace's call to the model: ai, or ai-canary when the split sent it there (1 in 10)
        assert re.search(r"knowledge: GET ai(-canary)? \(CLIENT\)", text), text[-3000:]
        assert tour.lines[-1] == "[demo] stopped"
        left = [pid for pid in children if alive(pid)]
        assert not left, f"left behind: {left}"
    finally:
        await tour.kill()
