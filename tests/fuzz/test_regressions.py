"""Bugs the property tests found, each pinned by the smallest input that showed it."""

from __future__ import annotations

import pytest

from sidecar.errors import UpstreamProtocolError
from sidecar.http.writer import request_head

from .test_request_head import parse as parse_request
from .test_response_parser import parse as parse_response


def test_an_http10_request_without_host_is_forwarded_in_a_form_a_peer_accepts() -> None:
    """It was forwarded as HTTP/1.1 with ``host: `` (empty, as RFC 9112 §3.2 says for a
    target without authority), and the peer sidecar's parser answered 400 invalid Host."""
    sink, error, _ = parse_request([b"GET / HTTP/1.0\r\n\r\n"])
    assert error is None and sink.heads[0].authority == ""
    forwarded = request_head(sink.heads[0], [])
    assert forwarded == b"GET / HTTP/1.1\r\nhost: \r\n\r\n"
    again, error, _ = parse_request([forwarded])
    assert error is None and again.heads[0].authority == "" and again.ends == 1


def test_a_host_that_is_not_empty_is_still_checked() -> None:
    for bad in (b"a,b", b"a b", b"a/b"):
        _, error, _ = parse_request([b"GET / HTTP/1.1\r\nHost: " + bad + b"\r\n\r\n"])
        assert error is not None and error.status == 400


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
