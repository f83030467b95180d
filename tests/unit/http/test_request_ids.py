"""The ids a sidecar gives requests without one: 128 random bits as 32 hex digits, every one
different, the header's bytes the same as the logs' text."""

from __future__ import annotations

import random
import re

from sidecar.http.headers import RequestIds


def test_ids_are_32_hex_digits_all_different_and_raw_is_the_same_text() -> None:
    ids = RequestIds()
    seen = set()
    for _ in range(RequestIds.BATCH * 3 + 5):  # across batches
        text = ids.take()
        assert re.fullmatch("[0-9a-f]{32}", text), text
        assert ids.raw == text.encode()
        seen.add(text)
    assert len(seen) == RequestIds.BATCH * 3 + 5


def test_each_id_is_the_next_128_bits_of_one_draw_per_batch() -> None:
    draws: list[bytes] = []
    source = random.Random(7)

    def draw(n: int) -> bytes:
        value = source.randbytes(n)
        draws.append(value)
        return value

    ids = RequestIds(draw)
    first = [ids.take() for _ in range(RequestIds.BATCH)]
    assert len(draws) == 1 and len(draws[0]) == RequestIds.BATCH * 16  # one draw for a whole batch
    assert "".join(first) == draws[0].hex()
    assert first[0] == draws[0][:16].hex()  # the first 16 bytes first
    ids.take()
    assert len(draws) == 2  # the batch's end draws the next


def test_a_short_id_is_cut_from_the_same_batch_and_one_that_does_not_fit_draws_anew() -> None:
    draws: list[bytes] = []
    source = random.Random(8)

    def draw(n: int) -> bytes:
        draws.append(source.randbytes(n))
        return draws[-1]

    ids = RequestIds(draw)
    taken = ""
    for _ in range(RequestIds.BATCH * 32 // 48):  # 42 exchanges: a span's 16 digits, a trace's 32
        span = ids.take(16)
        assert re.fullmatch("[0-9a-f]{16}", span) and ids.raw == span.encode()
        taken += span + ids.take()
    batch = draws[0].hex()
    assert len(draws) == 1 and taken == batch[:len(taken)] and len(batch) - len(taken) == 32
    assert ids.take(16) == batch[-32:-16]  # 16 left then: a trace id does not fit
    trace = ids.take()
    assert len(draws) == 2 and trace == draws[1].hex()[:32]  # a new batch, from its start
    assert ids.raw == trace.encode()


def test_two_sources_do_not_repeat_each_other() -> None:
    # every listener has its own: ids of two listeners of one sidecar must not collide
    a, b = RequestIds(), RequestIds()
    assert not {a.take() for _ in range(200)} & {b.take() for _ in range(200)}
