"""Hypothesis strategies for HTTP/1.1 messages: mostly well-formed heads with hostile parts
(CR, LF, NUL, obs-text, odd framing), then optionally mutated byte by byte, and split into
reads at random. Shared by the request and response property tests."""

from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["HEADER_NAMES", "body_framing", "header_values", "mutated", "reads", "splits_of"]

# Byte classes that parsers get wrong: separators, controls, obs-text, the framing words.
_VALUE_BYTES = b"aZ09 \t,;=-_./:\"\\\r\n\x00\x01\x0b\x0c\x7f\x80\xa0\xff"
_VALUE_WORDS = [b"chunked", b"gzip", b"identity", b"close", b"keep-alive", b"upgrade",
                b"100-continue", b"0", b"5", b"+5", b"-1", b"0x5", b"5 ", b" 5", b"5,5",
                b"99999999999999999999", b"websocket", b"x-a", b"orders", b"orders:80"]
HEADER_NAMES = [b"Host", b"host", b"HOST", b"Content-Length", b"content-length",
                b"Transfer-Encoding", b"transfer-encoding", b"Connection", b"Upgrade", b"Expect",
                b"TE", b"Trailer", b"Keep-Alive", b"Proxy-Connection", b"X-Request-ID",
                b"X-Forwarded-For", b"X-Forwarded-Proto", b"x-pake-principal",
                b"x-pake-peer-identity", b"x-a", b"X-B", b"x_user", b"Cookie", b"Accept",
                b"", b"x a", b"x:a", b"x\x00a", b"\xff", b"x\ta"]


def header_values() -> st.SearchStrategy[bytes]:
    words = st.lists(st.one_of(st.sampled_from(_VALUE_WORDS),
                               st.binary(max_size=4).map(bytes.hex).map(str.encode),
                               st.lists(st.sampled_from(list(_VALUE_BYTES)), max_size=4).map(bytes)),
                     max_size=3)
    return words.map(b"".join)


def body_framing(body: bytes, kind: str, ext: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Framing headers and the framed body for ``kind``: none, length (right or off by one),
    chunked (with a chunk extension), or both Content-Length and chunked."""
    if kind == "none":
        return [], b""
    if kind == "length":
        return [(b"Content-Length", b"%d" % len(body))], body
    if kind == "short":
        return [(b"Content-Length", b"%d" % max(len(body) - 1, 0))], body
    chunks = (b"%x%s\r\n%s\r\n" % (len(body), ext, body) if body else b"") + b"0\r\n\r\n"
    headers = [(b"Transfer-Encoding", b"chunked")]
    if kind == "both":
        headers.append((b"Content-Length", b"%d" % len(chunks)))
    return headers, chunks


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with up to three byte edits: insert, delete or replace, at random places."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(out)))
        what = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from(list(b"\r\n\x00 \t:;,0aZ\x7f\xff")))
        if what == "insert" or at == len(out):
            out.insert(at, byte)
        elif what == "delete":
            del out[at]
        else:
            out[at] = byte
    return bytes(out)


def splits_of(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, modulo its length) into reads."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


def reads() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 10_000), max_size=6)
