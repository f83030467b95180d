"""Coverage-guided fuzz target: the upstream response parser and how we re-frame a response.

Checks as in tests/fuzz/test_response_parser.py. The first byte picks the read split and
whether the request was a HEAD. Run: ``python fuzz/response.py [-max_total_time=60]``.
"""

from __future__ import annotations

import _harness  # noqa: F401 - puts the repository on sys.path

from tests.fuzz.test_response_parser import check, parse, view


def one_input(data: bytes) -> None:
    at = data[0] % (len(data) + 1) if data else 0
    head_only = bool(data and data[0] & 0x80)
    whole, error = parse([data], head_only)
    split, split_error = parse([data[:at], data[at:]], head_only)
    assert (error is None) == (split_error is None), (error, split_error)
    if error is None:
        assert [view(h) for h in whole.heads] == [view(h) for h in split.heads]
        assert whole.body == split.body
    if not head_only:
        check(whole)


if __name__ == "__main__":
    _harness.run(one_input, "response")
