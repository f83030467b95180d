"""The parsers' header-name tables answer exactly as the dicts they are built from, for
every name a client could send: what a table gets wrong turns one header into another."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http.headers import NameTable
from sidecar.http.request_parser import _KNOWN
from sidecar.http.response_parser import _RESPONSE_NAMES

TABLES = [pytest.param(_KNOWN, id="request"), pytest.param(_RESPONSE_NAMES, id="response")]


@pytest.mark.parametrize("entries", TABLES)
def test_every_name_and_its_near_misses_answer_as_the_dict(entries: dict[bytes, object]) -> None:
    table = NameTable(entries)
    probes = [b"", b"\xff", b"\xe9tag", b"x" * 300]
    for name in entries:
        probes += [name, name.upper(), name + b"x", name[:-1], name[:-1] + b"\x00", b"\x80" + name[1:],
                   bytes([name[0] ^ 0x20]) + name[1:]]
    for probe in probes:
        assert table.get(probe) == entries.get(probe), probe


@pytest.mark.parametrize("entries", TABLES)
@given(name=st.binary(max_size=40))
def test_any_bytes_answer_as_the_dict(entries: dict[bytes, object], name: bytes) -> None:
    assert NameTable(entries).get(name) == entries.get(name)


def test_a_name_that_is_not_ascii_cannot_be_an_entry() -> None:
    with pytest.raises(ValueError, match="must be non-empty ASCII"):
        NameTable({b"\xe9tag": 1})
