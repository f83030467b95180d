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
    draws: list[int] = []
    source = random.Random(7)

    def draw(bits: int) -> int:
        value = source.getrandbits(bits)
        draws.append(value)
        return value

    ids = RequestIds(draw)
    first = [ids.take() for _ in range(RequestIds.BATCH)]
    assert len(draws) == 1  # one draw for a whole batch
    digits = RequestIds.BATCH * 32
    assert "".join(first) == format(draws[0], f"0{digits}x")
    assert first[0] == format(draws[0] >> (digits * 4 - 128), "032x")  # the top 128 bits first
    ids.take()
    assert len(draws) == 2  # the batch's end draws the next


def test_two_sources_do_not_repeat_each_other() -> None:
    # every listener has its own: ids of two listeners of one sidecar must not collide
    a, b = RequestIds(), RequestIds()
    assert not {a.take() for _ in range(200)} & {b.take() for _ in range(200)}
