"""Bugs the property tests found, each pinned by the smallest input that showed it."""

from __future__ import annotations

import pytest

from sidecar.errors import UpstreamProtocolError

from .test_response_parser import parse as parse_response


@pytest.mark.parametrize("status", [b"099", b"000", b"001"])
def test_an_upstream_status_below_100_is_refused(status: bytes) -> None:
    """llhttp read ``099`` as 99; forwarded downstream as ``HTTP/1.1 99``, not a status line."""
    sink, error = parse_response([b"HTTP/1.1 " + status + b" OK\r\ncontent-length: 0\r\n\r\n"])
    assert isinstance(error, UpstreamProtocolError) and sink.heads == []


@pytest.mark.parametrize("reason", [b"a\x00b", b"a\x01", b"\x1b[31m", b"x\x7f"])
def test_control_characters_in_an_upstream_reason_are_refused(reason: bytes) -> None:
    """They were forwarded downstream as received (a NUL in the status line)."""
    sink, error = parse_response([b"HTTP/1.1 200 " + reason + b"\r\ncontent-length: 0\r\n\r\n"])
    assert isinstance(error, UpstreamProtocolError) and sink.heads == []
    ok, error = parse_response([b"HTTP/1.1 200 Fine\tby me caf\xc3\xa9\r\ncontent-length: 0\r\n\r\n"])
    assert error is None and ok.heads[0].reason == b"Fine\tby me caf\xc3\xa9"


def test_a_second_response_in_the_same_read_is_refused() -> None:
    """Found by the atheris target fuzz/response.py: after ``100 Continue`` and a ``204``, a
    second ``204`` in the same read reached the sink as another response head to the one
    request (and in a later read it is refused): the upstream is out of sync either way."""
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n\r\n")
    sink, error = parse_response([data])
    assert isinstance(error, UpstreamProtocolError)
    assert len(sink.heads) == 1 and sink.ends == 1  # the first response, and only it
