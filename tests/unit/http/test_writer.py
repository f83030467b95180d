"""Heads as they go on the wire: the status line keeps the upstream's reason, whatever it is."""

from __future__ import annotations

import pytest

from sidecar.http.writer import LengthLine, header_line, response_head


@pytest.mark.parametrize(("status", "reason", "line"), [
    (200, b"OK", b"HTTP/1.1 200 OK\r\n"),
    (404, b"Not Found", b"HTTP/1.1 404 Not Found\r\n"),
    (200, b"Fine", b"HTTP/1.1 200 Fine\r\n"),  # a non-standard reason is forwarded as it came
    (200, b"ok", b"HTTP/1.1 200 ok\r\n"),
    (404, b"OK", b"HTTP/1.1 404 OK\r\n"),  # the table's line is for its own status only
    (599, b"Custom", b"HTTP/1.1 599 Custom\r\n"),  # a status HTTPStatus does not know
    (799, b"Later", b"HTTP/1.1 799 Later\r\n"),  # past the table (the parser takes 100-999)
    (101, b"Switching Protocols", b"HTTP/1.1 101 Switching Protocols\r\n"),
    (200, b"-", b"HTTP/1.1 200 -\r\n"),
])
def test_the_status_line_carries_the_status_and_the_reason_given(status: int, reason: bytes, line: bytes) -> None:
    head = response_head(status, reason, [(b"x-a", b"1")], [header_line(b"content-length", b"0")])
    assert head == line + b"x-a: 1\r\ncontent-length: 0\r\n\r\n"


def test_a_length_line_is_made_again_only_when_the_length_changes() -> None:
    lengths = LengthLine()
    lines = [lengths.line(n) for n in (5, 5, 1024, 0, 0, 5, 10**12)]
    assert lines == [b"content-length: 5\r\n", b"content-length: 5\r\n", b"content-length: 1024\r\n",
                     b"content-length: 0\r\n", b"content-length: 0\r\n", b"content-length: 5\r\n",
                     b"content-length: 1000000000000\r\n"]
    assert lines[1] is lines[0] and lines[4] is lines[3]  # kept for a length asked again
