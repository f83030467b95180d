"""Coverage-guided fuzz target: the downstream request parser and the head we forward.

The input is split into two reads at a point taken from its first byte; the checks are the
property tests' (tests/fuzz/test_request_head.py): only DownstreamProtocolError may escape,
the outcome does not depend on the split, and an accepted request forwards without CR, LF
or NUL, without both Content-Length and Transfer-Encoding, and re-parses identically.
Run: ``python fuzz/request_head.py [-max_total_time=60] [corpus dirs]``.
"""

from __future__ import annotations

import _harness  # noqa: F401 - puts the repository on sys.path

from tests.fuzz.test_request_head import check_forwarded, parse, view


def one_input(data: bytes) -> None:
    at = data[0] % (len(data) + 1) if data else 0
    whole, error, _ = parse([data])
    split, split_error, _ = parse([data[:at], data[at:]])
    assert (error is None) == (split_error is None), (error, split_error)
    if error is None:
        assert [view(h) for h in whole.heads] == [view(h) for h in split.heads]
        assert whole.bodies == split.bodies
    for head, body in zip(whole.heads[:whole.ends], whole.bodies):
        if head.upgrade is None:
            check_forwarded(head, body)


if __name__ == "__main__":
    _harness.run(one_input, "request_head")
